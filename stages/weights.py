"""Loading and saving stage weights from local files.

`load_weights(model, path)` reads safetensors, or PyTorch pickles (`.pt`, `.pth`, `.bin`, `.ckpt`)
through `torch.load(weights_only=True)`, which refuses to run code from an untrusted file, and
loads them with strict=True. The official v2 checkpoints in the diffusers layout load as they are:

    stage_c = StageC(STAGE_C_CONFIGS["v2"]())
    load_weights(stage_c, "wuerstchen-prior/prior/diffusion_pytorch_model.safetensors")

A pickle that holds several entries (the research code's `{"state_dict": ..., "ema_state_dict": ...,
"effnet_state_dict": ..., "optimizer_state_dict": ...}`) is read with `key=` naming the state dict to
load. The research code's Stage B and Stage C attention is `nn.MultiheadAttention` (packed
`attn.in_proj_*`, `attn.out_proj.*`); `load_weights` converts it to the diffusers layout our models
use (`research_to_diffusers_attention`), so those checkpoints load too:

    load_weights(StageC(STAGE_C_CONFIGS["v2"]()), "model_v3_stage_c.pt", key="ema_state_dict")

docs/weights.md lists each upstream file, its layout and where that layout is documented.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# The research code's attention module holds an nn.MultiheadAttention named `attn`.
_RESEARCH_ATTENTION = ".attn."


def read_state_dict(path: str | os.PathLike, *, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict (on CPU) from a safetensors or PyTorch file; `key` selects a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        if key is not None:
            raise ValueError(f"key={key!r} was given but safetensors file {path} holds a flat state dict")
        return load_file(path, device="cpu")
    if path.suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"unsupported weights file {path}: use .safetensors or one of {', '.join(PICKLE_SUFFIXES)}")
    try:
        # Mapped, not read: a research checkpoint holds gigabytes of Stage B and optimizer state beside
        # the entry loaded from it. Only the zip format (torch.save's since PyTorch 1.6) can be mapped.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path} holds more than tensors and plain containers; refusing to unpickle it") from error
    if key is not None:
        if not isinstance(state, Mapping) or key not in state:
            found = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"{path} has no entry {key!r}; found {found}")
        state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors; pass key= to select one")
    return dict(state)


def research_to_diffusers_attention(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The research code's attention parameters renamed to the diffusers layout, the rest unchanged.

    `nn.MultiheadAttention` packs the q, k and v projections into one `in_proj_weight` (3C, C) and
    `in_proj_bias` (3C,), in that order along the first dim; diffusers' `Attention` keeps them as
    `to_q`, `to_k`, `to_v`, and names the output projection `to_out.0` where MHA has `out_proj`.
    """
    converted = {}
    for name, tensor in state.items():
        prefix, found, leaf = name.rpartition(_RESEARCH_ATTENTION)
        if not found or leaf not in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"):
            converted[name] = tensor
        elif leaf.startswith("out_proj."):
            converted[f"{prefix}.to_out.0.{leaf.removeprefix('out_proj.')}"] = tensor
        else:
            if tensor.shape[0] % 3:
                raise ValueError(
                    f"{name} has shape {tuple(tensor.shape)}: packed q/k/v needs a first dim divisible by 3"
                )
            kind = leaf.removeprefix("in_proj_")  # weight or bias
            for projection, part in zip(("to_q", "to_k", "to_v"), tensor.chunk(3, dim=0), strict=True):
                converted[f"{prefix}.{projection}.{kind}"] = part
    return converted


def load_weights(model: nn.Module, path: str | os.PathLike, *, key: str | None = None) -> nn.Module:
    """Load `path` into `model` with strict=True (every name and shape must match); returns `model`.
    Research-layout attention (`attn.in_proj_weight`, ...) is converted to the diffusers layout first."""
    state = research_to_diffusers_attention(read_state_dict(path, key=key))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"weights in {path} do not fit {type(model).__name__} (wrong config for this checkpoint?): {error}"
        ) from error
    return model


def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Write `model`'s state dict as safetensors (tensors made contiguous, moved to CPU)."""
    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    save_file(state, str(path))
