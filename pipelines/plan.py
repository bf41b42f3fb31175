"""What a run will cost before it runs: samples, GPU-hours, wall time and money per phase.

Three inputs, each visible in the output:

- the run config (``pipelines.config``): which phases run, their resources, the training steps
  and batch sizes, the budgets;
- the data: samples into the metadata filter and the fraction each filtering phase keeps (your
  assumptions: the defaults are guesses for LAION-Aesthetics and printed as such);
- measured throughputs (``cluster/measured.toml``, one figure per phase from the bench scripts),
  scaled to the planned GPU kind by a stated factor and to the run's resolution by pixel count.

A phase with no measured figure is listed without an estimate: nothing is invented for it. Beside
compute, each phase's output is priced as object storage for the months it is kept, and what the
next phases read of it as transfer; the text conditioning (hidden states stored at pre-encode, or
tokens encoded in every training step) is planned both ways, so the cheaper one shows.

    python -m pipelines.plan                           # v2 on LAION-Aesthetics v2 5+ (600M) at 64 A100s
    python -m pipelines.plan --samples 100e6 --gpus 128 --set train_c.steps=500000

The config's side lives here; the prices, the measured figures, the node types of the cluster file
and the memory model's arithmetic are ``cluster/``'s (costs, nodes, memory), which knows nothing of
the config.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import math
from importlib.resources.abc import Traversable

import numpy as np
import pyarrow as pa
import torch

from cluster import memory
from cluster.costs import (
    A100_USD_PER_GPU_HOUR,
    GPU_SPEED_VS_H200,
    MEASURED_FILE,
    RESTART_MINUTES,
    SPOT_INTERRUPTIONS_PER_NODE_MONTH,
    SPOT_PRICE_VS_ON_DEMAND,
    USD_PER_CPU_HOUR,
    USD_PER_GB_MONTH,
    PhasePlan,
    load_measured,
    row_costs,
    spot_run,
    total_costs,
)
from cluster.memory import SHARDED_BYTES_PER_PARAMETER
from cluster.nodes import CLUSTER_FILE, gpu_memory_gib, node_type_for, worker_node_types
from cluster.resources import GPU
from pipelines import pre_encode
from pipelines.chain_evaluation import RENDER_CHUNK
from pipelines.config import RUNS, RunConfig, load_config
from pipelines.embed import embedding_width
from pipelines.phases import PHASES
from pipelines.train_phase import training_needed
from pipelines.trainable import REGISTRY, build_model, training_phases
from pipelines.trainable.base import TaskSpec
from pipelines.trainable.text_conditioned import VALIDATION_TIMES
from pipelines.training.config import TrainConfig
from stages.generate import GENERATE_CONFIGS
from stages.text import TEXT_CONFIGS, TextEncoder

# Output bytes of the phases before pre-encode that their shapes do not give (assumed, not
# measured on LAION): a metadata row (URL, caption, sizes, scores; the demo's short rows are 233
# bytes, docs/data_format.md) and a decoded crop as a quality-95 JPEG at about 3 bits per pixel.
ROW_BYTES = 1_000
JPEG_BITS_PER_PIXEL = 3.0
# The paper's abstract gives this for its whole training; it publishes no split by stage.
PAPER_TRAINING_A100_HOURS = 24_602
DATA_PHASES = ("metadata_filter", "decode", "embed", "pre_encode")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Assumptions:
    """The data and the machine: what the config does not say."""

    samples: int
    """Rows into the metadata filter."""
    keep: dict[str, float]
    """Fraction of its input each data phase keeps (metadata_filter, decode, embed)."""
    gpus: int | None = None
    """GPUs for GPU phases; none: what the config's resources ask for."""
    cpus: int | None = None
    """CPU cores for CPU phases; none: what the config's resources ask for."""
    gpu: str = "h200"
    """GPU kind the measured figures are scaled to (a key of GPU_SPEED_VS_H200)."""
    scaling_efficiency: float = 0.9
    """Fraction of linear speed-up kept when a phase runs on more than one unit (assumed)."""
    usd_per_gpu_hour: float = A100_USD_PER_GPU_HOUR
    usd_per_cpu_hour: float = USD_PER_CPU_HOUR
    usd_per_gb_month: float = USD_PER_GB_MONTH
    storage_months: float = 1.0
    """How long each phase's output stays in object storage (assumed: a month)."""
    usd_per_gb_read: float = 0.0
    """Transfer price of what the phases read from object storage (none within the bucket's region)."""
    gpu_memory_gib: float | None = None
    """Memory of one GPU, which each training step must fit (cluster.memory); none: not checked."""
    usd_per_spot_gpu_hour: float = A100_USD_PER_GPU_HOUR * SPOT_PRICE_VS_ON_DEMAND
    spot_interruptions_per_node_month: float = SPOT_INTERRUPTIONS_PER_NODE_MONTH
    restart_minutes: float = RESTART_MINUTES
    """Wall-clock minutes a training run stands still for each restart after a preemption."""

    def __post_init__(self):
        if self.samples < 0:
            raise ValueError(f"samples must be >= 0, got {self.samples}")
        if self.gpu not in GPU_SPEED_VS_H200:
            raise ValueError(f"unknown GPU kind {self.gpu!r}; choose from {', '.join(GPU_SPEED_VS_H200)}")
        for phase, fraction in self.keep.items():
            if phase not in DATA_PHASES[:-1]:
                raise ValueError(f"keep fraction for {phase!r}: only {', '.join(DATA_PHASES[:-1])} drop samples")
            if not 0 <= fraction <= 1:
                raise ValueError(f"keep fraction for {phase} must be in [0, 1], got {fraction}")
        if not 0 < self.scaling_efficiency <= 1:
            raise ValueError(f"scaling_efficiency must be in (0, 1], got {self.scaling_efficiency}")
        for name in (
            "usd_per_gb_month",
            "storage_months",
            "usd_per_gb_read",
            "usd_per_spot_gpu_hour",
            "spot_interruptions_per_node_month",
            "restart_minutes",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def measured_table_for(config: RunConfig) -> str:
    """The table measured with the config's model sizes: v2 figures on a GPU, tiny ones on a CPU."""
    return "v2_h200" if config.pre_encode.models == "v2" else "tiny_cpu"


def latent_bytes_per_sample(config: RunConfig) -> int:
    """Tensor payload of one latent-shard row (what the training phases read); with aspect-ratio
    buckets, that of the largest crop, since how the data splits over buckets is unknown before decode."""

    def payload(crop: tuple[int, int]) -> int:
        schema = pre_encode.output_schema(config.pre_encode, (crop,), config.decode.resolution)
        return sum(
            int(np.prod(f.type.shape)) * f.type.value_type.bit_width // 8
            for f in schema
            if isinstance(f.type, pa.FixedShapeTensorType)
        )

    return max(payload(crop) for crop in config.decode.crop_sizes())


@dataclasses.dataclass(frozen=True)
class PhaseRequest:
    """What one phase asks Ray for, per actor or worker."""

    phase: str
    setting: str
    """The config section that sets it (what a user changes)."""
    cpus: float
    gpus: float
    count: int
    """Actors at most, or Ray Train workers."""
    description: str
    gpu_resource: str = GPU
    """The Ray resource ``gpus`` asks for: GPU, or a custom resource that stands in for GPUs."""


def _gpus(count: float, resource: str) -> str:
    """A GPU request as Ray reads it: real GPUs, or a resource that stands in for them (the work that
    holds it runs on CPU)."""
    if resource == GPU or not count:
        return f"{count:g} GPU"
    return f"{count:g} {resource}: a GPU stand-in, runs on CPU"


def phase_requests(config: RunConfig, phases: list[str]) -> list[PhaseRequest]:
    """The requests of the phases that will do work (a training the config does not need is left out)."""
    requests = []
    for phase in phases:
        if phase in DATA_PHASES:
            section = {"metadata_filter": "filter"}.get(phase, phase)
            r = getattr(config, section).resources
            requests.append(
                PhaseRequest(
                    phase,
                    f"{section}.resources",
                    r.num_cpus,
                    r.num_gpus,
                    r.max_actors,
                    f"{r.min_actors}-{r.max_actors} actors x ({r.num_cpus:g} CPU, {_gpus(r.num_gpus, r.gpu_resource)}), "
                    f"{r.batch_size} rows per call",
                    r.gpu_resource,
                )
            )
        elif phase in training_phases():
            if not training_needed(config, training_phases()[phase].name):
                continue
            section = training_phases()[phase].config_section
            t = getattr(config, section)
            requests.append(
                PhaseRequest(
                    phase,
                    section,
                    t.cpus_per_worker,
                    t.gpus_per_worker,
                    t.workers,
                    f"{t.workers} Ray Train workers x ({t.cpus_per_worker:g} CPU, "
                    f"{_gpus(t.gpus_per_worker, t.gpu_resource)}), {t.steps:,} steps at global batch {t.global_batch_size}",
                    t.gpu_resource,
                )
            )
        else:
            gpus, resource = config.generate.num_gpus, config.generate.gpu_resource
            requests.append(
                PhaseRequest(phase, "generate", 1.0, gpus, 1, f"one task with {_gpus(gpus, resource)}", resource)
            )
    return requests


def output_bytes_per_sample(config: RunConfig) -> dict[str, int]:
    """Bytes one kept sample leaves in each data phase's output (pre-encode's from the shapes)."""
    side = config.decode.resolution
    return {
        "metadata_filter": ROW_BYTES,
        "decode": ROW_BYTES + round(side * side * JPEG_BITS_PER_PIXEL / 8),
        "embed": ROW_BYTES + 2 * 2 * embedding_width(config.embed),  # two float16 embeddings
        "pre_encode": ROW_BYTES + latent_bytes_per_sample(config),
    }


def training_bytes_per_sample(config: RunConfig, stage: str) -> int:
    """What one training sample reads: the columns its stage takes (Parquet reads no others)."""
    if stage in ("stage_a", "semantic"):  # they train on decode's crops
        return output_bytes_per_sample(config)["decode"] - ROW_BYTES
    crop = max(config.decode.crop_sizes(), key=math.prod)
    fields = pre_encode.output_schema(config.pre_encode, (crop,), config.decode.resolution)
    spec = TaskSpec(
        stage=stage,
        models=config.pre_encode.models,
        caption_dropout=0.0,
        semantic_dropout=0.0,
        semantic_noise=0.0,
        text_from_tokens=config.pre_encode.text == "tokens",
    )
    return sum(
        int(np.prod(fields.field(name).type.shape)) * fields.field(name).type.value_type.bit_width // 8
        for name in REGISTRY[stage].columns(spec)
    )


def checkpoint_bytes(config: RunConfig, stage: str) -> int:
    """The checkpoints a training run keeps: fp32 weights, AdamW's two moments and the EMA's copy."""
    train = getattr(config, REGISTRY[stage].config_section)
    per_parameter = SHARDED_BYTES_PER_PARAMETER + (4 if train.ema_beta > 0 else 0)
    return train.keep_checkpoints * per_parameter * parameter_count(stage, config.pre_encode.models)


def _text_tower_seconds(phase: str, towers: dict | None) -> float | None:
    """H200 seconds per sample of the text towers a phase runs when it encodes the text itself."""
    if towers is None:
        return None
    return {
        "pre_encode": 1 / towers["stage_c"] + 1 / towers["stage_b"],
        "train_stage_c": 1 / towers["stage_c"],
        "train_stage_b": 1 / towers["stage_b"],
    }.get(phase)


def _text_setting_runs(phase: str, config: RunConfig) -> str | None:
    """Whether a phase runs the text towers ("hidden_states" at pre-encode; "tokens" in Stage B and C's
    steps) under the config; None for the phases that never do."""
    if phase == "pre_encode" or (phase in training_phases() and training_phases()[phase].text_column):
        return config.pre_encode.text
    return None


def plan(config: RunConfig, phases: list[str], assumptions: Assumptions, measured: dict) -> list[PhasePlan]:
    """One row per phase that does work (training phases a config does not need are left out)."""
    keep = {"metadata_filter": 1.0, "decode": 1.0, "embed": 1.0, **assumptions.keep}
    into = {"metadata_filter": assumptions.samples}
    for previous, phase in itertools.pairwise(DATA_PHASES):
        into[phase] = math.floor(into[previous] * keep[previous])
    kept = {phase: math.floor(into[phase] * keep.get(phase, 1.0)) for phase in DATA_PHASES}
    row_bytes = output_bytes_per_sample(config)
    reads = {"embed": ("decode",), "pre_encode": ("decode", "embed")}
    speed = GPU_SPEED_VS_H200[assumptions.gpu] / measured.get("speed_vs_h200", 1.0)
    rows = []
    for request in phase_requests(config, phases):
        if request.phase in DATA_PHASES:
            samples, budget = into[request.phase], None
            stored = kept[request.phase] * row_bytes[request.phase]
            read = samples * sum(row_bytes[earlier] for earlier in reads.get(request.phase, ()))
        elif request.phase in training_phases():
            stage = training_phases()[request.phase].name
            train = getattr(config, request.setting)
            samples, budget = train.steps * train.global_batch_size, train.budget_gpu_hours
            stored, read = checkpoint_bytes(config, stage), samples * training_bytes_per_sample(config, stage)
        else:
            continue  # generate: a few hundred images, nothing to plan
        on_gpu = request.gpus > 0
        override = assumptions.gpus if on_gpu else assumptions.cpus
        units = float(override if override is not None else request.count * (request.gpus if on_gpu else request.cpus))
        figure = measured.get(request.phase)
        rate, source = None, "no measured figure"
        if figure is not None:
            rate = figure["samples_per_second"] * (speed if figure["unit"] == "gpu" else 1.0)
            if "resolution" in figure:
                rate *= (figure["resolution"] / config.decode.resolution) ** 2
            rate, note = _with_text_setting(rate, figure, request.phase, config, measured.get("text_towers"), speed)
            if units > 1:
                rate *= assumptions.scaling_efficiency
            source = figure["source"] + note
            if request.phase in training_phases():
                source += _setting_note(figure, request.setting, getattr(config, request.setting))
        training_on_gpu = request.phase in training_phases() and on_gpu
        step = phase_memory(config, training_phases()[request.phase].name) if training_on_gpu else None
        rows.append(
            PhasePlan(
                phase=request.phase,
                unit="gpu" if on_gpu else "cpu",
                units=units,
                samples=samples,
                samples_per_second_per_unit=rate,
                budget=budget,
                source=source,
                memory=step,
                stored_bytes=stored,
                read_bytes=read,
            )
        )
    return rows


def _with_text_setting(
    rate: float, figure: dict, phase: str, config: RunConfig, towers: dict | None, speed: float
) -> tuple[float, str]:
    """A phase's rate under the config's text setting, from a figure measured under the other one:
    the text towers' own measured time per sample added or taken away (a prediction, said so)."""
    runs, measured_with = _text_setting_runs(phase, config), figure.get("text")
    if runs is None or measured_with is None or runs == measured_with:
        return rate, ""
    seconds = _text_tower_seconds(phase, towers)
    if seconds is None:
        return rate, f"; MEASURED text={measured_with}, BUT THE CONFIG RUNS text={runs}: the rate is not this setting's"
    towers_here = runs == ("hidden_states" if phase == "pre_encode" else "tokens")
    per_sample = 1 / rate + (seconds if towers_here else -seconds) / speed
    verb = "plus" if towers_here else "less"
    return 1 / per_sample, f"; measured with text={measured_with}, {verb} the text towers' measured time (predicted)"


def _setting_note(figure: dict, section: str, train) -> str:
    """What a training figure was measured with against what the config runs: a rate measured with
    another setting (checkpointing recomputes, a budget trades memory for time) is not this one's."""
    runs = memory.variant(train)
    note = ""
    if figure.get("setting", runs) != runs:
        note += f"; MEASURED {figure['setting']}, BUT {section} RUNS {runs}: the rate is not this setting's"
    per_gpu = train.global_batch_size // train.workers
    if figure.get("batch", per_gpu) != per_gpu:
        note += f"; measured at {figure['batch']} samples per GPU, {section} runs {per_gpu}"
    return note


@functools.cache
def parameter_count(stage: str, models: str) -> int:
    """Parameters of a stage, counted on the meta device (no memory, no initialisation)."""
    spec = TaskSpec(
        stage=stage, models=models, caption_dropout=0.0, semantic_dropout=0.0, semantic_noise=0.0, text_from_tokens=True
    )
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(spec).parameters())


