"""Held-out loss during training: the EMA weights on fixed validation rows, a number of the weights alone.

The rows are the first ``eval_samples`` of the validation split in shard order (the driver reads
them once and hands them to the workers with the task); whatever else the loss draws follows from
the rows' indices (``Task.validation_losses``), not from the run's seed, its worker count or its
batch size. So two evaluations of the same weights give the same number, and runs with other seeds
or scales are compared on the same draws. Each stage says what its held-out loss is: for the
diffusion stages the training objective at fixed times with fixed noise (``text_conditioned.py``),
for Stage A its reconstruction terms, for the semantic compressor its probe's error. Every term is
logged as ``val/<term>``, ``val/loss`` the one to read beside the training ``loss``.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from pipelines.tracking import TrackedRun
from pipelines.trainable.base import Task, TrainableStage
from pipelines.training.parallel import full_state, unwrapped
from pipelines.training.step import swapped_in


def validation_metrics(task: Task, model: nn.Module, batch_size: int) -> dict[str, float]:
    """``val/<term>`` for each term of the task's held-out loss, its mean over the task's validation
    rows, of ``model`` as it is (eval mode); empty where the task has none."""
    sums: dict[str, torch.Tensor] = {}
    row = 0
    model.eval()
    try:
        for group in task.spec.validation_batches:
            rows = len(next(iter(group.values())))
            for start in range(0, rows, batch_size):
                batch = {
                    name: torch.as_tensor(values[start : start + batch_size]).to(task.device)
                    for name, values in group.items()
                }
                with (
                    torch.no_grad(),
                    torch.autocast(task.device.type, dtype=torch.bfloat16, enabled=task.device.type == "cuda"),
                ):
                    losses = task.validation_losses(model, batch, row)
                for name, values in losses.items():
                    sums[name] = sums.get(name, 0) + values.double().sum().cpu()
                row += len(next(iter(batch.values())))
    finally:
        model.train()
    return {f"val/{name}": float(total / row) for name, total in sums.items()}


def log_validation(
    run: TrackedRun | None,
    stage: TrainableStage,
    task: Task,
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
            metrics.update(validation_metrics(task, model if sharded else unwrapped(model), batch_size))
            metrics["val/seconds"] = time.monotonic() - started
            if sharded:
                # A forward without backward leaves the root unit's parameters gathered; the EMA swap
                # back writes into the shards.
                for module in model.modules():
                    if isinstance(module, FSDPModule):
                        module.reshard()
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
