"""A small LAION-style data set, written exactly as img2dataset publishes one, with planted defects.

Images are coloured shapes on neutral backgrounds with captions that describe them ("a red circle
on a grey background"), so a tiny model can show measurably that it learns text conditioning.
The backgrounds are never one of the shape colours, which keeps "did it draw the prompted colour"
unambiguous.

Layout under the output URL::

    laion-metadata.parquet     the LAION metadata (img2dataset's input)
    shards/00000.tar           webdataset: {key}.jpg, {key}.txt, {key}.json
    shards/00000.parquet       one row per attempted sample, failed downloads included
    shards/00000_stats.json
    ground_truth.json          per key: the planted defect and what the pipeline must do with it

Run as a module: ``python -m pipelines.demo_data OUT_URL [--set num_shards=8 ...]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import random
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image, ImageDraw

from pipelines import schema
from pipelines.overrides import apply_overrides
from pipelines.schema import DropReason
from pipelines.storage import StorageConfig, filesystem

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 220), "yellow": (235, 205, 35)}
BACKGROUNDS = {"grey": (128, 128, 128), "black": (12, 12, 12), "white": (242, 242, 242)}
SHAPES = ("circle", "square", "triangle")
_FILLER = ("photo", "of", "the", "bright", "small", "picture", "with", "soft", "light", "edges")
ASPECT_RATIOS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16)

GROUND_TRUTH_FILE = "ground_truth.json"
LAION_METADATA_FILE = "laion-metadata.parquet"
SHARDS_DIR = "shards"
KEEP = "keep"

# Planted defect -> (phase that must catch it, expected outcome). "keep" means the sample is
# repairable and must survive (converted to RGB, rotated upright, decoded by content).
DEFECTS: dict[str, tuple[str, str]] = {
    "download_failed": ("metadata", DropReason.DOWNLOAD_FAILED),
    "too_small": ("metadata", DropReason.TOO_SMALL),
    "extreme_aspect_ratio": ("metadata", DropReason.ASPECT_RATIO),
    "empty_caption": ("metadata", DropReason.CAPTION_TOO_SHORT),
    "watermark": ("metadata", DropReason.WATERMARK),
    "unsafe": ("metadata", DropReason.UNSAFE),
    "low_aesthetic": ("metadata", DropReason.AESTHETIC),
    "duplicate": ("metadata", DropReason.DUPLICATE),
    "truncated_jpeg": ("decode", DropReason.IMAGE_CORRUPT),
    "zero_byte_image": ("decode", DropReason.IMAGE_EMPTY),
    "non_utf8_caption": ("decode", DropReason.CAPTION_NOT_UTF8),
    "missing_json": ("decode", DropReason.JSON_MISSING),
    "png_bytes_as_jpg": ("decode", KEEP),
    "cmyk": ("decode", KEEP),
    "grayscale": ("decode", KEEP),
    "sixteen_bit": ("decode", KEEP),
    "exif_rotated": ("decode", KEEP),
}
# The reliability corpus (``hard_defects``): rarer breakage a web crawl still produces.
HARD_DEFECTS: dict[str, tuple[str, str]] = {
    "whitespace_caption": ("metadata", DropReason.CAPTION_TOO_SHORT),
    "null_size": ("metadata", DropReason.METADATA_MISSING),
    "width_not_a_number": ("metadata", DropReason.METADATA_INVALID),
    "malformed_json": ("decode", DropReason.JSON_INVALID),
    "member_path_escapes": ("decode", DropReason.SAMPLE_MISSING),
    "member_path_absolute": ("decode", DropReason.SAMPLE_MISSING),
    "decompression_bomb": ("decode", DropReason.DECOMPRESSION_BOMB),
    "palette": ("decode", KEEP),
    "alpha": ("decode", KEEP),
    "long_caption": ("decode", KEEP),
    "duplicate_member": ("decode", KEEP),
}
_BOMB_SIDE = 8_000  # a 1-bit PNG of 64 MP: a few kB on disk, over decode.max_pixels' default of 50 MP

# The LAION scores of a sample that passes every threshold of the named runs.
_GOOD_SCORES = {"pwatermark": (0.0, 0.4), "punsafe": (0.0, 0.5), "aesthetic": (5.5, 7.5), "similarity": (0.28, 0.42)}
_EXIF_ORIENTATION_TAG = 0x0112
_ROTATED_90_CW = 6  # EXIF orientation: display after rotating the stored pixels 90° clockwise


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoDataConfig:
    """How much demo data to generate and how it looks."""

    seed: int = 0
    """Seed for every random choice; the same seed writes byte-identical shards."""
    num_shards: int = 4
    """Number of img2dataset shards."""
    samples_per_shard: int = 80
    """Samples attempted per shard (failed downloads included)."""
    short_side_min: int = 64
    """Smallest short side of an ordinary image, in pixels."""
    short_side_max: int = 160
    """Largest short side of an ordinary image, in pixels."""
    large_fraction: float = 0.1
    """Fraction of images drawn large (short side 512 to large_short_side_max)."""
    large_short_side_max: int = 1024
    """Largest short side of a large image, in pixels."""
    plant_defects: bool = True
    """Plant one sample of every kind in DEFECTS; false writes only clean samples."""
    hard_defects: bool = False
    """Plant one sample of every kind in HARD_DEFECTS too (the reliability tests' corpus)."""

    def __post_init__(self):
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {self.num_shards}")
        if not 1 <= self.samples_per_shard < 10_000:
            raise ValueError(f"samples_per_shard must be in [1, 9999] (4-digit keys), got {self.samples_per_shard}")
        if self.hard_defects and not self.plant_defects:
            raise ValueError("hard_defects plants defects: it needs plant_defects=true")
        if self.plant_defects and self.num_shards * self.samples_per_shard < 2 * len(self.defects()):
            raise ValueError(
                f"num_shards * samples_per_shard must be >= {2 * len(self.defects())} to plant every defect "
                "beside clean samples; raise samples_per_shard or set plant_defects=false"
            )
        if not 8 <= self.short_side_min <= self.short_side_max:
            raise ValueError(
                f"need 8 <= short_side_min ({self.short_side_min}) <= short_side_max ({self.short_side_max})"
            )
        if not 0.0 <= self.large_fraction <= 1.0:
            raise ValueError(f"large_fraction must be in [0, 1], got {self.large_fraction}")
        if self.large_short_side_max < 512:
            raise ValueError(f"large_short_side_max must be >= 512, got {self.large_short_side_max}")

    def defects(self) -> dict[str, tuple[str, str]]:
        """The defects this data set plants: kind -> (phase that drops it, reason or KEEP)."""
        if not self.plant_defects:
            return {}
        return {**DEFECTS, **HARD_DEFECTS} if self.hard_defects else dict(DEFECTS)


@dataclasses.dataclass(kw_only=True)
class _Sample:
    """One attempted download: its metadata row, its tar members and its ground truth."""

    key: str
    shard: str
    defect: str
    caption: str
    labels: dict[str, str]
    url: str
    image: bytes | None = None
    caption_bytes: bytes = b""
    width: int | None = None
    height: int | None = None
    exif: str | None = None
    scores: dict[str, float] = dataclasses.field(default_factory=dict)
    has_json: bool = True


def is_complete(url: str, storage: StorageConfig | None = None) -> bool:
    """True when a demo data set was fully written at ``url`` (the ground truth is written last)."""
    fs, root = filesystem(url, storage)
    return fs.exists(f"{root}/{GROUND_TRUTH_FILE}")


def shards_url(url: str) -> str:
    """The img2dataset output folder inside a demo data set."""
    return f"{url.rstrip('/')}/{SHARDS_DIR}"


def load_ground_truth(url: str, storage: StorageConfig | None = None) -> dict:
    fs, root = filesystem(url, storage)
    with fs.open(f"{root}/{GROUND_TRUTH_FILE}", "r") as file:
        return json.load(file)


def generate(url: str, config: DemoDataConfig, storage: StorageConfig | None = None) -> dict:
    """Writes the data set to ``url`` (any fsspec URL) and returns its ground truth."""
    rng = random.Random(config.seed)
    samples = _plan_samples(config, rng)
    fs, root = filesystem(url, storage)
    fs.makedirs(f"{root}/{SHARDS_DIR}", exist_ok=True)
    for shard in sorted({s.shard for s in samples}):
        _write_shard(fs, f"{root}/{SHARDS_DIR}", shard, [s for s in samples if s.shard == shard])
    _write_laion_metadata(fs, f"{root}/{LAION_METADATA_FILE}", samples)
    ground_truth = _ground_truth(config, samples)
    with fs.open(f"{root}/{GROUND_TRUTH_FILE}", "w") as file:
        json.dump(ground_truth, file, indent=1, sort_keys=True)
    return ground_truth


def _plan_samples(config: DemoDataConfig, rng: random.Random) -> list[_Sample]:
    total = config.num_shards * config.samples_per_shard
    defects = config.defects()
    # Slot 0 stays clean so the duplicate always has an earlier original to copy.
    defect_at = dict(zip(rng.sample(range(1, total), len(defects)), defects))
    samples = []
    for slot in range(total):
        shard_index, index = divmod(slot, config.samples_per_shard)
        defect = defect_at.get(slot, "none")
        if defect == "duplicate":
            original = rng.choice([s for s in samples if s.defect == "none"])
            sample = dataclasses.replace(original, defect=defect, scores=dict(original.scores))
        else:
            sample = _draw_sample(config, rng, defect)
        sample.shard = schema.shard_name(shard_index)
        # img2dataset's key: shard index then the index inside the shard, zero-padded.
        sample.key = f"{shard_index:05d}{index:04d}"
        samples.append(sample)
    return samples


def _draw_sample(config: DemoDataConfig, rng: random.Random, defect: str) -> _Sample:
    colour, shape, background = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))
    caption = f"a {colour} {shape} on a {background} background"
    serial = rng.getrandbits(48)
    sample = _Sample(
        key="",
        shard="",
        defect=defect,
        caption=caption,
        labels={"colour": colour, "shape": shape, "background": background},
        url=f"https://demo.invalid/{colour}-{shape}/{serial:012x}.jpg",
        scores={name: round(rng.uniform(*bounds), 4) for name, bounds in _GOOD_SCORES.items()},
    )
    if defect == "download_failed":
        return sample
    width, height = _draw_size(config, rng, defect)
    image = _draw_image(rng, width, height, COLOURS[colour], BACKGROUNDS[background], shape)
    sample.width, sample.height = width, height
    sample.image = _encode_image(image, defect)
    if defect == "exif_rotated":
        sample.exif = json.dumps({"Image Orientation": "Rotated 90 CW"})
    sample.caption_bytes = caption.encode("utf-8")
    if defect == "empty_caption":
        sample.caption, sample.caption_bytes = "", b""
    elif defect == "whitespace_caption":
        sample.caption = " \t \n "
        sample.caption_bytes = sample.caption.encode("utf-8")
    elif defect == "long_caption":
        sample.caption = (caption + ", " + " ".join(rng.choice(_FILLER) for _ in range(3000)))[:10_000]
        sample.caption_bytes = sample.caption.encode("utf-8")
    elif defect == "non_utf8_caption":
        sample.caption_bytes = caption.encode("utf-8").replace(b" on ", b" \xff\xfe on ")
        sample.caption = sample.caption_bytes.decode("utf-8", errors="replace")
    elif defect == "missing_json":
        sample.has_json = False
    elif defect == "watermark":
        sample.scores["pwatermark"] = 0.93
    elif defect == "unsafe":
        sample.scores["punsafe"] = 0.997
    elif defect == "low_aesthetic":
        sample.scores["aesthetic"] = 3.9
    return sample