@functools.cache
def text_tower_parameter_count(stage: str, models: str) -> int:
    """Parameters of the text tower a stage runs in its step when it trains from stored tokens."""
    text = TEXT_CONFIGS[models]().with_random_weights()
    with torch.device("meta"):
        return sum(p.numel() for p in TextEncoder(text.stage_c if stage == "stage_c" else text.stage_b).parameters())


def step_memory(
    stage: str, models: str, train: TrainConfig, latent: tuple[int, int], *, text_from_tokens: bool = False
) -> memory.StepMemory | None:
    """cluster.memory's prediction for a stage of the registry, with its parameters counted and,
    where it trains from stored tokens, its text tower's."""
    return memory.step_memory(stage, models, train, latent, **_parameters(stage, models, text_from_tokens))


def _parameters(stage: str, models: str, text_from_tokens: bool) -> dict[str, int]:
    return {
        "parameters": parameter_count(stage, models),
        "text_tower_parameters": text_tower_parameter_count(stage, models) if text_from_tokens else 0,
    }


def training_latent(config: RunConfig, stage: str) -> tuple[int, int]:
    """The largest (height, width) latent a stage trains on: with aspect-ratio buckets, the largest
    bucket's (a step holds one bucket, and the largest one sets the peak)."""
    shapes = [
        pre_encode.latent_shapes(config.pre_encode, crop, config.decode.resolution)[REGISTRY[stage].latent_column]
        for crop in config.decode.crop_sizes()
    ]
    return max((tuple(shape[1:]) for shape in shapes), key=math.prod)


