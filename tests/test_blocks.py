"""The blocks Stage B and Stage C are built of, each against the reference implementation's block of
the same name (diffusers' Würstchen v2 code, a test oracle only) with the same weights."""

from __future__ import annotations

import pytest
import torch
from diffusers.pipelines.deprecated.wuerstchen import modeling_wuerstchen_common as reference

from stages.blocks import AttnBlock, ResBlock, TimestepBlock, run_block

C, C_COND, HEADS = 16, 24, 4


def _randomised(module: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random: GRN's gamma and beta start at zero, which would hide a wrong formula."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 0.5)
    return module.eval()


def _pair(ours: torch.nn.Module, theirs: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    theirs = _randomised(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)  # same parameter names and shapes
    return ours.eval(), theirs


@pytest.mark.parametrize(
    "block, inputs",
    [
        ("res", lambda: (torch.randn(2, C, 6, 5),)),
        ("attn", lambda: (torch.randn(2, C, 6, 5), torch.randn(2, 7, C_COND))),
        ("timestep", lambda: (torch.randn(2, C, 6, 5), torch.randn(2, 8))),
    ],
)
def test_each_block_computes_what_the_reference_block_computes(block, inputs):
    ours, theirs = _pair(
        *{
            "res": lambda: (ResBlock(C), reference.ResBlock(C)),
            "attn": lambda: (AttnBlock(C, C_COND, HEADS), reference.AttnBlock(C, C_COND, HEADS)),
            "timestep": lambda: (TimestepBlock(C, 8), reference.TimestepBlock(C, 8)),
        }[block]()
    )
    args = inputs()
    torch.testing.assert_close(ours(*args), theirs(*args), rtol=1e-5, atol=1e-5)


def test_a_checkpointed_block_gives_the_same_output_and_gradients():
    block = _randomised(ResBlock(C)).train()
    x = torch.randn(2, C, 6, 5, requires_grad=True)
    results = []
    for checkpointing in (False, True):
        out = run_block(block, x, checkpointing=checkpointing)
        grads = torch.autograd.grad(out.square().sum(), [x, *block.parameters()])
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