def _draw_size(config: DemoDataConfig, rng: random.Random, defect: str) -> tuple[int, int]:
    if defect == "too_small":
        return 32, 32
    if defect == "extreme_aspect_ratio":
        return 8 * config.short_side_max, config.short_side_max
    if rng.random() < config.large_fraction:
        short = rng.randint(512, config.large_short_side_max)
    else:
        short = rng.randint(config.short_side_min, config.short_side_max)
    ratio = rng.choice(ASPECT_RATIOS)
    if defect == "exif_rotated" and ratio == 1.0:
        ratio = 4 / 3  # a square would hide a missing rotation
    return (round(short * ratio), short) if ratio >= 1 else (short, round(short / ratio))


def _draw_image(rng: random.Random, width: int, height: int, colour, background, shape: str) -> Image.Image:
    def jitter(rgb):
        return tuple(min(255, max(0, c + rng.randint(-8, 8))) for c in rgb)

    image = Image.new("RGB", (width, height), jitter(background))
    draw = ImageDraw.Draw(image)
    # Inside the central square, so the centre crop every resolution takes keeps the whole shape.
    short = min(width, height)
    size = rng.uniform(0.35, 0.6) * short
    left = (width - short) / 2 + rng.uniform(0, short - size)
    top = (height - short) / 2 + rng.uniform(0, short - size)
    box = (left, top, left + size, top + size)
    fill = jitter(colour)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(left + size / 2, top), (left, top + size), (left + size, top + size)], fill=fill)
    return image