def phase_memory(config: RunConfig, stage: str) -> memory.StepMemory | None:
    """The predicted peak of a training phase's step as ``config`` runs it; None where the stage or
    its setting has no calibration."""
    if not REGISTRY[stage].latent_column:
        return None
    section = REGISTRY[stage].config_section
    return step_memory(
        stage,
        config.pre_encode.models,
        getattr(config, section),
        training_latent(config, stage),
        text_from_tokens=config.pre_encode.text == "tokens",
    )


def does_not_fit(config: RunConfig, phase: str, stage: str, gpu_gib: float) -> str | None:
    """Why a training phase's step does not fit GPUs of ``gpu_gib`` and what would; None when it
    fits or is not modelled."""
    step = phase_memory(config, stage)
    if step is None or step.fits(gpu_gib):
        return None
    section = REGISTRY[stage].config_section
    height, width = step.latent
    changes = memory.what_fits(
        stage,
        config.pre_encode.models,
        section,
        getattr(config, section),
        step.latent,
        gpu_gib,
        **_parameters(stage, config.pre_encode.models, config.pre_encode.text == "tokens"),
    )
    return (
        f"{phase}: {step.peak_gib:.1f} GiB per GPU predicted ({step.samples_per_gpu} samples of "
        f"{height}x{width} latents, {step.variant}) does not fit {memory.HEADROOM:.0%} of {gpu_gib:g} GiB GPUs; "
        + ("would fit: " + "; ".join(changes) if changes else "nothing this planner knows would fit")
    )


