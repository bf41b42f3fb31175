"""bench/train_step.py: its asserted check against the reference, and the reference at its best."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench import train_step
from bench.train_step import (
    build,
    check,
    correctness_outputs,
    parse_variants,
    prepared,
)
from stages.stage_b import STAGE_B_CONFIGS
from stages.stage_c import STAGE_C_CONFIGS

SIDES = {"c": 8, "b": 16}
CONFIGS = {"c": STAGE_C_CONFIGS, "b": STAGE_B_CONFIGS}


def outputs(stage: str, impl: str, change=None) -> dict:
    torch.manual_seed(0)  # as each of the bench's workers does before it builds its model
    config = CONFIGS[stage]["tiny"]()
    model = build(stage, impl, dataclasses.replace(config, dropout=0.1))
    if change is not None:
        change(model)
    return correctness_outputs(model, stage, model.config, 4, SIDES[stage], torch.device("cpu"), bf16=True)


@pytest.mark.parametrize("stage", ["c", "b"])
def test_ours_passes_the_check_against_the_reference_with_dropout_on(stage: str) -> None:
    assert not check(stage, outputs(stage, "reference"), outputs(stage, "ours"), bf16=True)


def test_the_check_fails_on_a_wrong_weight_and_on_other_dropout_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    reference = outputs("c", "reference")

    def nudge(model: torch.nn.Module) -> None:
        with torch.no_grad():
            model.blocks[0].channelwise[-1].bias.add_(1e-2)

    failures = check("c", reference, outputs("c", "ours", nudge), bf16=True)
    assert [failure.split(" is ")[0] for failure in failures] == [
        "stage C: ours fp32 eval output",
        "stage C: ours fp32 train output (dropout on)",
        "stage C: ours fp32 train gradients",
    ]

    monkeypatch.setattr(train_step, "CHECK_SEED", train_step.CHECK_SEED + 1)
    failures = check("c", reference, outputs("c", "ours"), bf16=True)
    assert [failure.split(" is ")[0] for failure in failures] == [
        "stage C: ours fp32 train output (dropout on)",
        "stage C: ours fp32 train gradients",
    ]


def test_the_reference_with_fused_attention_computes_what_it_ships_with() -> None:
    torch.manual_seed(0)
    shipped = build("c", "reference", STAGE_C_CONFIGS["tiny"]())
    fused = prepared(shipped, "reference", frozenset({"sdpa"}), torch.device("cpu"))
    assert type(fused.blocks[2].attention.processor).__name__ == "AttnProcessor2_0"
    assert type(shipped.blocks[2].attention.processor).__name__ == "AttnProcessor"  # the prior's own choice
    x = torch.randn(2, shipped.config.c_in, 8, 8)
    r, cond = torch.rand(2), torch.randn(2, 77, shipped.config.c_cond)
    shipped.eval(), fused.eval()
    torch.testing.assert_close(fused(x, r, c=cond), shipped(x, r, c=cond), rtol=1e-5, atol=1e-6)


def test_variants_name_their_implementation_s_options() -> None:
    assert parse_variants("shipped,sdpa+compile", impl="reference") == [frozenset(), frozenset({"sdpa", "compile"})]
    assert parse_variants("eager,compile+budget=0.3/0.5+cudagraph") == [
        frozenset(),
        frozenset({"compile", "budget=0.3/0.5", "cudagraph"}),
    ]
    with pytest.raises(Exception, match="sdpa"):
        parse_variants("sdpa")  # a reference option, not one of ours
    with pytest.raises(Exception, match="budget"):
        parse_variants("budget=0.5")  # without compile
