"""Train-step throughput and peak memory of our Stage C / Stage B against the diffusers reference,
the reference as shipped and at its best.

One train step = forward, P2-weighted epsilon loss, backward, AdamW step, at the same config and
batch for both implementations. Each implementation runs in a fresh subprocess that builds the
model once and then measures its variants one after another, each on a fresh copy of the same
weights, with the peak-memory counter reset in between: `torch.cuda.max_memory_allocated` on a
GPU; on CPU the peak resident size over the process's size before the model was built (the model's
CPU template, from which each variant copies, counts; so does compiling), and "step +X", the most that one timed step adds to the resident size it
starts from (activations, gradients, temporaries), which compilation does not touch.

    python bench/train_step.py                              # CPU, reduced-width configs, fp32
    python bench/train_step.py --device cuda --config v2    # GPU, official v2 configs, bf16 autocast
    python bench/train_step.py --stages c --reference shipped,sdpa,sdpa+compile --ours eager,compile
    python bench/train_step.py --stages b --ours compile+budget=0.3/0.4/0.6/0.5+cudagraph --profile

Variants (`--ours`, `--reference`: comma-separated, each '+'-joined options or `eager`/`shipped`):
- both: `compile` (inductor, each repeated block on its own: ours through the training loop's
  `compile_blocks`, the reference's blocks likewise), `cudagraph` (the whole step, forward,
  backward and a capturable fused AdamW, captured once as a CUDA graph and replayed: no host work
  per step);
- ours: `checkpointing` (the training loop's `activation_checkpointing`), `budget=B` (with compile:
  the training loop's `activation_memory_budget`, one B, or for Stage B one per level joined by '/');
- the reference: `sdpa` (every attention on `F.scaled_dot_product_attention`, one
  `set_attn_processor` call for a diffusers user; the prior ships with the unfused processor, the
  decoder already uses this one).
Ratios are stated against the fastest reference variant of the run (its best) and against the
reference as shipped when it ran.

Correctness, asserted: before its variants each implementation runs, on the same weights (the
original init plus small seeded noise, so that the parts it leaves at zero count) and the same
seeded batch, one eval-mode forward in fp32 (TF32 off) and one under the run's autocast, and one
train-mode forward and backward in fp32 on two samples with the same seed before it, so that
dropout draws the same masks in both implementations. The script exits non-zero when ours in
fp32 leaves the reference by more than rounding (outputs, or the gradients, compared through a
seeded random projection of each parameter's gradient), or when ours in bf16 strays from the fp32
reference by more than the reference in bf16 does (with slack).

`--profile` adds, per variant, the device time of its kernels per step against the step's wall
time (a step whose kernels fill much less than its wall time waits on the host), the kernels
launched per step and the costliest kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import gc
import multiprocessing
import os
import platform
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.stage_oracle import REFERENCE_BLOCKS, perturb_, reference_like, use_fused_attention_  # noqa: E402
from cluster.gpus import peak_flops  # noqa: E402
from pipelines.flops import train_step_flops  # noqa: E402
from pipelines.trainable import REGISTRY  # noqa: E402
from pipelines.training.parallel import compile_blocks  # noqa: E402
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
    # The v2 reference rows of docs/benchmarks.md: Stage C at 24x24 batch 32, Stage B at 512 px (128x128 latents) batch 16.
    "v2": {"c": (STAGE_C_CONFIGS["v2"], 32, 24), "b": (STAGE_B_CONFIGS["v2"], 16, 128)},
}
TEXT_TOKENS = 77
OPTIONS = {
    "ours": ("compile", "checkpointing", "cudagraph", "budget=<0..1>[/<0..1>...]"),
    "reference": ("sdpa", "compile", "cudagraph"),
}
PLAIN = {"ours": "eager", "reference": "shipped"}  # the variant without options

# The asserted check. In fp32 the two implementations differ only in the order of their arithmetic:
# 1e-7 of the mean output on CPU and 3e-8 on an H200 (docs/benchmarks.md), so 1e-4 is far above
# rounding and far below any real difference (a wrong scale, a missing bias, another dropout mask).
FP32_TOLERANCE = 1e-4
# Gradients through both U-Nets sum far more terms; measured 3e-7 on CPU.
GRADIENT_TOLERANCE = 1e-3
# Ours under bf16 autocast may stray from fp32 at most this much more than the reference does.
BF16_SLACK = 1.5
CHECK_TRAIN_BATCH = 2
CHECK_SEED = 123


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


def adamw(model: torch.nn.Module, device: torch.device, capturable: bool = False) -> torch.optim.AdamW:
    """The optimizer of the training loop and of the reference script: fused on CUDA, for both; a CUDA
    graph needs its step count on the device (``capturable``)."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda", capturable=capturable)


