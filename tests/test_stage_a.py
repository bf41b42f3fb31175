"""Stage A: checkpoint layout, equivalence with diffusers' PaellaVQModel, latent conventions, training."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.stage_oracle import perturb_, reference_like, reference_stage_a, shapes
from stages.stage_a import STAGE_A_CONFIGS, MixingBlock, StageA, StageAConfig

SMALL = StageAConfig(bottleneck_blocks=2, embed_dim=16, codebook_size=64)


def images(batch: int = 2, size: tuple[int, int] = (16, 24)) -> torch.Tensor:
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(0))


def test_v2_has_the_official_checkpoint_layout() -> None:
    with torch.device("meta"):
        ours = StageA(STAGE_A_CONFIGS["v2"]())
        reference = reference_stage_a(STAGE_A_CONFIGS["v2"]())
    assert shapes(ours) == shapes(reference)
    assert sum(p.numel() for p in ours.parameters()) == pytest.approx(18.4e6, rel=0.01)  # docs/design.md


@pytest.fixture
def pair() -> tuple[StageA, torch.nn.Module]:
    torch.manual_seed(0)
    ours = perturb_(StageA(SMALL), std=0.1).eval()
    reference = reference_like(ours)
    return ours, reference


def test_encode_quantize_decode_match_reference(pair) -> None:
    ours, reference = pair
    x = images()
    latents = ours.encode(x)
    assert latents.shape == (2, 4, 4, 6)
    torch.testing.assert_close(latents, reference.encode(x).latents, rtol=1e-5, atol=1e-6)

    quantized, loss, indices = ours.quantize(latents)
    ref_quantized, ref_loss, (_, _, ref_indices) = reference.vquantizer(latents)
    torch.testing.assert_close(quantized, ref_quantized)
    torch.testing.assert_close(loss, ref_loss)
    assert torch.equal(indices.flatten(), ref_indices.flatten())

    torch.testing.assert_close(ours.decode(latents), reference.decode(latents).sample, rtol=1e-5, atol=1e-6)


def test_stage_b_latent_conventions_match_the_official_pipelines(pair) -> None:
    """Stage B latents are raw / 0.3764; the decoder pipeline decodes scale_factor x latents and clamps."""
    ours, reference = pair
    x = images()
    stage_b_latents = ours.encode_stage_b_latents(x)
    torch.testing.assert_close(stage_b_latents * 0.3764, reference.encode(x).latents, rtol=1e-5, atol=1e-6)
    expected = reference.decode(reference.config.scale_factor * stage_b_latents).sample.clamp(0, 1)
    torch.testing.assert_close(ours.decode_stage_b_latents(stage_b_latents), expected, rtol=1e-5, atol=1e-6)


def test_fresh_mixing_blocks_have_the_original_init() -> None:
    """Xavier weights and zero biases inside, zero gates outside: a fresh block is the identity."""
    torch.manual_seed(0)
    block = MixingBlock(16, 64)
    assert torch.count_nonzero(block.gammas) == 0
    assert torch.count_nonzero(block.channelwise[0].bias) == 0 and torch.count_nonzero(block.depthwise[1].bias) == 0
    x = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(block(x), x)


@pytest.mark.parametrize("quantize", [True, False])
def test_tiny_trains(quantize: bool) -> None:
    torch.manual_seed(0)
    model = StageA(STAGE_A_CONFIGS["tiny"]())
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(40e3, rel=0.1)
    x = images(4, (64, 64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    reconstruction_losses, vq_losses = [], []
    for _ in range(12):
        reconstruction, vq_loss = model(x, quantize=quantize)
        reconstruction_loss = torch.nn.functional.mse_loss(reconstruction, x)
        (reconstruction_loss + vq_loss).backward()
        # Through the quantiser, the straight-through estimator carries the gradient to the encoder.
        assert model.in_block[1].weight.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        reconstruction_losses.append(reconstruction_loss.item())
        vq_losses.append(vq_loss.item())
    assert reconstruction_losses[-1] < 0.5 * reconstruction_losses[0]
    assert vq_losses[-1] < vq_losses[0]


def test_rejects_images_the_model_cannot_downsample() -> None:
    model = StageA(SMALL)
    with pytest.raises(ValueError, match="multiples of 4"):
        model.encode(images(1, (16, 18)))


@pytest.mark.parametrize(
    "field, value", [("embed_dim", 15), ("codebook_size", 0), ("scale_factor", 0.0), ("vq_beta", -1.0)]
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(SMALL, **{field: value})
