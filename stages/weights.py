"""Loading and saving stage weights from local files.

`load_weights(model, path)` reads safetensors, or PyTorch pickles (`.pt`, `.pth`, `.bin`, `.ckpt`)
through `torch.load(weights_only=True)`, which refuses to run code from an untrusted file, and
loads them with strict=True. The official v2 checkpoints in the diffusers layout load as they are:

    stage_c = StageC(STAGE_C_CONFIGS["v2"]())
    load_weights(stage_c, "wuerstchen-prior/prior/diffusion_pytorch_model.safetensors")

A checkpoint that wraps its weights in a dict (e.g. the research code's
`{"state_dict": ..., "ema_state_dict": ...}`) is read with `key="ema_state_dict"`.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


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
        state = torch.load(path, map_location="cpu", weights_only=True)
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


def load_weights(model: nn.Module, path: str | os.PathLike, *, key: str | None = None) -> nn.Module:
    """Load `path` into `model` with strict=True (every name and shape must match); returns `model`."""
    state = read_state_dict(path, key=key)
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
