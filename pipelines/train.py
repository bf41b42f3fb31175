"""Training on Ray Train: one loop for every stage in the registry (pipelines/trainable).

The recipe of docs/design.md ("Training recipe"): AdamW with linear warm-up, gradient clipping, EMA weights, P2-weighted
epsilon loss with per-sample caption dropout (and semantic dropout for Stage B), bf16 autocast on
GPU. Distribution is DDP by default (FSDP as an option); the model code stays single-device. The
stage says what differs: its model, loss, sample grid, inputs and how its model is sharded and
compiled; the loop never names one.

What survives a failure: each checkpoint (pipelines/training/checkpoint.py) holds everything the
run needs to continue. The random draws of step ``s`` on rank ``k`` (noise, time, conditioning
dropout, and the models' own dropout) all follow from (seed, k, s), and the batches of each epoch
from the seed (pipelines/training/data.py), so a resumed run draws what the uninterrupted one would
have, and reads on from the position its checkpoint recorded rather than from the epoch's start. A
preemption notice (pipelines/training/preemption.py: a SIGTERM to a worker, or Ray draining a node)
has every rank checkpoint after the step it arrived in.

Rank 0 logs into the MLflow run the driver opened and prints a progress line at a steady interval
(pipelines/training/progress.py), and the held-out loss of the EMA weights every ``eval_every``
steps and at the end (pipelines/training/evaluation.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator

import pyarrow.fs
import ray.train
import torch
import torch._functorch.config
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file

from cluster.budget import BudgetMeter
from cluster.resources import GPU
from pipelines.runtime import quiet_ray_below
from pipelines.storage import local_copy
from pipelines.tracking import ATTEMPT_GPU_HOURS, connect
from pipelines.trainable.base import TaskSpec, TrainableStage
from pipelines.training.checkpoint import Checkpointer, TrainingState
from pipelines.training.config import TrainConfig
from pipelines.training.data import EpochReader, TrainingRows
from pipelines.training.evaluation import log_validation
from pipelines.training.parallel import all_agree, compile_blocks, data_parallel
from pipelines.training.preemption import Preempted, PreemptionWatch, TerminationNotice
from pipelines.training.progress import ProgressWindow, flops_per_sample, log_progress, log_samples, run_peak_flops
from pipelines.training.step import build_optimizer, build_schedule, step_seed, train_step, update_ema


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerArgs:
    """What the driver hands every worker."""

    train: TrainConfig
    stage: TrainableStage
    task: TaskSpec
    budget: float | None
    """GPU-hours the run may use in all, its earlier attempts included; None: no limit."""
    used_before: float
    """GPU-hours the run's earlier attempts used."""
    tracking_uri: str
    run_id: str
    data: dict[str, TrainingRows]
    """The training data: one data set, or one per aspect-ratio bucket, its rows counted."""
    clock: Callable[[], float] = time.monotonic
    """The budget meter's seconds (tests give one that advances a fixed amount per read, so per step)."""
    ray_log_level: str = "WARNING"
    """Ray's own lines on the console from this level up (RayConfig.log_level)."""


def train_worker(args: WorkerArgs) -> None:
    """The loop every Ray Train worker runs."""
    quiet_ray_below(args.ray_log_level)
    device = ray.train.torch.get_device()
    with worker_torch_settings(args.train, device):
        _train(args, device)


