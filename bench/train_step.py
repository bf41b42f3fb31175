"""Train-step throughput and peak memory of our Stage C / Stage B against the diffusers reference.

One train step = forward, P2-weighted epsilon loss, backward, AdamW step, at the same config and
batch for both implementations. Each (stage, implementation) runs in a fresh subprocess, so peak
memory is its own: `torch.cuda.max_memory_allocated` on a GPU, the growth of the process's peak
RSS over its size before building the model on CPU, where compiling adds to it; so on CPU the
script also prints "step +X", the most that one timed step adds to the resident size it starts
from (activations, gradients, temporaries), which compilation does not touch.

    python bench/train_step.py                              # CPU, reduced-width configs, fp32
    python bench/train_step.py --device cuda --config v2    # GPU, official v2 configs, bf16 autocast
    python bench/train_step.py --stages b --ours compile+checkpointing,compile   # two variants of ours
    python bench/train_step.py --stages b --ours compile+budget=0.25   # compiled, a quarter of its saved activations
    python bench/train_step.py --stages b --ours compile+budget=0.3/0.4/0.6/1   # a budget per level

Prints samples/s and peak memory for the reference and each variant of ours (`--ours`: eager, or
compiled with inductor, with activation checkpointing or an activation memory budget; the reference
always runs eager), and the ratios ours / reference. Both start from the same weights: the
original init plus small seeded noise (so that the parts it leaves at zero, such as Stage C's
output convolution, count), copied into the reference. Before the timed steps each implementation
runs one forward pass in eval mode on the same seeded inputs, in fp32 (TF32 off) and under the run's
autocast, and the script prints how far each is from the reference in fp32: ours in fp32 must
match it to rounding, ours in bf16 must stay as close as the reference in bf16 does. That is the
correctness check for the device and dtype of the run, at no extra cost in model builds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the stages, and the test oracle's reference builders

import torch  # noqa: E402
from stage_oracle import perturb_, reference_like  # noqa: E402

from pipelines.train import compile_blocks  # noqa: E402
from stages.diffusion import CosineDiffusion, DiffusionConfig  # noqa: E402
from stages.stage_b import STAGE_B_CONFIGS, StageB, StageBConfig  # noqa: E402
from stages.stage_c import STAGE_C_CONFIGS, StageC, StageCConfig  # noqa: E402


def reduced_stage_c() -> StageCConfig:
    """v2's structure at CPU scale: 24x24 latents and 77 text tokens as in v2, narrow and shallow."""
    return dataclasses.replace(STAGE_C_CONFIGS["v2"](), c=256, c_cond=256, depth=4, nhead=4)


def reduced_stage_b() -> StageBConfig:
    """v2's four levels and block pattern at CPU scale."""
    return dataclasses.replace(
        STAGE_B_CONFIGS["v2"](),
        c_cond=256,
        c_hidden=(64, 128, 256, 256),
        nhead=(-1, 2, 4, 4),
        blocks=(1, 1, 2, 1),
        clip_embd=256,
    )


# (config factory, batch, Stage C latent side, Stage B latent side) per --config.
SETUPS = {
    "reduced": {"c": (reduced_stage_c, 8, 24), "b": (reduced_stage_b, 4, 64)},
    # DESIGN.md's reference rows: Stage C at 24x24 batch 32, Stage B at 512 px (128x128 latents) batch 16.
    "v2": {"c": (STAGE_C_CONFIGS["v2"], 32, 24), "b": (STAGE_B_CONFIGS["v2"], 16, 128)},
}
TEXT_TOKENS = 77
VARIANT_OPTIONS = ("compile", "checkpointing", "budget=<0..1>[/<0..1>...]")


def build(stage: str, impl: str, config: StageCConfig | StageBConfig) -> torch.nn.Module:
    """Our model, or the diffusers reference holding the same initial weights."""
    # Small beside the init's weights: at std 0.01 the v2 prior amplified bf16 rounding to 6x its mean
    # output in both implementations (docs/benchmarks.md), too much for the check to tell a bug from noise.
    ours = perturb_(StageC(config) if stage == "c" else StageB(config), std=0.001)
    return ours if impl == "ours" else reference_like(ours)


@contextlib.contextmanager
def full_fp32():
    """fp32 products without TF32, which cuDNN's convolutions use by default on Ampere and later."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def inputs(stage: str, config, batch: int, side: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Clean latents and the conditioning keyword arguments of one batch."""
    device = generator.device

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device)

    if stage == "c":
        return randn(batch, config.c_in, side, side) * 0.03, {"c": randn(batch, TEXT_TOKENS, config.c_cond)}
    semantic_side = round(side / 10.67)  # Stage C latent of the same image (official ratio)
    return randn(batch, config.c_in, side, side), {
        "effnet": randn(batch, config.effnet_embd, semantic_side, semantic_side),
        "clip": randn(batch, TEXT_TOKENS, config.clip_embd),
    }


