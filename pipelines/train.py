"""Training on Ray Train: one loop for Stage C, Stage B, Stage A and the semantic compressor.

The recipe of DESIGN.md: AdamW with linear warm-up, gradient clipping, EMA weights, P2-weighted
epsilon loss with per-sample caption dropout (and semantic dropout for Stage B), bf16 autocast on
GPU. Distribution is DDP by default (FSDP as an option); the model code stays single-device.

What survives a failure: each checkpoint holds the model, its EMA, the optimizer, the LR schedule,
the step, the data position and the GPU-hours used; Ray Train persists it only once it is
complete, restarts failed workers from the latest one (``max_failures``), and a resubmitted job
with the same work dir continues from it. The random draws of step ``s`` on rank ``k`` (noise, time,
conditioning dropout, and the models' own dropout) all follow from (seed, k, s), so a resumed run
draws what the uninterrupted one would have.
Ray Data hands out the training set in a fixed order (``preserve_order``), so each epoch gives every
rank the same batches: a seeded run repeats, and a resumed run skips exactly the batches its
checkpoint had consumed. Latents in aspect-ratio buckets come as one data set per bucket; a step's
batch is from one bucket, and the buckets take turns in an order drawn from (seed, epoch), the
same on every rank (each holds as many batches of each bucket).

Rank 0 logs into the MLflow run the driver opened (params, loss, LR, grad norm, samples/s,
data-wait fraction, peak memory, GPU-hours, FLOPs per sample and, on a GPU whose peak is known, the
model FLOP utilisation) and prints a progress line at a steady interval.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import random
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import pyarrow.fs
import ray.data
import ray.train
import torch
import torch._functorch.config
import torch.distributed as dist
from ray.train import (Checkpoint, CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig,
                       ScalingConfig)
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from cluster.budget import BudgetMeter
from cluster.gpus import peak_flops
from pipelines.flops import train_step_flops
from pipelines.runtime import quiet_ray_below
from pipelines.storage import local_copy
from pipelines.train_tasks import StageALosses, Task, TaskSpec, build_model, exported, input_columns
from pipelines.tracking import ATTEMPT_GPU_HOURS, RUN_GPU_HOURS, TrackedRun, connect
from stages.blocks import AttnBlock, ResBlock, TimestepBlock
from stages.stage_a import MixingBlock
from stages.stage_b import StageB

logger = logging.getLogger(__name__)

# The repeated blocks of the models: FSDP's units, and (with the small timestep blocks) what `compile`
# compiles one by one.
SHARDED_BLOCKS = (ResBlock, AttnBlock, MixingBlock)
COMPILED_BLOCKS = (*SHARDED_BLOCKS, TimestepBlock)

_MODEL, _EMA, _OPTIMIZER, _STATE = "model.safetensors", "ema.safetensors", "optimizer.pt", "state.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run: recipe, scale, checkpoints, budget."""

    steps: int
    """Optimizer steps in all (a resumed run counts the steps it already made)."""
    global_batch_size: int
    """Samples per step over all workers; must be a multiple of ``workers``."""
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    warmup_steps: int = 10_000
    """Linear warm-up from 0 to ``lr``."""
    weight_decay: float = 0.01
    """AdamW weight decay (PyTorch's default, as the original training code used)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this."""
    ema_beta: float = 0.9
    """EMA weights move this fraction towards the trained ones... kept: ema = beta*ema + (1-beta)*model."""
    ema_every: int = 100
    """Update the EMA every this many steps."""
    ema_start: int = 5_000
    """First step with EMA updates; before it the EMA copies the model."""
    caption_dropout: float = 0.05
    """Per-sample probability of the empty caption (classifier-free guidance)."""
    semantic_dropout: float = 0.1
    """Stage B only: per-sample probability of no semantic conditioning."""
    semantic_noise: float = 0.0
    """Stage B only: std of Gaussian noise added to the semantic conditioning in training, so Stage B
    holds up on Stage C's samples, which are never exactly the compressor's latents (noise
    conditioning augmentation of cascaded diffusion models)."""
    workers: int = 1
    """Ray Train workers (one process each)."""
    gpus_per_worker: float = 1.0
    """GPUs per worker; 0 trains on CPU with gloo."""
    cpus_per_worker: float = 8.0
    """CPUs per worker (fractions let CPU test runs share a small machine with Ray Data)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Data parallelism: DDP replicates the model; FSDP (FSDP2, ``fully_shard``) shards parameters,
    gradients and optimizer state over the workers, each residual and attention block a unit of its
    own, so a worker holds one block's full weights at a time (for the large configs; gloo on CPU)."""
    compile: bool = False
    """torch.compile each block of the model on its own (residual, attention, timestep and Stage A
    mixing blocks; a model without them, the semantic compressor, whole), as torchtitan does: blocks
    of one shape share their compiled code, and activation checkpointing keeps its eager memory. One
    compilation per block shape and batch shape: each aspect-ratio bucket compiles its own. With DDP
    or FSDP; samples are drawn eager."""
    activation_checkpointing: bool = False
    """Stage B and Stage C: recompute the activations of each repeat of the block pattern in backward
    instead of keeping them, for a fraction of the step's memory at the cost of a second forward pass
    (docs/benchmarks.md)."""
    activation_memory_budget: tuple[float, ...] = (1.0,)
    """With ``compile``: the share, from 0 to 1, of what each compiled block saves for backward by
    default that it may keep; inductor's partitioner recomputes the ops that cost least per byte to
    stay under it (0 keeps what checkpointing every block keeps, 1 is its own speed-first choice).
    A middle ground between ``activation_checkpointing`` and neither (docs/benchmarks.md). One share
    for every block, or for Stage B one per U-Net level, outermost first (e.g. ``0.3,0.4,0.6,1``
    for v2): each block meets its budget on its own, and under one share for all the inner levels'
    blocks give up matrix products where the outer levels could give up more elementwise work."""
    checkpoint_every: int = 1_000
    """Steps between checkpoints (one is also written at the end and when the budget stops the run)."""
    keep_checkpoints: int = 3
    """Checkpoints kept in storage; older ones are deleted."""
    sample_every: int = 5_000
    """Steps between sample grids logged to MLflow; 0: only at the end."""
    log_every_seconds: float = 30.0
    """Interval of the progress line and the MLflow metrics."""
    max_failures: int = 3
    """Worker failures Ray Train recovers from (restarting from the latest checkpoint)."""
    cache_data: bool = False
    """For data sets that fit in memory: hold the training set in Ray's object store after one read,
    and each worker's shard in its own memory after its first epoch, reshuffled every epoch, so short
    epochs pay neither a re-read nor Ray Data's start of a new pass (at LAION scale leave it off:
    epochs are long and the data streams)."""
    budget_gpu_hours: float | None = None
    """GPU-hours (worker-hours on CPU) this run may use; none: no limit but the experiment's."""
    init_weights: str = ""
    """Weights to start from (fine-tuning), a path or URL; empty: the original initialisation."""
    stage_a_losses: StageALosses = dataclasses.field(default_factory=StageALosses)
    """``train_a`` only: the perceptual and adversarial terms of Stage A's loss (off by default)."""
    seed: int = 0
    """Seed of the initialisation, the data order and every random draw."""

    def __post_init__(self):
        for name in ("steps", "global_batch_size", "workers", "checkpoint_every", "keep_checkpoints", "ema_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.global_batch_size % self.workers:
            raise ValueError(f"global_batch_size ({self.global_batch_size}) must be a multiple of workers "
                             f"({self.workers}): each worker takes an equal share of every batch")
        if not 0 <= self.ema_beta < 1:
            raise ValueError(f"ema_beta must be in [0, 1), got {self.ema_beta}")
        for name in ("caption_dropout", "semantic_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.semantic_noise < 0:
            raise ValueError(f"semantic_noise must be >= 0, got {self.semantic_noise}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip <= 0:
            raise ValueError("lr and grad_clip must be > 0 and warmup_steps >= 0")
        if self.budget_gpu_hours is not None and self.budget_gpu_hours <= 0:
            raise ValueError(f"budget_gpu_hours must be > 0 or none, got {self.budget_gpu_hours}")
        budgets = self.activation_memory_budget
        if not budgets or not all(0 <= budget <= 1 for budget in budgets):
            raise ValueError(f"activation_memory_budget must be one or more shares in [0, 1], got {budgets}")
        if min(budgets) < 1 and not self.compile:
            raise ValueError("activation_memory_budget below 1 needs compile=true (it steers inductor's partitioner)")
        if min(budgets) < 1 and self.activation_checkpointing:
            raise ValueError("activation_memory_budget and activation_checkpointing both trade recompute for memory; "
                             "set one of them")

    @property
    def units_held(self) -> float:
        """GPUs held by the run, or workers on CPU: what the budget counts."""
        return self.workers * (self.gpus_per_worker or 1.0)

    def outcome(self) -> dict[str, Any]:
        """Settings that decide the trained weights (scale, logging and budget do not)."""
        ignored = {"workers", "gpus_per_worker", "cpus_per_worker", "checkpoint_every", "keep_checkpoints",
                   "sample_every", "log_every_seconds", "max_failures", "budget_gpu_hours", "cache_data", "compile",
                   "strategy", "activation_checkpointing", "activation_memory_budget"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ignored}


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerArgs:
    """What the driver hands every worker."""

    train: TrainConfig
    task: TaskSpec
    budget: float | None
    """GPU-hours the run may use in all, its earlier attempts included; None: no limit."""
    used_before: float
    """GPU-hours the run's earlier attempts used."""
    tracking_uri: str
    run_id: str
    buckets: dict[str, int] = dataclasses.field(default_factory=dict)
    """Aspect-ratio buckets: data set name -> batches each worker takes from it per epoch. Empty: the
    one data set ``train``, read to its end."""
    clock: Callable[[], float] = time.monotonic
    """The budget meter's seconds (tests give one that advances a fixed amount per read, so per step)."""
    ray_log_level: str = "WARNING"
    """Ray's own lines on the console from this level up (RayConfig.log_level)."""


TRAIN_DATASET = "train"


@dataclasses.dataclass(kw_only=True)
class TrainingState:
    """Where training stands, saved with every checkpoint."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    gpu_hours_used: float = 0.0
    """GPU-hours of the run at this checkpoint, its earlier attempts included."""
    gpu_hours_attempt: float = 0.0
    """GPU-hours of the attempt that wrote this checkpoint."""
    samples_seen: int = 0
    last_loss: float = math.nan
    stop_reason: str = ""


def _step_seed(seed: int, rank: int, step: int) -> int:
    # A function of (seed, rank, step) alone, so a resumed run draws exactly what it would have.
    return (seed * 1_000_003 + rank) * 10_000_019 + step


def _lr_factor(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


@contextlib.contextmanager
def _swapped_in(model: nn.Module, weights: list[torch.Tensor]):
    """Temporarily give ``model``'s (local) parameters the values ``weights`` (the EMA)."""
    originals = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
    try:
        yield model
    finally:
        with torch.no_grad():
            for p, o in zip(model.parameters(), originals):
                p.copy_(o)


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU, gathered from shards under FSDP."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def train_worker(args: WorkerArgs) -> None:
    """The loop every Ray Train worker runs."""
    config, spec = args.train, args.task
    quiet_ray_below(args.ray_log_level)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    # A 1x1 conv weight's gradient under channels_last activations has the same memory layout as
    # DDP's bucket view and differs only in the strides of its size-1 dims.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config.cpus_per_worker)))
    torch.manual_seed(config.seed)
    model = build_model(spec)
    if config.init_weights:
        model.load_state_dict(load_file(local_copy(config.init_weights, spec.storage)), strict=True)
    task = Task(spec, device)
    if config.strategy == "fsdp":
        model = _fully_sharded(model.to(device), device)
    else:
        model = ray.train.torch.prepare_model(model, parallel_strategy="ddp")
    forward = compile_blocks(model, config.activation_memory_budget) if config.compile else model
    optimizer = build_optimizer(model, config, device)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config.warmup_steps))
    ema = [p.detach().clone() for p in model.parameters()]
    state = TrainingState()

    candidates = list(_resume_candidates(ray.train.get_checkpoint()))
    unreadable: list[str] = []
    resumed_from = ""
    for checkpoint in candidates:
        try:
            state, ema = _restore(checkpoint, model, optimizer, schedule, ema)
            resumed_from = Path(checkpoint.path).name
            break
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
            # The next candidate sets model, optimizer, schedule and EMA again, whole.
            logger.warning("checkpoint %s cannot be read (%s): trying the previous one", checkpoint.path, error)
            unreadable.append(Path(checkpoint.path).name)
    else:
        if candidates:  # never silently start over: that would spend the budget again
            raise RuntimeError(f"none of the {len(candidates)} checkpoints beside {candidates[0].path} can be read; "
                               "delete them to train from the start")
    run = connect(args.tracking_uri, args.run_id) if rank == 0 else None
    # After a restart of the workers by Ray Train, the attempt goes on counting from what it last logged
    # (rank 0 decides the budget for all, so the other ranks need not know).
    meter = BudgetMeter(units_held=config.units_held, budget=args.budget, used_before=args.used_before,
                        attempt_before=(run.latest_metric(ATTEMPT_GPU_HOURS) or 0.0) if run is not None else 0.0,
                        clock=args.clock)
    peak = _run_peak_flops(device, config) if run is not None else None
    if run is not None and candidates:  # the console line can scroll away; the run keeps it
        run.set_tags({"resume.checkpoint": resumed_from, "resume.step": str(state.step),
                      "resume.unreadable_checkpoints": json.dumps(unreadable)})

    names = list(args.buckets) or [TRAIN_DATASET]
    shards = [ray.train.get_dataset_shard(name) for name in names]
    per_worker = config.global_batch_size // config.workers
    window = _Window()
    flops_by_shapes: dict[tuple, float] = {}  # FLOPs per sample, by the shapes of a batch (its bucket)
    step_seconds = 0.0
    last_log = -math.inf  # the first step is logged: a loss curve starts at the initial loss, however short
    caches = [_ShardCache() if config.cache_data else None for _ in names]
    while state.step < config.steps and not state.stop_reason:
        waited_since = time.monotonic()
        index = -1
        batches = _epoch_batches(shards, caches, list(args.buckets.values()), config, per_worker, device, rank,
                                 state.epoch)
        for index, batch in enumerate(batches):
            if index < state.batches_in_epoch:
                waited_since = time.monotonic()
                continue  # consumed before the checkpoint this run resumed from
            data_wait = time.monotonic() - waited_since
            if not _agree(meter.next_step_fits(step_seconds), device):
                state.stop_reason = (f"GPU-hour budget reached: used {meter.used():.4g} of {args.budget:.4g}; "
                                     "the next step would exceed it")
                break
            loss, grad_norm = train_step(forward, optimizer, schedule, task, batch, config,
                                          _step_seed(config.seed, rank, state.step))
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
                    flops_by_shapes[shapes] = _flops_per_sample(task, batch, per_worker, state.step - 1)
                flops = flops_by_shapes[shapes]
            window.add(loss, grad_norm, data_wait, total_seconds, flops)
            if run is not None and time.monotonic() - last_log >= config.log_every_seconds:
                _log_progress(run, state, window, meter, config, optimizer, device, peak)
                last_log = time.monotonic()
            if config.sample_every and state.step % config.sample_every == 0:
                _log_samples(run, task, model, ema, state.step)
            if state.step % config.checkpoint_every == 0 and state.step < config.steps:
                _report(model, ema, optimizer, state, meter)
            waited_since = time.monotonic()
            if state.step >= config.steps:
                break
        else:
            if index < 0:
                raise RuntimeError(f"rank {rank}: an epoch without a single batch of {per_worker} samples: the "
                                   "training set is smaller than global_batch_size")
            state.epoch += 1
            state.batches_in_epoch = 0
    _log_samples(run, task, model, ema, state.step)
    meter.lap()  # the final samples count; the driver logs the final figures from the checkpoint
    if run is not None:
        _log_progress(run, state, window, meter, config, optimizer, device, peak)
    _report(model, ema, optimizer, state, meter, final=True)


class _ShardCache:
    """A worker's shard in memory, collected during its first epoch."""

    def __init__(self):
        self.batches: list[dict[str, torch.Tensor]] = []
        self.columns: dict[str, torch.Tensor] | None = None

    def seal(self) -> None:
        self.columns = {name: torch.cat([b[name] for b in self.batches]) for name in self.batches[0]}
        self.batches = []


def _epoch_batches(shards: list, caches: list[_ShardCache | None], batches_per_bucket: list[int], config: TrainConfig,
                   per_worker: int, device: torch.device, rank: int, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of this worker's batches. Buckets take turns in an order shuffled by (seed, epoch) alone:
    every rank holds as many batches of each bucket, so all ranks step through the same order."""
    if not batches_per_bucket:
        yield from _shard_batches(shards[0], caches[0], config, per_worker, device, rank, epoch)
        return
    order = [bucket for bucket, batches in enumerate(batches_per_bucket) for _ in range(batches)]
    random.Random(_step_seed(config.seed, 0, epoch)).shuffle(order)
    iterators = [_shard_batches(shard, cache, config, per_worker, device, rank, epoch)
                 for shard, cache in zip(shards, caches)]
    for bucket in order:
        yield next(iterators[bucket])
    for bucket, iterator in enumerate(iterators):  # read to the end: a cache seals, Ray Data's pass finishes
        assert next(iterator, None) is None, f"bucket {bucket} holds more than its {batches_per_bucket[bucket]} batches"


def _shard_batches(shard, cache: _ShardCache | None, config: TrainConfig, per_worker: int, device: torch.device,
                   rank: int, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of a data set's batches: from Ray Data, or from the cache once it holds the shard."""
    if cache is not None and cache.columns is None and epoch > 0:
        # A run resumed after its first epoch fills the cache first, in the order the first epoch streams
        # (the local shuffle is seeded per epoch), and takes this epoch from it: the batches the run
        # would have had without the interruption, and the ones its checkpoint counted as consumed.
        cache.batches.extend(_streamed_batches(shard, config, per_worker, device, epoch=0))
        if cache.batches:
            cache.seal()
    if cache is not None and cache.columns is not None:
        rows = next(iter(cache.columns.values())).shape[0]
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(_step_seed(config.seed, rank, epoch)))
        for start in range(0, rows - per_worker + 1, per_worker):
            chosen = order[start:start + per_worker].to(device)
            yield {name: values[chosen] for name, values in cache.columns.items()}
        return
    for batch in _streamed_batches(shard, config, per_worker, device, epoch):
        if cache is not None:
            cache.batches.append(batch)
        yield batch
    if cache is not None and cache.batches:
        cache.seal()


def _streamed_batches(shard, config: TrainConfig, per_worker: int, device: torch.device,
                      epoch: int) -> Iterator[dict[str, torch.Tensor]]:
    return shard.iter_torch_batches(batch_size=per_worker, drop_last=True, device=device,
                                    local_shuffle_buffer_size=4 * per_worker,
                                    local_shuffle_seed=config.seed * 1000 + epoch)


def update_ema(ema: list[torch.Tensor], model: nn.Module, step: int, config: TrainConfig) -> None:
    """After optimizer step ``step``: move the EMA towards the model, or copy it before ``ema_start``."""
    with torch.no_grad():
        if step < config.ema_start:
            for e, p in zip(ema, model.parameters()):
                e.copy_(p.detach())
        elif step % config.ema_every == 0:
            for e, p in zip(ema, model.parameters()):
                e.lerp_(p.detach(), 1 - config.ema_beta)


def _agree(fits: bool, device: torch.device) -> bool:
    """Every rank stops at the same step: rank 0's budget decision holds for all."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fits
    flag = torch.tensor([1.0 if fits else 0.0], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # Fused on CUDA: the default foreach AdamW took 16% of a v2 Stage B step on an H200.
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                             fused=device.type == "cuda")


def train_step(model, optimizer, schedule, task: Task, batch, config: TrainConfig, seed: int) -> tuple[float, float]:
    """One optimizer step on ``batch`` whose random draws all follow from ``seed``; returns the loss and
    the gradient norm before clipping."""
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    # Dropout inside the models draws from the global generators: seeded per step as well (with a seed
    # the task's generator never gets, so the two streams differ), a resumed run draws the masks that
    # the uninterrupted one would have.
    torch.manual_seed(seed ^ (1 << 63))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = task.loss(model, batch, generator, step=schedule.last_epoch)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{task.spec.stage}: loss is {loss.item()} at step {schedule.last_epoch + 1}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    schedule.step()
    return loss.item(), float(grad_norm)


def _flops_per_sample(task: Task, batch: dict[str, torch.Tensor], per_worker: int, step: int) -> float:
    """FLOPs of one sample's forward and backward through ``task.loss`` at ``step``, counted on fake
    tensors. The model is built without activation checkpointing: MFU counts the model's FLOPs, and
    what a checkpoint recomputes is the run's cost, not the model's work. The loss draws from a
    generator of its own, so the training's draws stay as they were."""
    spec = dataclasses.replace(task.spec, activation_checkpointing=False)

    def build() -> nn.Module:
        with task.device:  # built there: fake parameters cannot be moved (``to`` cannot swap them)
            return build_model(spec)

    flops = train_step_flops(build, lambda model: task.loss(model, batch, torch.Generator(task.device).manual_seed(0),
                                                            step=step))
    return flops / per_worker


def _run_peak_flops(device: torch.device, config: TrainConfig) -> float | None:
    """Dense bf16 FLOP/s of all the GPUs the run holds; None on CPU and on a GPU cluster/gpus.py does
    not know (the run then logs no MFU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    per_gpu = peak_flops(name)
    if per_gpu is None:
        logger.warning(f"no peak FLOP/s known for {name!r} (add it to cluster/gpus.py): this run logs no MFU")
        return None
    return per_gpu * config.workers * config.gpus_per_worker


class _Window:
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


def _log_progress(run: TrackedRun, state: TrainingState, window: _Window, meter: BudgetMeter, config: TrainConfig,
                  optimizer, device: torch.device, peak: float | None) -> None:
    """Logs the window's figures; ``peak``: the FLOP/s of all GPUs held, None for no MFU."""
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
        metrics["mfu"] = figures["flops_per_sample"] * samples_per_second / peak
    run.log_metrics(metrics, step=state.step)
    budget = ("no budget" if meter.budget is None
              else f"{metrics['gpu_hours_remaining']:.3g} of {meter.budget:.3g} GPU-h left")
    mfu = f"MFU {metrics['mfu']:.0%}  " if "mfu" in metrics else ""
    # Ray Train sends the root logger to the driver's console once (its patched print shows twice).
    logger.info(f"step {state.step}/{config.steps}  loss {figures['loss']:.4f}  {samples_per_second:.1f} samples/s  "
                f"{mfu}data wait {figures['data_wait_fraction']:.0%}  ETA {metrics['eta_seconds'] / 60:.1f} min  "
                f"{budget}")


def _log_samples(run: TrackedRun | None, task: Task, model: nn.Module, ema: list[torch.Tensor], step: int) -> None:
    """The EMA model's sample grid, logged by rank 0 (``run``). Every rank calls it: under FSDP rank 0
    alone cannot run the sharded model, so all ranks gather the EMA weights into rank 0's unsharded
    copy, which samples."""
    if isinstance(model, FSDPModule):
        with _swapped_in(model, ema):
            weights = _full_state(model)
        if run is None:
            return
        sampler = build_model(task.spec)
        sampler.load_state_dict(weights)
        grid = task.samples(sampler.to(task.device), step)
    elif run is None:
        return
    else:
        # Eager: with `compile`, the blocks are compiled in place, and sampling (no grad, other batch
        # shapes) would compile each of them again.
        with _swapped_in(model, ema), torch.compiler.set_stance("force_eager"):
            grid = task.samples(_unwrapped(model), step)
    if grid is not None:
        run.log_image(grid, f"samples/step_{step:07d}.png")


def compile_blocks(model: nn.Module, memory_budget: tuple[float, ...] = (1.0,), backend: str = "inductor") -> nn.Module:
    """``model`` with each block compiled in place, or compiled whole if it has no such blocks, each
    graph keeping at most its budget's share of its default saved activations: one budget for every
    block, or one per level of a Stage B (TrainConfig.activation_memory_budget). ``backend``:
    inductor to train; bench/peak_memory.py runs the same partitioned graphs op by op
    (``aot_eager_decomp_partition``), which fake tensors can go through.

    Compiled whole, a checkpointed v2 Stage B kept far more alive in backward than eager
    checkpointing (25.6 against 17.6 GiB on an H200, docs/benchmarks.md): per block, inductor's
    backward of one block is all that a checkpoint recomputes. Static shapes: a run has a handful of
    batch shapes, and with dynamic ones inductor (torch 2.14.1) fails on the second shape of tiny
    Stage B and Stage C (ordering the symbolic strides of a convolution's input)."""
    blocks = _blocks_with_budgets(_unwrapped(model), memory_budget)
    if not blocks:
        (budget,) = memory_budget
        # Process-wide: the partitioner reads it whenever the graph compiles, which is at the first
        # call and at every recompile, long after this returns.
        torch._functorch.config.activation_memory_budget = budget
        return torch.compile(model, backend=backend, dynamic=False)
    # Every block runs through one compiled function, so each (block shape, budget, batch shape)
    # counts against one recompile limit: the v2 Stage B has 14 block shapes, and each of up to 9
    # aspect-ratio buckets compiles them again, far past the default of 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    compiled = torch.compile(_block_forward, backend=backend, dynamic=False)
    for block, budget in blocks:
        # Forward hooks (FSDP's gathers) stay eager around it, as with torchtitan's per-block compile.
        block.forward = functools.partial(_call_within_budget, compiled, block, budget)
    return model


def _blocks_with_budgets(model: nn.Module, memory_budget: tuple[float, ...]) -> list[tuple[nn.Module, float]]:
    """The blocks ``compile_blocks`` compiles, each with its budget."""
    if len(memory_budget) == 1:
        groups = [[model]]
    elif isinstance(model, StageB) and len(memory_budget) == len(model.config.c_hidden):
        groups = model.blocks_by_level()
    else:
        levels = len(model.config.c_hidden) if isinstance(model, StageB) else 1
        raise ValueError(f"activation_memory_budget has {len(memory_budget)} shares: give one for every block, or for "
                         f"Stage B one per level ({levels} here)")
    return [(block, budget) for group, budget in zip(groups, memory_budget)
            for module in group for block in module.modules() if isinstance(block, COMPILED_BLOCKS)]


def _call_within_budget(compiled: Callable[..., Any], block: nn.Module, budget: float, *args: Any, **kwargs: Any) -> Any:
    """``block``'s compiled forward, partitioned under ``budget`` when it compiles, which happens
    inside this call (at the first one and at every recompile). The process-wide setting, patched
    per call, not torch's ``region_activation_memory_budget``: that came after torch 2.11, which the
    lent GPU machines run."""
    with torch._functorch.config.patch(activation_memory_budget=budget):
        return compiled(block, budget, *args, **kwargs)


def _block_forward(block: nn.Module, budget: float, *args: Any, **kwargs: Any) -> Any:
    # Reading the budget makes it part of what the compiled code is cached under, so blocks of one
    # shape with different budgets compile apart instead of reusing each other's partition.
    assert 0 <= budget <= 1, budget
    return type(block).forward(block, *args, **kwargs)


def _fully_sharded(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` sharded over all workers with FSDP2: each residual and attention block is gathered only
    while it runs forward or backward; the rest (embeddings, timestep blocks, heads) with the root."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for module in model.modules():
        if isinstance(module, SHARDED_BLOCKS):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _resume_candidates(latest: Checkpoint | None) -> Iterator[Checkpoint]:
    """The checkpoint Ray Train resumes from, then the older ones kept beside it, newest first."""
    if latest is None:
        return
    yield latest
    parent = latest.path.rstrip("/").rsplit("/", 1)[0]
    siblings = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    # Ray names them checkpoint_<date>_<time>: the name order is the time order.
    older = sorted((info.path for info in siblings if info.type == pyarrow.fs.FileType.Directory
                    and info.base_name.startswith("checkpoint_") and info.path < latest.path.rstrip("/")), reverse=True)
    for path in older:
        yield Checkpoint(path, filesystem=latest.filesystem)


def _restore(checkpoint: Checkpoint, model, optimizer, schedule, ema: list[torch.Tensor]) -> tuple[TrainingState, list]:
    """Model, optimizer, schedule and EMA from ``checkpoint``; its files are checked against the sizes
    and SHA-256 digests its state recorded, so a truncated or altered file is refused even where its
    format would load it."""
    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        state, files = _read_state(folder)
        verify_files(folder, files)
        # A run stopped by its budget continues when resubmitted (with a larger one).
        state = dataclasses.replace(state, stop_reason="")
        model_state, ema_state = load_file(folder / _MODEL), load_file(folder / _EMA)
        optimizer_state = torch.load(folder / _OPTIMIZER, weights_only=True)
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_state, options=options)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
        schedule.last_epoch = state.step - 1
        schedule.step()
        with _swapped_in(model, ema):
            set_model_state_dict(model, ema_state, options=options)
            ema = [p.detach().clone() for p in model.parameters()]
    return state, ema


def _read_state(folder: Path) -> tuple[TrainingState, dict[str, dict[str, Any]]]:
    """A checkpoint's training state and the size and digest each of its files had when written."""
    recorded = json.loads((folder / _STATE).read_text())
    files = recorded.pop("files")
    return TrainingState(**recorded), files


def verify_files(folder: Path, files: dict[str, dict[str, Any]]) -> None:
    """Raises ValueError unless each file has the size and SHA-256 digest recorded when it was written."""
    for name, written in files.items():
        found = {"bytes": (folder / name).stat().st_size}
        if found["bytes"] == written["bytes"]:
            found["sha256"] = _sha256(folder / name)
        if found != written:
            raise ValueError(f"{name} is not what the checkpoint wrote ({found} != {written})")


def file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _report(model, ema, optimizer, state: TrainingState, meter: BudgetMeter, *, final=False) -> None:
    """Writes a checkpoint from rank 0 and reports it; every rank must call this at the same step."""
    state.gpu_hours_used, state.gpu_hours_attempt = meter.used(), meter.attempt()
    model_state = _full_state(model)
    with _swapped_in(model, ema):
        ema_state = _full_state(model)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                          cpu_offload=True))
    metrics = {"step": state.step, "loss": state.last_loss, RUN_GPU_HOURS: state.gpu_hours_used,
               ATTEMPT_GPU_HOURS: state.gpu_hours_attempt, "final": final, "stop_reason": state.stop_reason}
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_file({k: v.contiguous() for k, v in model_state.items()}, Path(folder) / _MODEL)
        save_file({k: v.contiguous() for k, v in ema_state.items()}, Path(folder) / _EMA)
        torch.save(optimizer_state, Path(folder) / _OPTIMIZER)
        # Hashing costs about a second per 2 GB on rank 0 (v2 Stage C: ~14 GB with the optimizer).
        files = {name: file_record(Path(folder) / name) for name in (_MODEL, _EMA, _OPTIMIZER)}
        (Path(folder) / _STATE).write_text(json.dumps({**dataclasses.asdict(state), "files": files}))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))


def trainer(*, name: str, args: WorkerArgs, datasets: dict[str, ray.data.Dataset], storage_path: str,
            storage_filesystem: pyarrow.fs.FileSystem | None) -> TorchTrainer:
    """The TorchTrainer of one training run; same ``name`` and storage: a rerun resumes it."""
    config = args.train
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # otherwise blocks reach the ranks in the order Ray Data's tasks finish
    return TorchTrainer(
        train_worker,
        train_loop_config=args,
        scaling_config=ScalingConfig(
            num_workers=config.workers,
            use_gpu=config.gpus_per_worker > 0,
            resources_per_worker={"CPU": config.cpus_per_worker,
                                  **({"GPU": config.gpus_per_worker} if config.gpus_per_worker else {})},
        ),
        run_config=RunConfig(
            logging_config=LoggingConfig(log_level=args.ray_log_level),
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
        ),
        datasets={name: dataset.select_columns(input_columns(args.task)) for name, dataset in datasets.items()},
        dataset_config=DataConfig(execution_options=ingest),
    )


def read_checkpoint_weights(checkpoint: Checkpoint) -> tuple[dict[str, torch.Tensor], TrainingState]:
    """The EMA weights and the training state of a finished run's last checkpoint."""
    with checkpoint.as_directory() as folder:
        return load_file(Path(folder) / _EMA), _read_state(Path(folder))[0]


def exported_state(spec: TaskSpec, ema_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights later phases load: the EMA of the part of the model they use."""
    model = build_model(spec)
    model.load_state_dict(ema_weights, strict=True)
    return {k: v.contiguous() for k, v in exported(spec, model).state_dict().items()}