def parse_variants(text: str, impl: str = "ours") -> list[frozenset[str]]:
    """'compile+checkpointing,eager' -> [{'compile', 'checkpointing'}, set()]."""
    variants = []
    for variant in text.split(","):
        options = frozenset() if variant == PLAIN[impl] else frozenset(variant.split("+"))
        for option in options:
            if impl == "ours" and option.startswith("budget="):
                try:
                    budgets = _budgets(option)
                except ValueError:
                    budgets = (-1.0,)
                in_range = all(0 <= budget <= 1 for budget in budgets)
                if not in_range or "compile" not in options or "checkpointing" in options:
                    raise argparse.ArgumentTypeError(
                        f"{variant!r}: budget=B takes a B from 0 to 1, or for Stage B one per level joined by '/', "
                        "with compile and without checkpointing (TrainConfig.activation_memory_budget)"
                    )
            elif option not in OPTIONS[impl]:
                raise argparse.ArgumentTypeError(
                    f"{text!r}: each {impl} variant is {PLAIN[impl]!r} or '+'-joined from {OPTIONS[impl]}"
                )
        variants.append(options)
    return variants


def _budgets(option: str) -> tuple[float, ...]:
    return tuple(float(share) for share in option.removeprefix("budget=").split("/"))


def memory_budget(options: frozenset[str]) -> tuple[float, ...]:
    return next((_budgets(option) for option in options if option.startswith("budget=")), (1.0,))


def label(impl: str, options: frozenset[str]) -> str:
    return "+".join([impl, *sorted(options)])


def update(model, optimizer, diffusion: CosineDiffusion, x0: torch.Tensor, cond: dict, autocast) -> torch.Tensor:
    """Forward, P2-weighted epsilon loss, backward and AdamW step, without a device sync; returns the loss."""
    noised, noise, r = diffusion.noise_batch(x0)
    with autocast:
        loss = diffusion.loss(model(noised, r, **cond), noise, r)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def one_step(model, optimizer, diffusion: CosineDiffusion, x0: torch.Tensor, cond: dict, autocast) -> float:
    """``update``, then the loss as a number (which syncs the device)."""
    return update(model, optimizer, diffusion, x0, cond, autocast).item()


def graphed(step_update: Callable[[], torch.Tensor], optimizer, warmup: int) -> Callable[[], float]:
    """The step captured as one CUDA graph, replayed per call: the host launches one graph instead of
    every kernel. Its random draws (noise, times, dropout) advance on every replay."""
    side = torch.cuda.Stream()  # warm-up off the default stream, as torch.cuda.graph asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 1)):
            step_update()
    torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates the gradients from its pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step_update()

    def replay() -> float:
        graph.replay()
        return loss.item()

    return replay


def prepared(template: torch.nn.Module, impl: str, options: frozenset[str], device: torch.device) -> torch.nn.Module:
    """A fresh copy of ``template`` on ``device`` with the variant's options applied; returns the
    module the step calls (the blocks are compiled in place)."""
    model = copy.deepcopy(template).to(device).train()
    if impl == "reference" and "sdpa" in options:
        use_fused_attention_(model)
    if "checkpointing" in options:
        model.config = dataclasses.replace(model.config, checkpointing=True)
    if "compile" not in options:
        return model
    if impl == "ours":
        stage = REGISTRY["stage_c" if isinstance(model, StageC) else "stage_b"]
        return compile_blocks(model, stage.parallelism, memory_budget(options))
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    for block in model.modules():
        if isinstance(block, REFERENCE_BLOCKS):
            block.compile(dynamic=False)
    return model


