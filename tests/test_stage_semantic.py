"""Semantic compressor: EfficientNetV2-S layout, preprocessing, shapes and the Stage C latent scaling."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from bench.stage_oracle import perturb_
from stages.semantic import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SEMANTIC_CONFIGS,
    EffNetStage,
    SemanticCompressor,
    from_stage_c_latents,
    to_stage_c_latents,
)
from stages.weights import load_weights


def test_v2_is_efficientnet_v2_s_features_then_conv_and_batchnorm() -> None:
    with torch.device("meta"):
        ours = SemanticCompressor(SEMANTIC_CONFIGS["v2"]())
        torchvision_features = torchvision.models.efficientnet_v2_s().features
    backbone = {k: v.shape for k, v in ours.backbone.state_dict().items()}
    assert backbone == {k: v.shape for k, v in torchvision_features.state_dict().items()}
    mapper = {k: v.shape for k, v in ours.mapper.state_dict().items()}
    assert mapper["0.weight"] == (16, 1280, 1, 1) and "0.bias" not in mapper  # Conv1x1, no bias
    assert mapper["1.running_mean"] == (16,)  # BatchNorm2d(16)
    assert set(ours.state_dict()) == {f"backbone.{k}" for k in backbone} | {f"mapper.{k}" for k in mapper}
    assert sum(p.numel() for p in ours.parameters()) == pytest.approx(20.2e6, rel=0.01)  # docs/design.md


def test_v2_maps_768_px_to_16x24x24() -> None:
    config = SEMANTIC_CONFIGS["v2"]()
    assert (config.downsampling, config.latent_size) == (32, 24)
    with torch.device("meta"):
        out = SemanticCompressor(config)(torch.empty(1, 3, 1024, 1024))
    assert out.shape == (1, 16, 24, 24)


def test_tiny_maps_64_px_to_16x4x4_and_crops_the_centre() -> None:
    torch.manual_seed(0)
    model = SemanticCompressor(SEMANTIC_CONFIGS["tiny"]()).eval()
    square = torch.rand(2, 3, 64, 64)
    assert model(square).shape == (2, 16, 4, 4)
    # A wide image is resized on its shorter side and centre-cropped: padding its sides changes nothing.
    wide = torch.cat([torch.zeros(2, 3, 64, 16), square, torch.zeros(2, 3, 64, 16)], dim=-1)
    torch.testing.assert_close(model(wide), model(square))


def test_preprocessing_is_imagenet_normalisation() -> None:
    model = SemanticCompressor(SEMANTIC_CONFIGS["tiny"]())
    grey = torch.full((1, 3, 64, 64), 0.5)
    expected = (0.5 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(model.preprocess(grey)[0, :, 10, 10], expected)


def test_stage_c_latent_scaling_is_the_official_one() -> None:
    e = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(to_stage_c_latents(e), (e + 1) / 42)
    torch.testing.assert_close(from_stage_c_latents(to_stage_c_latents(e)), e)
    torch.manual_seed(0)
    model = SemanticCompressor(SEMANTIC_CONFIGS["tiny"]()).eval()
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(model.encode_stage_c_latents(images), (model(images) + 1) / 42)


def test_config_rejects_mismatched_stages() -> None:
    config = SEMANTIC_CONFIGS["tiny"]()
    with pytest.raises(ValueError, match=r"stages\[1\].in_channels"):
        dataclasses.replace(config, stages=(config.stages[0], EffNetStage("fused", 4, 3, 2, 9, 16, 1)))
    with pytest.raises(ValueError, match="image_size"):
        dataclasses.replace(config, image_size=72)


class UpstreamEncoder(nn.Module):
    """The `EfficientNetEncoder` that wrote the upstream files: torchvision's EfficientNetV2-S features, a 1x1
    conv to 16 channels and a BatchNorm, affine in the research code (dome272/Wuerstchen `modules.py`;
    diffusers' research example `modeling_efficient_net_encoder.py`), not in Stable Cascade (`modules/effnet.py`)."""

    def __init__(self, *, affine: bool) -> None:
        super().__init__()
        self.backbone = torchvision.models.efficientnet_v2_s().features
        self.mapper = nn.Sequential(nn.Conv2d(1280, 16, kernel_size=1, bias=False), nn.BatchNorm2d(16, affine=affine))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mapper(self.backbone(x))


@torch.no_grad()
def test_v2_weights_load_from_the_research_stage_b_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    upstream = perturb_(UpstreamEncoder(affine=True), std=0.01).eval()
    # As the research Stage B script saves it: the encoder beside Stage B and the training state.
    torch.save(
        {
            "state_dict": {"clip_mapper.weight": torch.zeros(2, 2)},
            "effnet_state_dict": upstream.state_dict(),
            "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95)}]},
            "scheduler_last_step": 3,
            "iter": 3,
            "grad_scaler_state_dict": {"scale": 65536.0},
            "wandb_run_id": "run",
        },
        tmp_path / "model_v2_stage_b.pt",
    )
    ours = load_weights(
        SemanticCompressor(SEMANTIC_CONFIGS["v2"]()), tmp_path / "model_v2_stage_b.pt", key="effnet_state_dict"
    ).eval()
    images = torch.rand(1, 3, 80, 96)
    expected = upstream(ours.preprocess(images, (64, 96)))  # the research code's own preprocessing is ours
    torch.testing.assert_close(ours(images, (64, 96)), expected)
    # ... and Stage C's target is (e + 1) / 42, as in diffusers' research example for training the prior.
    torch.testing.assert_close(ours.encode_stage_c_latents(images, (64, 96)), (expected + 1) / 42)


def test_stable_cascade_encoder_is_refused_by_name(tmp_path) -> None:
    with torch.device("meta"):
        names = UpstreamEncoder(affine=False).state_dict()
    save_file(
        {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in names.items()}, tmp_path / "effnet_encoder.safetensors"
    )
    with pytest.raises(ValueError, match=r"(?s)do not fit SemanticCompressor.*mapper\.1\.weight"):
        load_weights(SemanticCompressor(SEMANTIC_CONFIGS["v2"]()), tmp_path / "effnet_encoder.safetensors")
