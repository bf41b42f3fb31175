"""What the chain (Stage C -> Stage B -> Stage A) makes of held-out captions, scored.

At each evaluation of Stage C's training (``eval_every``, with the Stage B and Stage A the run
trained before it), the chain renders the captions of the first ``generate.eval_captions`` rows of
the validation split, with the generate phase's size, guidance and seed, and logs:

- ``eval/clip_score``: the mean CLIP score of each image against its caption, with the embed
  phase's open_clip model (pipelines/quality.py);
- ``eval/fid``: FID between the rendered images and the held-out rows' real images (the decode
  phase's crops), with the feature extractor ``generate.fid_features`` names;
- ``eval/colour_accuracy`` (the demo, ``generate.score_colours``): the share of images whose
  dominant colour is the one the caption names, as the generate phase scores it.

Definitions and sources: docs/evaluation.md.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from PIL import Image

from pipelines import pre_encode, quality, schema
from pipelines.embed import EmbedConfig, load_clip
from pipelines.generate_phase import SampleConfig, colour_accuracy, dominant_colour, render_with
from pipelines.reports import fit_square
from pipelines.storage import StorageConfig, filesystem
from stages.generate import Wuerstchen


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeldOutCaptions:
    """Held-out rows the chain is scored on: their captions and where their real images are."""

    captions: tuple[str, ...]
    keys: tuple[tuple[str, str], ...]
    """(shard, key) of each caption's row, in caption order."""
    images_url: str
    """The decode phase's output, which holds each row's image in ``<shard>.parquet``."""
    storage: StorageConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChainEvaluation:
    """Everything a worker needs to score the chain: picklable, read on the worker's own node."""

    held_out: HeldOutCaptions
    sample: SampleConfig
    embed: EmbedConfig
    models: str


def held_out_captions(
    latents_url: str, images_url: str, shards: list[str], count: int, storage: StorageConfig
) -> HeldOutCaptions | None:
    """The first ``count`` validation rows of the latent shards, in shard order; None if there are none."""
    fs, folder = filesystem(latents_url, storage)
    captions, keys = [], []
    for shard in shards:
        if len(captions) >= count:
            break
        table = pq.read_table(
            f"{folder}/{schema.shard_parquet(shard)}",
            filesystem=fs,
            columns=[schema.KEY, schema.CAPTION],
            filters=pre_encode.VALIDATION_ROWS.to_pyarrow(),
        )
        for row in table.slice(0, count - len(captions)).to_pylist():
            captions.append(row[schema.CAPTION])
            keys.append((shard, row[schema.KEY]))
    if not captions:
        return None
    return HeldOutCaptions(captions=tuple(captions), keys=tuple(keys), images_url=images_url, storage=storage)


def real_images(held_out: HeldOutCaptions, size: int) -> list[Image.Image]:
    """Each held-out row's real image, fitted to ``size`` x ``size`` as the chain renders."""
    fs, folder = filesystem(held_out.images_url, held_out.storage)
    by_key: dict[tuple[str, str], bytes] = {}
    for shard in dict.fromkeys(shard for shard, _ in held_out.keys):
        wanted = [key for s, key in held_out.keys if s == shard]
        table = pq.read_table(
            f"{folder}/{schema.shard_parquet(shard)}",
            filesystem=fs,
            columns=[schema.KEY, schema.IMAGE],
            filters=pc.field(schema.KEY).isin(wanted),
        )
        by_key.update({(shard, row[schema.KEY]): row[schema.IMAGE] for row in table.to_pylist()})
    missing = [key for key in held_out.keys if key not in by_key]
    assert not missing, f"held-out rows without an image in {held_out.images_url}: {missing[:3]}"
    return [fit_square(Image.open(io.BytesIO(by_key[key])).convert("RGB"), size) for key in held_out.keys]


