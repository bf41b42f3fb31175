"""Stage B: checkpoint layout, equivalence with diffusers' WuerstchenDiffNeXt, init, compile."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.stage_oracle import perturb_, reference_like, reference_stage_b, shapes
from stages.diffusion import DIFFUSION_CONFIGS, CosineDiffusion
from stages.stage_b import STAGE_B_CONFIGS, StageB, StageBConfig

# All four v2 levels, block patterns and injections, at toy widths; two blocks at one level.
SMALL = StageBConfig(
    c_cond=24,
    c_hidden=(8, 16, 24, 24),
    nhead=(-1, 2, 3, 4),
    blocks=(1, 2, 1, 1),
    level_config=("CT", "CTA", "CTA", "CTA"),
    inject_effnet=(False, True, True, True),
    clip_embd=20,
)


def inputs(config: StageBConfig, batch: int = 2, side: tuple[int, int] = (16, 32)) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, config.c_in, *side, generator=g)
    r = torch.rand(batch, generator=g)
    effnet = torch.randn(batch, config.effnet_embd, 3, 5, generator=g)
    clip = torch.randn(batch, 77, config.clip_embd, generator=g)
    return x, r, effnet, clip


def test_v2_has_the_official_checkpoint_layout() -> None:
    with torch.device("meta"):
        ours = StageB(STAGE_B_CONFIGS["v2"]())
        reference = reference_stage_b(STAGE_B_CONFIGS["v2"]())
    assert shapes(ours) == shapes(reference)
    assert sum(p.numel() for p in ours.parameters()) == pytest.approx(1.06e9, rel=0.01)  # docs/design.md


@pytest.mark.parametrize(
    "channels_last, checkpointing", [(True, False), (False, False), (True, True)], ids=["cl", "nchw", "cl-ckpt"]
)
def test_forward_and_gradients_match_reference(channels_last: bool, checkpointing: bool) -> None:
    torch.manual_seed(0)
    config = dataclasses.replace(SMALL, channels_last=channels_last, checkpointing=checkpointing)
    ours = perturb_(StageB(config), std=0.05)
    reference = reference_like(ours)
    x, r, effnet, clip = inputs(config)

    expected = reference(x, r, effnet, clip)
    actual = ours(x, r, effnet, clip)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)

    target = torch.randn_like(expected)
    ((expected - target) ** 2).mean().backward()
    ((actual - target) ** 2).mean().backward()
    ref_grads = {name: p.grad for name, p in reference.named_parameters()}
    # Absolute tolerance from the largest gradient: some are zero up to rounding (e.g. key biases).
    atol = 1e-5 * max(g.abs().max() for g in ref_grads.values())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=atol, msg=name)


def test_fresh_model_has_the_original_init() -> None:
    torch.manual_seed(0)
    model = StageB(SMALL)
    assert torch.count_nonzero(model.clf[1].weight) == 0
    # Xavier weights and zero biases for convs and linears (the original leaves ConvTranspose2d at
    # PyTorch's default).
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert all(torch.count_nonzero(m.bias) == 0 for m in layers if m.bias is not None)
    assert model.clip_mapper.weight.std().item() == pytest.approx(0.02, rel=0.2)
    # The zero output conv makes a = 0 and b = sigmoid(0) = 1/2 (within eps): prediction 2x.
    x, r, effnet, clip = inputs(SMALL)
    torch.testing.assert_close(model(x, r, effnet, clip), x / 0.5)


def test_tiny_train_step_reduces_the_loss() -> None:
    torch.manual_seed(0)
    config = STAGE_B_CONFIGS["tiny"]()
    model = StageB(config)
    diffusion = CosineDiffusion(DIFFUSION_CONFIGS["tiny"]())
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, config.c_in, 16, 16, generator=g)
    effnet = torch.randn(8, config.effnet_embd, 4, 4, generator=g)
    clip = torch.randn(8, 77, config.clip_embd, generator=g)
    r = torch.linspace(0.1, 0.9, 8)
    noise = torch.randn(x0.shape, generator=g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):  # one fixed batch: the loss must fall at every step
        loss = diffusion.loss(model(diffusion.add_noise(x0, noise, r), r, effnet, clip), noise, r)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))
    assert losses[-1] < 0.85 * losses[0]


def test_compiles_without_graph_breaks() -> None:
    torch.manual_seed(0)
    model = StageB(dataclasses.replace(SMALL, checkpointing=True))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x, r, effnet, clip = inputs(SMALL)
    out = compiled(x, r, effnet, clip)
    out.sum().backward()
    torch.testing.assert_close(out, model(x, r, effnet, clip))


def test_rejects_a_latent_size_the_levels_cannot_halve() -> None:
    torch.manual_seed(0)
    model = StageB(SMALL)  # patch 2 x 2^3 levels: sides must be multiples of 16
    x, r, effnet, clip = inputs(SMALL, side=(16, 24))
    with pytest.raises(ValueError, match="multiple of 16"):
        model(x, r, effnet, clip)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"nhead": (-1, 2, 3)}, "nhead has 3 entries"),
        ({"nhead": (-1, 5, 3, 4)}, r"nhead\[1\]"),
        ({"level_config": ("CT", "CTX", "CTA", "CTA")}, r"level_config\[1\]"),
        ({"kernel_size": 4}, "kernel_size"),
    ],
)
def test_config_rejects_bad_values(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(SMALL, **change)
