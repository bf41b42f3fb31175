"""The semantic compressor: images -> the 16-channel semantic latent (docs/design.md, "Semantic compressor").

EfficientNetV2-S `.features` (torchvision) -> Conv1x1 (no bias) -> BatchNorm2d, on images resized
(shorter side), centre-cropped and ImageNet-normalised as in the original training code. For v2,
768 px in -> 16 x 24 x 24 out. It is frozen when training Stage C (call `.eval()`: BatchNorm).

Latent conventions of the official v2 pipelines: Stage C is trained on and samples
`to_stage_c_latents(e) = (e + 1) / 42`; the prior pipeline hands Stage B
`from_stage_c_latents(z) = z * 42 - 1` (its `latent_mean=42`, `latent_std=1`).

Module names (`backbone.*`, `mapper.*`) are those of the research code's `EfficientNetEncoder`
(affine final BatchNorm). The v2 weights are the `effnet_state_dict` entry of the research checkpoint
`model_v2_stage_b.pt` and load with `weights.load_weights(model, path, key="effnet_state_dict")`.
Stable Cascade's `effnet_encoder.safetensors` does not load: its final BatchNorm has no affine
parameters (docs/weights.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal, NamedTuple

import torch
from torch import nn
from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STAGE_C_LATENT_SCALE = 42.0  # (e + 1) / 42: the official prior pipeline's latent_mean (docs/weights.md)
STAGE_C_LATENT_SHIFT = 1.0  # ... and its latent_std, which acts as the shift


class EffNetStage(NamedTuple):
    """One stage of an EfficientNetV2 backbone (a row of Table 4 of the EfficientNetV2 paper)."""

    kind: Literal["fused", "mbconv"]
    expand_ratio: float
    kernel: int
    stride: int
    in_channels: int
    out_channels: int
    num_layers: int


@dataclass(frozen=True, kw_only=True)
class SemanticConfig:
    """Architecture and input size of the semantic compressor."""

    stages: tuple[EffNetStage, ...]
    """Backbone stages after the stride-2 stem."""
    last_channel: int
    """Channels of the backbone's final 1x1 conv (1280 in EfficientNetV2-S)."""
    c_latent: int = 16
    """Channels of the semantic latent."""
    image_size: int
    """Images are resized (shorter side) and centre-cropped to this square before the backbone."""
    output_scale: float = 1.0
    """Scale of the latent of a compressor trained from scratch, applied to its final BatchNorm when it is
    exported (`scale_output_`). Stage C sees (e + 1) / 42, so at std 1 its signal is 1/42 of the noise's
    and takes a long training to resolve; at toy scale a larger latent lets Stage C learn in minutes."""

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("SemanticConfig.stages must hold at least one stage")
        for i, stage in enumerate(self.stages):
            if stage.kind not in ("fused", "mbconv"):
                raise ValueError(f"SemanticConfig.stages[{i}].kind must be 'fused' or 'mbconv', got {stage.kind!r}")
            if i > 0 and stage.in_channels != self.stages[i - 1].out_channels:
                raise ValueError(
                    f"SemanticConfig.stages[{i}].in_channels ({stage.in_channels}) must equal the previous"
                    f" stage's out_channels ({self.stages[i - 1].out_channels})"
                )
        if self.output_scale <= 0:
            raise ValueError(f"SemanticConfig.output_scale must be > 0, got {self.output_scale}")
        for name in ("last_channel", "c_latent"):
            if getattr(self, name) < 1:
                raise ValueError(f"SemanticConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size < self.downsampling or self.image_size % self.downsampling:
            raise ValueError(
                f"SemanticConfig.image_size ({self.image_size}) must be a positive multiple of the"
                f" backbone's downsampling ({self.downsampling})"
            )

    @property
    def downsampling(self) -> int:
        """Input pixels per latent pixel along each side (32 for EfficientNetV2-S)."""
        factor = 2  # the stem
        for stage in self.stages:
            factor *= stage.stride
        return factor

    @property
    def latent_size(self) -> int:
        """Side of the semantic latent."""
        return self.image_size // self.downsampling


def tiny() -> SemanticConfig:
    """A 4-stage, narrow EfficientNetV2: 64 px -> 16 x 4 x 4, trained from scratch (so output_scale 10)."""
    return SemanticConfig(
        stages=(
            EffNetStage("fused", 1, 3, 1, 8, 8, 1),
            EffNetStage("fused", 4, 3, 2, 8, 16, 1),
            EffNetStage("fused", 4, 3, 2, 16, 24, 1),
            EffNetStage("mbconv", 4, 3, 2, 24, 32, 1),
        ),
        last_channel=64,
        image_size=64,
        output_scale=10.0,
    )


def v2() -> SemanticConfig:
    """EfficientNetV2-S as in Würstchen v2 (20.2M parameters): 768 px -> 16 x 24 x 24."""
    return SemanticConfig(
        stages=(
            EffNetStage("fused", 1, 3, 1, 24, 24, 2),
            EffNetStage("fused", 4, 3, 2, 24, 48, 4),
            EffNetStage("fused", 4, 3, 2, 48, 64, 4),
            EffNetStage("mbconv", 4, 3, 2, 64, 128, 6),
            EffNetStage("mbconv", 6, 3, 1, 128, 160, 9),
            EffNetStage("mbconv", 6, 3, 2, 160, 256, 15),
        ),
        last_channel=1280,
        image_size=768,
    )


SEMANTIC_CONFIGS: dict[str, Callable[[], SemanticConfig]] = {"tiny": tiny, "v2": v2}


def to_stage_c_latents(semantic: torch.Tensor) -> torch.Tensor:
    """Semantic latent e -> the space Stage C is trained and sampled in: (e + 1) / 42."""
    return (semantic + STAGE_C_LATENT_SHIFT) / STAGE_C_LATENT_SCALE


def from_stage_c_latents(latents: torch.Tensor) -> torch.Tensor:
    """Stage C sample -> Stage B's semantic conditioning: latents x 42 - 1."""
    return latents * STAGE_C_LATENT_SCALE - STAGE_C_LATENT_SHIFT


def _backbone(config: SemanticConfig) -> nn.Sequential:
    settings = [
        (FusedMBConvConfig if s.kind == "fused" else MBConvConfig)(
            s.expand_ratio, s.kernel, s.stride, s.in_channels, s.out_channels, s.num_layers
        )
        for s in config.stages
    ]
    # torchvision's EfficientNetV2 BatchNorm eps; no stochastic depth, so a backbone trained
    # jointly (tiny runs) computes the same features it is later frozen with.
    net = EfficientNet(
        settings,
        dropout=0.0,
        stochastic_depth_prob=0.0,
        norm_layer=partial(nn.BatchNorm2d, eps=1e-3),
        last_channel=config.last_channel,
    )
    return net.features


class SemanticCompressor(nn.Module):
    """Images in [0, 1] -> semantic latents (B, c_latent, latent_size, latent_size)."""

    def __init__(self, config: SemanticConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = _backbone(config)
        self.mapper = nn.Sequential(
            nn.Conv2d(config.last_channel, config.c_latent, kernel_size=1, bias=False),
            nn.BatchNorm2d(config.c_latent),  # latents with mean 0 and std 1
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> ImageNet-normalised input: resized (shorter side) and centre-cropped
        to the S x S square, or resized to ``size`` (height, width) for a crop of another aspect ratio."""
        if size is None:
            side = self.config.image_size
            images = TF.resize(images, [side], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
            images = TF.center_crop(images, [side, side])
        else:
            images = TF.resize(images, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> semantic latents e (B, c_latent, h, w), about N(0, 1); ``size`` as in
        ``preprocess``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"SemanticCompressor expects images (B, 3, H, W), got {tuple(images.shape)}")
        if size is not None and (size[0] % self.config.downsampling or size[1] % self.config.downsampling):
            raise ValueError(
                f"semantic input size {size} must be a multiple of {self.config.downsampling} on each side"
            )
        return self.mapper(self.backbone(self.preprocess(images, size)))

    @torch.no_grad()
    def scale_output_(self) -> None:
        """Multiply the latent by `config.output_scale` (after training from scratch, before export)."""
        self.mapper[1].weight.mul_(self.config.output_scale)
        self.mapper[1].bias.mul_(self.config.output_scale)

    def encode_stage_c_latents(self, images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Images in [0, 1] -> Stage C's training target (e + 1) / 42; ``size`` as in ``preprocess``."""
        return to_stage_c_latents(self(images, size))