def _pixels(images: list[Image.Image]) -> torch.Tensor:
    """(N, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2).float() / 255


_FEATURE_BATCH = 64
RENDER_CHUNK = 4
"""Captions rendered together, with a seed of their own (the sample seed plus the chunk's index):
what a caption's image is depends on neither the worker count nor the caption count, and chunks
this small spread 256 captions over 64 GPUs."""


@dataclasses.dataclass(frozen=True)
class _ChunkScores:
    """What one chunk of rendered images contributes to the metrics."""

    clip_scores: np.ndarray
    features: torch.Tensor
    dominant_colours: list[str | None]


class ChainScorer:
    """Scores a chain's images of the held-out captions; holds the CLIP model, the feature extractor
    and (on the rank that adds up) the real images' feature statistics from the first call on."""

    def __init__(self, evaluation: ChainEvaluation, device: torch.device):
        self.evaluation, self.device = evaluation, device
        self._clip = None
        self._features: torch.nn.Module | None = None
        self._real: quality.FeatureStatistics | None = None

    def _feature_batches(self, images: list[Image.Image]) -> Iterator[torch.Tensor]:
        assert self._features is not None
        pixels = _pixels(images)
        with torch.inference_mode():
            for start in range(0, len(pixels), _FEATURE_BATCH):
                yield self._features(pixels[start : start + _FEATURE_BATCH].to(self.device)).cpu()

    def __call__(self, models: Wuerstchen, *, shared: bool = False) -> dict[str, float]:
        """The metrics of the chain ``models`` (in eval mode, on this scorer's device). With ``shared``
        every rank of the process group calls this with the same weights: each renders and scores
        every world-size-th chunk of captions, and rank 0 returns the metrics of all (the others an
        empty dict); without, this process renders every chunk."""
        evaluation, sample = self.evaluation, self.evaluation.sample
        captions = list(evaluation.held_out.captions)
        rank, world = (dist.get_rank(), dist.get_world_size()) if shared and dist.is_initialized() else (0, 1)
        if self._clip is None:
            self._clip = load_clip(evaluation.embed, self.device)
            self._features = quality.feature_extractor(sample.fid_features).to(self.device)
            if rank == 0:
                real = real_images(evaluation.held_out, sample.size)
                batches = list(self._feature_batches(real))
                self._real = quality.FeatureStatistics(batches[0].shape[1])
                for batch in batches:
                    self._real.add(batch)
        chunks = range(0, len(captions), RENDER_CHUNK)
        scored = {
            index: self._score_chunk(models, captions[start : start + RENDER_CHUNK], sample.seed + index)
            for index, start in enumerate(chunks)
            if index % world == rank
        }
        if world > 1:
            every_rank: list[dict[int, _ChunkScores]] = [{} for _ in range(world)]
            dist.all_gather_object(every_rank, scored)
            scored = {index: chunk for part in every_rank for index, chunk in part.items()}
        if rank != 0:
            return {}
        assert sorted(scored) == list(range(len(chunks))), f"chunks scored: {sorted(scored)}"
        assert self._real is not None
        rendered = quality.FeatureStatistics(self._real.mean.numel())
        for index in range(len(chunks)):  # in caption order: the same sums whatever the world size
            rendered.add(scored[index].features)
        metrics = {
            "eval/clip_score": float(np.concatenate([scored[i].clip_scores for i in range(len(chunks))]).mean()),
            "eval/fid": rendered.frechet_distance(self._real),
        }
        if sample.score_colours:
            dominant = [colour for index in range(len(chunks)) for colour in scored[index].dominant_colours]
            metrics["eval/colour_accuracy"] = colour_accuracy(dominant, captions)["colour_accuracy"]
        return metrics

    def _score_chunk(self, models: Wuerstchen, captions: list[str], seed: int) -> _ChunkScores:
        sample = self.evaluation.sample
        pixels = render_with(models, self.evaluation.models, captions, sample.size, sample.prior_guidance, seed)
        images = [Image.fromarray(image) for image in pixels]
        model, preprocess, tokenizer = self._clip
        clip_scores = quality.clip_scores(model, preprocess, tokenizer, images, captions, self.device)
        return _ChunkScores(
            clip_scores=clip_scores.double().cpu().numpy(),
            features=torch.cat(list(self._feature_batches(images))),
            dominant_colours=[dominant_colour(image) for image in pixels] if sample.score_colours else [],
        )