def memory_problems(config: RunConfig, phases: list[str], gpu_gib: float) -> list[str]:
    """One line per training phase on GPUs whose step does not fit GPUs of ``gpu_gib``: its
    predicted peak and the settings that would fit."""
    stages = training_phases()
    problems = [
        does_not_fit(config, phase, stages[phase].name, gpu_gib)
        for phase in phases
        if phase in stages and getattr(config, stages[phase].config_section).gpus_per_worker > 0
    ]
    return [f"DOES NOT FIT: {problem}" for problem in problems if problem is not None]


def _peak(row: PhasePlan, gpu_gib: float | None) -> str:
    if row.phase not in training_phases() or row.unit != "gpu":
        return "-"
    if row.memory is None:
        return "not modelled"
    peak = f"{row.memory.peak_gib:,.1f} GiB"
    if gpu_gib is None:
        return peak
    return f"{peak}: " + ("fits" if row.memory.fits(gpu_gib) else "OVER")


def _bytes(count: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if count >= size:
            return f"{count / size:,.2f} {unit}"
    return f"{count:,.0f} B"


def _hours(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 3600:,.1f} h" if seconds >= 360 else f"{seconds:,.0f} s"


def evaluation_unit_hours(row: PhasePlan, train: TrainConfig, passes_per_row: int) -> float | None:
    """GPU-hours a training run spends on its held-out loss (pipelines/training/evaluation.py): at each
    evaluation (every ``eval_every`` steps and at the end) the ranks share ``eval_samples`` rows in
    batches of a worker's batch size, each row run forward ``passes_per_row`` times (a diffusion
    stage once per fixed time, an image stage once), about a third of a training sample's work each;
    the rank with the most batches holds every GPU of the run."""
    if row.samples_per_second_per_unit is None or not train.eval_samples:
        return None
    evaluations = (train.steps // train.eval_every if train.eval_every else 0) + 1
    per_worker = train.global_batch_size // train.workers
    rows_per_rank = math.ceil(math.ceil(train.eval_samples / per_worker) / row.units) * per_worker
    seconds = evaluations * rows_per_rank * passes_per_row / (3 * row.samples_per_second_per_unit)
    return seconds * row.units / 3600


def chain_scoring_unit_hours(stage_c: PhasePlan, stage_b: PhasePlan, config: RunConfig) -> float | None:
    """GPU-hours Stage C's training spends rendering and scoring held-out captions through the chain
    (pipelines/chain_evaluation.py): at each evaluation the ranks share ``generate.eval_captions``
    captions in chunks of ``RENDER_CHUNK``; an image costs Stage C's sampling steps (twice each with
    guidance) and Stage B's, each forward about a third of a training sample of that stage, scaled by
    pixel count from the training resolution to ``generate.size``. Stage A's decode and the CLIP and
    FID models are left out; the rank with the most chunks holds every GPU of the run."""
    rates = (stage_c.samples_per_second_per_unit, stage_b.samples_per_second_per_unit)
    captions, train = config.generate.eval_captions, config.train_c
    if None in rates or not captions or not train.eval_every:
        return None
    sampling = GENERATE_CONFIGS[config.pre_encode.models]()
    forwards = (
        sampling.prior_steps * (2 if config.generate.prior_guidance > 1 else 1),
        sampling.decoder_steps * (2 if sampling.decoder_guidance > 1 else 1),
    )
    pixels = (config.generate.size / config.decode.resolution) ** 2
    seconds_per_image = sum(count * pixels / (3 * rate) for count, rate in zip(forwards, rates, strict=True))
    evaluations = train.steps // train.eval_every + 1
    images_per_rank = math.ceil(math.ceil(captions / RENDER_CHUNK) / stage_c.units) * RENDER_CHUNK
    return evaluations * images_per_rank * seconds_per_image * stage_c.units / 3600


def format_plan(rows: list[PhasePlan], assumptions: Assumptions, config: RunConfig, measured_name: str) -> str:
    """The table, its totals and its inputs, as printed by the planner and by ``full.py --dry-run``."""
    lines = [
        "| phase | runs on | samples | samples/s per unit | wall time | GPU-hours | CPU core-hours | compute (USD) "
        "| stored | read | storage + transfer (USD) | budget | peak per GPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    gpu_hours = cpu_hours = 0.0
    for row in rows:
        hours = row.unit_hours
        gpu = hours if row.unit == "gpu" else None
        cpu = hours if row.unit == "cpu" else None
        costs = row_costs(row, assumptions)
        gpu_hours += gpu or 0.0
        cpu_hours += cpu or 0.0
        budget = (
            "-"
            if row.budget is None
            else (f"{row.budget:,.1f}: " + ("OVER" if gpu is not None and gpu > row.budget else "fits"))
        )
        rate = "no figure" if row.samples_per_second_per_unit is None else f"{row.samples_per_second_per_unit:,.1f}"
        lines.append(
            f"| {row.phase} | {row.units:g} {row.unit.upper()} | {row.samples:,} | {rate} | "
            f"{_hours(row.seconds)} | {'-' if gpu is None else f'{gpu:,.1f}'} | "
            f"{'-' if cpu is None else f'{cpu:,.1f}'} | {'-' if hours is None else f'{costs.compute:,.0f}'} | "
            f"{_bytes(row.stored_bytes)} | {_bytes(row.read_bytes)} | {costs.storage + costs.transfer:,.0f} | "
            f"{budget} | {_peak(row, assumptions.gpu_memory_gib)} |"
        )
    total = total_costs(rows, assumptions)
    lines.append(
        f"| total | | | | | {gpu_hours:,.1f} | {cpu_hours:,.1f} | {total.compute:,.0f} | "
        f"{_bytes(sum(row.stored_bytes for row in rows))} | {_bytes(sum(row.read_bytes for row in rows))} | "
        f"{total.storage + total.transfer:,.0f} | {_experiment_budget(config, gpu_hours)} | |"
    )
    gpu_scaling = (
        f", scaled to {assumptions.gpu.upper()} (x{GPU_SPEED_VS_H200[assumptions.gpu]:g} of an H200)"
        if any(row.unit == "gpu" for row in rows)
        else ""
    )
    lines += [
        "",
        (
            f"Measured figures: cluster/{MEASURED_FILE.name} [{measured_name}]{gpu_scaling}, to {config.decode.resolution} px "
            f"by pixel count where the figure names a resolution; {assumptions.scaling_efficiency:.0%} scaling "
            "efficiency above one unit (assumed)."
        ),
    ]
    lines += [f"  {row.phase}: {row.source}" for row in rows]
    if any(row.phase in training_phases() and row.unit == "gpu" for row in rows):
        against = (
            ""
            if assumptions.gpu_memory_gib is None
            else f", against {memory.HEADROOM:.0%} of {assumptions.gpu_memory_gib:g} GiB per GPU"
        )
        lines.append(f"Peak per GPU: one training step's, predicted by cluster.memory (docs/memory.md){against}.")
        if assumptions.gpu_memory_gib is not None:
            lines += memory_problems(config, [row.phase for row in rows], assumptions.gpu_memory_gib)
    lines.append(
        f"Stored: each phase's output (a training run's kept checkpoints) for {assumptions.storage_months:g} "
        f"month(s) at ${assumptions.usd_per_gb_month:g} per GB-month; read: what each phase reads of earlier "
        f"outputs, at ${assumptions.usd_per_gb_read:g} per GB (assumed list prices; a metadata row "
        f"{ROW_BYTES:,} bytes and a JPEG crop {JPEG_BITS_PER_PIXEL:g} bits per pixel, assumed)."
    )
    kept = next((row.samples for row in rows if row.phase == "pre_encode"), None)
    if kept is not None:
        per_sample = latent_bytes_per_sample(config)
        largest = ", largest bucket" if config.decode.crop == "buckets" else ""
        lines.append(
            f"Latent shards: {per_sample:,} bytes per sample (tensor payload{largest}, pre_encode.text="
            f"{config.pre_encode.text}) x {kept:,} samples = {_bytes(per_sample * kept)}."
        )
    training = [row for row in rows if row.phase.startswith("train_") and row.unit == "gpu"]
    stages = training_phases()
    evaluations = [
        (
            row,
            evaluation_unit_hours(
                row,
                getattr(config, stages[row.phase].config_section),
                VALIDATION_TIMES if stages[row.phase].source_phase == pre_encode.PHASE else 1,
            ),
        )
        for row in training
    ]
    evaluations = [(row, hours) for row, hours in evaluations if hours is not None and row.unit_hours]
    by_phase = {row.phase: row for row in training}
    chain = (
        chain_scoring_unit_hours(by_phase["train_stage_c"], by_phase["train_stage_b"], config)
        if {"train_stage_c", "train_stage_b"} <= by_phase.keys()
        else None
    )
    if evaluations:
        shares = ", ".join(
            f"{row.phase} {hours:,.1f} ({hours / row.unit_hours:.1%} of its training)" for row, hours in evaluations
        )
        lines.append(
            f"Held-out loss ({assumptions.gpu.upper()}-hours, predicted: forward passes shared by the run's "
            f"GPUs, each a third of a training sample's work, assumed): {shares}. Not in the totals above."
        )
    stage_c = by_phase.get("train_stage_c")
    if chain is not None and stage_c is not None and stage_c.unit_hours:
        lines.append(
            f"Chain scoring in train_stage_c ({assumptions.gpu.upper()}-hours, predicted: "
            f"{config.generate.eval_captions} held-out captions per evaluation rendered at "
            f"{config.generate.size} px, shared by the run's GPUs, each sampling step's forward a third of "
            f"a training sample's work, assumed; Stage A and the scorers left out): {chain:,.1f} "
            f"({chain / stage_c.unit_hours:.1%} of its training). Not in the totals above."
        )
    if training and all(row.unit_hours is not None for row in training):
        hours = sum(row.unit_hours for row in training)
        lines.append(
            f"Training ({', '.join(row.phase for row in training)}): {hours:,.0f} "
            f"{assumptions.gpu.upper()}-hours predicted; the paper gives {PAPER_TRAINING_A100_HOURS:,} "
            f"A100-hours for its whole training, not split by stage ({hours / PAPER_TRAINING_A100_HOURS:.2f}x)."
        )
    return "\n".join(lines)


def format_spot(rows: list[PhasePlan], assumptions: Assumptions, config: RunConfig) -> str:
    """Each GPU training phase on on-demand and on spot nodes: spot's price with the restarts expected
    and the work each loses (pipelines/training/preemption.py, ray_cluster.yaml's spot pool)."""
    types = worker_node_types(CLUSTER_FILE)
    lines = []
    for row in rows:
        if row.phase not in training_phases() or row.unit != "gpu" or not row.unit_hours:
            continue
        train: TrainConfig = getattr(config, training_phases()[row.phase].config_section)
        node = node_type_for(train.cpus_per_worker, train.gpus_per_worker, types)
        if node is None:
            lines.append(f"| {row.phase} | no node type of {CLUSTER_FILE.name} fits a worker | | | | | |")
            continue
        # A preemption that finds no checkpoint at its notice loses half a checkpoint interval on average.
        lost_work = row.seconds / train.steps * min(train.checkpoint_every, train.steps) / 2 / 3600
        try:
            spot = spot_run(
                gpu_hours=row.unit_hours,
                gpus=row.units,
                gpus_per_node=types[node]["GPU"],
                lost_work_hours=lost_work,
                interruptions_per_node_month=assumptions.spot_interruptions_per_node_month,
                restart_minutes=assumptions.restart_minutes,
            )
        except ValueError as error:
            lines.append(f"| {row.phase} | {row.unit_hours:,.1f} | {error} | | | | |")
            continue
        lines.append(
            f"| {row.phase} | {row.unit_hours:,.1f} | {row.unit_hours * assumptions.usd_per_gpu_hour:,.0f} | "
            f"{spot.preemptions:,.1f} | {spot.lost_hours_per_preemption * 60:,.0f} min | {spot.gpu_hours:,.1f} | "
            f"{spot.gpu_hours * assumptions.usd_per_spot_gpu_hour:,.0f} |"
        )
    if not lines:
        return ""
    return "\n".join(
        [
            "",
            f"Training on spot nodes (${assumptions.usd_per_spot_gpu_hour:.2f} per GPU-hour against "
            f"${assumptions.usd_per_gpu_hour:.2f} on demand; {assumptions.spot_interruptions_per_node_month:g} "
            f"interruptions per node and month; {assumptions.restart_minutes:g} minutes per restart; all assumed, "
            "cluster/costs.py says from what):",
            "| phase | on-demand GPU-hours | on-demand (USD) | preemptions expected | lost per preemption "
            "| spot GPU-hours | spot (USD) |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *lines,
            "Lost per preemption: the restart, while every GPU of the run waits, and half a checkpoint interval "
            "(train_*.checkpoint_every) of steps, the average where no notice comes in time; a notice caught "
            "(a SIGTERM or Ray's drain) checkpoints at the next step and loses about one. Without a drain each "
            "preemption counts against train_*.max_failures: allow more than the preemptions expected.",
        ]
    )


def format_text_choice(config: RunConfig, phases: list[str], assumptions: Assumptions, measured: dict) -> str:
    """The run planned with each text setting: stored hidden states (the towers run once, at
    pre-encode; the shards grow) or stored tokens (the towers run in every Stage B and Stage C step)."""
    if not {"pre_encode", "train_stage_b", "train_stage_c"} & set(phases):
        return ""
    lines = [
        f"Text conditioning both ways (compute, and storage + transfer for {assumptions.storage_months:g} month(s)):"
    ]
    totals = {}
    for text in ("hidden_states", "tokens"):
        other = dataclasses.replace(config, pre_encode=dataclasses.replace(config.pre_encode, text=text))
        rows = plan(other, phases, assumptions, measured)
        if any(row.unit_hours is None for row in rows if _text_setting_runs(row.phase, other)):
            return ""  # a phase that the setting changes has no figure: nothing to compare
        costs = total_costs(rows, assumptions)
        totals[text] = costs.total
        gpu_hours = sum(row.unit_hours or 0.0 for row in rows if row.unit == "gpu")
        current = "  (this config)" if text == config.pre_encode.text else ""
        lines.append(
            f"  pre_encode.text={text}: {gpu_hours:,.0f} GPU-hours, "
            f"{_bytes(sum(row.stored_bytes for row in rows))} stored: ${costs.compute:,.0f} + "
            f"${costs.storage + costs.transfer:,.0f} = ${costs.total:,.0f}{current}"
        )
    cheaper = min(totals, key=totals.get)
    advice = "" if cheaper == config.pre_encode.text else f": set pre_encode.text={cheaper}"
    lines.append(f"  cheaper: text={cheaper}, by ${abs(totals['hidden_states'] - totals['tokens']):,.0f}{advice}")
    return "\n".join(lines)


def training_gpu_memory(config: RunConfig, phases: list[str], path: Traversable = CLUSTER_FILE) -> float | None:
    """The GPU memory the training workers of ``phases`` get on the cluster file's node types (the
    smallest where they land on several); none when none of them runs on a GPU node that gives it."""
    types, memories = worker_node_types(path), gpu_memory_gib(path)
    found = [
        memories[node]
        for request in phase_requests(config, phases)
        if request.phase in training_phases()
        and request.gpus > 0
        and (node := node_type_for(request.cpus, request.gpus, types)) in memories
    ]
    return min(found, default=None)


def check_training_memory(config: RunConfig, phases: list[str]) -> None:
    """``full.py --dry-run``'s refusal of a training step that does not fit the GPUs of the node type
    it would land on: such a run would stop out of memory only after the autoscaler has started the
    GPU nodes and the data phases have run, so the dry run, the check before a submission, fails."""
    gpu_gib = training_gpu_memory(config, phases)
    problems = [] if gpu_gib is None else memory_problems(config, phases, gpu_gib)
    if problems:
        raise ValueError(
            f"a training step does not fit the GPUs of {CLUSTER_FILE.name}: "
            + " | ".join(problem.removeprefix("DOES NOT FIT: ") for problem in problems)
        )


def check_local_gpus(config: RunConfig, phases: list[str], gpus_here: int) -> None:
    """A local Ray has no autoscaler: a phase asking for more GPUs than this machine has would wait
    forever, so it is refused before anything starts, naming the setting to change. A local Ray has
    none of a resource that stands in for GPUs either."""
    for request in phase_requests(config, phases):
        here = gpus_here if request.gpu_resource == GPU else 0
        if request.gpus > here:
            field = "gpus_per_worker" if request.phase in training_phases() else "num_gpus"
            unit = "GPU(s)" if request.gpu_resource == GPU else request.gpu_resource
            raise ValueError(
                f"{request.phase} asks for {request.gpus:g} {unit} per {'worker' if field == 'gpus_per_worker' else 'actor'} "
                f"({request.setting}.{field}) but this machine has {here} and Ray runs locally: set "
                f"{request.setting}.{field}=0 to run it on CPU, or submit to a cluster with GPUs (ray.address)"
            )


def dry_run(config: RunConfig, phases: list[str], samples: int, local_gpus: int | None = None) -> str:
    """What ``full.py --dry-run`` prints: each phase's resources and where ray_cluster.yaml's
    autoscaler would place them, then the plan at the config's own scale. ``local_gpus``: the GPUs of
    this machine, where Ray would start when no cluster is given; None when one is."""
    types = worker_node_types()
    lines = [f"Dry run of the {config.name!r} config: nothing is started or written."]
    if local_gpus is not None:
        lines.append(f"Ray would start on this machine (no ray.address or RAY_ADDRESS): {local_gpus} GPU(s) here.")
        try:
            check_local_gpus(config, phases, local_gpus)
        except ValueError as refused:
            lines.append(f"REFUSED HERE: {refused}")
    lines += ["", f"Resources per phase, and the {CLUSTER_FILE.name} node type each actor or worker fits:"]
    for request in phase_requests(config, phases):
        node = node_type_for(request.cpus, request.gpus, types)
        lines.append(
            f"  {request.phase}: {request.description} -> "
            + (node or "FITS NO NODE TYPE: the autoscaler could never place it")
        )
    # Every sample kept: the dry run has no measured keep rates, so its volumes are upper bounds.
    assumptions = Assumptions(
        samples=samples, keep={}, gpu="a100", scaling_efficiency=0.9, gpu_memory_gib=training_gpu_memory(config, phases)
    )
    name = measured_table_for(config)
    lines += ["", f"Plan ({samples:,} input rows, every one kept: an upper bound):", ""]
    measured = load_measured(name)
    lines.append(format_plan(plan(config, phases, assumptions, measured), assumptions, config, name))
    choice = format_text_choice(config, phases, assumptions, measured)
    return "\n".join(lines + ([choice] if choice else []))


def _experiment_budget(config: RunConfig, gpu_hours: float) -> str:
    budget = config.tracking.experiment_budget_gpu_hours
    if budget is None:
        return "-"
    return f"experiment {budget:,.1f}: " + ("OVER" if gpu_hours > budget else "fits")


def _keep(text: str) -> dict[str, float]:
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"--keep takes phase=fraction pairs separated by commas, got {text!r}")
    try:
        return {phase.strip(): float(value) for phase, value in pairs}
    except ValueError:
        raise ValueError(f"--keep fractions must be numbers, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Phases without a measured figure are listed without an estimate."
    )
    parser.add_argument("--config", default="v2", choices=sorted(RUNS), help="named run (default: v2)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field by dotted key (repeatable)",
    )
    parser.add_argument(
        "--samples",
        type=float,
        default=600e6,
        help="rows into the metadata filter (default 600e6: LAION-Aesthetics v2 5+)",
    )
    parser.add_argument(
        "--keep",
        default="metadata_filter=0.5,decode=0.95,embed=0.9",
        help="fraction each filtering phase keeps (default: assumed, not measured)",
    )
    parser.add_argument(
        "--gpus", type=int, default=64, help="GPUs for each GPU phase (default 64: ray_cluster.yaml's 8 p4de nodes)"
    )
    parser.add_argument("--cpus", type=int, default=2048, help="CPU cores for CPU phases (default: 32 c6i.16xlarge)")
    parser.add_argument("--gpu", default="a100", choices=sorted(GPU_SPEED_VS_H200))
    parser.add_argument("--usd-per-gpu-hour", type=float, default=A100_USD_PER_GPU_HOUR)
    parser.add_argument(
        "--usd-per-gb-month",
        type=float,
        default=USD_PER_GB_MONTH,
        help="object storage price (default: S3 Standard's, assumed)",
    )
    parser.add_argument(
        "--storage-months",
        type=float,
        default=1.0,
        help="how long the phases' outputs stay stored (default 1, assumed)",
    )
    parser.add_argument(
        "--usd-per-gb-read",
        type=float,
        default=0.0,
        help="transfer price of reads from object storage (default 0: same region)",
    )
    parser.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=None,
        help="memory of one GPU that each training step must fit (default: that of "
        f"{CLUSTER_FILE.name}'s node type for the training workers)",
    )
    parser.add_argument(
        "--spot-usd-per-gpu-hour",
        type=float,
        default=None,
        help=f"spot price of a GPU-hour (default: {SPOT_PRICE_VS_ON_DEMAND:g} of --usd-per-gpu-hour, assumed)",
    )
    parser.add_argument(
        "--spot-interruptions-per-node-month",
        type=float,
        default=SPOT_INTERRUPTIONS_PER_NODE_MONTH,
        help="spot interruptions of each GPU node per month (default: assumed, cluster/costs.py)",
    )
    parser.add_argument(
        "--restart-minutes",
        type=float,
        default=RESTART_MINUTES,
        help="minutes a training run stands still after each preemption (default: assumed)",
    )
    parser.add_argument("--phases", default=",".join(PHASES))
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        phases = [name.strip() for name in args.phases.split(",") if name.strip()]
        unknown = [name for name in phases if name not in PHASES]
        if unknown:
            raise ValueError(f"unknown phase(s) {', '.join(unknown)} in --phases; available: {', '.join(PHASES)}")
        gpu_gib = args.gpu_memory_gib if args.gpu_memory_gib is not None else training_gpu_memory(config, list(PHASES))
        assumptions = Assumptions(
            samples=int(args.samples),
            keep=_keep(args.keep),
            gpus=args.gpus,
            cpus=args.cpus,
            gpu=args.gpu,
            usd_per_gpu_hour=args.usd_per_gpu_hour,
            gpu_memory_gib=gpu_gib,
            usd_per_gb_month=args.usd_per_gb_month,
            storage_months=args.storage_months,
            usd_per_gb_read=args.usd_per_gb_read,
            usd_per_spot_gpu_hour=(
                args.spot_usd_per_gpu_hour
                if args.spot_usd_per_gpu_hour is not None
                else args.usd_per_gpu_hour * SPOT_PRICE_VS_ON_DEMAND
            ),
            spot_interruptions_per_node_month=args.spot_interruptions_per_node_month,
            restart_minutes=args.restart_minutes,
        )
        name = measured_table_for(config)
        measured = load_measured(name)
        rows = plan(config, phases, assumptions, measured)
        choice = format_text_choice(config, phases, assumptions, measured)
        spot = format_spot(rows, assumptions, config)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    memory_text = "" if gpu_gib is None else f" of {gpu_gib:g} GiB"
    print(
        f"Plan for the {config.name!r} config: {assumptions.samples:,} rows in, keep {args.keep}, "
        f"{args.gpus} {args.gpu.upper()} GPUs{memory_text}, {args.cpus} CPU cores, "
        f"${assumptions.usd_per_gpu_hour:.2f} per GPU-hour.\n"
    )
    print(format_plan(rows, assumptions, config, name))
    if choice:
        print(choice)
    if spot:
        print(spot)


if __name__ == "__main__":
    main()
