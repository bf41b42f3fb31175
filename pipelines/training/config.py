"""The settings of one training run: recipe, scale, checkpoints, budget."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from cluster.resources import GPU, check_gpu_resource
from pipelines.trainable.base import StageALosses


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
    gpu_resource: str = GPU
    """The Ray resource ``gpus_per_worker`` asks for: GPU, or a custom resource that a node type
    offers in place of GPUs (the workers then train on CPU with gloo there)."""
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
    eval_every: int = 2_000
    """Steps between evaluations of the held-out loss (``val/loss``); 0: only at the end."""
    eval_samples: int = 256
    """Held-out rows each evaluation uses: the first of the validation split in shard order, shared
    equally among the aspect-ratio buckets; 0: no evaluation. Each costs a forward pass (Stage B and
    Stage C: one at each of 8 times)."""
    log_every_seconds: float = 30.0
    """Interval of the progress line and the MLflow metrics."""
    max_failures: int = 3
    """Worker failures Ray Train recovers from (restarting from the latest checkpoint). A SIGTERM to a
    worker (a spot instance's shutdown) is one; a node Ray drains for preemption is not
    (pipelines/training/preemption.py): on spot capacity without draining, allow the preemptions the
    planner expects."""
    cache_data: bool = False
    """For data sets that fit in memory: each worker keeps the files it has read in memory (their
    training rows, images decoded), so later epochs neither read nor decode them again (at LAION
    scale leave it off: epochs are long and the data streams)."""
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
        for name in ("eval_every", "eval_samples", "sample_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.global_batch_size % self.workers:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of workers "
                f"({self.workers}): each worker takes an equal share of every batch"
            )
        check_gpu_resource(self.gpu_resource)
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
            raise ValueError(
                "activation_memory_budget and activation_checkpointing both trade recompute for memory; set one of them"
            )

    @property
    def units_held(self) -> float:
        """GPUs held by the run, or workers on CPU: what the budget counts."""
        return self.workers * (self.gpus_per_worker or 1.0)

    def outcome(self) -> dict[str, Any]:
        """Settings that decide the trained weights (scale, logging and budget do not)."""
        ignored = {
            "workers",
            "gpus_per_worker",
            "gpu_resource",
            "cpus_per_worker",
            "checkpoint_every",
            "keep_checkpoints",
            "sample_every",
            "eval_every",
            "eval_samples",
            "log_every_seconds",
            "max_failures",
            "budget_gpu_hours",
            "cache_data",
            "compile",
            "strategy",
            "activation_checkpointing",
            "activation_memory_budget",
        }
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ignored}
