"""bench/activation_memory.py counts what autograd keeps for backward, by the module that kept it."""

from __future__ import annotations

import collections
import contextlib
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.activation_memory import saved_for_backward  # noqa: E402


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU())

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) * r


def test_each_saved_storage_counts_once_for_the_module_that_saved_it_and_parameters_not_at_all():
    model = Scaled()
    batch = 3
    saved = saved_for_backward(model, torch.randn(batch, 4), torch.rand(batch, 1), {}, contextlib.nullcontext())
    # Linear keeps its input (its weight is a parameter), GELU its input, the product its factor r.
    assert saved.by_class == collections.Counter({"Linear": batch * 4 * 4, "GELU": batch * 8 * 4, "Scaled": batch * 4})
    assert saved.by_part == collections.Counter({"mlp.0": batch * 4 * 4, "mlp.1": batch * 8 * 4,
                                                 "(top level)": batch * 4})
    assert saved.activations == batch * 13 * 4
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed
