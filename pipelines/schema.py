"""Column names, file names and drop reasons shared by every phase.

Sources spell columns differently (LAION metadata uses ``URL``/``TEXT``/``AESTHETIC_SCORE``,
some releases ``aesthetic``; img2dataset writes lower case); everything past the reader uses the
canonical names below.
"""

from __future__ import annotations

import enum

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
    "URL", "TEXT", "WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark", "AESTHETIC_SCORE", "hash",
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


class DropReason(enum.StrEnum):
    """Why a sample left the data set. Each sample gets exactly one: the first check it fails."""

    # metadata phase, in the order the checks run
    DOWNLOAD_FAILED = "download_failed"
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
