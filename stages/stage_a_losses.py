"""Stage A's optional training terms: a perceptual distance and a patch critic, as VQGAN trains with.

Model code only; ``pipelines/trainable/stage_a.py`` decides when they count.

- ``PerceptualDistance``: a frozen network's features of both images at several depths, each
  normalised over channels, squared differences averaged per depth and summed over depths: LPIPS
  without its learned per-channel weights. ``v2`` uses VGG16's relu1_2 ... relu5_3 (LPIPS's and
  VQGAN's taps) with torchvision's ImageNet weights; ``tiny`` a small conv stack that stays random.
- ``PatchCritic``: VQGAN's PatchGAN discriminator (4x4 convs, stride 2, LeakyReLU 0.2, N(0, 0.02)
  init), one logit per image patch, trained with the hinge loss. GroupNorm stands in for its
  BatchNorm so that per-worker batch statistics do not differ under data parallelism.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from stages.weights import read_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's ImageNet VGG16 (IMAGENET1K_V1); only its ``features.*`` tensors are read.
VGG16_WEIGHTS_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
_VGG16_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16().features


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerceptualConfig:
    network: Literal["vgg16", "convs"]
    widths: tuple[int, ...] = ()
    """``convs`` only: channels of each stage (two 3x3 convs, a tap, then 2x downsampling)."""

    def __post_init__(self):
        if self.network not in ("vgg16", "convs"):
            raise ValueError(f"PerceptualConfig.network must be 'vgg16' or 'convs', got {self.network!r}")
        if self.network == "convs" and not self.widths:
            raise ValueError("PerceptualConfig.widths must name at least one stage for network='convs'")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CriticConfig:
    channels: int = 64
    """Channels of the first layer; each further layer doubles them (up to 8x)."""
    layers: int = 3
    """Stride-2 layers: the receptive field of a logit grows with them (70 px at 3)."""

    def __post_init__(self):
        if self.channels < 1 or self.layers < 1:
            raise ValueError(f"CriticConfig needs channels >= 1 and layers >= 1, got {self.channels}, {self.layers}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageALossConfig:
    perceptual: PerceptualConfig
    critic: CriticConfig


def tiny() -> StageALossConfig:
    return StageALossConfig(
        perceptual=PerceptualConfig(network="convs", widths=(8, 16)), critic=CriticConfig(channels=16, layers=2)
    )


def v2() -> StageALossConfig:
    return StageALossConfig(perceptual=PerceptualConfig(network="vgg16"), critic=CriticConfig(channels=64, layers=3))


STAGE_A_LOSS_CONFIGS: dict[str, Callable[[], StageALossConfig]] = {"tiny": tiny, "v2": v2}


class PerceptualDistance(nn.Module):
    """Per-sample perceptual distance between two image batches in [0, 1]; frozen."""

    def __init__(self, config: PerceptualConfig):
        super().__init__()
        self.config = config
        if config.network == "vgg16":
            self.features = torchvision.models.vgg16(weights=None).features
            self.taps = _VGG16_TAPS
        else:
            layers, taps, c_in = [], [], 3
            for width in config.widths:
                layers += [
                    nn.Conv2d(c_in, width, 3, padding=1),
                    nn.ReLU(),
                    nn.Conv2d(width, width, 3, padding=1),
                    nn.ReLU(),
                ]
                taps.append(len(layers) - 1)
                layers.append(nn.AvgPool2d(2))
                c_in = width
            self.features = nn.Sequential(*layers[:-1])  # no pooling after the last tap
            self.taps = tuple(taps)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def load_torchvision_vgg16(self, path: str | os.PathLike) -> PerceptualDistance:
        """torchvision's VGG16 checkpoint (a weights-only pickle); its classifier is left out."""
        assert self.config.network == "vgg16", "only the vgg16 network has torchvision weights"
        state = read_state_dict(path)
        features = {name.removeprefix("features."): t for name, t in state.items() if name.startswith("features.")}
        try:
            self.features.load_state_dict(features, strict=True)
        except RuntimeError as error:
            raise ValueError(f"{path} is not torchvision's VGG16 checkpoint: {error}") from error
        return self

    def train(self, mode: bool = True) -> PerceptualDistance:
        return super().train(False)  # frozen: no mode but eval

    def _tapped(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.mean) / self.std
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                # Unit length over channels, so every depth weighs alike (LPIPS's normalisation).
                taps.append(x / (x.float().pow(2).sum(dim=1, keepdim=True).sqrt().to(x.dtype) + 1e-10))
                if index == self.taps[-1]:
                    break
        return taps

    def forward(self, images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        distance = 0.0
        for a, b in zip(self._tapped(images), self._tapped(reference), strict=True):
            distance = distance + (a - b).float().pow(2).sum(dim=1).mean(dim=(1, 2))
        return distance


class PatchCritic(nn.Module):
    """PatchGAN discriminator: images in [0, 1] -> a map of real/fake logits."""

    def __init__(self, config: CriticConfig):
        super().__init__()
        self.config = config
        c = config.channels
        layers: list[nn.Module] = [nn.Conv2d(3, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c_in = c
        for i in range(1, config.layers + 1):
            c_out = c * min(2**i, 8)
            stride = 2 if i < config.layers else 1  # the last widening layer keeps the resolution
            layers += [
                nn.Conv2d(c_in, c_out, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(min(32, c_out // 4), c_out),
                nn.LeakyReLU(0.2),
            ]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images * 2 - 1)


def critic_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The critic's hinge loss: real logits pushed above 1, fake ones below -1."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """What the autoencoder minimises against the critic."""
    return -fake_logits.mean()