def correctness_outputs(
    model: torch.nn.Module, stage: str, config, batch: int, side: int, device: torch.device, bf16: bool
) -> dict:
    """What the asserted check compares: eval-mode outputs in fp32 and under autocast, and a train-mode
    forward and backward in fp32 on ``CHECK_TRAIN_BATCH`` samples, dropout seeded."""
    generator = torch.Generator(device).manual_seed(1)
    x0, cond = inputs(stage, config, batch, side, generator)
    diffusion = CosineDiffusion(DiffusionConfig())
    noised, _, r = diffusion.noise_batch(x0, generator=generator)
    outputs = {}
    with torch.no_grad():
        model.eval()
        with full_fp32():
            outputs["fp32"] = model(noised, r, **cond).cpu()
        if bf16:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                outputs["bf16"] = model(noised, r, **cond).float().cpu()
    model.train()
    few = slice(0, CHECK_TRAIN_BATCH)
    with full_fp32():
        torch.manual_seed(CHECK_SEED)  # the same dropout masks in both: they draw in the same order and shapes
        out = model(noised[few], r[few], **{name: value[few] for name, value in cond.items()})
        out.square().mean().backward()
    outputs["train"] = out.detach().cpu()
    outputs["gradients"] = gradient_projections(model)
    model.zero_grad(set_to_none=True)
    return outputs


def gradient_projections(model: torch.nn.Module) -> dict[str, float]:
    """Each parameter's gradient projected on a random direction seeded by the parameter's name (both
    implementations share the names): a few numbers per model that move with any change of a gradient,
    where the gradients themselves (4 GB for a v2 stage) would not cross a process boundary cheaply."""
    projections = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is None:
            continue
        generator = torch.Generator(parameter.device).manual_seed(zlib.crc32(name.encode()))
        direction = torch.randn(parameter.shape, generator=generator, device=parameter.device)
        projections[name] = float((parameter.grad.float() * direction).sum())
    return projections


def model_flops_per_sample(stage: str, config, batch: int, side: int) -> float:
    """FLOPs of one train step per sample, forward and backward (pipelines/flops.py), of the model without
    checkpointing: the arithmetic every variant of both implementations does, so that a variant that
    recomputes shows a lower MFU for the time it spends."""
    generator = torch.Generator().manual_seed(2)
    x0, cond = inputs(stage, config, batch, side, generator)
    diffusion = CosineDiffusion(DiffusionConfig())
    noised, noise, r = diffusion.noise_batch(x0, generator=generator)
    model = functools.partial(StageC if stage == "c" else StageB, dataclasses.replace(config, checkpointing=False))
    return train_step_flops(model, lambda m: diffusion.loss(m(noised, r, **cond), noise, r)) / batch


