"""bench/activation_memory.py counts what autograd keeps for backward, by the module that kept it."""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from torch import nn

from bench.activation_memory import saved_for_backward
from pipelines.trainable.stage_b import STAGE_B
from pipelines.trainable.stage_c import STAGE_C
from pipelines.training.parallel import compile_blocks
from stages.stage_b import STAGE_B_CONFIGS, StageB
from stages.stage_c import STAGE_C_CONFIGS, StageC


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
    assert saved.by_part == collections.Counter(
        {"mlp.0": batch * 4 * 4, "mlp.1": batch * 8 * 4, "(top level)": batch * 4}
    )
    assert saved.activations == batch * 13 * 4
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed


# compile_blocks sets these process-wide; torch's own patch puts them back after the test (pytest's
# monkeypatch would delete them from torch's config modules, which then raise on every later read).
@torch._functorch.config.patch(activation_memory_budget=1.0)
@torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit)
def test_a_lower_activation_memory_budget_saves_less_for_backward_and_changes_no_gradient():
    generator = torch.Generator().manual_seed(0)
    x, r, c = (
        torch.randn(4, 16, 8, 8, generator=generator),
        torch.rand(4, generator=generator),
        torch.randn(4, 77, 32, generator=generator),
    )

    def saved_bytes_and_gradients(budget: float | None) -> tuple[int, list[torch.Tensor]]:
        torch._dynamo.reset()  # each model's blocks compile afresh, not from the last model's cache
        torch.manual_seed(0)
        model = StageC(STAGE_C_CONFIGS["tiny"]())
        if budget is not None:
            # The partitioner picks what is saved; inductor's kernels do not change it (the same
            # bytes either way) and cost half a minute more to build here.
            compile_blocks(model, STAGE_C.parallelism, (budget,), backend="aot_eager_decomp_partition")
        saved = saved_for_backward(model, x, r, {"c": c}, contextlib.nullcontext()).activations
        model(x, r, c).square().mean().backward()
        return saved, [parameter.grad for parameter in model.parameters()]

    eager_bytes, eager_gradients = saved_bytes_and_gradients(None)
    full_bytes, full_gradients = saved_bytes_and_gradients(1.0)
    low_bytes, low_gradients = saved_bytes_and_gradients(0.0)
    # Measured: 9.7 MB eager, 7.7 MB compiled, 1.5 MB at budget 0 (with inductor and without).
    assert low_bytes < 0.5 * full_bytes and full_bytes < eager_bytes, (eager_bytes, full_bytes, low_bytes)
    for gradients in (full_gradients, low_gradients):
        for expected, got in zip(eager_gradients, gradients):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit)
@pytest.mark.slow
def test_stage_b_s_budgets_per_level_each_hold_their_level_and_change_no_gradient():
    generator = torch.Generator().manual_seed(0)
    x, r = torch.randn(4, 4, 16, 16, generator=generator), torch.rand(4, generator=generator)
    cond = {
        "effnet": torch.randn(4, 16, 12, 12, generator=generator),
        "clip": torch.randn(4, 8, 24, generator=generator),
    }

    def saved_bytes_and_gradients(budgets: tuple[float, ...] | None) -> tuple[int, list[torch.Tensor]]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = StageB(STAGE_B_CONFIGS["tiny"]())
        if budgets is not None:
            compile_blocks(model, STAGE_B.parallelism, budgets, backend="aot_eager_decomp_partition")
        saved = saved_for_backward(model, x, r, cond, contextlib.nullcontext()).activations
        model(x, r, **cond).square().mean().backward()
        with torch.compiler.set_stance("force_eager"):  # how the training loop draws samples
            model(x, r, **cond)
        return saved, [parameter.grad for parameter in model.parameters()]

    _, eager_gradients = saved_bytes_and_gradients(None)
    budget_sets = [(1.0,), (0.0,), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0)]
    results = {budgets: saved_bytes_and_gradients(budgets) for budgets in budget_sets}
    saved = {budgets: saved_bytes for budgets, (saved_bytes, _) in results.items()}
    # Measured: 1.19 MB at 1, 0.38 MB at 0; 0.86 MB with the outermost level at 0, 1.01 MB the innermost.
    for one_level in [(0.0, 1.0, 1.0), (1.0, 1.0, 0.0)]:
        assert saved[(0.0,)] < saved[one_level] < saved[(1.0,)], saved
    # The outermost and the innermost level at 0 (their savings add up): the middle one keeps its share.
    assert saved[(0.0, 1.0, 1.0)] + saved[(1.0, 1.0, 0.0)] - saved[(1.0,)] > saved[(0.0,)], saved
    for _, gradients in results.values():
        for expected, got in zip(eager_gradients, gradients):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="2 shares.*one per level \\(3 here\\)"):
        compile_blocks(StageB(STAGE_B_CONFIGS["tiny"]()), STAGE_B.parallelism, (0.5, 0.5))
