"""The run configuration: one typed section per component, named runs as code.

``tiny`` is the embedded default: the generated demo data, CPU-sized everything, a local Ray and
a local MLflow store; the demo and the tests use it. ``v2`` carries the data settings of the
Würstchen v2 paper model (docs/design.md). Change anything with ``--set section.field=value``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cluster.resources import StepResources
from pipelines.decode import DecodeConfig
from pipelines.embed import EmbedConfig
from pipelines.generate_phase import SampleConfig, colour_prompts
from pipelines.inputs import DataConfig
from pipelines.metadata_filter import MetadataFilterConfig
from pipelines.overrides import apply_overrides
from pipelines.pre_encode import PreEncodeConfig
from pipelines.runtime import RayConfig
from pipelines.storage import StorageConfig
from pipelines.tracking import TrackingConfig
from pipelines.trainable.base import StageALosses
from pipelines.training.config import TrainConfig
from stages.stage_a_losses import VGG16_WEIGHTS_URL
from stages.stage_b import STAGE_B_CONFIGS


def _v2_stage_c_training() -> TrainConfig:
    """The public v2 recipe (docs/design.md): 918k steps at global batch 1280 on 8 nodes of 8 A100s (80 GB:
    20 samples per GPU need ~44 GiB with the text tower, docs/memory.md)."""
    return TrainConfig(
        steps=918_000,
        global_batch_size=1280,
        lr=1e-4,
        warmup_steps=10_000,
        workers=64,
        gpus_per_worker=1,
        cpus_per_worker=10,
        checkpoint_every=2_000,
        sample_every=10_000,
    )


def _v2_other_training() -> TrainConfig:
    """Stage B, Stage A and the semantic compressor: the same recipe; their batch and length are ours."""
    return dataclasses.replace(_v2_stage_c_training(), global_batch_size=512, steps=500_000)


def _v2_stage_a_training() -> TrainConfig:
    """As the others; the perceptual term, when switched on, uses torchvision's ImageNet VGG16."""
    return dataclasses.replace(_v2_other_training(), stage_a_losses=StageALosses(perceptual_weights=VGG16_WEIGHTS_URL))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything one invocation of ``pipelines/full.py`` needs."""

    name: str
    """Name of the run; also the MLflow parent run's name."""
    work_dir: str
    """Folder (or fsspec URL) for every output: phase results, demo data, the default MLflow store."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    filter: MetadataFilterConfig = dataclasses.field(default_factory=MetadataFilterConfig)
    decode: DecodeConfig = dataclasses.field(default_factory=DecodeConfig)
    embed: EmbedConfig = dataclasses.field(default_factory=EmbedConfig)
    pre_encode: PreEncodeConfig = dataclasses.field(default_factory=PreEncodeConfig)
    train_a: TrainConfig = dataclasses.field(default_factory=_v2_stage_a_training)
    """Stage A from images (only when pre_encode.stage_a_weights is "trained")."""
    train_semantic: TrainConfig = dataclasses.field(default_factory=_v2_other_training)
    """The semantic compressor from images (only when pre_encode.semantic_weights is "trained")."""
    train_b: TrainConfig = dataclasses.field(default_factory=_v2_other_training)
    train_c: TrainConfig = dataclasses.field(default_factory=_v2_stage_c_training)
    generate: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)

    def __post_init__(self):
        if not self.work_dir.strip():
            raise ValueError("work_dir must not be empty")
        for section in ("train_semantic", "train_b", "train_c"):
            if getattr(self, section).stage_a_losses.active:
                raise ValueError(f"{section}.stage_a_losses sets Stage A's loss terms: they apply to train_a only")
        for section in ("train_a", "train_semantic"):
            if getattr(self, section).activation_checkpointing:
                raise ValueError(
                    f"{section}.activation_checkpointing: only Stage B and Stage C checkpoint their "
                    "blocks; set it in train_b or train_c"
                )
        levels = len(STAGE_B_CONFIGS[self.pre_encode.models]().c_hidden)
        for section in ("train_a", "train_semantic", "train_b", "train_c"):
            budgets = getattr(self, section).activation_memory_budget
            if len(budgets) > 1 and (section != "train_b" or len(budgets) != levels):
                raise ValueError(
                    f"{section}.activation_memory_budget has {len(budgets)} shares: give one for every "
                    f"block, or in train_b one per level of the {self.pre_encode.models!r} Stage B "
                    f"({levels})"
                )

    def resolved_work_dir(self) -> str:
        """``work_dir`` as an absolute path (URLs unchanged), fixed before anything is written."""
        return self.work_dir if "://" in self.work_dir else str(Path(self.work_dir).resolve())


def tiny() -> RunConfig:
    """The embedded default: runs end to end on a 2-core laptop in minutes."""
    return RunConfig(
        name="tiny",
        work_dir="work/tiny",
        data=DataConfig(shards_url="demo"),
        # The demo images are 64-1820 px; the v2 side limits would drop them all.
        filter=MetadataFilterConfig(
            min_side=64,
            resources=StepResources(num_cpus=0.25, min_actors=1, max_actors=1, batch_size=1024),
        ),
        # 64 px crops, stored lossless: the size the tiny stages train at.
        decode=DecodeConfig(
            resolution=64, image_format="png", resources=StepResources(num_cpus=1, min_actors=1, max_actors=2)
        ),
        # A random tiny CLIP and aesthetic MLP: the path runs, the scores mean nothing, so no thresholds.
        embed=EmbedConfig(
            clip_model="tiny-clip",
            clip_pretrained="",
            aesthetic_weights="",
            resources=StepResources(num_cpus=1, num_gpus=0, batch_size=64),
        ),
        # No pretrained tiny encoders exist: Stage A and the semantic compressor are trained first. 16 of
        # the ~300 demo samples held out: enough to run an evaluation on, few enough to keep every bucket's batches.
        pre_encode=PreEncodeConfig(
            models="tiny",
            stage_a_weights="trained",
            semantic_weights="trained",
            validation_min=16,
            resources=StepResources(num_cpus=1, num_gpus=0, batch_size=32),
        ),
        # Runs this short learn best from their last weights; only Stage C keeps an EMA.
        train_a=_tiny_training(steps=300, lr=3e-3, ema_beta=0.0),
        train_semantic=_tiny_training(steps=300, lr=3e-3, ema_beta=0.0),
        train_b=_tiny_training(steps=800, lr=2e-3, ema_beta=0.0),
        train_c=_tiny_training(steps=700, lr=3e-3, ema_beta=0.99),
        # 16 prompts per demo colour: the learning measure of the test suite, and a grid to look at.
        generate=SampleConfig(
            prompts=colour_prompts(16), size=64, score_colours=True, num_gpus=0, eval_captions=16, fid_features="tiny"
        ),
    )


def _tiny_training(*, steps: int, lr: float, ema_beta: float) -> TrainConfig:
    """Two CPU workers sharing a 2-core machine with Ray Data (fractional CPUs avoid starving it)."""
    return TrainConfig(
        steps=steps,
        global_batch_size=32,
        lr=lr,
        warmup_steps=50,
        ema_beta=ema_beta,
        ema_every=1,
        ema_start=0,
        workers=2,
        gpus_per_worker=0,
        cpus_per_worker=0.5,
        checkpoint_every=200,
        sample_every=0,
        eval_every=100,
        eval_samples=16,
        log_every_seconds=10,
        cache_data=True,
    )


def v2() -> RunConfig:
    """Würstchen v2's data settings (docs/design.md): LAION at >= 512 px, aesthetic >= 5.1."""
    return RunConfig(
        name="v2",
        work_dir="work/v2",
        data=DataConfig(shards_url=""),
        filter=MetadataFilterConfig(
            min_side=512,
            max_side=4096,
            max_pwatermark=0.5,
            max_punsafe=0.99,
            min_aesthetic=5.1,
            resources=StepResources(num_cpus=1, min_actors=1, max_actors=64, batch_size=8192),
        ),
        # v2's final training resolution; the semantic compressor sees these crops resized to 768.
        decode=DecodeConfig(
            resolution=1024, image_format="jpeg", resources=StepResources(num_cpus=1, min_actors=1, max_actors=1024)
        ),
        # OpenAI ViT-L/14 and the public aesthetic predictor. No thresholds by default: the LAION
        # aesthetic cut (5.1) already ran on the metadata; set embed.min_* to filter again.
        embed=EmbedConfig(
            clip_model="ViT-L-14",
            clip_pretrained="openai",
            resources=StepResources(num_cpus=8, num_gpus=1, min_actors=1, max_actors=64, batch_size=256),
        ),
        # Two calls per actor: each GPU actor starts its next shard while it commits the last, which
        # took the phase from 0.81x to 0.99x of the encoders' own rate on an H200 (docs/benchmarks.md).
        # Tokens, not the towers' hidden states: by `python -m pipelines.plan`, running the towers in
        # every Stage B and C step costs less GPU time than a month of storing 0.35 MB more per sample.
        pre_encode=PreEncodeConfig(
            models="v2",
            text="tokens",
            resources=StepResources(
                num_cpus=8, num_gpus=1, min_actors=1, max_actors=64, batch_size=64, calls_per_actor=2
            ),
        ),
    )


RUNS = {"tiny": tiny, "v2": v2}


def load_config(name: str, overrides: list[str] = ()) -> RunConfig:
    """The named run with ``dotted.key=value`` overrides applied."""
    if name not in RUNS:
        raise ValueError(f"unknown config {name!r}: choose one of {', '.join(RUNS)}")
    return apply_overrides(RUNS[name](), list(overrides))