def compile_counts() -> dict[str, int]:
    """Dynamo's counters so far in this process: graphs compiled, graph breaks."""
    counters = torch._dynamo.utils.counters
    return {"graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values())}


def profiled(step: Callable[[], float], steps: int = 2) -> dict:
    """Device time of the kernels per step against the wall time per step, kernels per step, the costliest."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - start) / steps
    # The kernels themselves: the operators that launched them carry the same device time again.
    kernels = [event for event in profiler.key_averages() if event.device_type == DeviceType.CUDA]
    kernel_seconds = sum(event.self_device_time_total for event in kernels) / 1e6 / steps
    launches = sum(event.count for event in kernels) / steps
    top = sorted(kernels, key=lambda event: -event.self_device_time_total)[:6]
    return {"wall_ms": wall * 1e3, "kernel_ms": kernel_seconds * 1e3, "launches": launches,
            "top": [(event.key[:60], event.self_device_time_total / 1e3 / steps) for event in top]}  # fmt: skip


def measure(
    template: torch.nn.Module, job: dict, options: frozenset[str], batch: int, side: int, baseline_gib: float
) -> dict:
    """One variant: fresh weights, warm-up (compiling), timed steps; its peak memory and counters."""
    started = time.perf_counter()
    device = torch.device(job["device"])
    impl, stage = job["impl"], job["stage"]
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from the current RSS
    trained = prepared(template, impl, options, device)
    cudagraph = "cudagraph" in options
    optimizer = adamw(trained, device, capturable=cudagraph)
    diffusion = CosineDiffusion(DiffusionConfig())
    # Seeded on the device, so both implementations see the same batch whatever else drew numbers.
    generator = torch.Generator(device).manual_seed(1)
    x0, cond = inputs(stage, template.config, batch, side, generator)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=job["bf16"])
    counts_before = compile_counts()
    if cudagraph:
        step = graphed(
            functools.partial(update, trained, optimizer, diffusion, x0, cond, autocast), optimizer, job["warmup"]
        )
    else:
        step = functools.partial(one_step, trained, optimizer, diffusion, x0, cond, autocast)
        for _ in range(job["warmup"]):
            step()
    counts_warm = compile_counts()
    step_times, step_growth_gib = [], 0.0
    peak_before_steps_gib = rss_gib("VmHWM") if device.type == "cpu" else 0.0
    for _ in range(job["steps"]):
        if device.type == "cpu":
            before_gib = rss_gib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from the current RSS
        start = time.perf_counter()
        step()
        step_times.append(time.perf_counter() - start)
        if device.type == "cpu":
            step_growth_gib = max(step_growth_gib, rss_gib("VmHWM") - before_gib)
    counts_after = compile_counts()
    if device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak_gib = max(rss_gib("VmHWM"), peak_before_steps_gib) - baseline_gib
    result = {
        # CPU only: what one step adds at its peak to what the process held before it (activations,
        # gradients, temporaries), leaving out what building and compiling the model left behind.
        "step_growth_gib": step_growth_gib,
        # The median step resists the hiccups of a shared machine.
        "samples_per_s": batch / statistics.median(step_times),
        "peak_gib": peak_gib,
        "batch": batch,
        "params_m": sum(p.numel() for p in trained.parameters()) / 1e6,
        "graphs": counts_warm["graphs"] - counts_before["graphs"],
        "breaks": counts_warm["breaks"] - counts_before["breaks"],
        "recompiles_in_timed_steps": counts_after["graphs"] - counts_warm["graphs"],
        "profile": profiled(step) if job["profile"] and device.type == "cuda" else None,
        # Copying, compiling, warming up and stepping, not the process start-up, imports and model build.
        "seconds": time.perf_counter() - started,
    }
    del trained, optimizer, step
    torch._dynamo.reset()  # the next variant compiles its own blocks (inductor's disk cache stays warm)
    return result


def worker(job: dict) -> dict:
    """Build one implementation once, check it, then measure each of its variants; in its own process."""
    device = torch.device(job["device"])
    baseline_gib = rss_gib("VmRSS") if device.type == "cpu" else 0.0
    torch.manual_seed(0)
    factory, batch, side = SETUPS[job["config"]][job["stage"]]
    batch = job["batch"] or batch
    template = build(job["stage"], job["impl"], factory())  # on the CPU: each variant copies it to the device
    checked = correctness_outputs(copy.deepcopy(template).to(device), job["stage"], template.config, batch, side,
                                  device, job["bf16"])  # fmt: skip
    results = {}
    for options in job["variants"]:
        name = label(job["impl"], options)
        try:
            results[name] = measure(template, job, options, batch, side, baseline_gib)
        except Exception as error:  # noqa: BLE001 - one variant's failure (out of memory, a capture) must not hide the others
            results[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            if device.type == "cuda":
                torch.cuda.synchronize()
        # Printed as it lands: a run cut short by a time limit keeps what it measured.
        print(describe(job["stage"], name, results[name], job["mfu_of"]), flush=True)
    return {"check": checked, "variants": results}


def rss_gib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc (Linux)."""
    kib = next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(kib) / 2**20


def describe(stage: str, name: str, res: dict, mfu_of: Callable[[float], float | None] = lambda rate: None) -> str:
    if "error" in res:
        return f"stage {stage.upper()} {name:40s}: failed: {res['error']}"
    step_growth = f", step +{res['step_growth_gib']:6.3f} GiB" if res["step_growth_gib"] else ""
    utilisation = mfu_of(res["samples_per_s"])
    utilisation = f" (MFU {utilisation:.0%})" if utilisation is not None else ""
    compiled = (f", {res['graphs']} graphs, {res['breaks']} breaks, {res['recompiles_in_timed_steps']} compiles in "
                "the timed steps" if res["graphs"] else "")  # fmt: skip
    line = (
        f"stage {stage.upper()} {name:40s}: {res['params_m']:8.2f}M params, batch {res['batch']:3d}: "
        f"{res['samples_per_s']:8.2f} samples/s{utilisation}, peak {res['peak_gib']:7.3f} GiB{step_growth}{compiled}, "
        f"{res['seconds']:.0f} s"
    )
    if res["profile"]:
        profile = res["profile"]
        line += (
            f"\n    profile: {profile['wall_ms']:.1f} ms wall per step, kernels {profile['kernel_ms']:.1f} ms "
            f"({profile['kernel_ms'] / profile['wall_ms']:.0%} of it), {profile['launches']:.0f} kernels per step; "
            "costliest: " + "; ".join(f"{key} {ms:.1f} ms" for key, ms in profile["top"])
        )
    return line


def mfu(flops_per_sample: float, peak: float | None, samples_per_s: float) -> float | None:
    """Model FLOP utilisation: the model's FLOPs per second over the device's peak; None without a peak."""
    return flops_per_sample * samples_per_s / peak if peak else None


def relative(value: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean absolute difference over the mean absolute value of ``exact``."""
    return float((value - exact).abs().mean() / exact.abs().mean())


def check(stage: str, reference: dict, ours: dict, bf16: bool) -> list[str]:
    """Print how far ours is from the reference; return the failures of the asserted check."""
    exact = reference["fp32"]
    print(f"stage {stage.upper()} check against the reference in fp32, same weights and inputs (eval: max |out| "
          f"{exact.abs().max():.3g}, mean |out| {exact.abs().mean():.3g}):")  # fmt: skip
    names = sorted(reference["gradients"])
    assert names == sorted(ours["gradients"]), "the two implementations' parameter names differ"
    reference_projections = torch.tensor([reference["gradients"][name] for name in names], dtype=torch.float64)
    ours_projections = torch.tensor([ours["gradients"][name] for name in names], dtype=torch.float64)
    figures = {
        "ours fp32 eval output": (relative(ours["fp32"], exact), FP32_TOLERANCE),
        "ours fp32 train output (dropout on)": (relative(ours["train"], reference["train"]), FP32_TOLERANCE),
        "ours fp32 train gradients": (
            float((ours_projections - reference_projections).norm() / reference_projections.norm()),
            GRADIENT_TOLERANCE,
        ),
    }
    if bf16:
        reference_bf16 = relative(reference["bf16"], exact)
        print(f"  reference bf16 eval output: {reference_bf16:.3g} of the mean |out| (bf16's own distance)")
        figures["ours bf16 eval output"] = (relative(ours["bf16"], exact), BF16_SLACK * reference_bf16 + FP32_TOLERANCE)
    failures = []
    for what, (value, limit) in figures.items():
        verdict = "ok" if value <= limit else "FAILED"
        print(f"  {what}: {value:.3g} of the reference's (limit {limit:.3g}) {verdict}")
        if value > limit:
            failures.append(f"stage {stage.upper()}: {what} is {value:.3g} from the reference, over {limit:.3g}")
    return failures


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
    parser.add_argument("--reference", default=None, type=functools.partial(parse_variants, impl="reference"),
                        help="comma-separated variants of the reference: 'shipped', or '+'-joined from sdpa, "
                             "compile, cudagraph (default: shipped,sdpa for Stage C, whose prior ships with the "
                             "unfused attention; shipped for Stage B)")  # fmt: skip
    parser.add_argument(
        "--ours",
        default=[frozenset()],
        type=parse_variants,
        help="comma-separated variants of ours: 'eager', or '+'-joined from compile, "
        "checkpointing, cudagraph and budget=B (with compile; for Stage B one B per level, "
        "outermost first, joined by '/'), e.g. 'eager,compile+budget=0.3/0.4/0.6/0.5+cudagraph'",
    )
    parser.add_argument("--profile", action="store_true", help="on cuda: kernel time, wall time and kernels per step")
    args = parser.parse_args()
    config = args.config or ("v2" if args.device == "cuda" else "reduced")
    steps = args.steps or (20 if args.device == "cuda" else 5)
    bf16 = args.bf16 if args.bf16 is not None else args.device == "cuda"
    if args.device == "cuda":
        assert torch.cuda.is_available(), "--device cuda needs a GPU"
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    peak = peak_flops(device_name) if args.device == "cuda" else None
    print(f"device: {device_name}; torch {torch.__version__}; config {config}; bf16 autocast {bf16}; "
          f"fused AdamW {args.device == 'cuda'}; {steps} timed steps after {args.warmup} warm-up; peak dense bf16 "
          f"{f'{peak / 1e12:.1f} TFLOP/s' if peak else 'unknown (no MFU)'}")  # fmt: skip

    if args.device == "cpu":
        # Freed activations go back to the system at once (glibc keeps smaller blocks for reuse), so that
        # each step's peak shows in its resident size; read by the workers' allocator as they start.
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    context = multiprocessing.get_context("spawn")
    failures = []
    for stage in args.stages.split(","):
        reference_variants = args.reference or ([frozenset(), frozenset({"sdpa"})] if stage == "c" else [frozenset()])
        factory, default_batch, side = SETUPS[config][stage]
        flops = model_flops_per_sample(stage, factory(), args.batch or default_batch, side)
        print(f"stage {stage.upper()}: {flops / 1e9:,.1f} GFLOP per sample in a train step (forward and backward)")
        mfu_of = functools.partial(mfu, flops, peak)
        results: dict[str, dict] = {}
        checks = {}
        for _ in range(args.repeats):
            # Alternate the implementations so that a change in machine load hits both alike; keep each variant's best.
            for impl, variants in (("reference", reference_variants), ("ours", args.ours)):
                job = dict(stage=stage, impl=impl, variants=variants, device=args.device, config=config,
                           batch=args.batch, steps=steps, warmup=args.warmup, bf16=bf16, profile=args.profile,
                           mfu_of=mfu_of)  # fmt: skip
                with context.Pool(1) as pool:
                    out = pool.apply(worker, (job,))
                checks[impl] = out["check"]
                for name, res in out["variants"].items():
                    if "error" in res:
                        continue
                    if name not in results or res["samples_per_s"] > results[name]["samples_per_s"]:
                        results[name] = res
        if args.repeats > 1:
            for name, res in results.items():
                print(f"best of {args.repeats}: {describe(stage, name, res, mfu_of)}")
        failures += check(stage, checks["reference"], checks["ours"], bf16)
        references = {name: res for name, res in results.items() if name.startswith("reference")}
        if not references:
            print(f"stage {stage.upper()}: no reference variant ran, no ratios")
            continue
        best_name = max(references, key=lambda name: references[name]["samples_per_s"])
        best, shipped = references[best_name], references.get("reference")
        print(f"stage {stage.upper()} reference at its best in this run: {best_name}")
        for name, res in results.items():
            if name.startswith("reference"):
                continue
            against_shipped = (
                f"; / reference as shipped: {res['samples_per_s'] / shipped['samples_per_s']:.2f}x "
                f"samples/s, {res['peak_gib'] / shipped['peak_gib']:.2f}x peak"
                if shipped
                else ""
            )
            print(f"stage {stage.upper()} {name} / best reference: {res['samples_per_s'] / best['samples_per_s']:.2f}x "
                  f"samples/s, {res['peak_gib'] / best['peak_gib']:.2f}x peak memory{against_shipped}")  # fmt: skip
    if failures:
        sys.exit("correctness check failed:\n  " + "\n  ".join(failures))


if __name__ == "__main__":
    main()