def adamw(model: torch.nn.Module, device: torch.device) -> torch.optim.AdamW:
    """The optimizer of the training loop and of the reference script: fused on CUDA, for both."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")


def parse_variants(text: str) -> list[frozenset[str]]:
    """'compile+checkpointing,eager' -> [{'compile', 'checkpointing'}, set()]."""
    variants = []
    for variant in text.split(","):
        options = frozenset() if variant == "eager" else frozenset(variant.split("+"))
        for option in options:
            if option.startswith("budget="):
                try:
                    budgets = _budgets(option)
                except ValueError:
                    budgets = (-1.0,)
                in_range = all(0 <= budget <= 1 for budget in budgets)
                if not in_range or "compile" not in options or "checkpointing" in options:
                    raise argparse.ArgumentTypeError(
                        f"{variant!r}: budget=B takes a B from 0 to 1, or for Stage B one per level joined by '/', "
                        "with compile and without checkpointing (TrainConfig.activation_memory_budget)")
            elif option not in VARIANT_OPTIONS:
                raise argparse.ArgumentTypeError(f"{text!r}: each variant is 'eager' or '+'-joined from {VARIANT_OPTIONS}")
        variants.append(options)
    return variants


def _budgets(option: str) -> tuple[float, ...]:
    return tuple(float(share) for share in option.removeprefix("budget=").split("/"))


def memory_budget(options: frozenset[str]) -> tuple[float, ...]:
    return next((_budgets(option) for option in options if option.startswith("budget=")), (1.0,))


def label(impl: str, options: frozenset[str]) -> str:
    return "+".join([impl, *sorted(options)])


def one_step(model, optimizer, diffusion: CosineDiffusion, x0: torch.Tensor, cond: dict, autocast) -> float:
    """Forward, P2-weighted epsilon loss, backward and AdamW step; returns the loss (syncs the device)."""
    noised, noise, r = diffusion.noise_batch(x0)
    with autocast:
        loss = diffusion.loss(model(noised, r, **cond), noise, r)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def worker(job: dict) -> dict:
    """Run one (stage, implementation) measurement; executed in its own process."""
    started = time.perf_counter()
    device = torch.device(job["device"])
    baseline_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    factory, batch, side = SETUPS[job["config"]][job["stage"]]
    batch = job["batch"] or batch
    config = dataclasses.replace(factory(), checkpointing="checkpointing" in job["options"])  # reference ignores it
    model = build(job["stage"], job["impl"], config).to(device).train()
    # The training loop's `compile` and `activation_memory_budget`.
    trained = compile_blocks(model, memory_budget(job["options"])) if "compile" in job["options"] else model
    optimizer = adamw(model, device)
    diffusion = CosineDiffusion(DiffusionConfig())
    # Seeded on the device, so both implementations see the same batch whatever else drew numbers.
    generator = torch.Generator(device).manual_seed(1)
    x0, cond = inputs(job["stage"], config, batch, side, generator)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=job["bf16"])

    noised, _, r = diffusion.noise_batch(x0, generator=generator)
    check_outputs = {}
    # Eager: compiled, each check (eval mode, autocast on and off) would compile every block once more.
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        model.eval()
        with full_fp32():
            check_outputs["fp32"] = model(noised, r, **cond).cpu()
        if job["bf16"]:
            with autocast:
                check_outputs["bf16"] = model(noised, r, **cond).float().cpu()
        model.train()

    step = functools.partial(one_step, trained, optimizer, diffusion, x0, cond, autocast)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(job["warmup"]):
        step()
    step_times, step_growth_gib = [], 0.0
    for _ in range(job["steps"]):
        if device.type == "cpu":
            before_gib = rss_gib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from the current RSS
        start = time.perf_counter()
        step()
        step_times.append(time.perf_counter() - start)
        if device.type == "cpu":
            step_growth_gib = max(step_growth_gib, rss_gib("VmHWM") - before_gib)
    if device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # ru_maxrss is in KiB on Linux
        peak_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_rss_kb) / 2**20
    return {
        # CPU only: what one step adds at its peak to what the process held before it (activations,
        # gradients, temporaries), leaving out what building and compiling the model left behind.
        "step_growth_gib": step_growth_gib,
        # The median step resists the hiccups of a shared machine.
        "samples_per_s": batch / statistics.median(step_times),
        "peak_gib": peak_gib,
        "batch": batch,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "check_outputs": check_outputs,
        # Building, compiling, checking and stepping, not the process start-up and imports before them.
        "worker_seconds": time.perf_counter() - started,
    }


def rss_gib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc (Linux)."""
    kib = next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(kib) / 2**20


