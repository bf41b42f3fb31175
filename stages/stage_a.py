"""Stage A, the f4 VQGAN between pixels and Stage B's latent space (docs/design.md, "Stage A").

Encoder: pixel-unshuffle, a 1x1 conv, mixing residual blocks with stride-2 convs between levels,
then a 1x1 conv and BatchNorm to `latent_channels`. A vector quantiser (codebook of
`codebook_size` entries) is used in training; at generation time the decoder takes unquantised
latents, as the official pipelines do.

Latent conventions (the official pipelines and the Stable Cascade code): `encode` returns the raw
BatchNorm-ed latent; Stage B works on that latent divided by `scale_factor` (0.3764 in v2), and
its samples are multiplied by `scale_factor` before `decode`. `encode_stage_b_latents` and
`decode_stage_b_latents` apply that convention, so callers never handle the factor.

Parameter names and shapes are those of diffusers' `PaellaVQModel`, so the official v2 weights
(`warp-ai/wuerstchen`, subfolder `vqgan`) load with `weights.load_weights(model, path)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stages.blocks import layer_norm_last, to_nchw, to_nhwc


@dataclass(frozen=True, kw_only=True)
class StageAConfig:
    """Architecture of Stage A."""

    in_channels: int = 3
    """Image channels in."""
    out_channels: int = 3
    """Image channels out."""
    up_down_scale_factor: int = 2
    """Pixel-unshuffle factor of the first layer (the f of the model is this x 2^(levels - 1))."""
    levels: int = 2
    """Resolution levels; each after the first halves the size."""
    bottleneck_blocks: int
    """Mixing blocks of the decoder at the latent resolution."""
    embed_dim: int
    """Channels at the deepest level; level i from the top has embed_dim / 2^(levels - 1 - i)."""
    latent_channels: int = 4
    """Channels of the latent."""
    codebook_size: int
    """Entries of the vector quantiser's codebook."""
    scale_factor: float = 0.3764
    """Stage B latents are the raw latent divided by this (official v2 value)."""
    vq_beta: float = 0.25
    """Weight of the commitment term of the quantisation loss."""

    def __post_init__(self) -> None:
        for name in (
            "in_channels",
            "out_channels",
            "up_down_scale_factor",
            "levels",
            "bottleneck_blocks",
            "latent_channels",
            "codebook_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"StageAConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.embed_dim < 2 ** (self.levels - 1) or self.embed_dim % 2 ** (self.levels - 1):
            raise ValueError(
                f"StageAConfig.embed_dim ({self.embed_dim}) must be a positive multiple of 2^(levels - 1)"
                f" = {2 ** (self.levels - 1)}"
            )
        if self.scale_factor <= 0:
            raise ValueError(f"StageAConfig.scale_factor must be > 0, got {self.scale_factor}")
        if self.vq_beta < 0:
            raise ValueError(f"StageAConfig.vq_beta must be >= 0, got {self.vq_beta}")

    @property
    def downsampling(self) -> int:
        """Pixels per latent pixel along each side (4 for the f4 model)."""
        return self.up_down_scale_factor * 2 ** (self.levels - 1)


def tiny() -> StageAConfig:
    """~40k parameters: trains in minutes on 2 CPU cores (64 px images -> 4x16x16 latents)."""
    return StageAConfig(bottleneck_blocks=1, embed_dim=32, codebook_size=256)


def v2() -> StageAConfig:
    """The official Würstchen v2 VQGAN (18.4M parameters; `warp-ai/wuerstchen`, subfolder `vqgan`)."""
    return StageAConfig(bottleneck_blocks=12, embed_dim=384, codebook_size=8192)


STAGE_A_CONFIGS: dict[str, Callable[[], StageAConfig]] = {"tiny": tiny, "v2": v2}


class MixingBlock(nn.Module):
    """Residual block of the Paella VQGAN: a depthwise conv then a channel MLP, each gated by learned scalars."""

    def __init__(self, c: int, c_hidden: int) -> None:
        super().__init__()
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.channelwise = nn.Sequential(nn.Linear(c, c_hidden), nn.GELU(), nn.Linear(c_hidden, c))
        # (scale, shift, gate) for each half; zero gates make a fresh block the identity.
        self.gammas = nn.Parameter(torch.zeros(6))
        for m in self.modules():  # the original code's init, for this block only
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gammas
        h = to_nchw(layer_norm_last(to_nhwc(x)) * (1 + g[0]) + g[1])
        x = x + self.depthwise(h) * g[2]
        h = layer_norm_last(to_nhwc(x)) * (1 + g[3]) + g[4]  # (B, H, W, C)
        return x + to_nchw(self.channelwise(h)) * g[5]


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantiser with a straight-through gradient."""

    def __init__(self, codebook_size: int, dim: int, *, beta: float) -> None:
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z: (B, C, H, W) -> (quantised (B, C, H, W), loss (), indices (B, H, W))."""
        flat = to_nhwc(z).reshape(-1, z.shape[1])  # (BHW, C)
        indices = torch.cdist(flat, self.embedding.weight).argmin(dim=1)  # (BHW,)
        zq = self.embedding(indices).view(z.shape[0], *z.shape[2:], z.shape[1])  # (B, H, W, C)
        zq = to_nchw(zq)
        # Codebook term pulls entries to the encoder; the beta-weighted commitment term the reverse.
        loss = self.beta * F.mse_loss(z, zq.detach()) + F.mse_loss(zq, z.detach())
        zq = z + (zq - z).detach()
        return zq, loss, indices.view(z.shape[0], *z.shape[2:])


class StageA(nn.Module):
    """The Würstchen VQGAN: images in [0, 1] <-> 4-channel latents at 1/4 the size."""

    def __init__(self, config: StageAConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        f = cfg.up_down_scale_factor
        c_levels = [cfg.embed_dim // 2**i for i in reversed(range(cfg.levels))]  # top level first

        self.in_block = nn.Sequential(
            nn.PixelUnshuffle(f), nn.Conv2d(cfg.in_channels * f**2, c_levels[0], kernel_size=1)
        )
        down: list[nn.Module] = []
        for i in range(cfg.levels):
            if i > 0:
                down.append(nn.Conv2d(c_levels[i - 1], c_levels[i], kernel_size=4, stride=2, padding=1))
            down.append(MixingBlock(c_levels[i], c_levels[i] * 4))
        # BatchNorm so the latents come out with mean 0 and std 1.
        down.append(
            nn.Sequential(
                nn.Conv2d(c_levels[-1], cfg.latent_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(cfg.latent_channels),
            )
        )
        self.down_blocks = nn.Sequential(*down)

        self.vquantizer = VectorQuantizer(cfg.codebook_size, cfg.latent_channels, beta=cfg.vq_beta)

        up: list[nn.Module] = [nn.Sequential(nn.Conv2d(cfg.latent_channels, c_levels[-1], kernel_size=1))]
        for i in range(cfg.levels):
            c = c_levels[cfg.levels - 1 - i]
            for _ in range(cfg.bottleneck_blocks if i == 0 else 1):
                up.append(MixingBlock(c, c * 4))
            if i < cfg.levels - 1:
                up.append(nn.ConvTranspose2d(c, c_levels[cfg.levels - 2 - i], kernel_size=4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(
            nn.Conv2d(c_levels[0], cfg.out_channels * f**2, kernel_size=1), nn.PixelShuffle(f)
        )

    def _check_size(self, images: torch.Tensor) -> None:
        f = self.config.downsampling
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"Stage A needs image sides that are multiples of {f}, got {tuple(images.shape[-2:])}")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> raw unquantised latents (B, 4, H / 4, W / 4)."""
        self._check_size(images)
        return self.down_blocks(self.in_block(images))

    def quantize(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw latents -> (quantised latents, quantisation loss, codebook indices (B, h, w))."""
        return self.vquantizer(latents)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents (quantised or not) (B, 4, h, w) -> images (B, 3, 4h, 4w), not clamped."""
        return self.out_block(self.up_blocks(latents))

    def forward(self, images: torch.Tensor, *, quantize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass: images -> (reconstruction, quantisation loss).

        With quantize=False the decoder sees the unquantised latents, as it does at generation
        time behind Stage B; the quantisation loss still trains the codebook and the commitment.
        """
        latents = self.encode(images)
        quantized, vq_loss, _ = self.quantize(latents)
        return self.decode(quantized if quantize else latents), vq_loss

    def encode_stage_b_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> Stage B's training target: the raw latent / scale_factor."""
        return self.encode(images) / self.config.scale_factor

    def decode_stage_b_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Stage B's output -> images, clamped to [0, 1] as the official decoder pipeline does."""
        return self.decode(latents * self.config.scale_factor).clamp(0, 1)
