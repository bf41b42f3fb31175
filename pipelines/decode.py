"""Phase 2: decode. Every sample the metadata filter kept is read from its tar shard and decoded.

Checks, cheapest first: the tar holds the sample once, its .json and .txt are readable, its image
is a JPEG/PNG/WebP that is not a decompression bomb, has the size its metadata says (after EXIF
rotation), and decodes. Large JPEGs are decoded at reduced scale (DCT scaling, PIL's draft mode)
when the crop is smaller, which skips most of the decoding work. The image is converted to RGB
(CMYK, greyscale, 16-bit, palette and alpha included), EXIF orientation applied, resized and
centre-cropped, and stored re-encoded for the encoders. The crop is the ``resolution`` square, or
with ``crop="buckets"`` the aspect-ratio bucket nearest the image's own shape (about as many pixels
as the square), so wide and tall images keep their composition.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import tarfile
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from cluster.resources import StepResources
from pipelines import fingerprints, schema, shard_phase
from pipelines.ledger import ShardCounts
from pipelines.schema import DropReason
from pipelines.storage import StorageConfig, exists, filesystem

PHASE = "decode"
DECODE_REASONS = (
    DropReason.TAR_TRUNCATED,
    DropReason.SAMPLE_MISSING,
    DropReason.JSON_MISSING,
    DropReason.JSON_INVALID,
    DropReason.CAPTION_MISSING,
    DropReason.CAPTION_NOT_UTF8,
    DropReason.IMAGE_EMPTY,
    DropReason.IMAGE_CORRUPT,
    DropReason.IMAGE_FORMAT,
    DropReason.DECOMPRESSION_BOMB,
    DropReason.SIZE_MISMATCH,
)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DECODABLE_FORMATS = ("JPEG", "PNG", "WEBP")
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
OUTPUT_SCHEMA = schema.sample_schema(pa.field(schema.CAPTION, pa.string()), pa.field(schema.IMAGE, pa.binary()))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """How images are decoded and cropped for the encoders."""

    resolution: int = 512
    """Side of the square crop handed to Stage A and the semantic compressor, in pixels."""
    crop: Literal["centre", "buckets"] = "centre"
    """centre: every image becomes the ``resolution`` square; buckets: the bucket of
    ``bucket_aspect_ratios`` nearest its shape (Stage B and Stage C then train on every bucket)."""
    bucket_aspect_ratios: tuple[float, ...] = (1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)
    """Long side / short side of the buckets; each is made landscape and portrait."""
    bucket_multiple: int = 128
    """Bucket sides are multiples of this, so that both encoders divide them (pre-encode checks):
    128 at v2's 1024 px (Stage A downsamples by 4; the semantic compressor by 32 after scaling
    1024 px to 768 px)."""
    max_pixels: int = 50_000_000
    """Images declaring more pixels are refused as decompression bombs before decoding."""
    image_format: Literal["png", "jpeg"] = "jpeg"
    """How the crop is stored between phases: png is lossless, jpeg (quality 95) ~5x smaller."""
    resources: StepResources = dataclasses.field(default_factory=StepResources)
    """Decode actors: CPU only, one shard per call."""

    def __post_init__(self):
        if self.resolution < 8:
            raise ValueError(f"resolution must be >= 8 pixels, got {self.resolution}")
        if self.max_pixels < self.resolution**2:
            raise ValueError(f"max_pixels ({self.max_pixels}) must be >= resolution² ({self.resolution**2})")
        if self.resources.num_gpus:
            raise ValueError("decode runs on CPU workers: set decode.resources.num_gpus=0")
        if self.crop not in ("centre", "buckets"):
            raise ValueError(f"crop must be 'centre' or 'buckets', got {self.crop!r}")
        if self.crop == "buckets":
            if self.bucket_multiple < 1 or self.resolution % self.bucket_multiple:
                raise ValueError(f"bucket_multiple ({self.bucket_multiple}) must divide resolution ({self.resolution})")
            if not self.bucket_aspect_ratios or min(self.bucket_aspect_ratios) < 1:
                raise ValueError(
                    f"bucket_aspect_ratios must be long side / short side, each >= 1, got {self.bucket_aspect_ratios}"
                )

    def crop_sizes(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of every crop this config produces, in a fixed order."""
        if self.crop == "centre":
            return ((self.resolution, self.resolution),)
        sizes = set()
        for ratio in self.bucket_aspect_ratios:
            long, short = (
                self._bucket_side(self.resolution * math.sqrt(ratio)),
                self._bucket_side(self.resolution / math.sqrt(ratio)),
            )
            sizes |= {(long, short), (short, long)}
        return tuple(sorted(sizes))

    def _bucket_side(self, pixels: float) -> int:
        return max(self.bucket_multiple, round(pixels / self.bucket_multiple) * self.bucket_multiple)

    def outcome(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "resources"}