@contextlib.contextmanager
def worker_torch_settings(config: TrainConfig, device: torch.device) -> Iterator[None]:
    """The process-wide torch settings a worker trains under, put back when training ends (Ray Train
    may run more in the same process): its thread count, a warning filter, and what ``compile_blocks``
    sets (patched to their own values, so leaving restores them)."""
    threads = torch.get_num_threads()
    with (
        warnings.catch_warnings(),
        torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit),
        torch._functorch.config.patch(activation_memory_budget=torch._functorch.config.activation_memory_budget),
    ):
        # A 1x1 conv weight's gradient under channels_last activations has the same memory layout as
        # DDP's bucket view and differs only in the strides of its size-1 dims.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        if device.type == "cpu":
            torch.set_num_threads(max(1, int(config.cpus_per_worker)))
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _train(args: WorkerArgs, device: torch.device) -> None:
    config, stage, spec = args.train, args.stage, args.task
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(config.seed)
    model = stage.build_model(spec)
    if config.init_weights:  # each worker reads them itself: a driver's copy would be on its node only
        model.load_state_dict(load_file(local_copy(config.init_weights, spec.storage)), strict=True)
    task = stage.task(spec, device)
    model = data_parallel(model, stage.parallelism, config, device)
    forward = compile_blocks(model, stage.parallelism, config.activation_memory_budget) if config.compile else model
    optimizer = build_optimizer(model, config, device)
    schedule = build_schedule(optimizer, config)
    checkpoints = Checkpointer(model, optimizer, [p.detach().clone() for p in model.parameters()], device)
    resumed = checkpoints.restore_latest(schedule)
    state, ema = resumed.state, checkpoints.ema

    run = connect(args.tracking_uri, args.run_id) if rank == 0 else None
    # After a restart of the workers by Ray Train, the attempt goes on counting from what it last logged
    # (rank 0 decides the budget for all, so the other ranks need not know).
    meter = BudgetMeter(
        units_held=config.units_held,
        budget=args.budget,
        used_before=args.used_before,
        attempt_before=(run.latest_metric(ATTEMPT_GPU_HOURS) or 0.0) if run is not None else 0.0,
        clock=args.clock,
    )
    peak = run_peak_flops(device, config) if run is not None else None
    if peak is not None:  # tags: a resumed attempt measures a CPU's again, and params cannot change
        run.set_tags({"mfu.peak_flops": f"{peak.flops:.4g}", "mfu.peak_basis": peak.basis})
    if run is not None and resumed.candidates:  # the console line can scroll away; the run keeps it
        run.set_tags(
            {
                "resume.checkpoint": resumed.checkpoint,
                "resume.step": str(state.step),
                "resume.unreadable_checkpoints": json.dumps(resumed.unreadable),
            }
        )

    per_worker = config.global_batch_size // config.workers
    window = ProgressWindow()
    flops_by_shapes: dict[tuple, float] = {}  # FLOPs per sample, by the shapes of a batch (its bucket)
    step_seconds = 0.0
    last_log = -math.inf  # the first step is logged: a loss curve starts at the initial loss, however short
    preemption = PreemptionWatch(device)
    reader = EpochReader(list(args.data.values()), config, rank, device)
    try:
        while state.step < config.steps and not state.stop_reason:
            waited_since = time.monotonic()
            # From the position of the checkpoint resumed from: the reader skips rows of one piece at most.
            for batch in reader.batches(state.epoch, state.batches_in_epoch):
                data_wait = time.monotonic() - waited_since
                if not all_agree(meter.next_step_fits(step_seconds), device):
                    state.stop_reason = (
                        f"GPU-hour budget reached: used {meter.used():.4g} of {args.budget:.4g}; "
                        "the next step would exceed it"
                    )
                    break
                loss, grad_norm = train_step(
                    forward, optimizer, schedule, task, batch, config, step_seed(config.seed, rank, state.step)
                )
                state.step += 1
                state.batches_in_epoch += 1
                state.samples_seen += config.global_batch_size
                update_ema(ema, model, state.step, config)
                # The next step's cost, foreseen from this one's: its whole cycle holds the GPUs (data wait,
                # logging, samples and checkpoints of the step before included).
                step_seconds = meter.lap()
                total_seconds = time.monotonic() - waited_since
                state.last_loss = loss
                flops = None
                if run is not None:  # after the step's timing: counting a new bucket's shapes is not the step's
                    shapes = tuple(tuple(values.shape) for values in batch.values())
                    if shapes not in flops_by_shapes:
                        flops_by_shapes[shapes] = flops_per_sample(stage, task, batch, per_worker, state.step - 1)
                    flops = flops_by_shapes[shapes]
                window.add(loss, grad_norm, data_wait, total_seconds, flops)
                if run is not None and time.monotonic() - last_log >= config.log_every_seconds:
                    log_progress(run, state, window, meter, config, optimizer, device, peak)
                    log_reads(run, reader, state.step)
                    last_log = time.monotonic()
                if config.sample_every and state.step % config.sample_every == 0:
                    log_samples(run, stage, task, model, ema, state.step)
                if config.eval_every and state.step % config.eval_every == 0 and state.step < config.steps:
                    log_validation(run, stage, task, model, ema, state.step, per_worker)
                notice = preemption.notice()
                checkpoints.report_written(state.step)
                if notice is not None or (state.step % config.checkpoint_every == 0 and state.step < config.steps):
                    state.data_position = _positions(args, reader, state)
                    # A preemption's must be in storage before the node goes.
                    checkpoints.save(state, meter, durable=notice is not None)
                if notice is not None and notice.ends_run:
                    raise Preempted(
                        f"rank {rank}: {notice.reason}; checkpointed at step {state.step}, which the restart "
                        "resumes from"
                    )
                waited_since = time.monotonic()
                if state.step >= config.steps:
                    break
            else:
                state.epoch += 1
                state.batches_in_epoch = 0
    finally:
        reader.close()
    log_samples(run, stage, task, model, ema, state.step)
    log_validation(run, stage, task, model, ema, state.step, per_worker)
    meter.lap()  # the final samples count; the driver logs the final figures from the checkpoint
    if run is not None:
        log_progress(run, state, window, meter, config, optimizer, device, peak)
        log_reads(run, reader, state.step)
    state.data_position = _positions(args, reader, state)
    checkpoints.save(state, meter, final=True)


def _positions(args: WorkerArgs, reader: EpochReader, state: TrainingState) -> dict[str, list[dict]]:
    """Where each rank is in each data set, for a reader of the checkpoint's state (the position itself
    follows from the epoch and the batches taken in it)."""
    return dict(zip(args.data, reader.positions(state.epoch, state.batches_in_epoch), strict=True))


def log_reads(run, reader: EpochReader, step: int) -> None:
    """Rank 0's rows read from storage in this attempt, and those of them it had consumed before the
    position the attempt resumed from."""
    run.log_metrics({"data/rows_read": reader.rows_read, "data/rows_reread": reader.rows_reread}, step=step)


def trainer(
    *,
    name: str,
    args: WorkerArgs,
    storage_path: str,
    storage_filesystem: pyarrow.fs.FileSystem | None,
) -> TorchTrainer:
    """The TorchTrainer of one training run; same ``name`` and storage: a rerun resumes it."""
    config = args.train
    return TorchTrainer(
        train_worker,
        train_loop_config=args,
        scaling_config=ScalingConfig(
            num_workers=config.workers,
            use_gpu=config.gpus_per_worker > 0 and config.gpu_resource == GPU,
            resources_per_worker={
                "CPU": config.cpus_per_worker,
                **({config.gpu_resource: config.gpus_per_worker} if config.gpus_per_worker else {}),
            },
        ),
        run_config=RunConfig(
            logging_config=LoggingConfig(log_level=args.ray_log_level),
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            callbacks=[TerminationNotice()],
        ),
    )


def exported_state(
    stage: TrainableStage, spec: TaskSpec, ema_weights: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The weights later phases load: the EMA of the part of the model they use."""
    model = stage.build_model(spec)
    model.load_state_dict(ema_weights, strict=True)
    return {k: v.contiguous() for k, v in stage.export(model).state_dict().items()}
