"""Phase 3: embed. CLIP image and text embeddings, their similarity, and the LAION aesthetic score.

One open_clip model (OpenAI ViT-L/14 for v2, the model the public aesthetic predictor was trained
on) embeds each kept crop and its caption; the aesthetic MLP scores the image embedding. Both
scores can drop a sample, and the embeddings are kept in the output for later use (retrieval,
deduplication, analysis). GPU actors when the config asks for GPUs, CPU otherwise.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pyarrow as pa
import torch
from PIL import Image

from cluster.resources import StepResources
from pipelines import fingerprints, schema, shard_phase, trained_weights
from pipelines.ledger import ShardCounts
from pipelines.schema import DropReason
from pipelines.storage import StorageConfig, exists, filesystem, local_copy
from stages.aesthetic import IMPROVED_AESTHETIC_PREDICTOR_URL, AestheticPredictor
from stages.weights import load_weights

PHASE = "embed"
EMBED_REASONS = (DropReason.LOW_CLIP_SIMILARITY, DropReason.LOW_AESTHETIC_SCORE)
# open_clip configs of the project's own small models (``tiny-clip``), beside the library's.
MODEL_CONFIGS = Path(__file__).with_name("model_configs")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """The CLIP model, the aesthetic predictor and the thresholds on their scores."""

    clip_model: str = "ViT-L-14"
    """open_clip model name."""
    clip_pretrained: str = "openai"
    """open_clip pretrained tag; empty: random weights seeded by ``seed`` (tiny runs and tests only)."""
    aesthetic_weights: str = IMPROVED_AESTHETIC_PREDICTOR_URL
    """Path or URL of the aesthetic predictor's weights; empty: random weights seeded by ``seed``."""
    min_clip_similarity: float | None = None
    """Drop samples whose image-caption cosine similarity is below this; none: keep all."""
    min_aesthetic_score: float | None = None
    """Drop samples whose predicted aesthetic score is below this; none: keep all."""
    seed: int = 0
    """Seed of random weights, the same in every actor."""
    resources: StepResources = dataclasses.field(default_factory=lambda: StepResources(num_gpus=1, batch_size=256))
    """Embedding actors; ``batch_size`` is images per forward pass."""
    budget_gpu_hours: float | None = None
    """GPU-hours the phase may hold in all, its earlier stopped runs included: it stops starting shards
    when the next would exceed them; none: no limit (``tracking.experiment_budget_gpu_hours`` still caps it)."""

    def __post_init__(self):
        if self.budget_gpu_hours is not None and self.budget_gpu_hours <= 0:
            raise ValueError(f"budget_gpu_hours must be > 0 or none, got {self.budget_gpu_hours}")
        if self.min_clip_similarity is not None and not -1 <= self.min_clip_similarity <= 1:
            raise ValueError(
                f"min_clip_similarity is a cosine: must be in [-1, 1] or none, got {self.min_clip_similarity}"
            )

    def outcome(self) -> dict[str, Any]:
        """The settings that decide the output (how wide and how long it runs do not)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("resources", "budget_gpu_hours")}


def _register_own_config(config: EmbedConfig) -> None:
    if (MODEL_CONFIGS / f"{config.clip_model}.json").is_file():
        open_clip.add_model_config(MODEL_CONFIGS / f"{config.clip_model}.json")


def embedding_width(config: EmbedConfig) -> int:
    """The width of the configured model's embeddings, from its open_clip config (nothing is built)."""
    _register_own_config(config)
    model_config = open_clip.get_model_config(config.clip_model)
    if model_config is None:
        raise ValueError(
            f"embed.clip_model {config.clip_model!r} is not an open_clip model: choose one of open_clip.list_models()"
        )
    return model_config["embed_dim"]