def decode_image(data: bytes, expected_size: tuple[int, int] | None, config: DecodeConfig) -> Image.Image | DropReason:
    """The RGB crop of an encoded image, or why it cannot be had.

    ``expected_size`` is the (width, height) the metadata claims for the upright image.
    """
    if not data:
        return DropReason.IMAGE_EMPTY
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return DropReason.DECOMPRESSION_BOMB
    except (OSError, SyntaxError, ValueError):  # UnidentifiedImageError is an OSError
        return DropReason.IMAGE_CORRUPT
    if image.format not in DECODABLE_FORMATS:
        return DropReason.IMAGE_FORMAT
    width, height = image.size
    if width * height > config.max_pixels:
        return DropReason.DECOMPRESSION_BOMB
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError):
        return DropReason.IMAGE_CORRUPT
    upright = (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)
    if expected_size is not None and upright != expected_size:
        return DropReason.SIZE_MISMATCH
    crop = nearest_crop(upright, config.crop_sizes())
    # The crop's side across the image's own (stored, not yet rotated) axes decides the scale.
    crop_across = crop if upright == (width, height) else crop[::-1]
    scale = max(crop_across[0] / width, crop_across[1] / height)
    if image.format == "JPEG" and scale < 1:
        # DCT scaling decodes at 1/2, 1/4 or 1/8 size, as long as the result stays >= this.
        image.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError):
        return DropReason.IMAGE_CORRUPT
    return ImageOps.fit(to_rgb(image), crop, Image.Resampling.BICUBIC)


