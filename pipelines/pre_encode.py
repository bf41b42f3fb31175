"""Phase 4: pre-encode. Every kept sample becomes its training targets and conditioning, once.

Per sample, from the decoded crop and its caption:

- ``stage_c_latent``: the semantic compressor's latent, scaled (e + 1) / 42 (Stage C's target);
- ``stage_b_latent``: the Stage A latent / scale factor (Stage B's target);
- ``text_tokens``: the caption as 77 CLIP tokens (the attention mask follows from them);
- ``text_stage_c``/``text_stage_b``: the CLIP bigG and CLIP H last hidden states, unless the
  config stores tokens only and leaves text encoding to training time.

Latent shards are Parquet with Arrow fixed-shape tensor columns (float16), one per input shard,
holding only kept samples; training reads them and never touches pixels again. Crops in
aspect-ratio buckets (``decode.crop=buckets``) give latents of several shapes: those shards store
each latent flattened in a list column, with the sample's ``crop_width`` and ``crop_height`` to
reshape it by (``latent_shapes``). See docs/data_format.md for the bytes per sample of each option.

A deterministic share of the samples is held out for evaluation (``split`` = ``validation``,
chosen by a hash of the sample key: ``validation_threshold``); those rows sit in row groups of
their own at the end of each shard, so training's filter on ``split`` (``TRAINING_ROWS``) skips
them by their statistics, and an evaluation reads them alone. The split is decided before Stage A
and the semantic compressor train, and they leave the same keys out (``held_out``). See
docs/evaluation.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import io
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from ray.data.expressions import col
from safetensors.torch import save

from cluster.resources import StepResources
from pipelines import fingerprints, schema, shard_phase, trained_weights
from pipelines.ledger import Manifest, ShardCounts
from pipelines.schema import DropReason, Split
from pipelines.storage import StorageConfig, exists, filesystem, write_atomically
from stages.semantic import SEMANTIC_CONFIGS, SemanticCompressor
from stages.stage_a import STAGE_A_CONFIGS, StageA
from stages.text import MAX_LENGTH, TEXT_CONFIGS, TextEncoder, tokenize

PHASE = "pre_encode"
EMPTY_CAPTION_FILE = "empty_caption.safetensors"
PRE_ENCODE_REASONS = (DropReason.NON_FINITE_LATENT,)
# Official v2 encoder weights (docs/weights.md): the VQGAN of warp-ai/wuerstchen, and the v2 models' own
# EfficientNet encoder, stored beside their Stage B in the research checkpoint (the entry after '#').
# Stable Cascade's effnet_encoder.safetensors is another encoder: its last BatchNorm has no affine
# parameters, so it does not load into ours, and Stable Cascade trains on its raw output, not (e + 1) / 42.
V2_STAGE_A_WEIGHTS = "https://huggingface.co/warp-ai/wuerstchen/resolve/main/vqgan/diffusion_pytorch_model.safetensors"
V2_SEMANTIC_WEIGHTS = "https://huggingface.co/dome272/wuerstchen/resolve/main/model_v2_stage_b.pt#effnet_state_dict"
# The rows of the latent shards a training phase may read (a Ray Data expression; ``.to_pyarrow()`` for pyarrow).
TRAINING_ROWS = col(schema.SPLIT) == str(Split.TRAIN)
VALIDATION_ROWS = col(schema.SPLIT) == str(Split.VALIDATION)
_KEY_HASHES = 2**64
# Standard deviations between the number of keys the share is expected to hold out and the minimum,
# beyond which the minimum is taken as met without counting: the chance it is not is below e^-50.
_SURE_MARGIN = 10


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreEncodeConfig:
    """The encoders and what the latent shards store."""

    models: str = "v2"
    """Encoder sizes: a name in the stage registries (tiny, v2)."""
    stage_a_weights: str = V2_STAGE_A_WEIGHTS
    """Path or URL of Stage A's weights; empty: random weights seeded by ``seed`` (tiny runs only)."""
    semantic_weights: str = V2_SEMANTIC_WEIGHTS
    """Path or URL of the semantic compressor's weights (``#entry``: a state dict in a PyTorch pickle holding
    several); empty: random weights seeded by ``seed``."""
    text: Literal["hidden_states", "tokens"] = "hidden_states"
    """Store both CLIP hidden states (fast training, ~355 kB/sample in v2) or tokens only (encode at train time)."""
    text_weights: Literal["pretrained", "random"] = "pretrained"
    """The text towers' weights with ``text=hidden_states``: the models' own (v2: by hub name), or random at the
    same architecture, seeded (an offline benchmark of the phase; the hidden states mean nothing)."""
    seed: int = 0
    """Seed of random weights, the same in every actor."""
    validation_fraction: float = 0.005
    """Share of the samples held out for evaluation, chosen by a hash of their key; no training phase reads them."""
    validation_min: int = 1000
    """Hold out at least this many samples (the smallest key hashes) when the share gives fewer."""
    resources: StepResources = dataclasses.field(default_factory=lambda: StepResources(num_gpus=1, batch_size=64))
    """Encoder actors; ``batch_size`` is images per forward pass."""
    budget_gpu_hours: float | None = None
    """GPU-hours the phase may hold in all, its earlier stopped runs included: it stops starting shards
    when the next would exceed them; none: no limit (``tracking.experiment_budget_gpu_hours`` still caps it)."""

    def __post_init__(self):
        if self.budget_gpu_hours is not None and self.budget_gpu_hours <= 0:
            raise ValueError(f"budget_gpu_hours must be > 0 or none, got {self.budget_gpu_hours}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(
                f"validation_fraction is a share of the samples: must be in [0, 1), got {self.validation_fraction}"
            )
        if self.validation_min < 0:
            raise ValueError(f"validation_min is a number of samples: must be 0 or more, got {self.validation_min}")
        if self.models not in STAGE_A_CONFIGS:
            raise ValueError(f"models {self.models!r} is not a stage size; choose from {', '.join(STAGE_A_CONFIGS)}")
        if self.text_weights == "random" and self.text == "tokens":
            # Training would encode the tokens with the models' own towers, so the setting would be ignored.
            raise ValueError(
                "text_weights=random applies only to text=hidden_states (tokens are encoded at train "
                "time with the models' own towers): set text=hidden_states or text_weights=pretrained"
            )

    def outcome(self) -> dict[str, Any]:
        """The settings that decide the output (how wide and how long it runs do not)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("resources", "budget_gpu_hours")}


def key_hash(key: str) -> int:
    """A sample's place in the split: its key's 64-bit BLAKE2b digest, the same on every machine and in
    every run (Python's ``hash`` of a string changes with each process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def held_out(keys: Iterable[str], threshold: int) -> np.ndarray:
    """Which of ``keys`` are held out of every training phase: those whose hash is below ``threshold``
    (``validation_threshold``). Pre-encode marks the ones it keeps ``validation``; Stage A and the
    semantic compressor, which learn from the decoded crops before pre-encode runs, leave them out."""
    return np.array([key_hash(key) < threshold for key in keys], dtype=bool)


def validation_threshold(config: PreEncodeConfig, embedded: Manifest, embedded_url: str, storage: StorageConfig) -> int:
    """The key hash below which a sample embed kept is held out for validation.

    The share alone is a fixed bound in hash space: whether a key is held out depends on nothing but
    the key, so a data set that grows keeps its validation samples validation samples. The minimum
    needs the keys: the bound is raised to just above the ``validation_min``-th smallest key hash when
    that lies beyond the share. The driver computes it once embed has finished, before anything
    trains (``PhaseContext.validation_threshold``): every actor of this phase applies one bound, the
    split needs no second pass, and the encoders' training leaves the same keys out (``held_out``).
    Reading the keys is skipped when the share is sure to hold the minimum (it is more than
    ``_SURE_MARGIN`` standard deviations beyond it): large data sets, whose keys cost minutes to
    read, never read them.
    """
    share = math.floor(config.validation_fraction * _KEY_HASHES)
    if config.validation_min == 0:
        return share
    if config.validation_min >= embedded.kept:
        raise ValueError(
            f"pre_encode.validation_min ({config.validation_min}) would hold out all {embedded.kept} "
            "samples that embed kept, leaving none to train on: lower it"
        )
    expected = config.validation_fraction * embedded.kept
    if expected - _SURE_MARGIN * math.sqrt(expected) >= config.validation_min:
        return share
    fs, folder = filesystem(embedded_url, storage)
    hashes = (
        key_hash(row[schema.KEY])
        for shard in sorted(embedded.shards)
        for rows in shard_phase.iter_rows(
            fs, f"{folder}/{schema.shard_parquet(shard)}", columns=[schema.KEY, schema.DROP_REASON]
        )
        for row in rows
        if row[schema.DROP_REASON] is None
    )
    smallest = heapq.nsmallest(config.validation_min, hashes)
    return max(share, smallest[-1] + 1)


def semantic_input_size(config: PreEncodeConfig, crop: tuple[int, int], resolution: int) -> tuple[int, int] | None:
    """(height, width) the semantic compressor sees a (width, height) crop at: scaled as the square
    ``resolution`` crop is to its image size; None for that square (the compressor's own resize)."""
    if crop == (resolution, resolution):
        return None
    semantic = SEMANTIC_CONFIGS[config.models]()
    size = tuple(side * semantic.image_size / resolution for side in crop[::-1])
    if any(side != int(side) or side % semantic.downsampling for side in size):
        raise ValueError(
            f"the {crop[0]}x{crop[1]} crop bucket scales to {size[1]:g}x{size[0]:g} px for the semantic "
            f"compressor, not a multiple of its downsampling ({semantic.downsampling}): choose a "
            f"decode.bucket_multiple that makes it one"
        )
    return int(size[0]), int(size[1])


def latent_shapes(config: PreEncodeConfig, crop: tuple[int, int], resolution: int) -> dict[str, tuple[int, ...]]:
    """The Stage C and Stage B latent shapes of a (width, height) crop."""
    semantic = SEMANTIC_CONFIGS[config.models]()
    stage_a = STAGE_A_CONFIGS[config.models]()
    width, height = crop
    if width % stage_a.downsampling or height % stage_a.downsampling:
        setting = "decode.resolution" if width == height == resolution else "decode.bucket_multiple"
        raise ValueError(
            f"the {width}x{height} crop is not a multiple of Stage A's downsampling ({stage_a.downsampling}) "
            f"to pre-encode with the {config.models!r} models: change {setting}"
        )
    semantic_size = semantic_input_size(config, crop, resolution) or (semantic.image_size, semantic.image_size)
    return {
        schema.STAGE_C_LATENT: (semantic.c_latent, *(side // semantic.downsampling for side in semantic_size)),
        schema.STAGE_B_LATENT: (stage_a.latent_channels, height // stage_a.downsampling, width // stage_a.downsampling),
    }


def output_schema(config: PreEncodeConfig, crops: tuple[tuple[int, int], ...], resolution: int) -> pa.Schema:
    """The latent shard schema for the decoded crops; tensors are float16, tokens int32."""
    text = TEXT_CONFIGS[config.models]()
    shapes = [latent_shapes(config, crop, resolution) for crop in crops]
    if len(crops) == 1:
        latents = [
            pa.field(name, pa.fixed_shape_tensor(pa.float16(), list(shape))) for name, shape in shapes[0].items()
        ]
    else:
        latents = [
            pa.field(schema.CROP_WIDTH, pa.int32()),
            pa.field(schema.CROP_HEIGHT, pa.int32()),
            *(pa.field(name, pa.list_(pa.float16())) for name in shapes[0]),
        ]
    fields = [
        pa.field(schema.SPLIT, pa.string()),
        pa.field(schema.CAPTION, pa.string()),
        pa.field(schema.CLIP_SIMILARITY, pa.float32()),
        pa.field(schema.AESTHETIC_SCORE, pa.float32()),
        *latents,
        pa.field(schema.TEXT_TOKENS, pa.fixed_shape_tensor(pa.int32(), [MAX_LENGTH])),
    ]
    if config.text == "hidden_states":
        fields += [
            pa.field(schema.TEXT_STAGE_C, pa.fixed_shape_tensor(pa.float16(), [MAX_LENGTH, text.stage_c.hidden_size])),
            pa.field(schema.TEXT_STAGE_B, pa.fixed_shape_tensor(pa.float16(), [MAX_LENGTH, text.stage_b.hidden_size])),
        ]
    return schema.sample_schema(*fields, drop_reason=False)


def _random_or_loaded(model: torch.nn.Module, weights: str, what: str, storage: StorageConfig) -> torch.nn.Module:
    if weights:
        trained_weights.load(model, weights, storage)
    else:
        warnings.warn(
            f"pre_encode: {what} has random weights (its *_weights setting is empty); "
            "latents are only meaningful for tests and tiny demo runs",
            stacklevel=2,
        )
    return model


class PreEncodeShard:
    """Ray Data step: encodes one shard's kept samples into ``pre_encode/{shard}.parquet``; those whose
    key hash is below ``validation_threshold`` (``validation_threshold()``) are the validation split."""

    def __init__(
        self,
        *,
        decoded_url: str,
        embedded_url: str,
        output_url: str,
        config: PreEncodeConfig,
        crops: tuple[tuple[int, int], ...],
        resolution: int,
        validation_threshold: int,
        fingerprint: dict[str, Any],
        storage: StorageConfig,
    ):
        exists(output_url, "work_dir", storage)  # as in decode: a node without the storage fails at once
        self.decoded, self.decoded_folder = filesystem(decoded_url, storage)
        self.embedded, self.embedded_folder = filesystem(embedded_url, storage)
        self.output, self.output_folder = filesystem(output_url, storage)
        self.config, self.fingerprint = config, fingerprint
        self.validation_threshold = validation_threshold
        self.schema = output_schema(config, crops, resolution)
        self.bucketed = len(crops) > 1
        self.semantic_sizes = {crop: semantic_input_size(config, crop, resolution) for crop in crops}
        self.device = torch.device("cuda" if config.resources.on_gpu and torch.cuda.is_available() else "cpu")
        torch.manual_seed(config.seed)
        self.stage_a = (
            _random_or_loaded(StageA(STAGE_A_CONFIGS[config.models]()), config.stage_a_weights, "Stage A", storage)
            .to(self.device)
            .eval()
        )
        self.semantic = (
            _random_or_loaded(
                SemanticCompressor(SEMANTIC_CONFIGS[config.models]()),
                config.semantic_weights,
                "the semantic compressor",
                storage,
            )
            .to(self.device)
            .eval()
        )
        text = TEXT_CONFIGS[config.models]()
        if config.text_weights == "random":
            warnings.warn(
                "pre_encode: the text towers have random weights (text_weights=random); their hidden "
                "states are only meaningful for benchmarks",
                stacklevel=2,
            )
            text = text.with_random_weights()
        self.text_encoders = (
            {
                schema.TEXT_STAGE_C: TextEncoder(text.stage_c).to(self.device),
                schema.TEXT_STAGE_B: TextEncoder(text.stage_b).to(self.device),
            }
            if config.text == "hidden_states"
            else {}
        )
        if self.text_encoders and not self.output.exists(f"{self.output_folder}/{EMPTY_CAPTION_FILE}"):
            self.write_empty_caption()

    @torch.inference_mode()
    def write_empty_caption(self) -> None:
        """The empty caption's hidden states, which training swaps in for classifier-free guidance."""
        tokens, mask = tokenize([""])
        states = {
            name: encoder(tokens.to(self.device), mask.to(self.device))[0].float().cpu().contiguous()
            for name, encoder in self.text_encoders.items()
        }
        self.output.makedirs(self.output_folder, exist_ok=True)
        write_atomically(
            self.output, f"{self.output_folder}/{EMPTY_CAPTION_FILE}", lambda stream: stream.write(save(states))
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (shard,) = batch[schema.SHARD]
        counts = self.encode_shard(str(shard))
        return {schema.SHARD: np.array([shard]), "samples_in": np.array([counts.samples_in])}

    @torch.inference_mode()
    def encode(self, batch: PreparedBatch) -> EncodedBatch:
        """Targets and conditioning of a batch, float16 as stored (tokens int32). On a GPU this returns
        once the work is queued, so the caller can queue the next batch while this one runs."""
        # uint8 crosses to the device (a quarter of the bytes of float32) and is converted there.
        pixels = batch.pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float() / 255
        out = {}
        semantic_size = self.semantic_sizes[(pixels.shape[3], pixels.shape[2])]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out[schema.STAGE_C_LATENT] = self.semantic.encode_stage_c_latents(pixels, semantic_size)
            out[schema.STAGE_B_LATENT] = self.stage_a.encode_stage_b_latents(pixels)
            if self.text_encoders:
                tokens, mask = (t.to(self.device, non_blocking=True) for t in (batch.tokens, batch.mask))
                for name, encoder in self.text_encoders.items():
                    out[name] = encoder(tokens, mask)
        # Converted and checked where they were computed: half the bytes cross to the host, and a value
        # beyond float16's range, which becomes inf here, is caught with the rest.
        out = {name: value.to(torch.float16) for name, value in out.items()}
        finite = torch.stack([value.isfinite().flatten(1).all(1) for value in out.values()]).all(0)
        asynchronous = self.device.type == "cuda"  # a non-blocking copy to the host lands in pinned memory
        host = {name: value.to("cpu", non_blocking=asynchronous) for name, value in out.items()}
        host[schema.TEXT_TOKENS] = batch.tokens.to(torch.int32)
        finite = finite.to("cpu", non_blocking=asynchronous)
        copied = None
        if asynchronous:
            copied = torch.cuda.Event()
            copied.record()
        return EncodedBatch(arrays=host, finite=finite, copied=copied)

    def prepare(self, rows: list[dict[str, Any]], decoders: ThreadPoolExecutor) -> PreparedBatch:
        """The CPU side of a batch: crops decoded (on the decoder threads) and stacked, captions tokenised."""
        crops = list(
            decoders.map(lambda row: np.asarray(Image.open(io.BytesIO(row[schema.IMAGE])).convert("RGB")), rows)
        )
        pixels = torch.from_numpy(np.stack(crops))
        tokens, mask = tokenize([row[schema.CAPTION] for row in rows])
        if self.device.type == "cuda":
            # Copies to the GPU from pinned memory run asynchronously; from pageable memory they would
            # wait for the work already queued.
            pixels, tokens, mask = pixels.pin_memory(), tokens.pin_memory(), mask.pin_memory()
        return PreparedBatch(rows=rows, pixels=pixels, tokens=tokens, mask=mask)

    def encode_shard(self, shard: str) -> ShardCounts:
        """Decoding, encoding and writing overlap: while the device encodes one batch, threads decode the
        next and write the previous, so a GPU actor is not left waiting on its CPU work."""
        embedded = {
            row[schema.KEY]: row
            for rows in shard_phase.iter_rows(
                self.embedded,
                f"{self.embedded_folder}/{schema.shard_parquet(shard)}",
                columns=[schema.KEY, schema.CLIP_SIMILARITY, schema.AESTHETIC_SCORE, schema.DROP_REASON],
            )
            for row in rows
            if row[schema.DROP_REASON] is None
        }
        batches = _batches_by_crop(
            (
                row
                for rows in shard_phase.iter_rows(
                    self.decoded,
                    f"{self.decoded_folder}/{schema.shard_parquet(shard)}",
                    batch_size=self.config.resources.batch_size,
                )
                for row in rows
                if row[schema.KEY] in embedded
            ),
            self.config.resources.batch_size,
        )
        dropped: Counter[str] = Counter()
        # Validation rows of each crop, written as the shard's last row groups: a row group holds one
        # split (and one crop), so a reader's filter on either skips the others by their statistics.
        validation_rows: dict[tuple[int, int], list[pa.Table]] = {}

        def write(output: shard_phase.ShardOutput, batch: PreparedBatch, encoded: EncodedBatch) -> None:
            encoded.wait()
            finite = encoded.finite.numpy()
            dropped[DropReason.NON_FINITE_LATENT] += int(finite.size - finite.sum())
            rows = [row for row, keep in zip(batch.rows, finite, strict=True) if keep]
            columns = {name: [row[name] for row in rows] for name in (*schema.SAMPLE_METADATA, schema.CAPTION)}
            for name in (schema.CLIP_SIMILARITY, schema.AESTHETIC_SCORE):
                columns[name] = [embedded[row[schema.KEY]][name] for row in rows]
            width, height = batch.crop
            columns[schema.CROP_WIDTH], columns[schema.CROP_HEIGHT] = [width] * len(rows), [height] * len(rows)
            columns.update({name: value.numpy()[finite] for name, value in encoded.arrays.items()})
            validation = held_out([row[schema.KEY] for row in rows], self.validation_threshold)
            columns[schema.SPLIT] = [str(Split.VALIDATION if v else Split.TRAIN) for v in validation]
            output.write_columns(_rows_where(columns, ~validation))
            if validation.any():
                validation_rows.setdefault(batch.crop, []).append(
                    shard_phase.columns_to_table(_rows_where(columns, validation), self.schema)
                )

        path = f"{self.output_folder}/{schema.shard_parquet(shard)}"
        decode_threads = max(1, int(self.config.resources.num_cpus))
        with (
            shard_phase.ShardOutput(self.output, path, self.schema) as output,
            ThreadPoolExecutor(decode_threads) as decoders,
            ThreadPoolExecutor(1) as preparer,
            ThreadPoolExecutor(1) as writer,
        ):
            written: Future | None = None
            for batch in _one_ahead(preparer, lambda rows: self.prepare(rows, decoders), batches):
                encoded = self.encode(batch)
                if written is not None:
                    written.result()  # at most one batch waits to be written: memory stays bounded
                written = writer.submit(write, output, batch, encoded)
            if written is not None:
                written.result()
            for crop in sorted(validation_rows):
                output.write_table(pa.concat_tables(validation_rows[crop]))
            counts = ShardCounts(
                samples_in=len(embedded),
                kept=len(embedded) - sum(dropped.values()),
                dropped={str(k): v for k, v in sorted(dropped.items())},
                validation=sum(table.num_rows for tables in validation_rows.values() for table in tables),
            )
            output.commit(counts, self.fingerprint)
        return counts


@dataclasses.dataclass(frozen=True)
class PreparedBatch:
    rows: list[dict[str, Any]]
    pixels: torch.Tensor
    """(B, R, R, 3) uint8 crops."""
    tokens: torch.Tensor
    mask: torch.Tensor

    @property
    def crop(self) -> tuple[int, int]:
        """(width, height) of the batch's crops."""
        return self.pixels.shape[2], self.pixels.shape[1]


@dataclasses.dataclass(frozen=True)
class EncodedBatch:
    arrays: dict[str, torch.Tensor]
    """Per column, (B, ...) on the host: float16 latents and hidden states, int32 tokens."""
    finite: torch.Tensor
    """(B,) bool: every value of the sample is finite."""
    copied: torch.cuda.Event | None
    """Recorded after the copies to the host were queued; None when they were synchronous (CPU)."""

    def wait(self) -> None:
        """Returns once the host tensors hold their values."""
        if self.copied is not None:
            self.copied.synchronize()


def _rows_where(columns: dict[str, Any], selected: np.ndarray) -> dict[str, Any]:
    """The rows of ``columns`` (lists or arrays, one entry per row) where ``selected`` is true."""
    return {
        name: values[selected]
        if isinstance(values, np.ndarray)
        else [value for value, keep in zip(values, selected, strict=True) if keep]
        for name, values in columns.items()
    }


def _batches_by_crop(rows: Iterable[dict[str, Any]], batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """Batches of rows whose crops share one size (a batch is one tensor), each yielded once it is full,
    the partial ones at the end. The size comes from the image header, without decoding."""
    filling: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in rows:
        size = Image.open(io.BytesIO(row[schema.IMAGE])).size
        batch = filling.setdefault(size, [])
        batch.append(row)
        if len(batch) == batch_size:
            yield filling.pop(size)
    yield from filling.values()


def _one_ahead(pool: ThreadPoolExecutor, function: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
    """``map(function, items)``, with the next result computed on ``pool`` while the caller uses the current."""
    pending: Future | None = None
    for item in items:
        following = pool.submit(function, item)
        if pending is not None:
            yield pending.result()
        pending = following
    if pending is not None:
        yield pending.result()


def phase(
    *,
    decoded_url: str,
    embedded_url: str,
    output_url: str,
    embedded_fingerprint: dict[str, Any],
    crops: tuple[tuple[int, int], ...],
    resolution: int,
    config: PreEncodeConfig,
    validation_threshold: int,
    storage: StorageConfig,
) -> shard_phase.ShardPhase:
    output_schema(config, crops, resolution)  # crops the encoders cannot take fail here, before any work
    # Retrained or replaced encoders change every latent.
    weights = {
        "stage_a_weights": trained_weights.weights_fingerprint(config.stage_a_weights, storage),
        "semantic_weights": trained_weights.weights_fingerprint(config.semantic_weights, storage),
    }
    fingerprint = fingerprints.of(input=embedded_fingerprint, settings={**config.outcome(), **weights})
    return shard_phase.ShardPhase(
        name=PHASE,
        step=PreEncodeShard,
        step_kwargs={
            "decoded_url": decoded_url,
            "embedded_url": embedded_url,
            "output_url": output_url,
            "config": config,
            "crops": crops,
            "resolution": resolution,
            "validation_threshold": validation_threshold,
            "fingerprint": fingerprint,
            "storage": storage,
        },
        resources=config.resources,
        fingerprint=fingerprint,
    )
