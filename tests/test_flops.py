"""Model FLOP utilisation: the FLOPs of a train step (pipelines/flops.py)."""

from __future__ import annotations

import torch
from torch import nn

from pipelines.flops import train_step_flops


def test_a_step_counts_the_forward_and_the_gradients_the_backward_takes() -> None:
    def build() -> nn.Module:
        return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 6, 1), nn.Flatten(),
                             nn.Linear(6 * 8 * 8, 10))

    x = torch.randn(2, 4, 8, 8)
    # A multiply and an add per output element and input it reads.
    depthwise = 2 * (2 * 4 * 8 * 8) * 9
    pointwise = 2 * (2 * 6 * 8 * 8) * 4
    linear = 2 * 2 * (6 * 8 * 8) * 10
    # The input takes no gradient, so the first convolution's backward is its weight gradient alone (not
    # counted as an ungrouped convolution's, 4x this); the others take input and weight gradients.
    expected = depthwise + pointwise + linear + depthwise + 2 * (pointwise + linear)
    assert train_step_flops(build, lambda model: model(x).sum()) == expected