def _encode_image(image: Image.Image, defect: str) -> bytes:
    buffer = io.BytesIO()
    if defect == "png_bytes_as_jpg":
        image.save(buffer, "PNG")
    elif defect == "sixteen_bit":
        # 16-bit greyscale only exists in PNG; img2dataset would still name it .jpg.
        grey = np.asarray(image.convert("L"), dtype=np.uint16) * 257  # 0..255 -> 0..65535
        Image.fromarray(grey).save(buffer, "PNG")
    elif defect == "cmyk":
        image.convert("CMYK").save(buffer, "JPEG", quality=90)
    elif defect == "grayscale":
        image.convert("L").save(buffer, "JPEG", quality=90)
    elif defect == "palette":
        image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(buffer, "PNG")
    elif defect == "alpha":
        # Opaque picture, half-transparent border: decode composites it onto white.
        rgba = image.convert("RGBA")
        alpha = Image.new("L", image.size, 128)
        alpha.paste(255, (image.width // 8, image.height // 8, image.width * 7 // 8, image.height * 7 // 8))
        rgba.putalpha(alpha)
        rgba.save(buffer, "PNG")
    elif defect == "decompression_bomb":
        Image.new("1", (_BOMB_SIDE, _BOMB_SIDE)).save(buffer, "PNG")
    elif defect == "exif_rotated":
        # Store the pixels rotated 90° counter-clockwise; the tag says to turn them back.
        exif = Image.Exif()
        exif[_EXIF_ORIENTATION_TAG] = _ROTATED_90_CW
        image.rotate(90, expand=True).save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    else:
        image.save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    if defect == "truncated_jpeg":
        return data[: len(data) // 2]
    if defect == "zero_byte_image":
        return b""
    return data


def _metadata_row(sample: _Sample) -> dict:
    """The img2dataset row: its own columns, then the LAION columns passed through."""
    success = sample.image is not None
    known_size = sample.defect != "null_size"
    return {
        schema.URL: sample.url,
        schema.CAPTION: sample.caption,
        schema.KEY: sample.key,
        schema.STATUS: schema.STATUS_SUCCESS if success else "failed_to_download",
        schema.ERROR_MESSAGE: None if success else "HTTP Error 404: Not Found",
        schema.WIDTH: sample.width if known_size else None,
        schema.HEIGHT: sample.height if known_size else None,
        schema.ORIGINAL_WIDTH: sample.width if known_size else None,
        schema.ORIGINAL_HEIGHT: sample.height if known_size else None,
        schema.EXIF: sample.exif,
        "sha256": hashlib.sha256(sample.image).hexdigest() if success else None,
        "similarity": sample.scores["similarity"],
        "punsafe": sample.scores["punsafe"],
        "pwatermark": sample.scores["pwatermark"],
        "AESTHETIC_SCORE": sample.scores["aesthetic"],
        "hash": _laion_hash(sample.url, sample.caption),
    }


_SHARD_PARQUET_SCHEMA = pa.schema(
    [
        (schema.URL, pa.string()),
        (schema.CAPTION, pa.string()),
        (schema.KEY, pa.string()),
        (schema.STATUS, pa.string()),
        (schema.ERROR_MESSAGE, pa.string()),
        (schema.WIDTH, pa.int64()),
        (schema.HEIGHT, pa.int64()),
        (schema.ORIGINAL_WIDTH, pa.int64()),
        (schema.ORIGINAL_HEIGHT, pa.int64()),
        (schema.EXIF, pa.string()),
        ("sha256", pa.string()),
        ("similarity", pa.float64()),
        ("punsafe", pa.float64()),
        ("pwatermark", pa.float64()),
        ("AESTHETIC_SCORE", pa.float64()),
        ("hash", pa.int64()),
    ]
)


def _laion_hash(url: str, caption: str) -> int:
    """A signed 64-bit hash of URL and caption, the form of LAION's ``hash`` column."""
    digest = hashlib.sha256(f"{url}\t{caption}".encode("utf-8", errors="surrogateescape")).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def _write_shard(fs, folder: str, shard: str, samples: list[_Sample]) -> None:
    rows = [_metadata_row(s) for s in samples]
    with fs.open(f"{folder}/{schema.shard_tar(shard)}", "wb") as stream:
        # Fixed mtime, user and group make the tar byte-identical for the same seed.
        with wds.TarWriter(stream, mtime=0, user="demo", group="demo") as tar:
            for sample, row in zip(samples, rows):
                if sample.image is None:
                    continue  # img2dataset writes nothing to the tar for a failed download
                # A member named ../<key>.jpg or /tmp/<key>.jpg forms no key the metadata lists, as a
                # path outside the tar would; the sample itself is then missing.
                key = {"member_path_escapes": f"../{sample.key}", "member_path_absolute": f"/tmp/{sample.key}"}.get(
                    sample.defect, sample.key
                )
                member = {"__key__": key, "jpg": sample.image, "txt": sample.caption_bytes}
                if sample.has_json:
                    member["json"] = (
                        b'{"key": "' + sample.key.encode() + b'", "caption": '
                        if sample.defect == "malformed_json"
                        else json.dumps(row).encode("utf-8")
                    )
                tar.write(member)
                if sample.defect == "duplicate_member":
                    tar.write({**member, "jpg": b""})  # a second copy of the key: the first one counts
    table_schema = _SHARD_PARQUET_SCHEMA
    if any(s.defect == "width_not_a_number" for s in samples):
        # A writer that stored the sizes as text: the numbers still read, the word does not.
        for sample, row in zip(samples, rows):
            width = row[schema.ORIGINAL_WIDTH]
            row[schema.ORIGINAL_WIDTH] = "wide" if sample.defect == "width_not_a_number" else width and str(width)
        column = table_schema.get_field_index(schema.ORIGINAL_WIDTH)
        table_schema = table_schema.set(column, pa.field(schema.ORIGINAL_WIDTH, pa.string()))
    with fs.open(f"{folder}/{schema.shard_parquet(shard)}", "wb") as stream:
        pq.write_table(pa.Table.from_pylist(rows, schema=table_schema), stream)
    successes = sum(s.image is not None for s in samples)
    failures = len(samples) - successes
    stats = {
        "count": len(samples),
        "successes": successes,
        "failed_to_download": failures,
        "failed_to_resize": 0,
        "duration": 0.0,
        "start_time": 0.0,
        "end_time": 0.0,
        "status_dict": {"success": successes, **({"HTTP Error 404: Not Found": failures} if failures else {})},
    }
    with fs.open(f"{folder}/{schema.shard_stats(shard)}", "w") as file:
        json.dump(stats, file, indent=1)


def _write_laion_metadata(fs, path: str, samples: list[_Sample]) -> None:
    columns = {
        "URL": [s.url for s in samples],
        "TEXT": [s.caption for s in samples],
        "WIDTH": [s.width for s in samples],
        "HEIGHT": [s.height for s in samples],
        "similarity": [s.scores["similarity"] for s in samples],
        "punsafe": [s.scores["punsafe"] for s in samples],
        "pwatermark": [s.scores["pwatermark"] for s in samples],
        "AESTHETIC_SCORE": [s.scores["aesthetic"] for s in samples],
        "hash": [_laion_hash(s.url, s.caption) for s in samples],
    }
    assert tuple(columns) == schema.LAION_METADATA_COLUMNS
    table = pa.table(
        columns,
        schema=pa.schema(
            [
                ("URL", pa.string()),
                ("TEXT", pa.string()),
                ("WIDTH", pa.int64()),
                ("HEIGHT", pa.int64()),
                ("similarity", pa.float64()),
                ("punsafe", pa.float64()),
                ("pwatermark", pa.float64()),
                ("AESTHETIC_SCORE", pa.float64()),
                ("hash", pa.int64()),
            ]
        ),
    )
    with fs.open(path, "wb") as stream:
        pq.write_table(table, stream)


def _ground_truth(config: DemoDataConfig, samples: list[_Sample]) -> dict:
    records = {}
    for sample in samples:
        phase, expected = config.defects().get(sample.defect, (None, KEEP))
        records[sample.key] = {
            "shard": sample.shard,
            "defect": sample.defect,
            "phase": phase,
            "expected": str(expected),
            "caption": sample.caption,
            "labels": sample.labels,
        }
    return {"config": dataclasses.asdict(config), "samples": records}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="output folder or fsspec URL (s3://bucket/path)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help=f"override a DemoDataConfig field ({', '.join(f.name for f in dataclasses.fields(DemoDataConfig))})",
    )
    args = parser.parse_args(argv)
    config = apply_overrides(DemoDataConfig(), args.overrides)
    truth = generate(args.out, config)
    records = truth["samples"].values()
    kept = sum(r["expected"] == KEEP for r in records)
    planted = sum(r["defect"] != "none" for r in records)
    print(
        f"wrote {len(records)} samples in {config.num_shards} shards to {args.out}: "
        f"{planted} planted defects, {kept} samples to keep",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
