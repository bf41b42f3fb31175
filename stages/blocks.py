"""Layers shared by Stage B (stage_b.py) and Stage C (stage_c.py).

Module and parameter names follow the diffusers reference (`modeling_wuerstchen_common.py`), so
official checkpoints load with strict=True. The arithmetic is the reference's, arranged to be cheap:

- Activations are NCHW tensors that the models keep in channels_last memory, so the per-pixel
  work (layer norm, MLP, attention) runs on free NHWC views instead of permuted copies.
- Layer norm and GlobalResponseNorm run with autocast off: they keep the activation dtype
  (reductions still accumulate in fp32), where autocast would write fp32 copies of every
  activation they touch and keep them for backward.
- Attention is one fused `F.scaled_dot_product_attention` call on the projected q/k/v.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LN_EPS = 1e-6  # every layer norm in Würstchen (reference code)
GRN_EPS = 1e-6  # ConvNeXt-V2 GlobalResponseNorm


def layer_norm_last(x: torch.Tensor) -> torch.Tensor:
    """Affine-free layer norm over the last dim, in the dtype of `x`."""
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x, x.shape[-1:], eps=LN_EPS)


def to_nhwc(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W, C) view; contiguous when `x` is channels_last."""
    return x.permute(0, 2, 3, 1)


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W) view; channels_last when `x` is contiguous."""
    return x.permute(0, 3, 1, 2)


class LayerNorm2d(nn.Module):
    """Affine-free layer norm over the channels of an NCHW tensor (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_nchw(layer_norm_last(to_nhwc(x)))


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on (B, H, W, C): x * (1 + gamma * N(x)) + beta."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            norm = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True, dtype=torch.float32)  # (B, 1, 1, C)
            norm = norm / (norm.mean(dim=-1, keepdim=True) + GRN_EPS)
            # The reference's gamma*(x*N) + beta + x, folded into one pass over x; the small
            # (B, 1, 1, C) factors are cast so the big tensor stays in the activation dtype.
            scale = (1 + self.gamma * norm).to(x.dtype)
            return torch.addcmul(self.beta.to(x.dtype), x, scale)


class ResBlock(nn.Module):
    """ConvNeXt-style block: depthwise conv, layer norm, MLP with GRN, residual.

    Skip inputs (Stage B's encoder features and semantic conditioning) are concatenated to the
    normalised features before the MLP, as in the reference `ResBlockStageB`; with no skips
    (Stage C) the block has exactly the reference `ResBlock`'s parameters and arithmetic.
    """

    def __init__(self, c: int, *, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d()
        self.channelwise = nn.Sequential(
            nn.Linear(c + c_skip, c * 4),
            nn.GELU(),
            GlobalResponseNorm(c * 4),
            nn.Dropout(dropout),
            nn.Linear(c * 4, c),
        )

    def forward(self, x: torch.Tensor, *skips: torch.Tensor) -> torch.Tensor:
        h = layer_norm_last(to_nhwc(self.depthwise(x)))  # (B, H, W, C)
        if skips:
            h = torch.cat([h, *(to_nhwc(s).to(h.dtype) for s in skips)], dim=-1)  # (B, H, W, C + c_skip)
        return x + to_nchw(self.channelwise(h))


class TimestepBlock(nn.Module):
    """Scale and shift the features from the embedding of the diffusion time r."""

    def __init__(self, c: int, c_r: int) -> None:
        super().__init__()
        self.mapper = nn.Linear(c_r, c * 2)

    def forward(self, x: torch.Tensor, r_embed: torch.Tensor) -> torch.Tensor:
        a, b = self.mapper(r_embed)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        # x * (1 + a) + b in one op: the two-op form is several times slower on channels_last x.
        return torch.addcmul(b.to(x.dtype), x, (1 + a).to(x.dtype))


class Attention(nn.Module):
    """Multi-head attention with the diffusers `Attention` parameter names (to_q/k/v, to_out.0)."""

    def __init__(self, c: int, nhead: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        assert c % nhead == 0, (c, nhead)
        self.nhead = nhead
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        # A ModuleList, not a Sequential, only to keep the reference's `to_out.0.*` names.
        self.to_out = nn.ModuleList([nn.Linear(c, c), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """x: (B, L, C) queries; kv: (B, S, C) keys and values -> (B, L, C)."""
        batch, length, c = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, heads, N, C / heads)
            return t.unflatten(-1, (self.nhead, c // self.nhead)).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.to_q(x)), heads(self.to_k(kv)), heads(self.to_v(kv)))
        out = out.transpose(1, 2).reshape(batch, length, c)
        return self.to_out[1](self.to_out[0](out))


class AttnBlock(nn.Module):
    """Self-attention over the latent's pixels, with the conditioning tokens as extra keys/values."""

    def __init__(self, c: int, c_cond: int, nhead: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = LayerNorm2d()
        self.attention = Attention(c, nhead, dropout=dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); cond: (B, S, c_cond) -> (B, C, H, W)."""
        batch, c, height, width = x.shape
        tokens = layer_norm_last(to_nhwc(x)).reshape(batch, height * width, c)  # (B, HW, C)
        kv = torch.cat([tokens, self.kv_mapper(cond).to(tokens.dtype)], dim=1)  # (B, HW + S, C)
        out = self.attention(tokens, kv).view(batch, height, width, c)
        return x + to_nchw(out)


def timestep_embedding(r: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of the continuous diffusion time r in [0, 1]: (B,) -> (B, dim)."""
    half = dim // 2
    r = r * max_positions
    freqs = torch.exp(torch.arange(half, device=r.device).float() * (-math.log(max_positions) / (half - 1)))
    emb = r[:, None] * freqs[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb.to(r.dtype)


def xavier_init_(module: nn.Module) -> None:
    """The original code's general init: Xavier-uniform conv/linear weights, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def run_block(block: Callable[..., torch.Tensor], *args: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """Call `block`, recomputing its activations in backward when `checkpointing` (saves memory)."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)