def nearest_crop(size: tuple[int, int], crops: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The crop whose aspect ratio is nearest (on a log scale: 2:1 and 1:2 are as far from 1:1) ``size``'s."""
    return min(crops, key=lambda crop: abs(math.log(crop[0] / crop[1]) - math.log(size[0] / size[1])))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any mode PIL decodes: 16-bit keeps its top 8 bits, transparency goes onto white."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # PIL's own conversion clips 16-bit values at 255, which turns the image white.
        image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def encode_crop(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, "PNG")
    else:
        image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def tar_samples(stream) -> Iterator[tuple[str, dict[str, bytes]] | None]:
    """(key, {extension: bytes}) per sample of a tar, in order; ``None`` last if the tar is cut short.

    Members never reach the disk, so paths like ``../x.jpg`` cannot escape; they just form keys
    that no metadata row names.
    """
    key, members = None, {}
    try:
        for member in tar_file_iterator(stream):
            prefix, extension = base_plus_ext(member["fname"])
            if prefix is None:
                continue
            if prefix != key:
                if key is not None:
                    yield key, members
                key, members = prefix, {}
            if extension.lower() not in members:
                members[extension.lower()] = member["data"]
    except (tarfile.TarError, EOFError, OSError):
        if key is not None:
            yield key, members
        yield None
        return
    if key is not None:
        yield key, members


def decode_sample(members: dict[str, bytes], row: dict[str, Any], config: DecodeConfig) -> dict[str, Any]:
    """The output row of one sample: its crop and caption, or its drop reason."""
    out = {column: row.get(column) for column in schema.SAMPLE_METADATA}
    out.update({schema.CAPTION: None, schema.IMAGE: None, schema.DROP_REASON: None})
    reason = _check_members(members)
    if reason is None:
        out[schema.CAPTION] = members["txt"].decode("utf-8")
        expected = (row.get(schema.WIDTH), row.get(schema.HEIGHT))
        image_bytes = next(members[e] for e in IMAGE_EXTENSIONS if e in members)
        crop = decode_image(image_bytes, expected if None not in expected else None, config)
        if isinstance(crop, DropReason):
            reason = crop
        else:
            out[schema.IMAGE] = encode_crop(crop, config.image_format)
    out[schema.DROP_REASON] = None if reason is None else str(reason)
    return out


def _check_members(members: dict[str, bytes]) -> DropReason | None:
    if "json" not in members:
        return DropReason.JSON_MISSING
    try:
        if not isinstance(json.loads(members["json"]), dict):
            return DropReason.JSON_INVALID
    except (UnicodeDecodeError, json.JSONDecodeError):
        return DropReason.JSON_INVALID
    if "txt" not in members:
        return DropReason.CAPTION_MISSING
    try:
        members["txt"].decode("utf-8")
    except UnicodeDecodeError:
        return DropReason.CAPTION_NOT_UTF8
    if not any(extension in members for extension in IMAGE_EXTENSIONS):
        return DropReason.SAMPLE_MISSING
    return None


class DecodeShard:
    """Ray Data step: decodes one shard's kept samples into ``decode/{shard}.parquet``."""

    def __init__(
        self,
        *,
        shards_url: str,
        filtered_url: str,
        output_url: str,
        config: DecodeConfig,
        fingerprint: dict[str, Any],
        storage: StorageConfig,
    ):
        # A node that cannot reach the storage fails here, in seconds and naming the setting, not in its
        # first shard after minutes of retries.
        exists(shards_url, "data.shards_url", storage)
        exists(output_url, "work_dir", storage)
        self.tars, self.tars_folder = filesystem(shards_url, storage)
        self.filtered, self.filtered_folder = filesystem(filtered_url, storage)
        self.output, self.output_folder = filesystem(output_url, storage)
        self.config, self.fingerprint = config, fingerprint

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (shard,) = batch[schema.SHARD]
        counts = self.decode(str(shard))
        return {schema.SHARD: np.array([shard]), "samples_in": np.array([counts.samples_in])}

    def decode(self, shard: str) -> ShardCounts:
        wanted = {
            row[schema.KEY]: row
            for rows in shard_phase.iter_rows(self.filtered, f"{self.filtered_folder}/{schema.shard_parquet(shard)}")
            for row in rows
            if row[schema.DROP_REASON] is None
        }
        seen: set[str] = set()
        dropped: dict[str, int] = {}
        pending: list[dict[str, Any]] = []
        path = f"{self.output_folder}/{schema.shard_parquet(shard)}"

        def emit(row: dict[str, Any]) -> None:
            if row[schema.DROP_REASON] is not None:
                dropped[row[schema.DROP_REASON]] = dropped.get(row[schema.DROP_REASON], 0) + 1
            pending.append(row)
            if len(pending) >= 64:
                output.write(pending)
                pending.clear()

        def dropped_row(key: str, reason: DropReason) -> dict[str, Any]:
            row = wanted[key]
            return {
                **{c: row.get(c) for c in schema.SAMPLE_METADATA},
                schema.CAPTION: None,
                schema.IMAGE: None,
                schema.DROP_REASON: str(reason),
            }

        with shard_phase.ShardOutput(self.output, path, OUTPUT_SCHEMA) as output:
            truncated = False
            with self.tars.open(f"{self.tars_folder}/{schema.shard_tar(shard)}", "rb") as stream:
                for sample in tar_samples(stream):
                    if sample is None:
                        truncated = True
                        break
                    key, members = sample
                    if key not in wanted:
                        continue  # dropped by the metadata filter, or never listed
                    if key in seen:
                        continue  # the first copy in the tar is the sample; later ones are not counted twice
                    seen.add(key)
                    emit(decode_sample(members, wanted[key], self.config))
            absent = DropReason.TAR_TRUNCATED if truncated else DropReason.SAMPLE_MISSING
            for key in sorted(set(wanted) - seen):
                emit(dropped_row(key, absent))
            output.write(pending)
            counts = ShardCounts(
                samples_in=len(wanted), kept=len(wanted) - sum(dropped.values()), dropped=dict(sorted(dropped.items()))
            )
            output.commit(counts, self.fingerprint)
        return counts


def phase(
    *,
    shards_url: str,
    filtered_url: str,
    output_url: str,
    filtered_fingerprint: dict[str, Any],
    config: DecodeConfig,
    storage: StorageConfig,
) -> shard_phase.ShardPhase:
    fingerprint = fingerprints.of(input=filtered_fingerprint, settings=config.outcome())
    return shard_phase.ShardPhase(
        name=PHASE,
        step=DecodeShard,
        step_kwargs={
            "shards_url": shards_url,
            "filtered_url": filtered_url,
            "output_url": output_url,
            "config": config,
            "fingerprint": fingerprint,
            "storage": storage,
        },
        resources=config.resources,
        fingerprint=fingerprint,
    )
