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
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from pipelines.tracking import TrackedRun
from pipelines.trainable.base import Task, TrainableStage
from pipelines.training.parallel import full_state, unwrapped
from pipelines.training.step import swapped_in


def validation_metrics(task: Task, model: nn.Module, batch_size: int, *, lockstep: bool = False) -> dict[str, float]:
    """``val/<term>`` for each term of the task's held-out loss, its mean over the task's validation
    rows, of ``model`` as it is (eval mode); empty where the task has none.

    In a process group the ranks share the batches (rank k scores every world-size-th one) and add
    their sums, each rank receiving the whole figure: a batch's losses follow from its rows alone,
    so the split changes the figure only by the order of the additions. With ``lockstep`` (FSDP,
    whose forward gathers parameters from every rank) each rank runs as many forwards as the rank
    with the most batches, the extra ones scored and dropped."""
    batches = []  # (group, first row of the group, first row overall), in the fixed row order
    row = 0
    for group in task.spec.validation_batches:
        rows = len(next(iter(group.values())))
        for start in range(0, rows, batch_size):
            batches.append((group, start, row))
            row += min(batch_size, rows - start)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = batches[rank::world]
    dropped = (-(-len(batches) // world) - len(mine)) if lockstep and batches else 0
    sums: dict[str, float] = {}
    model.eval()
    try:
        for index, (group, start, first_row) in enumerate(mine + [batches[0]] * dropped):
            batch = {
                name: torch.as_tensor(values[start : start + batch_size]).to(task.device)
                for name, values in group.items()
            }
            with (
                torch.no_grad(),
                torch.autocast(task.device.type, dtype=torch.bfloat16, enabled=task.device.type == "cuda"),
            ):
                losses = task.validation_losses(model, batch, first_row)
            if index < len(mine):
                for name, values in losses.items():
                    sums[name] = sums.get(name, 0.0) + values.double().sum().item()
    finally:
        model.train()
    if world > 1:
        every_rank: list[dict[str, float]] = [{} for _ in range(world)]
        dist.all_gather_object(every_rank, sums)
        sums = {name: sum(part.get(name, 0.0) for part in every_rank) for name in every_rank[0]}
    return {f"val/{name}": total / row for name, total in sums.items()}


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
    (pipelines/chain_evaluation.py). Every rank calls it. The ranks share the held-out loss's rows
    (``validation_metrics``), and the chain's captions (``ChainScorer``); under FSDP the chain
    renders on rank 0 alone, through an unsharded copy of the EMA weights gathered from all, while
    the other ranks wait at the next step's all-reduce."""
    scores_chain = stage.evaluates_chain and task.spec.chain_evaluation is not None
    sharded = isinstance(model, FSDPModule)
    if not (task.spec.validation_batches or scores_chain):
        return
    metrics: dict[str, float] = {}
    # Eager: with `compile`, the blocks are compiled in place, and other batch shapes would compile again.
    with swapped_in(model, ema), torch.compiler.set_stance("force_eager"):
        started = time.monotonic()
        if task.spec.validation_batches:
            metrics.update(
                validation_metrics(task, model if sharded else unwrapped(model), batch_size, lockstep=sharded)
            )
            metrics["val/seconds"] = time.monotonic() - started
            if sharded:
                # A forward without backward leaves the root unit's parameters gathered; the EMA swap
                # back writes into the shards.
                for module in model.modules():
                    if isinstance(module, FSDPModule):
                        module.reshard()
        if scores_chain:
            started = time.monotonic()
            if sharded:
                # The chain needs whole weights: rank 0 renders every caption with a gathered copy.
                weights = full_state(model)
                if run is not None:
                    renderer = stage.build_model(task.spec)
                    renderer.load_state_dict(weights)
                    chain = task.chain_metrics(renderer.to(task.device))
                else:
                    chain = {}
            else:
                chain = task.chain_metrics(unwrapped(model), shared=True)
            metrics.update(chain)
            if chain:
                metrics["eval/seconds"] = time.monotonic() - started
    if run is not None and metrics:
        run.log_metrics(metrics, step=step)
