"""Held-out loss during training: the EMA weights on fixed validation rows, at fixed times, with fixed noise.

The number depends on the weights alone: the rows are the first ``eval_samples`` of the validation
split in shard order (the driver reads them), the times are evenly spaced over the training range,
and each row's noise at each time follows from its index and the time's index, not from the run's
seed, its worker count or its batch size. Two evaluations of the same weights give the same number,
and runs with other seeds or scales are compared on the same draws. Each time's loss is the stage's
training objective (P2-weighted noise MSE) at that time; ``val/loss`` is their mean, which estimates
the training loss's expectation over times as a fixed quadrature (training draws times uniformly).
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from pipelines.tracking import TrackedRun
from pipelines.trainable.base import TrainableStage
from pipelines.trainable.text_conditioned import TextConditionedTask
from pipelines.training.parallel import full_state, unwrapped
from pipelines.training.step import swapped_in

VALIDATION_TIMES = 8
"""Times at which each held-out row is noised and denoised."""
_NOISE_SEED = 20_240_125


def validation_times(t_min: float, count: int = VALIDATION_TIMES) -> list[float]:
    """``count`` times at the midpoints of equal parts of the training range [t_min, 1]."""
    return [t_min + (1 - t_min) * (k + 0.5) / count for k in range(count)]


def validation_noise(shape: torch.Size, row: int, time_index: int) -> torch.Tensor:
    """The noise of held-out row ``row`` at time ``time_index``: the same on any device and batch."""
    generator = torch.Generator().manual_seed(_NOISE_SEED + row * VALIDATION_TIMES + time_index)
    return torch.randn(shape, generator=generator)


def validation_metrics(
    stage: TrainableStage, task: TextConditionedTask, model: nn.Module, batch_size: int
) -> dict[str, float]:
    """``val/loss`` and one ``val/loss_r<time>`` per time, of ``model`` as it is (eval mode) on the
    task's validation rows; empty where the task has none."""
    groups = task.spec.validation_batches
    if not groups:
        return {}
    times = validation_times(task.diffusion.config.t_min)
    sums = torch.zeros(len(times), dtype=torch.float64)
    row = 0
    model.eval()
    try:
        for group in groups:
            rows = len(next(iter(group.values())))
            for start in range(0, rows, batch_size):
                batch = {
                    name: torch.as_tensor(values[start : start + batch_size]).to(task.device)
                    for name, values in group.items()
                }
                shape = batch[stage.latent_column].shape[1:]
                for k, r in enumerate(times):
                    noise = torch.stack(
                        [validation_noise(shape, row + i, k) for i in range(batch[stage.latent_column].shape[0])]
                    ).to(task.device)
                    with torch.autocast(task.device.type, dtype=torch.bfloat16, enabled=task.device.type == "cuda"):
                        sums[k] += task.validation_losses(model, batch, noise, r).double().sum().cpu()
                row += batch[stage.latent_column].shape[0]
    finally:
        model.train()
    per_time = (sums / row).tolist()
    return {
        "val/loss": sum(per_time) / len(per_time),
        **{f"val/loss_r{r:.3f}": loss for r, loss in zip(times, per_time)},
    }


def log_validation(
    run: TrackedRun | None,
    stage: TrainableStage,
    task: TextConditionedTask,
    model: nn.Module,
    ema: list[torch.Tensor],
    step: int,
    batch_size: int,
) -> None:
    """Evaluates the EMA weights and logs the figures and their seconds at ``step`` from rank 0 (``run``):
    the held-out loss, and for a stage that ``evaluates_chain`` the chain's scores
    (pipelines/chain_evaluation.py). Every rank calls it. Under FSDP each rank runs the sharded
    model's forward on every held-out row (rank 0 alone cannot), and the chain renders on rank 0
    through an unsharded copy of the EMA weights gathered from all; otherwise rank 0 evaluates while
    the others wait at the next step's all-reduce."""
    scores_chain = stage.evaluates_chain and task.spec.chain_evaluation is not None
    sharded = isinstance(model, FSDPModule)
    if not (task.spec.validation_batches or scores_chain) or (run is None and not sharded):
        return
    metrics: dict[str, float] = {}
    # Eager: with `compile`, the blocks are compiled in place, and other batch shapes would compile again.
    with swapped_in(model, ema), torch.compiler.set_stance("force_eager"):
        started = time.monotonic()
        if task.spec.validation_batches:
            metrics.update(validation_metrics(stage, task, model if sharded else unwrapped(model), batch_size))
            metrics["val/seconds"] = time.monotonic() - started
        if scores_chain:
            started = time.monotonic()
            renderer = unwrapped(model)
            if sharded:
                weights = full_state(model)
                if run is not None:
                    renderer = stage.build_model(task.spec)
                    renderer.load_state_dict(weights)
                    renderer.to(task.device)
            if run is not None:
                chain = task.chain_metrics(renderer)
                metrics.update(chain)
                if chain:
                    metrics["eval/seconds"] = time.monotonic() - started
    if run is not None and metrics:
        run.log_metrics(metrics, step=step)
