"""What rank 0 shows of a run while it trains: the figures of each log interval in MLflow and on the
console (loss, LR, grad norm, samples/s, data-wait fraction, peak memory, GPU-hours, FLOPs per
sample and the model FLOP utilisation), and the sample grids."""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from cluster.budget import BudgetMeter
from cluster.gpus import peak_flops
from pipelines.flops import train_step_flops
from pipelines.tracking import ATTEMPT_GPU_HOURS, RUN_GPU_HOURS, TrackedRun
from pipelines.trainable.base import Task, TrainableStage
from pipelines.training.checkpoint import TrainingState
from pipelines.training.config import TrainConfig
from pipelines.training.parallel import full_state, unwrapped
from pipelines.training.step import swapped_in

# The training loop's one logger: its progress lines are the loop's.
logger = logging.getLogger("pipelines.train")


class ProgressWindow:
    """Figures since the last log line."""

    def __init__(self):
        self.losses, self.grad_norms, self.waits, self.totals = [], [], [], []
        self.flops: list[float | None] = []

    def add(self, loss: float, grad_norm: float, wait: float, total: float, flops_per_sample: float | None) -> None:
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        self.waits.append(wait)
        self.totals.append(total)
        self.flops.append(flops_per_sample)

    def drain(self) -> dict[str, float]:
        if not self.losses:
            return {}
        figures = {
            "loss": float(np.mean(self.losses)),
            "grad_norm": float(np.mean(self.grad_norms)),
            "data_wait_fraction": float(np.sum(self.waits) / max(np.sum(self.totals), 1e-9)),
            "step_seconds": float(np.mean(self.totals)),
            # What the ETA goes by: the first window also holds the run's start (compiling, the data
            # pipeline's first blocks), which its mean would spread over every remaining step.
            "median_step_seconds": float(np.median(self.totals)),
        }
        if None not in self.flops:
            # Every step takes the global batch: the mean per sample over the steps, times samples/s, is
            # the window's FLOP/s, whatever buckets it mixed.
            figures["flops_per_sample"] = float(np.mean(self.flops))
        self.__init__()
        return figures


