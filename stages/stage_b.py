"""Stage B, the "DiffNeXt" decoder from semantic latents to Stage A latents (docs/design.md, "Stage B (decoder)").

A U-Net over the (scaled) Stage A latent: patchify, per-level stacks of ResBlock / TimestepBlock /
AttnBlock going down and back up, skip connections between matching levels. The semantic latent
(Stage C's output mapped back with x 42 - 1) is resized bicubically to each level that injects it
and concatenated into that level's ResBlocks; the CLIP-H text hidden states are extra keys/values
of the attention blocks.

Parameter names and shapes are those of diffusers' `WuerstchenDiffNeXt`, so the official v2
weights (`warp-ai/wuerstchen`, `decoder/diffusion_pytorch_model.safetensors`) load with
`weights.load_weights(model, path)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from stages.blocks import (
    AttnBlock,
    LayerNorm2d,
    ResBlock,
    TimestepBlock,
    layer_norm_last,
    run_block,
    timestep_embedding,
    xavier_init_,
)

OUTPUT_EPS = 1e-3  # the predicted scale b lies in [eps, 1 - eps] (reference code)
BLOCK_TYPES = frozenset("CTA")  # C: ResBlock, T: TimestepBlock, A: AttnBlock


@dataclass(frozen=True, kw_only=True)
class StageBConfig:
    """Architecture of Stage B; the per-level tuples all have one entry per U-Net level."""

    c_in: int = 4
    """Channels of the Stage A latent."""
    c_out: int = 4
    """Channels of the predicted noise."""
    c_r: int = 64
    """Width of the sinusoidal embedding of the diffusion time r."""
    patch_size: int = 2
    """Pixel-unshuffle factor of the input embedding."""
    c_cond: int
    """Width the text and semantic conditioning are mapped to."""
    c_hidden: tuple[int, ...]
    """Channels per level."""
    nhead: tuple[int, ...]
    """Attention heads per level (ignored, conventionally -1, where the level has no 'A')."""
    blocks: tuple[int, ...]
    """Repeats of the level's block pattern per level."""
    level_config: tuple[str, ...]
    """Block pattern per level, letters from C (ResBlock), T (TimestepBlock), A (AttnBlock)."""
    inject_effnet: tuple[bool, ...]
    """Whether each level receives the semantic latent."""
    effnet_embd: int = 16
    """Channels of the semantic latent."""
    clip_embd: int
    """Width of the text conditioning (hidden size of the Stage B text encoder)."""
    kernel_size: int = 3
    """Depthwise convolution kernel of the ResBlocks."""
    dropout: float = 0.0
    """Dropout in the MLPs and after attention (the official v2 training used 0.1)."""
    checkpointing: bool = False
    """Recompute the activations of each repeat of a level's pattern in backward (less memory, ~1/3
    more compute)."""
    channels_last: bool = True
    """Keep activations in channels_last memory so per-pixel ops run on free NHWC views."""

    def __post_init__(self) -> None:
        levels = len(self.c_hidden)
        if levels < 1:
            raise ValueError("StageBConfig.c_hidden must name at least one level")
        for name in ("nhead", "blocks", "level_config", "inject_effnet"):
            if len(getattr(self, name)) != levels:
                raise ValueError(
                    f"StageBConfig.{name} has {len(getattr(self, name))} entries; c_hidden has {levels} levels"
                )
        for name in ("c_in", "c_out", "c_r", "patch_size", "c_cond", "effnet_embd", "clip_embd", "kernel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"StageBConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"StageBConfig.kernel_size must be odd to keep the size, got {self.kernel_size}")
        for i, (c, heads, n, pattern) in enumerate(zip(self.c_hidden, self.nhead, self.blocks, self.level_config)):
            if c < 1 or n < 1:
                raise ValueError(f"StageBConfig.c_hidden[{i}] and blocks[{i}] must be >= 1, got {c}, {n}")
            if not pattern or not set(pattern) <= BLOCK_TYPES or pattern[0] != "C":
                raise ValueError(
                    f"StageBConfig.level_config[{i}] must be letters from 'CTA' starting with 'C', got {pattern!r}"
                )
            if "A" in pattern and (heads < 1 or c % heads != 0):
                raise ValueError(f"StageBConfig.nhead[{i}] ({heads}) must be >= 1 and divide c_hidden[{i}] ({c})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"StageBConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def size_multiple(self) -> int:
        """The latent's height and width must be multiples of this."""
        return self.patch_size * 2 ** (len(self.c_hidden) - 1)


def tiny() -> StageBConfig:
    """~0.2M parameters: trains in minutes on 2 CPU cores (64 px images, 16x16 latents)."""
    return StageBConfig(
        c_cond=32,
        c_hidden=(16, 32, 64),
        nhead=(-1, 2, 4),
        blocks=(1, 1, 1),
        level_config=("CT", "CTA", "CTA"),
        inject_effnet=(False, True, True),
        clip_embd=24,
    )


def v2() -> StageBConfig:
    """The official Würstchen v2 decoder (`warp-ai/wuerstchen`, subfolder `decoder`)."""
    return StageBConfig(
        c_cond=1024,
        c_hidden=(320, 640, 1280, 1280),
        nhead=(-1, 10, 20, 20),
        blocks=(4, 4, 14, 4),
        level_config=("CT", "CTA", "CTA", "CTA"),
        inject_effnet=(False, True, True, True),
        clip_embd=1024,
        dropout=0.1,
    )


STAGE_B_CONFIGS: dict[str, Callable[[], StageBConfig]] = {"tiny": tiny, "v2": v2}


class StageB(nn.Module):
    """The Würstchen decoder: predicts the noise in a noised (scaled) Stage A latent."""

    def __init__(self, config: StageBConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        levels = len(cfg.c_hidden)

        self.clip_mapper = nn.Linear(cfg.clip_embd, cfg.c_cond)
        # One mapper slot per level going down, then per level coming up (None where not injected),
        # so the indices match the reference checkpoints.
        self.effnet_mappers = nn.ModuleList(
            [
                nn.Conv2d(cfg.effnet_embd, cfg.c_cond, kernel_size=1) if inject else None
                for inject in cfg.inject_effnet + tuple(reversed(cfg.inject_effnet))
            ]
        )
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(cfg.patch_size),
            nn.Conv2d(cfg.c_in * cfg.patch_size**2, cfg.c_hidden[0], kernel_size=1),
            LayerNorm2d(),
        )

        def make(kind: str, level: int, c_skip: int) -> nn.Module:
            c = cfg.c_hidden[level]
            if kind == "C":
                return ResBlock(c, c_skip=c_skip, kernel_size=cfg.kernel_size, dropout=cfg.dropout)
            if kind == "T":
                return TimestepBlock(c, cfg.c_r)
            return AttnBlock(c, cfg.c_cond, cfg.nhead[level], dropout=cfg.dropout)

        self.down_blocks = nn.ModuleList()
        for i in range(levels):
            level = nn.ModuleList()
            if i > 0:
                level.append(
                    nn.Sequential(
                        LayerNorm2d(), nn.Conv2d(cfg.c_hidden[i - 1], cfg.c_hidden[i], kernel_size=2, stride=2)
                    )
                )
            effnet_skip = cfg.c_cond if cfg.inject_effnet[i] else 0
            for _ in range(cfg.blocks[i]):
                for kind in cfg.level_config[i]:
                    level.append(make(kind, i, effnet_skip))
            self.down_blocks.append(level)

        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            level = nn.ModuleList()
            for j in range(cfg.blocks[i]):
                for k, kind in enumerate(cfg.level_config[i]):
                    # The first block of every level but the deepest also takes the encoder's features.
                    c_skip = cfg.c_hidden[i] if i < levels - 1 and j == k == 0 else 0
                    c_skip += cfg.c_cond if cfg.inject_effnet[i] else 0
                    level.append(make(kind, i, c_skip))
            if i > 0:
                level.append(
                    nn.Sequential(
                        LayerNorm2d(),
                        nn.ConvTranspose2d(cfg.c_hidden[i], cfg.c_hidden[i - 1], kernel_size=2, stride=2),
                    )
                )
            self.up_blocks.append(level)

        self.clf = nn.Sequential(
            LayerNorm2d(),
            nn.Conv2d(cfg.c_hidden[0], 2 * cfg.c_out * cfg.patch_size**2, kernel_size=1),
            nn.PixelShuffle(cfg.patch_size),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original training code's init (docs/design.md, "Initialisation")."""
        xavier_init_(self)
        for mapper in self.effnet_mappers:
            if mapper is not None:
                nn.init.normal_(mapper.weight, std=0.02)
        nn.init.normal_(self.clip_mapper.weight, std=0.02)
        nn.init.xavier_uniform_(self.embedding[1].weight, gain=0.02)
        nn.init.zeros_(self.clf[1].weight)
        for level in [*self.down_blocks, *self.up_blocks]:
            for block in level:
                if isinstance(block, ResBlock):
                    block.channelwise[-1].weight.data.mul_(math.sqrt(1 / sum(self.config.blocks)))
                elif isinstance(block, TimestepBlock):
                    nn.init.zeros_(block.mapper.weight)

    def blocks_by_level(self) -> list[list[nn.Module]]:
        """Each U-Net level's modules, outermost level first: those going down, then those coming up."""
        levels = len(self.config.c_hidden)
        return [[*self.down_blocks[i], *self.up_blocks[levels - 1 - i]] for i in range(levels)]

    def _semantic(self, slot: int, effnet: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        """The semantic latent resized to `size` and mapped by mapper `slot`: () or ((B, c_cond, *size),)."""
        mapper = self.effnet_mappers[slot]
        if mapper is None:
            return ()
        # Bicubic resampling in fp32 as in the reference; the tensor is small (B, 16, h, w).
        resized = F.interpolate(effnet.float(), size=size, mode="bicubic", antialias=True, align_corners=True)
        out = mapper(resized.to(effnet.dtype))
        return (out.contiguous(memory_format=torch.channels_last) if self.config.channels_last else out,)

    @staticmethod
    def _repeat(
        blocks: tuple[nn.Module, ...],
        x: torch.Tensor,
        r_embed: torch.Tensor,
        clip: torch.Tensor,
        semantic: tuple[torch.Tensor, ...],
        encoder_skip: tuple[torch.Tensor, ...],
    ) -> torch.Tensor:
        """One repeat of a level's block pattern; the encoder's features go to its first block only."""
        for k, block in enumerate(blocks):
            if isinstance(block, ResBlock):
                x = block(x, *(encoder_skip if k == 0 else ()), *semantic)
            elif isinstance(block, TimestepBlock):
                x = block(x, r_embed)
            else:
                x = block(x, clip)
        return x

    def _run_repeats(
        self,
        blocks: nn.ModuleList,
        pattern: str,
        h: torch.Tensor,
        r_embed: torch.Tensor,
        clip: torch.Tensor,
        semantic: tuple[torch.Tensor, ...],
        encoder_skip: tuple[torch.Tensor, ...] = (),
    ) -> torch.Tensor:
        """A level's blocks, one checkpoint per repeat of its pattern (as Stage C's triples): a
        checkpointed repeat keeps only its input for backward, where one checkpoint per block would
        also keep the input of each block after the first."""
        for start in range(0, len(blocks), len(pattern)):
            repeat = partial(self._repeat, tuple(blocks[start : start + len(pattern)]),
                             semantic=semantic, encoder_skip=encoder_skip if start == 0 else ())  # fmt: skip
            h = run_block(repeat, h, r_embed, clip, checkpointing=self.config.checkpointing)
        return h

    def forward(self, x: torch.Tensor, r: torch.Tensor, effnet: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        """Predict the noise.

        x: (B, c_in, H, W) noised Stage A latent divided by its scale factor (stage_a.py), H and W
        multiples of `config.size_multiple`; r: (B,) diffusion time in [0, 1]; effnet: (B,
        effnet_embd, h, w) semantic latent (Stage C latent x 42 - 1, or zeros when unconditional);
        clip: (B, S, clip_embd) text hidden states. Returns (B, c_out, H, W).
        """
        cfg = self.config
        height, width = x.shape[-2:]
        if height % cfg.size_multiple or width % cfg.size_multiple:
            raise ValueError(
                f"Stage B latent size {height}x{width} must be a multiple of {cfg.size_multiple} "
                "(patch_size x 2^(levels - 1)); change the image size"
            )
        levels = len(cfg.c_hidden)
        sizes = [(height // (cfg.patch_size * 2**i), width // (cfg.patch_size * 2**i)) for i in range(levels)]
        r_embed = timestep_embedding(r, cfg.c_r)  # (B, c_r)
        clip = layer_norm_last(self.clip_mapper(clip))  # (B, S, c_cond)
        x_in = x
        h = self.embedding(x)  # (B, c_hidden[0], H / patch, W / patch)
        if cfg.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)

        level_outputs = []  # deepest level first
        for i, level in enumerate(self.down_blocks):
            if i > 0:
                h = level[0](h)  # down-sampling
            repeats = level[1:] if i > 0 else level
            h = self._run_repeats(repeats, cfg.level_config[i], h, r_embed, clip, self._semantic(i, effnet, sizes[i]))
            level_outputs.insert(0, h)

        for i, level in enumerate(self.up_blocks):
            depth = levels - 1 - i
            repeats = level[:-1] if depth > 0 else level
            semantic = self._semantic(levels + i, effnet, sizes[depth])
            encoder_skip = (level_outputs[i],) if i > 0 else ()
            h = self._run_repeats(repeats, cfg.level_config[depth], h, r_embed, clip, semantic, encoder_skip)
            if depth > 0:
                h = level[-1](h)  # up-sampling

        a, b = self.clf(h).chunk(2, dim=1)  # (B, c_out, H, W) each
        b = b.sigmoid() * (1 - 2 * OUTPUT_EPS) + OUTPUT_EPS
        return (x_in - a) / b
