"""Column names, file names and drop reasons shared by every phase.

Sources spell columns differently (LAION metadata uses ``URL``/``TEXT``/``AESTHETIC_SCORE``,
some releases ``aesthetic``; img2dataset writes lower case); everything past the reader uses the
canonical names below.
"""

from __future__ import annotations

import enum

import pyarrow as pa

# img2dataset shard parquet / per-sample json
KEY = "key"
URL = "url"
CAPTION = "caption"
STATUS = "status"
ERROR_MESSAGE = "error_message"
WIDTH = "width"
HEIGHT = "height"
ORIGINAL_WIDTH = "original_width"
ORIGINAL_HEIGHT = "original_height"
EXIF = "exif"
SHA256 = "sha256"

# LAION columns that img2dataset passes through
SIMILARITY = "similarity"
PUNSAFE = "punsafe"
PWATERMARK = "pwatermark"
AESTHETIC = "aesthetic"
HASH = "hash"

# Added by this project
SHARD = "shard"
DROP_REASON = "drop_reason"
IMAGE = "image"  # the decoded, cropped image, re-encoded (PNG or JPEG bytes)
CLIP_IMAGE_EMBEDDING = "clip_image_embedding"
CLIP_TEXT_EMBEDDING = "clip_text_embedding"
CLIP_SIMILARITY = "clip_similarity"
AESTHETIC_SCORE = "aesthetic_score"
CROP_WIDTH = "crop_width"  # the aspect-ratio bucket of a sample (latent shards of bucketed crops only)
CROP_HEIGHT = "crop_height"
STAGE_C_LATENT = "stage_c_latent"  # semantic latent, (e + 1) / 42
STAGE_B_LATENT = "stage_b_latent"  # Stage A latent / scale factor
TEXT_TOKENS = "text_tokens"  # 77 CLIP token ids
TEXT_STAGE_C = "text_stage_c"  # CLIP bigG last hidden states
TEXT_STAGE_B = "text_stage_b"  # CLIP H last hidden states
SPLIT = "split"  # a ``Split``: training reads the train rows of the latent shards only

# What every phase after the metadata filter carries along with a sample: the metadata that
# decided its filtering.
SAMPLE_METADATA_FIELDS = (
    pa.field(KEY, pa.string()),
    pa.field(SHARD, pa.string()),
    pa.field(URL, pa.string()),
    pa.field(HASH, pa.int64()),
    pa.field(SIMILARITY, pa.float64()),
    pa.field(PUNSAFE, pa.float64()),
    pa.field(PWATERMARK, pa.float64()),
    pa.field(AESTHETIC, pa.float64()),
    pa.field(ORIGINAL_WIDTH, pa.int64()),
    pa.field(ORIGINAL_HEIGHT, pa.int64()),
)
SAMPLE_METADATA = tuple(field.name for field in SAMPLE_METADATA_FIELDS)

# Every column the metadata filter carries from an img2dataset shard's parquet, with the type
# later phases rely on whatever width or spelling a source used. Other columns are not carried:
# shards that disagree on their types could not be read as one data set.
SHARD_METADATA_FIELDS = (
    *(field for field in SAMPLE_METADATA_FIELDS if field.name != SHARD),
    pa.field(CAPTION, pa.string()),
    pa.field(STATUS, pa.string()),
    pa.field(ERROR_MESSAGE, pa.string()),
    pa.field(WIDTH, pa.int64()),
    pa.field(HEIGHT, pa.int64()),
    pa.field(EXIF, pa.string()),
    pa.field(SHA256, pa.string()),
)


def sample_schema(*fields: pa.Field, drop_reason: bool = True) -> pa.Schema:
    """A phase's output schema: the sample metadata, the phase's own columns, then the drop reason."""
    return pa.schema([*SAMPLE_METADATA_FIELDS, *fields, *([pa.field(DROP_REASON, pa.string())] if drop_reason else [])])


STATUS_SUCCESS = "success"

# Spelling in the sources -> canonical name.
COLUMN_ALIASES = {
    "URL": URL,
    "TEXT": CAPTION,
    "WIDTH": ORIGINAL_WIDTH,
    "HEIGHT": ORIGINAL_HEIGHT,
    "AESTHETIC_SCORE": AESTHETIC,
}

# The LAION metadata parquet as LAION publishes it (the input of img2dataset).
LAION_METADATA_COLUMNS = (
    "URL",
    "TEXT",
    "WIDTH",
    "HEIGHT",
    "similarity",
    "punsafe",
    "pwatermark",
    "AESTHETIC_SCORE",
    "hash",
)


def shard_tar(shard: str) -> str:
    return f"{shard}.tar"


def shard_parquet(shard: str) -> str:
    return f"{shard}.parquet"


def shard_stats(shard: str) -> str:
    return f"{shard}_stats.json"


def shard_name(index: int) -> str:
    """img2dataset's shard naming: five zero-padded digits."""
    return f"{index:05d}"


class Split(enum.StrEnum):
    """Which use a kept sample is for (the ``split`` column of the latent shards)."""

    TRAIN = "train"
    VALIDATION = "validation"  # held out: no training phase reads it; evaluation does


class DropReason(enum.StrEnum):
    """Why a sample left the data set. Each sample gets exactly one: the first check it fails."""

    # metadata phase, in the order the checks run
    DOWNLOAD_FAILED = "download_failed"
    METADATA_INVALID = "metadata_invalid"  # a value that cannot be read as its column's type
    METADATA_MISSING = "metadata_missing"
    TOO_SMALL = "too_small"
    TOO_LARGE = "too_large"
    ASPECT_RATIO = "aspect_ratio"
    CAPTION_TOO_SHORT = "caption_too_short"
    WATERMARK = "watermark"
    UNSAFE = "unsafe"
    AESTHETIC = "aesthetic"
    DUPLICATE = "duplicate"
    # decode phase (reading the tar shards), in the order the checks run
    TAR_TRUNCATED = "tar_truncated"
    SAMPLE_MISSING = "sample_missing"
    JSON_MISSING = "json_missing"
    JSON_INVALID = "json_invalid"
    CAPTION_MISSING = "caption_missing"
    CAPTION_NOT_UTF8 = "caption_not_utf8"
    IMAGE_EMPTY = "image_empty"
    IMAGE_CORRUPT = "image_corrupt"
    IMAGE_FORMAT = "image_format"
    DECOMPRESSION_BOMB = "decompression_bomb"
    SIZE_MISMATCH = "size_mismatch"
    # embed phase
    LOW_CLIP_SIMILARITY = "low_clip_similarity"
    LOW_AESTHETIC_SCORE = "low_aesthetic_score"
    # pre-encode phase
    NON_FINITE_LATENT = "non_finite_latent"
