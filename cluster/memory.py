"""Peak GPU memory of one training step, predicted before a run: does a training phase fit its GPUs?

    peak = fixed + samples per GPU x GiB per sample x (latent pixels / the calibration's latent pixels)

per stage, model size and setting (eager, or activation checkpointing), with DDP; FSDP divides
the fp32 weights and AdamW's two moments (12 bytes per parameter) over the workers. The GiB per
sample is the slope between two batches of ``bench/peak_memory.py`` (fake tensors, the step of
``bench/train_step.py``) at the latent v2 trains at; ``fixed`` puts the line through the peak
measured on an H200 (``torch.cuda.max_memory_allocated``). docs/memory.md has the runs, the fit
and the model beside every measured peak.

What it does not model, and says so: compiled blocks with an ``activation_memory_budget`` below 1
(their peak depends on the partitioner's choices: measure them with ``bench/peak_memory.py``);
FSDP's peak, never measured (the model adds nothing for the unit of weights each worker
gathers, ~1% of a v2 stage); model sizes without a calibration (``tiny``).

It takes plain numbers and settings: the planner of a run config (``pipelines/plan.py``) counts a
stage's parameters and finds the latent it trains on.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

GIB = 2**30
HEADROOM = 0.9
"""Share of a GPU's memory a planned step may take: the rest is for what max_memory_allocated does
not count (the CUDA context, NCCL's buffers, the caching allocator's fragmentation) and for the
model's own error (within 3.5% of the measured and predicted peaks, docs/memory.md)."""
SHARDED_BYTES_PER_PARAMETER = 12  # fp32 weights 4, AdamW's two fp32 moments 8: held at every peak
TEXT_TOWER_BYTES_PER_PARAMETER = 4  # with pre_encode.text=tokens the frozen tower steps in fp32 beside the stage
# GPU sizes a plan can point to when a step does not fit, with an AWS node type that has them.
GPU_SIZES_GIB = (
    (40, "A100 40 GB: p4d.24xlarge"),
    (80, "A100 80 GB: p4de.24xlarge"),
    (140, "H200 141 GB: p5en.48xlarge"),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calibration:
    """One stage, model size and setting: the line through a measured peak, its slope predicted."""

    latent: tuple[int, int]
    """(height, width) of the latent the slope was predicted at."""
    gib_per_sample: float
    """What one more sample per GPU adds at that latent (bench/peak_memory.py, two batches)."""
    fixed_gib: float
    """The rest of the peak with DDP: weights, AdamW's moments, gradients as far as the peak holds
    them, autocast's bf16 weight copies (the measured peak less the samples' share)."""


# (stage, models, setting) -> the fit; the runs behind each number are in docs/memory.md.
CALIBRATIONS = {
    # Slope: 35.19 GiB at batch 16 and 57.39 at 32; through 57.55 measured at 32.
    ("stage_c", "v2", "eager"): Calibration(latent=(24, 24), gib_per_sample=1.3878, fixed_gib=13.14),
    # Slope: 15.65 GiB at batch 16 and 16.52 at 32; through 16.79 measured at 32.
    ("stage_c", "v2", "checkpointing"): Calibration(latent=(24, 24), gib_per_sample=0.0546, fixed_gib=15.04),
    # Slope: 32.32 GiB at batch 4 and 50.90 at 8 (1024 px); through 33.02 measured at 16 of 128x128.
    ("stage_b", "v2", "eager"): Calibration(latent=(256, 256), gib_per_sample=4.6445, fixed_gib=14.44),
    # Slope: 17.14 GiB at batch 4 and 18.56 at 8 (1024 px); through 17.67 measured at 16 of 128x128.
    ("stage_b", "v2", "checkpointing"): Calibration(latent=(256, 256), gib_per_sample=0.3563, fixed_gib=16.24),
}


class StepSettings(Protocol):
    """What the model reads of a training config: a dataclass (``what_fits`` varies its fields), as
    ``pipelines.training.config.TrainConfig`` is."""

    workers: int
    global_batch_size: int
    strategy: str
    """"ddp" or "fsdp"."""
    compile: bool
    activation_checkpointing: bool
    activation_memory_budget: tuple[float, ...]


def variant(train: StepSettings) -> str:
    """What a training config runs, named as bench/train_step.py names its variants of ours (the
    name cluster/measured.toml gives a throughput's ``setting``)."""
    parts = ["compile"] if train.compile else []
    if train.activation_checkpointing:
        parts.append("checkpointing")
    if min(train.activation_memory_budget) < 1:
        parts.append("budget=" + "/".join(f"{share:g}" for share in train.activation_memory_budget))
    return "+".join(parts) or "eager"


def setting(train: StepSettings) -> str | None:
    """The calibrated setting whose line bounds a config's peak, or None for one the model does not
    know. Compiled per block without a budget keeps at most what eager keeps (v2 Stage C measured
    50.92 GiB against 57.81, Stage B predicted 30.26 against 32.70), so eager's line bounds it."""
    if train.activation_checkpointing:
        return "checkpointing"
    if min(train.activation_memory_budget) < 1:
        return None
    return "eager"


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepMemory:
    """The predicted peak of one worker's step, and what it is made of."""

    samples_per_gpu: int
    latent: tuple[int, int]
    variant: str
    """What the config runs (``variant``)."""
    sharded_gib: float
    """Weights and AdamW's moments, over the workers with FSDP."""
    rest_gib: float
    """The calibration's fixed part less the weights and moments."""
    samples_gib: float
    text_tower_gib: float = 0.0
    """The frozen text tower's weights, with pre_encode.text=tokens (its activations, without
    gradients, are freed before the stage's forward)."""

    @property
    def peak_gib(self) -> float:
        return self.sharded_gib + self.rest_gib + self.samples_gib + self.text_tower_gib

    def fits(self, gpu_gib: float) -> bool:
        return self.peak_gib <= HEADROOM * gpu_gib


def step_memory(
    stage: str,
    models: str,
    train: StepSettings,
    latent: tuple[int, int],
    *,
    parameters: int,
    text_tower_parameters: int = 0,
) -> StepMemory | None:
    """The peak of one step of ``train`` on a (height, width) latent, for a stage of ``parameters``
    trained beside a frozen text tower of ``text_tower_parameters`` (with pre_encode.text=tokens; 0
    without); None where nothing is calibrated."""
    name = setting(train)
    fit = CALIBRATIONS.get((stage, models, name))
    if fit is None:
        return None
    states = SHARDED_BYTES_PER_PARAMETER * parameters / GIB
    shards = train.workers if train.strategy == "fsdp" else 1
    samples = train.global_batch_size // train.workers
    return StepMemory(
        samples_per_gpu=samples,
        latent=latent,
        variant=variant(train),
        sharded_gib=states / shards,
        rest_gib=fit.fixed_gib - states,
        samples_gib=samples * fit.gib_per_sample * math.prod(latent) / math.prod(fit.latent),
        text_tower_gib=TEXT_TOWER_BYTES_PER_PARAMETER * text_tower_parameters / GIB,
    )


def what_fits(
    stage: str,
    models: str,
    section: str,
    train: StepSettings,
    latent: tuple[int, int],
    gpu_gib: float,
    *,
    parameters: int,
    text_tower_parameters: int = 0,
) -> list[str]:
    """Changes that would make a step fit GPUs of ``gpu_gib``, each with its predicted peak: more
    workers (fewer samples each), activation checkpointing, FSDP, bigger GPUs. Empty when none does."""
    changes = []
    for workers in range(train.workers + 1, train.global_batch_size + 1):
        if train.global_batch_size % workers:
            continue
        memory = step_memory(
            stage,
            models,
            dataclasses.replace(train, workers=workers),
            latent,
            parameters=parameters,
            text_tower_parameters=text_tower_parameters,
        )
        if memory is not None and memory.fits(gpu_gib):
            changes.append(
                f"{section}.workers={workers} ({memory.samples_per_gpu} samples per GPU, {memory.peak_gib:.1f} GiB)"
            )
            break
    for change, variant in (
        (
            f"{section}.activation_checkpointing=true",
            {"activation_checkpointing": True, "compile": False, "activation_memory_budget": (1.0,)},
        ),
        (f"{section}.strategy=fsdp", {"strategy": "fsdp"}),
    ):
        memory = step_memory(
            stage,
            models,
            dataclasses.replace(train, **variant),
            latent,
            parameters=parameters,
            text_tower_parameters=text_tower_parameters,
        )
        if memory is not None and memory.fits(gpu_gib):
            changes.append(f"{change} ({memory.peak_gib:.1f} GiB)")
    memory = step_memory(
        stage, models, train, latent, parameters=parameters, text_tower_parameters=text_tower_parameters
    )
    assert memory is not None, "asked what fits for a step the model does not know"
    bigger = next((name for size, name in GPU_SIZES_GIB if size > gpu_gib and memory.fits(size)), None)
    if bigger is not None:
        changes.append(f"GPUs of {memory.peak_gib / HEADROOM:.0f} GiB or more ({bigger})")
    return changes
