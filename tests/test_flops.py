"""Model FLOP utilisation: the FLOPs of a train step (pipelines/flops.py) and the GPUs' peaks
(cluster/gpus.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cluster.gpus import peak_flops
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


@pytest.mark.parametrize("name, flops", [
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA H100 80GB HBM3", 989.5e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989.5e12),
    ("NVIDIA GeForce RTX 4090", None),
    ("NVIDIA A10", None),
])
def test_peak_flops_by_device_name_and_none_for_an_unknown_device(name: str, flops: float | None) -> None:
    assert peak_flops(name) == flops
