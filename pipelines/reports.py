"""Pictures for MLflow: a grid of images with their captions, histograms of scores."""

from __future__ import annotations

import textwrap

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageOps

_TILE = 128
_CAPTION_LINES = 3
_LINE_HEIGHT = 12


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Model images (N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8, as PIL and the colour measure take them."""
    return (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def fit_square(image: Image.Image, side: int) -> Image.Image:
    """``image`` as a ``side`` x ``side`` square: its centre, scaled (bicubic), unless it is one already."""
    if image.size == (side, side):
        return image
    return ImageOps.fit(image, (side, side), Image.Resampling.BICUBIC)


def image_grid(images: list[Image.Image], captions: list[str], columns: int = 4) -> Image.Image:
    """Tiles of ``_TILE`` px (an image keeps its aspect ratio) with their captions (wrapped, cut at three lines) beneath them."""
    assert len(images) == len(captions) and images, "a grid needs images and one caption each"
    rows = -(-len(images) // columns)
    cell_height = _TILE + _CAPTION_LINES * _LINE_HEIGHT + 4
    grid = Image.new("RGB", (columns * _TILE, rows * cell_height), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image, caption) in enumerate(zip(images, captions)):
        left, top = (index % columns) * _TILE, (index // columns) * cell_height
        grid.paste(ImageOps.contain(image.convert("RGB"), (_TILE, _TILE), Image.Resampling.NEAREST), (left, top))
        for line_index, line in enumerate(textwrap.wrap(caption, width=22)[:_CAPTION_LINES]):
            draw.text((left + 2, top + _TILE + 2 + line_index * _LINE_HEIGHT), line, fill="black")
    return grid


def histograms(values: dict[str, list[float]], thresholds: dict[str, float | None]) -> Figure:
    """One histogram per named score, with its threshold (when set) as a vertical line."""
    figure = Figure(figsize=(4 * len(values), 3), layout="constrained")
    for axes, (name, data) in zip(figure.subplots(1, len(values), squeeze=False)[0], values.items()):
        axes.hist(data, bins=30)
        axes.set_title(name)
        axes.set_xlabel(name)
        axes.set_ylabel("samples")
        if thresholds.get(name) is not None:
            axes.axvline(thresholds[name], color="red", linestyle="--", label="threshold")
            axes.legend()
    return figure
