"""Weight loading: safetensors and safe pickles, strict names and shapes, the research code's attention
layout converted, clear errors."""

from __future__ import annotations

import pytest
import torch
from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_common import AttnBlock as ReferenceAttnBlock
from safetensors.torch import save_file
from torch import nn

from bench.stage_oracle import perturb_, reference_like, reference_stage_b, reference_stage_c
from pipelines import trained_weights
from stages.stage_b import StageB, StageBConfig
from stages.stage_c import StageC, StageCConfig
from stages.weights import load_weights, read_state_dict, research_to_diffusers_attention, save_weights

CONFIG = StageCConfig(c_in=16, c=32, c_cond=24, depth=1, nhead=4)
STAGE_B = StageBConfig(
    c_cond=24,
    c_hidden=(8, 16),
    nhead=(-1, 2),
    blocks=(1, 1),
    level_config=("CT", "CTA"),
    inject_effnet=(False, True),
    clip_embd=20,
)


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


class ResearchAttention2D(nn.Module):
    """The research code's attention (dome272/Wuerstchen `modules.py`, `Attention2D`): an
    nn.MultiheadAttention named `attn` over the flattened pixels. The diffusers `AttnBlock` calling it
    has already put the pixels in front of the conditioning keys, as the research block does."""

    def __init__(self, c: int, nhead: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(c, nhead, bias=True, batch_first=True)

    def forward(self, x: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        out = self.attn(tokens, encoder_hidden_states, encoder_hidden_states, need_weights=False)[0]
        return out.transpose(1, 2).reshape(x.shape)


def research_model(reference: nn.Module) -> nn.Module:
    """The diffusers reference with the research code's attention: the research Prior / DiffNeXt, whose
    other parameter names are diffusers' own (diffusers' `scripts/convert_wuerstchen.py` renames only these)."""
    for block in reference.modules():
        if isinstance(block, ReferenceAttnBlock):
            block.attention = ResearchAttention2D(block.attention.to_q.in_features, block.attention.heads)
    return perturb_(reference, std=0.05).eval()


def _research_checkpoint(path, model: nn.Module) -> None:
    """The research training scripts' checkpoint: several entries, the EMA weights among them."""
    torch.save(
        {
            "state_dict": model.state_dict(),
            "ema_state_dict": model.state_dict(),
            "iter": 5,
            "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95)}]},
            "wandb_run_id": "run",
        },
        path,
    )


@torch.no_grad()
def test_research_stage_c_checkpoint_converts_and_computes_the_same(tmp_path) -> None:
    torch.manual_seed(0)
    research = research_model(reference_stage_c(CONFIG))
    names = set(research.state_dict())
    assert {"blocks.2.attention.attn.in_proj_weight", "blocks.2.attention.attn.out_proj.bias"} <= names
    assert not any(".to_q." in name for name in names)
    _research_checkpoint(tmp_path / "model_v3_stage_c.pt", research)
    ours = load_weights(StageC(CONFIG), tmp_path / "model_v3_stage_c.pt", key="ema_state_dict").eval()
    x, r, c = torch.randn(2, 16, 4, 6), torch.rand(2), torch.randn(2, 7, 24)
    expected = research(x, r, c)
    torch.testing.assert_close(ours(x, r, c), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(reference_like(ours)(x, r, c), expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_research_stage_b_checkpoint_converts_and_computes_the_same(tmp_path) -> None:
    torch.manual_seed(0)
    research = research_model(reference_stage_b(STAGE_B))
    assert any(name.endswith(".attention.attn.in_proj_bias") for name in research.state_dict())
    _research_checkpoint(tmp_path / "model_v2_stage_b.pt", research)
    ours = load_weights(StageB(STAGE_B), tmp_path / "model_v2_stage_b.pt", key="state_dict").eval()
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(2, 4, 16, 16, generator=g), torch.rand(2, generator=g)
    effnet, clip = torch.randn(2, 16, 3, 3, generator=g), torch.randn(2, 77, 20, generator=g)
    expected = research(x, r, effnet, clip)
    torch.testing.assert_close(ours(x, r, effnet, clip), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(reference_like(ours)(x, r, effnet, clip), expected, rtol=1e-4, atol=1e-5)


def test_packed_projections_that_cannot_split_are_refused() -> None:
    with pytest.raises(ValueError, match="blocks.0.attention.attn.in_proj_bias has shape \\(10,\\)"):
        research_to_diffusers_attention({"blocks.0.attention.attn.in_proj_bias": torch.zeros(10)})
    other = {"blocks.0.attention.to_q.weight": torch.zeros(2, 2), "attn.bias_k": torch.zeros(1)}
    assert research_to_diffusers_attention(other) == other  # only the research names change


def test_config_weights_name_an_entry_after_a_hash(tmp_path) -> None:
    torch.manual_seed(0)
    source = StageC(CONFIG)
    torch.save({"ema_state_dict": source.state_dict(), "iter": 1}, tmp_path / "model.pt")
    loaded = trained_weights.load(StageC(CONFIG), f"{tmp_path}/model.pt#ema_state_dict")
    assert torch.equal(loaded.projection.weight, source.projection.weight)
    assert trained_weights.split_entry("s3://b/w.safetensors") == ("s3://b/w.safetensors", None)
    assert trained_weights.fingerprint_of(f"{tmp_path}/model.pt#ema_state_dict", None) is None  # not a phase's file
    with pytest.raises(ValueError, match="after '#' give the name of a state dict"):
        trained_weights.split_entry(f"{tmp_path}/model.pt#")
    with pytest.raises(ValueError, match="no entry 'ema'"):
        trained_weights.load(StageC(CONFIG), f"{tmp_path}/model.pt#ema")
