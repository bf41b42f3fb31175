"""Decode throughput: our reduced-scale JPEG decode against a plain PIL decode, on the same JPEGs.

Both paths turn the same encoded JPEG (1024 px and larger) into the same ``resolution`` x
``resolution`` RGB centre crop:

- ours: ``pipelines.decode.decode_image``, the decode phase's code (size and EXIF checks, DCT-scaled
  decode through PIL's draft mode, RGB conversion, ``ImageOps.fit`` with bicubic resampling);
- reference: ``Image.open(...).convert("RGB")`` at full size, then a bicubic resize of the shorter
  side to ``resolution`` and a centre crop.

    python bench/decode.py                      # 512 px crops of 24 generated JPEGs
    python bench/decode.py --resolution 1024    # the v2 config's crop size

The JPEGs are generated in memory from a seed (smooth gradients, filled shapes, coarse texture and
pixel noise, quality 90: about 1.4 bits per pixel, a realistic size for web photos), so both paths
decode identical bytes and nothing touches the disk. The two paths alternate over ``--repeats``
passes; images/s are the median over the passes. The crops of both are compared, so that the
speedup cannot come from doing different work; they agree closely but not exactly, because
decoding at 1/2, 1/4 or 1/8 scale low-pass filters differently from a bicubic resize of the full
image (the difference sits in the finest detail of the crop).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import PIL  # noqa: E402
from PIL import Image, ImageDraw, features  # noqa: E402

from pipelines.decode import DecodeConfig, decode_image  # noqa: E402

# Aspect ratios of common photo formats, landscape and portrait alike.
ASPECT_RATIOS = (1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)
MAX_SIDE = 4096  # the v2 metadata filter's upper bound on either side (docs/design.md)
JPEG_QUALITY = 90


def synthetic_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """An RGB image with photo-like JPEG statistics: smooth areas, hard edges, texture and noise."""
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    corner, right, bottom = rng.uniform(0, 255, (3, 3)).astype(np.float32)
    gradient = corner + (right - corner) * x + (bottom - corner) * y  # (H, W, 3)
    image = Image.fromarray(gradient.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(8, 24)):
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=tuple(rng.integers(0, 256, 3).tolist()))
    # Coarse texture at 1/8 size gives the mid frequencies that photos have and flat shapes lack.
    coarse = rng.integers(0, 256, (max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8)
    image = Image.blend(image, Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR), 0.15)
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-5, 6, (height, width, 3), dtype=np.int16)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def synthetic_jpegs(count: int, min_side: int, max_short_side: int, seed: int) -> list[bytes]:
    """``count`` JPEGs with the shorter side in [min_side, max_short_side] and mixed aspect ratios."""
    rng = np.random.default_rng(seed)
    jpegs = []
    for _ in range(count):
        short = int(rng.integers(min_side, max_short_side + 1))
        long = min(round(short * ASPECT_RATIOS[rng.integers(len(ASPECT_RATIOS))]), MAX_SIDE)
        width, height = (long, short) if rng.random() < 0.5 else (short, long)
        buffer = io.BytesIO()
        synthetic_image(rng, width, height).save(buffer, "JPEG", quality=JPEG_QUALITY)
        jpegs.append(buffer.getvalue())
    return jpegs


def reference_decode(data: bytes, resolution: int) -> Image.Image:
    """Full-size decode, then one bicubic resize of the centred square to ``resolution``.

    Resizing the centred square (a fractional box) is the shorter-side resize and the centre crop in
    one step, without the half-pixel shift that rounding an intermediate size would add.
    """
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    side = min(width, height)
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    return image.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)


Decoder = Callable[[bytes, tuple[int, int]], Image.Image]  # (JPEG, its (width, height)) -> crop


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: figures taken on a busy machine say so."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def timed_pass(decode: Decoder, jpegs: list[bytes], sizes: list[tuple[int, int]]) -> float:
    """Images per second of one pass over all JPEGs."""
    start = time.perf_counter()
    for data, size in zip(jpegs, sizes):
        decode(data, size)
    return len(jpegs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=512, help="side of the square crop in pixels")
    parser.add_argument("--count", type=int, default=24, help="JPEGs to generate")
    parser.add_argument("--min-side", type=int, default=1024, help="smallest shorter side of a generated JPEG")
    parser.add_argument("--max-side", type=int, default=3000, help="largest shorter side of a generated JPEG")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per path, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-diff", type=float, default=4.0,
                        help="fail when the crops of the two paths differ by more than this mean absolute "
                             "difference (8-bit levels) on any image")  # fmt: skip
    args = parser.parse_args()
    if not 0 < args.min_side <= args.max_side:
        parser.error("--min-side must be positive and at most --max-side")

    load_at_start = load_average()
    config = DecodeConfig(resolution=args.resolution)
    jpegs = synthetic_jpegs(args.count, args.min_side, args.max_side, args.seed)
    sizes = [Image.open(io.BytesIO(data)).size for data in jpegs]
    megapixels = [width * height / 1e6 for width, height in sizes]

    def ours(data: bytes, size: tuple[int, int]) -> Image.Image:
        # The size is the metadata's claim, checked against the JPEG header as in the decode phase.
        crop = decode_image(data, size, config)
        assert isinstance(crop, Image.Image), f"decode_image dropped a generated JPEG: {crop}"
        return crop

    def reference(data: bytes, size: tuple[int, int]) -> Image.Image:
        return reference_decode(data, args.resolution)

    print(f"machine: {platform.processor() or platform.machine()}; Pillow {PIL.__version__}, "
          f"libjpeg-turbo {features.version('libjpeg_turbo')}; Python {platform.python_version()}")  # fmt: skip
    print(f"{len(jpegs)} JPEGs (quality {JPEG_QUALITY}): {min(megapixels):.1f}-{max(megapixels):.1f} MP, "
          f"mean {statistics.mean(megapixels):.1f} MP, mean {statistics.mean(map(len, jpegs)) / 1e6:.2f} MB; "
          f"crops {args.resolution}x{args.resolution}")  # fmt: skip

    # The untimed first pass warms caches and checks that both paths return the same crop.
    differences = [
        float(np.abs(np.asarray(ours(data, size), np.float32) - np.asarray(reference(data, size), np.float32)).mean())
        for data, size in zip(jpegs, sizes)
    ]
    print(f"crop agreement, mean |ours - reference| per image: mean {statistics.mean(differences):.2f}, "
          f"max {max(differences):.2f} (8-bit levels)")  # fmt: skip
    if max(differences) > args.max_diff:
        sys.exit(f"error: the two paths disagree by up to {max(differences):.2f} levels (> --max-diff "
                 f"{args.max_diff}): they are not doing the same work")  # fmt: skip

    rates: dict[str, list[float]] = {"reference": [], "ours": []}
    paths: dict[str, Decoder] = {"reference": reference, "ours": ours}
    for repeat in range(args.repeats):
        # Alternate which path goes first, so that a change in machine load hits both alike.
        for name in ("reference", "ours") if repeat % 2 == 0 else ("ours", "reference"):
            rates[name].append(timed_pass(paths[name], jpegs, sizes))
    ratios = [o / r for o, r in zip(rates["ours"], rates["reference"])]
    for name, values in rates.items():
        print(f"{name:9s}: {statistics.median(values):7.2f} images/s (median of {len(values)} passes; "
              f"min {min(values):.2f}, max {max(values):.2f})")  # fmt: skip
    print(f"ours / reference: {statistics.median(rates['ours']) / statistics.median(rates['reference']):.2f}x "
          f"(per-pass ratios {min(ratios):.2f}-{max(ratios):.2f}x)")  # fmt: skip
    print(f"load average (1, 5, 15 min) at start: {load_at_start}; at end: {load_average()}")


if __name__ == "__main__":
    main()
