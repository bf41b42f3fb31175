"""The pictures a run logs: image grids with captions, images fitted to a square, score histograms."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipelines.reports import _CAPTION_LINES, _LINE_HEIGHT, _TILE, fit_square, histograms, image_grid, to_uint8


def _thirds(width: int, height: int) -> Image.Image:
    """Left third red, middle third green, right third blue."""
    pixels = np.zeros((height, width, 3), np.uint8)
    third = width // 3
    pixels[:, :third, 0] = pixels[:, third : 2 * third, 1] = pixels[:, 2 * third :, 2] = 255
    return Image.fromarray(pixels)


def test_a_wide_image_is_fitted_to_its_centre_and_a_square_one_is_kept():
    fitted = np.asarray(fit_square(_thirds(96, 32), 16))
    assert fitted.shape == (16, 16, 3)
    # The centre square of the wide image is its middle (green) third.
    assert fitted[:, 3:13, 1].min() > 200 and fitted[:, 3:13, [0, 2]].max() < 60
    square = _thirds(16, 16)
    assert fit_square(square, 16) is square


def test_a_grid_holds_each_image_in_its_tile_with_its_caption_beneath():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    images = [Image.new("RGB", (32, 32), colour) for colour in colours]
    grid = image_grid(images, [f"caption {i}" for i in range(5)], columns=4)
    cell = _TILE + _CAPTION_LINES * _LINE_HEIGHT + 4
    assert grid.size == (4 * _TILE, 2 * cell)
    pixels = np.asarray(grid)
    for index, colour in enumerate(colours):
        top, left = (index // 4) * cell, (index % 4) * _TILE
        assert tuple(pixels[top + _TILE // 2, left + _TILE // 2]) == colour, index
        caption = pixels[top + _TILE + 2 : top + cell, left : left + _TILE]
        assert (caption < 128).any(), f"no caption under tile {index}"
    assert (pixels[cell : 2 * cell, _TILE:] == 255).all(), "the empty cells stay white"


def test_model_images_become_uint8_pixels_clamped_to_their_range():
    images = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.5]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert to_uint8(images)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_a_histogram_per_score_with_its_threshold_when_set():
    figure = histograms({"aesthetic": [4.0, 5.0, 6.0], "clip": [0.2, 0.3]}, {"aesthetic": 5.0, "clip": None})
    aesthetic, clip = figure.axes
    assert aesthetic.get_title() == "aesthetic" and [line.get_xdata()[0] for line in aesthetic.lines] == [5.0]
    assert clip.get_title() == "clip" and not clip.lines
