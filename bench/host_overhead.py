"""Host time of a train step: the v2 Stage B's 148 blocks at a width where their arithmetic is nothing.

On a GPU the host launches every kernel of a step; when it launches them more slowly than the GPU runs
them, the GPU waits (docs/benchmarks.md: the v2 Stage B compiled per block ran 65 samples/s, and 128
once the same step was replayed as a CUDA graph). This script measures the host's share on any machine:
the v2 Stage B's levels, block counts and pattern, with 8 to 32 channels and a 16x16 latent, so that a
step's time is the Python, dispatch and launch work around the kernels. Eager, compiled per block (the
training loop's ``compile``, with and without a memory budget) and compiled whole, each in its own
process, with dynamo's counters (graphs, graph breaks, compilations during the timed steps).

    python bench/host_overhead.py                       # CPU
    python bench/host_overhead.py --device cuda         # what the host costs a GPU step
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipelines.trainable.stage_b import STAGE_B  # noqa: E402
from pipelines.training.parallel import compile_blocks  # noqa: E402
from stages.diffusion import CosineDiffusion, DiffusionConfig  # noqa: E402
from stages.stage_b import STAGE_B_CONFIGS, StageB  # noqa: E402

VARIANTS = ("eager", "per-block", "per-block+budget", "whole")


def narrow_v2():
    """v2's structure (4 levels, blocks 4/4/14/4, CT/CTA/CTA/CTA) at 8 to 32 channels."""
    return dataclasses.replace(STAGE_B_CONFIGS["v2"](), c_cond=16, c_hidden=(8, 16, 32, 32), nhead=(-1, 2, 2, 2),
                               clip_embd=16)  # fmt: skip


def measure(variant: str, device: str, steps: int) -> dict:
    """One variant's median step time after two warm-up steps; in its own process."""
    torch.set_num_threads(1)  # the host's one Python thread is what is measured, not kernels
    torch.manual_seed(0)
    model = StageB(narrow_v2()).to(device).train()
    if variant == "per-block":
        forward = compile_blocks(model, STAGE_B.parallelism)
    elif variant == "per-block+budget":
        forward = compile_blocks(model, STAGE_B.parallelism, (0.3, 0.4, 0.6, 0.5))
    elif variant == "whole":
        forward = torch.compile(model, dynamic=False)
    else:
        forward = model
    optimizer = torch.optim.AdamW(model.parameters(), fused=device == "cuda")
    diffusion = CosineDiffusion(DiffusionConfig())
    generator = torch.Generator(device).manual_seed(1)
    x0 = torch.randn(2, 4, 16, 16, generator=generator, device=device)
    cond = {"effnet": torch.randn(2, 16, 2, 2, generator=generator, device=device),
            "clip": torch.randn(2, 8, 16, generator=generator, device=device)}  # fmt: skip

    def step() -> None:
        noised, noise, r = diffusion.noise_batch(x0)
        diffusion.loss(forward(noised, r, **cond), noise, r).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    counters = torch._dynamo.utils.counters
    for _ in range(2):
        step()
    graphs = counters["stats"]["unique_graphs"]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"ms": 1e3 * statistics.median(times), "graphs": graphs,
            "breaks": sum(counters["graph_break"].values()),
            "compiled_in_timed_steps": counters["stats"]["unique_graphs"] - graphs}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated from {VARIANTS}")
    args = parser.parse_args()
    blocks = sum(len(level) for level in StageB(narrow_v2()).blocks_by_level())
    print(f"narrow v2 Stage B ({blocks} modules in its levels), batch 2, 16x16 latent, on {args.device}; "
          f"torch {torch.__version__}; one host thread; median of {args.steps} steps")  # fmt: skip
    context = multiprocessing.get_context("spawn")
    results = {}
    for variant in args.variants.split(","):
        with context.Pool(1) as pool:
            results[variant] = pool.apply(measure, (variant, args.device, args.steps))
        res = results[variant]
        print(f"  {variant:18s} {res['ms']:7.1f} ms per step; {res['graphs']} graphs, {res['breaks']} graph breaks, "
              f"{res['compiled_in_timed_steps']} compiled in the timed steps", flush=True)  # fmt: skip
    if "eager" in results:
        for variant, res in results.items():
            print(f"  {variant} / eager: {res['ms'] / results['eager']['ms']:.2f}x the host time")


if __name__ == "__main__":
    main()
