"""Stage C, the text-conditional prior over semantic latents (docs/design.md, "Stage C (prior)").

A flat stack of `depth` x [ResBlock, TimestepBlock, AttnBlock] at one resolution. It predicts the
noise in a Stage C latent (the semantic compressor's output scaled as (e + 1) / 42, see
semantic.py) from the noised latent, the diffusion time r and the CLIP bigG text hidden states.

Parameter names and shapes are those of diffusers' `WuerstchenPrior`, so the official v2 weights
(`warp-ai/wuerstchen-prior`, `prior/diffusion_pytorch_model.safetensors`) load with
`weights.load_weights(model, path)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from stages.blocks import (
    AttnBlock,
    LayerNorm2d,
    ResBlock,
    TimestepBlock,
    run_block,
    timestep_embedding,
    xavier_init_,
)

OUTPUT_EPS = 1e-5  # keeps (x - a) / |1 - b| finite (reference code)


@dataclass(frozen=True, kw_only=True)
class StageCConfig:
    """Architecture of Stage C."""

    c_in: int
    """Channels of the semantic latent (16 in Würstchen)."""
    c: int
    """Width of the block stack."""
    c_cond: int
    """Width of the text conditioning (hidden size of the Stage C text encoder)."""
    c_r: int = 64
    """Width of the sinusoidal embedding of the diffusion time r."""
    depth: int
    """Number of [ResBlock, TimestepBlock, AttnBlock] triples."""
    nhead: int
    """Attention heads; must divide `c`."""
    dropout: float = 0.0
    """Dropout in the MLPs and after attention (the official v2 training used 0.1)."""
    checkpointing: bool = False
    """Recompute each triple's activations in backward (less memory, ~1/3 more compute)."""
    channels_last: bool = True
    """Keep activations in channels_last memory so per-pixel ops run on free NHWC views."""

    def __post_init__(self) -> None:
        for name in ("c_in", "c", "c_cond", "c_r", "depth", "nhead"):
            if getattr(self, name) < 1:
                raise ValueError(f"StageCConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.c % self.nhead != 0:
            raise ValueError(f"StageCConfig.nhead ({self.nhead}) must divide StageCConfig.c ({self.c})")
        if self.c_r < 4:
            raise ValueError(f"StageCConfig.c_r must be >= 4 for the sinusoidal embedding, got {self.c_r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"StageCConfig.dropout must be in [0, 1), got {self.dropout}")


def tiny() -> StageCConfig:
    """~0.3M parameters: trains in minutes on 2 CPU cores (64 px images, 4x4 latents)."""
    return StageCConfig(c_in=16, c=64, c_cond=32, depth=5, nhead=4)


def v2() -> StageCConfig:
    """The official Würstchen v2 prior (0.99B parameters; `warp-ai/wuerstchen-prior`)."""
    return StageCConfig(c_in=16, c=1536, c_cond=1280, depth=32, nhead=24, dropout=0.1)


STAGE_C_CONFIGS: dict[str, Callable[[], StageCConfig]] = {"tiny": tiny, "v2": v2}


class StageC(nn.Module):
    """The Würstchen prior: predicts the noise in a noised Stage C latent."""

    def __init__(self, config: StageCConfig) -> None:
        super().__init__()
        self.config = config
        c = config.c
        self.projection = nn.Conv2d(config.c_in, c, kernel_size=1)
        self.cond_mapper = nn.Sequential(nn.Linear(config.c_cond, c), nn.LeakyReLU(0.2), nn.Linear(c, c))
        # One flat list, as in the reference, so checkpoint keys are blocks.{3i, 3i+1, 3i+2}.
        self.blocks = nn.ModuleList()
        for _ in range(config.depth):
            self.blocks.append(ResBlock(c, dropout=config.dropout))
            self.blocks.append(TimestepBlock(c, config.c_r))
            self.blocks.append(AttnBlock(c, c, config.nhead, dropout=config.dropout))
        self.out = nn.Sequential(LayerNorm2d(), nn.Conv2d(c, config.c_in * 2, kernel_size=1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original training code's init (docs/design.md, "Initialisation")."""
        xavier_init_(self)
        nn.init.normal_(self.projection.weight, std=0.02)
        nn.init.normal_(self.cond_mapper[0].weight, std=0.02)
        nn.init.normal_(self.cond_mapper[2].weight, std=0.02)
        # A zero output conv makes the first prediction (x - 0) / |1 - 0|: harmless, not exploding.
        nn.init.zeros_(self.out[1].weight)
        for block in self.blocks:
            if isinstance(block, ResBlock):
                block.channelwise[-1].weight.data.mul_(math.sqrt(1 / self.config.depth))
            elif isinstance(block, TimestepBlock):
                nn.init.zeros_(block.mapper.weight)

    @staticmethod
    def _triple(
        res: ResBlock, time: TimestepBlock, attn: AttnBlock, x: torch.Tensor, r_embed: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        return attn(time(res(x), r_embed), cond)

    def forward(self, x: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Predict the noise.

        x: (B, c_in, h, w) noised Stage C latent; r: (B,) diffusion time in [0, 1];
        c: (B, S, c_cond) text hidden states (S = 77). Returns (B, c_in, h, w); under autocast
        it keeps the dtype of x (fp32), like the reference.
        """
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.projection(x)  # (B, c, h, w)
        cond = self.cond_mapper(c)  # (B, S, c)
        r_embed = timestep_embedding(r, self.config.c_r)  # (B, c_r)
        blocks = self.blocks
        for res, time, attn in zip(blocks[0::3], blocks[1::3], blocks[2::3]):
            layer = partial(self._triple, res, time, attn)
            h = run_block(layer, h, r_embed, cond, checkpointing=self.config.checkpointing)
        a, b = self.out(h).chunk(2, dim=1)  # (B, c_in, h, w) each
        return (x - a) / ((1 - b).abs() + OUTPUT_EPS)
