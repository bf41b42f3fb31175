"""Weight loading: safetensors and safe pickles, strict names and shapes, clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from stage_oracle import reference_stage_c

from stages.stage_c import StageC, StageCConfig
from stages.weights import load_weights, read_state_dict, save_weights

CONFIG = StageCConfig(c_in=16, c=32, c_cond=24, depth=1, nhead=4)


class Payload:
    """An arbitrary object: unpickling it could run code, so the loader must refuse it."""


def test_official_layout_safetensors_load_strictly(tmp_path) -> None:
    torch.manual_seed(0)
    reference = reference_stage_c(CONFIG)  # the diffusers module the official checkpoints come from
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(reference.state_dict(), str(path))
    model = load_weights(StageC(CONFIG), path)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_save_then_load_round_trips(tmp_path) -> None:
    torch.manual_seed(0)
    source = StageC(CONFIG)
    save_weights(source, tmp_path / "stage_c.safetensors")
    loaded = load_weights(StageC(CONFIG), tmp_path / "stage_c.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))


def test_pickled_checkpoints_load_with_an_optional_key(tmp_path) -> None:
    torch.manual_seed(0)
    source = StageC(CONFIG)
    torch.save(source.state_dict(), tmp_path / "flat.pt")
    torch.save({"state_dict": {}, "ema_state_dict": source.state_dict(), "iter": 5}, tmp_path / "wrapped.bin")
    load_weights(StageC(CONFIG), tmp_path / "flat.pt")
    loaded = load_weights(StageC(CONFIG), tmp_path / "wrapped.bin", key="ema_state_dict")
    assert torch.equal(loaded.projection.weight, source.projection.weight)
    with pytest.raises(ValueError, match="pass key="):
        read_state_dict(tmp_path / "wrapped.bin")
    with pytest.raises(ValueError, match="no entry 'model'"):
        read_state_dict(tmp_path / "wrapped.bin", key="model")


def test_refuses_to_unpickle_arbitrary_objects(tmp_path) -> None:
    torch.save({"weight": torch.zeros(1), "payload": Payload()}, tmp_path / "unsafe.pt")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        read_state_dict(tmp_path / "unsafe.pt")


def test_errors_name_the_file_and_the_problem(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        read_state_dict(tmp_path / "missing.safetensors")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported weights file"):
        read_state_dict(tmp_path / "weights.npz")
    torch.manual_seed(0)
    save_weights(StageC(CONFIG), tmp_path / "small.safetensors")
    wider = StageCConfig(c_in=16, c=64, c_cond=24, depth=1, nhead=4)
    with pytest.raises(ValueError, match="small.safetensors do not fit StageC"):
        load_weights(StageC(wider), tmp_path / "small.safetensors")