def describe(stage: str, name: str, res: dict) -> str:
    step_growth = f", step +{res['step_growth_gib']:6.3f} GiB" if res["step_growth_gib"] else ""
    return (f"stage {stage.upper()} {name:26s}: {res['params_m']:8.2f}M params, batch {res['batch']:3d}: "
            f"{res['samples_per_s']:8.2f} samples/s, peak {res['peak_gib']:7.3f} GiB{step_growth}, "
            f"{res['worker_seconds']:.0f} s in all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--config", default=None, choices=sorted(SETUPS), help="default: reduced on cpu, v2 on cuda")
    parser.add_argument("--stages", default="c,b", help="comma-separated subset of c,b")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 5 on cpu, 20 on cuda)")
    parser.add_argument("--batch", type=int, default=None, help="batch of every stage (default: the config's, SETUPS)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs per implementation, alternating; best kept")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on for cuda, off for cpu)")  # fmt: skip
    parser.add_argument("--ours", default="eager", type=parse_variants,
                        help="comma-separated variants of ours, each measured against the one reference run: "
                             "'eager', or '+'-joined from compile (inductor, each block on its own, as the "
                             "training loop's `compile`), checkpointing (activation checkpointing per "
                             "block) and budget=B (with compile: each block keeps at most B of what it saves "
                             "for backward by default, the training loop's `activation_memory_budget`; for "
                             "Stage B one B per level, outermost first, joined by '/'), "
                             "e.g. 'compile+checkpointing,compile+budget=0.3,compile+budget=0.3/0.4/0.6/1'")
    args = parser.parse_args()
    config = args.config or ("v2" if args.device == "cuda" else "reduced")
    steps = args.steps or (20 if args.device == "cuda" else 5)
    bf16 = args.bf16 if args.bf16 is not None else args.device == "cuda"
    if args.device == "cuda":
        assert torch.cuda.is_available(), "--device cuda needs a GPU"
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device: {device_name}; torch {torch.__version__}; config {config}; bf16 autocast {bf16}; "
          f"variants of ours {', '.join(label('ours', v) for v in args.ours)}; fused AdamW {args.device == 'cuda'}; {steps} timed steps")  # fmt: skip

    if args.device == "cpu":
        # Freed activations go back to the system at once (glibc keeps smaller blocks for reuse), so that
        # each step's peak shows in its resident size; read by the workers' allocator as they start.
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    context = multiprocessing.get_context("spawn")
    for stage in args.stages.split(","):
        results: dict[str, dict] = {}
        # Alternate the runs so that a change in machine load hits all alike; keep each one's best.
        runs = [("reference", frozenset()), *[("ours", options) for options in args.ours]]
        for _ in range(args.repeats):
            for impl, options in runs:
                job = dict(stage=stage, impl=impl, options=options, device=args.device, config=config, batch=args.batch,
                           steps=steps, warmup=args.warmup, bf16=bf16)  # fmt: skip
                with context.Pool(1) as pool:
                    res = pool.apply(worker, (job,))
                name = label(impl, options)
                # Printed as it lands: a run cut short by a time limit keeps what it measured.
                print(describe(stage, name, res), flush=True)
                if name not in results or res["samples_per_s"] > results[name]["samples_per_s"]:
                    results[name] = res
        if args.repeats > 1:
            for name, res in results.items():
                print(f"best of {args.repeats}: {describe(stage, name, res)}")
        ref = results.pop("reference")
        # Against the reference in fp32: ours in fp32 must match it to rounding, and ours under bf16
        # autocast must stay as close to it as the reference under the same autocast is. The check
        # runs the eager module in eval mode, the same for every variant of ours: the first one's.
        exact = ref["check_outputs"]["fp32"]
        ours_checked = next(iter(results.values()))["check_outputs"]
        print(f"stage {stage.upper()} eval forward on the same weights and inputs, vs the reference in fp32 "
              f"(max |out| {exact.abs().max():.3g}, mean |out| {exact.abs().mean():.3g}):")  # fmt: skip
        checked = [("ours", "fp32", ours_checked)]
        if bf16:
            checked += [("reference", "bf16", ref["check_outputs"]), ("ours", "bf16", ours_checked)]
        for impl, precision, outputs in checked:
            difference = (outputs[precision] - exact).abs()
            print(f"  {impl:9s} {precision}: max |diff| {difference.max():.3g}, mean |diff| {difference.mean():.3g} "
                  f"({difference.mean() / exact.abs().mean():.3g} of the mean |out|)")  # fmt: skip
        for name, ours in results.items():
            print(f"stage {stage.upper()} {name} / reference: {ours['samples_per_s'] / ref['samples_per_s']:.2f}x "
                  f"samples/s, {ours['peak_gib'] / ref['peak_gib']:.2f}x peak memory")  # fmt: skip


if __name__ == "__main__":
    main()