def load_clip(config: EmbedConfig, device: torch.device):
    """(model, image preprocessing, tokenizer) of the configured open_clip model, in eval mode."""
    _register_own_config(config)
    torch.manual_seed(config.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(
        config.clip_model, pretrained=config.clip_pretrained or None, device=device
    )
    return model.eval(), preprocess, open_clip.get_tokenizer(config.clip_model)


def load_aesthetic(
    config: EmbedConfig, embed_dim: int, storage: StorageConfig, device: torch.device
) -> AestheticPredictor:
    torch.manual_seed(config.seed)
    predictor = AestheticPredictor(embed_dim)
    if config.aesthetic_weights:
        load_weights(predictor, local_copy(config.aesthetic_weights, storage))
    return predictor.to(device).eval()


def output_schema(embed_dim: int) -> pa.Schema:
    vector = pa.fixed_shape_tensor(pa.float16(), [embed_dim])
    return schema.sample_schema(
        pa.field(schema.CAPTION, pa.string()),
        pa.field(schema.CLIP_IMAGE_EMBEDDING, vector),
        pa.field(schema.CLIP_TEXT_EMBEDDING, vector),
        pa.field(schema.CLIP_SIMILARITY, pa.float32()),
        pa.field(schema.AESTHETIC_SCORE, pa.float32()),
    )


class EmbedShard:
    """Ray Data step: embeds one shard's decoded samples into ``embed/{shard}.parquet``."""

    def __init__(
        self,
        *,
        decoded_url: str,
        output_url: str,
        config: EmbedConfig,
        fingerprint: dict[str, Any],
        storage: StorageConfig,
    ):
        exists(output_url, "work_dir", storage)  # as in decode: a node without the storage fails at once
        self.decoded, self.decoded_folder = filesystem(decoded_url, storage)
        self.output, self.output_folder = filesystem(output_url, storage)
        self.config, self.fingerprint = config, fingerprint
        self.device = torch.device("cuda" if config.resources.on_gpu and torch.cuda.is_available() else "cpu")
        self.model, self.preprocess, self.tokenizer = load_clip(config, self.device)
        with torch.inference_mode():
            self.embed_dim = self.model.encode_text(self.tokenizer([""]).to(self.device)).shape[-1]
        self.aesthetic = load_aesthetic(config, self.embed_dim, storage, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (shard,) = batch[schema.SHARD]
        counts = self.embed(str(shard))
        return {schema.SHARD: np.array([shard]), "samples_in": np.array([counts.samples_in])}

    @torch.inference_mode()
    def scores(self, images: list[Image.Image], captions: list[str]) -> dict[str, np.ndarray]:
        """Normalised embeddings, cosine similarity and aesthetic score of a batch."""
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        tokens = self.tokenizer(captions).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            image_embedding = self.model.encode_image(pixels).float()
            text_embedding = self.model.encode_text(tokens).float()
        image_embedding = image_embedding / image_embedding.norm(dim=-1, keepdim=True)
        text_embedding = text_embedding / text_embedding.norm(dim=-1, keepdim=True)
        return {
            schema.CLIP_IMAGE_EMBEDDING: image_embedding.half().cpu().numpy(),
            schema.CLIP_TEXT_EMBEDDING: text_embedding.half().cpu().numpy(),
            schema.CLIP_SIMILARITY: (image_embedding * text_embedding).sum(-1).cpu().numpy(),
            schema.AESTHETIC_SCORE: self.aesthetic(image_embedding).float().cpu().numpy(),
        }

    def reason(self, similarity: float, aesthetic: float) -> str | None:
        c = self.config
        if c.min_clip_similarity is not None and similarity < c.min_clip_similarity:
            return str(DropReason.LOW_CLIP_SIMILARITY)
        if c.min_aesthetic_score is not None and aesthetic < c.min_aesthetic_score:
            return str(DropReason.LOW_AESTHETIC_SCORE)
        return None

    def embed(self, shard: str) -> ShardCounts:
        samples_in, dropped = 0, {}
        table_schema = output_schema(self.embed_dim)
        path = f"{self.output_folder}/{schema.shard_parquet(shard)}"
        with shard_phase.ShardOutput(self.output, path, table_schema) as output:
            for rows in shard_phase.iter_rows(
                self.decoded,
                f"{self.decoded_folder}/{schema.shard_parquet(shard)}",
                batch_size=self.config.resources.batch_size,
            ):
                rows = [row for row in rows if row[schema.DROP_REASON] is None]
                if not rows:
                    continue
                samples_in += len(rows)
                scores = self.scores(
                    [Image.open(io.BytesIO(row[schema.IMAGE])) for row in rows], [row[schema.CAPTION] for row in rows]
                )
                out = []
                for index, row in enumerate(rows):
                    reason = self.reason(
                        float(scores[schema.CLIP_SIMILARITY][index]), float(scores[schema.AESTHETIC_SCORE][index])
                    )
                    if reason is not None:
                        dropped[reason] = dropped.get(reason, 0) + 1
                    out.append(
                        {
                            **{c: row[c] for c in schema.SAMPLE_METADATA},
                            schema.CAPTION: row[schema.CAPTION],
                            **{name: values[index] for name, values in scores.items()},
                            schema.DROP_REASON: reason,
                        }
                    )
                output.write(out)
            counts = ShardCounts(
                samples_in=samples_in, kept=samples_in - sum(dropped.values()), dropped=dict(sorted(dropped.items()))
            )
            output.commit(counts, self.fingerprint)
        return counts


def phase(
    *,
    decoded_url: str,
    output_url: str,
    decoded_fingerprint: dict[str, Any],
    config: EmbedConfig,
    storage: StorageConfig,
) -> shard_phase.ShardPhase:
    fingerprint = fingerprints.of(
        input=decoded_fingerprint,
        settings={
            **config.outcome(),
            "aesthetic_weights": trained_weights.weights_fingerprint(config.aesthetic_weights, storage),
        },
    )
    return shard_phase.ShardPhase(
        name=PHASE,
        step=EmbedShard,
        step_kwargs={
            "decoded_url": decoded_url,
            "output_url": output_url,
            "config": config,
            "fingerprint": fingerprint,
            "storage": storage,
        },
        resources=config.resources,
        fingerprint=fingerprint,
    )