def log_progress(
    run: TrackedRun,
    state: TrainingState,
    window: ProgressWindow,
    meter: BudgetMeter,
    config: TrainConfig,
    optimizer,
    device: torch.device,
    peak: PeakFlops | None,
) -> None:
    """Logs the window's figures; ``peak``: the FLOP/s of all devices held, None for no MFU."""
    figures = window.drain()
    if not figures:
        return
    samples_per_second = config.global_batch_size / figures["step_seconds"]
    eta_seconds = (config.steps - state.step) * figures.pop("median_step_seconds")
    metrics = {
        **figures,
        "lr": optimizer.param_groups[0]["lr"],
        "samples_per_second": samples_per_second,
        "epoch": state.epoch,
        RUN_GPU_HOURS: meter.used(),
        ATTEMPT_GPU_HOURS: meter.attempt(),
        "eta_seconds": eta_seconds,
    }
    if meter.budget is not None:
        metrics["gpu_hours_remaining"] = meter.remaining()
    if device.type == "cuda":
        metrics["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if peak is not None and "flops_per_sample" in figures:
        metrics["mfu"] = figures["flops_per_sample"] * samples_per_second / peak.flops
    run.log_metrics(metrics, step=state.step)
    budget = (
        "no budget"
        if meter.budget is None
        else f"{metrics['gpu_hours_remaining']:.3g} of {meter.budget:.3g} GPU-h left"
    )
    mfu = f"MFU {metrics['mfu']:.0%}  " if "mfu" in metrics else ""
    # Ray Train sends the root logger to the driver's console once (its patched print shows twice).
    logger.info(
        f"step {state.step}/{config.steps}  loss {figures['loss']:.4f}  {samples_per_second:.1f} samples/s  "
        f"{mfu}data wait {figures['data_wait_fraction']:.0%}  ETA {metrics['eta_seconds'] / 60:.1f} min  "
        f"{budget}"
    )


def log_samples(
    run: TrackedRun | None, stage: TrainableStage, task: Task, model: nn.Module, ema: list[torch.Tensor], step: int
) -> None:
    """The EMA model's sample grid, logged by rank 0 (``run``). Every rank calls it: under FSDP rank 0
    alone cannot run the sharded model, so all ranks gather the EMA weights into rank 0's unsharded
    copy, which samples."""
    if isinstance(model, FSDPModule):
        with swapped_in(model, ema):
            weights = full_state(model)
        if run is None:
            return
        sampler = stage.build_model(task.spec)
        sampler.load_state_dict(weights)
        grid = task.samples(sampler.to(task.device), step)
    elif run is None:
        return
    else:
        # Eager: with `compile`, the blocks are compiled in place, and sampling (no grad, other batch
        # shapes) would compile each of them again.
        with swapped_in(model, ema), torch.compiler.set_stance("force_eager"):
            grid = task.samples(unwrapped(model), step)
    if grid is not None:
        run.log_image(grid, f"samples/step_{step:07d}.png")


def flops_per_sample(
    stage: TrainableStage, task: Task, batch: dict[str, torch.Tensor], per_worker: int, step: int
) -> float:
    """FLOPs of one sample's forward and backward through ``task.loss`` at ``step``, counted on fake
    tensors. The model is built without activation checkpointing: MFU counts the model's FLOPs, and
    what a checkpoint recomputes is the run's cost, not the model's work. The loss draws from a
    generator of its own, so the training's draws stay as they were."""
    spec = dataclasses.replace(task.spec, activation_checkpointing=False)

    def build() -> nn.Module:
        with task.device:  # built there: fake parameters cannot be moved (``to`` cannot swap them)
            return stage.build_model(spec)

    flops = train_step_flops(
        build, lambda model: task.loss(model, batch, torch.Generator(task.device).manual_seed(0), step=step)
    )
    return flops / per_worker


@dataclasses.dataclass(frozen=True)
class PeakFlops:
    """The denominator of a run's MFU: the FLOP/s of all the devices it holds, and where it comes from."""

    flops: float
    basis: str


def run_peak_flops(device: torch.device, config: TrainConfig) -> PeakFlops | None:
    """On a GPU, the datasheet's dense bf16 peak (cluster/gpus.py) times the GPUs held; None on one the
    table does not know (the run then logs no MFU). On CPU no datasheet applies and training runs in
    fp32: the fp32 matrix-product rate measured here, on this worker's threads, times the workers,
    so a CPU run's MFU is the share of this machine's matrix-product rate that the model reaches."""
    if device.type == "cpu":
        threads = torch.get_num_threads()
        per_worker = measured_matmul_flops()
        return PeakFlops(
            per_worker * config.workers,
            f"CPU fp32 matrix products measured on rank 0 at the start: {per_worker / 1e9:.3g} GFLOP/s "
            f"on {threads} thread(s), times {config.workers} worker(s)",
        )
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    per_gpu = peak_flops(name)
    if per_gpu is None:
        logger.warning(f"no peak FLOP/s known for {name!r} (add it to cluster/gpus.py): this run logs no MFU")
        return None
    gpus = config.workers * config.gpus_per_worker
    return PeakFlops(per_gpu * gpus, f"{name}: dense bf16 datasheet peak {per_gpu / 1e12:g} TFLOP/s, times {gpus:g}")


def measured_matmul_flops(size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an fp32 ``size`` x ``size`` matrix product on the CPU, the fastest of ``repeats``
    after one to warm up: near the rate the matrix library reaches, where the first call or a busy
    moment would understate it."""
    generator = torch.Generator().manual_seed(0)  # the global generator's draws stay the training's
    a, b = torch.randn(size, size, generator=generator), torch.randn(size, size, generator=generator)
    torch.mm(a, b)
    fastest = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * size**3 / fastest
