"""bench/peak_memory.py: the live-storage count it predicts GPU peaks from, on fake and real tensors."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bench.peak_memory import CUDA_BLOCK_BYTES, LiveStorages, predict, train_steps
from stages.diffusion import CosineDiffusion, DiffusionConfig
from stages.stage_c import STAGE_C_CONFIGS, StageC


def test_live_storages_count_each_storage_once_rounded_as_cuda_allocates_until_it_is_freed() -> None:
    tracker = LiveStorages()
    with tracker:
        a = torch.empty(1000)  # 4,000 bytes: one 4,096-byte block
        view = a.view(10, 100)
        view.add_(1)  # in place: nothing new
        b = a * 2
        assert tracker.current == 2 * 4096
        del a
        assert tracker.current == 2 * 4096  # the view keeps the storage alive
        del view
        assert tracker.current == 4096
        c = torch.empty(1)  # 4 bytes take the allocator's smallest block
        assert tracker.current == 4096 + CUDA_BLOCK_BYTES
        del b, c
    assert tracker.current == 0
    assert tracker.peak == 2 * 4096  # a and b, before the view let a's storage go


def test_flops_count_a_depthwise_convolution_s_gradients_as_two_of_its_forward() -> None:
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, groups=64)
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    tracker = LiveStorages()
    with tracker:
        tracker.phase = "forward"
        y = conv(x)
        tracker.phase = "backward"
        y.sum().backward()
    forward = 2 * (2 * 64 * 8 * 8) * 9  # a multiply and an add per output element and tap
    # torch's own formula counts the weight gradient as an ungrouped convolution: 64x too much here.
    assert tracker.flops == {"forward": forward, "backward": 2 * forward}


def tiny_step_peak(fake: bool, checkpointing: bool) -> LiveStorages:
    """Two train steps of a tiny Stage C with dropout, on real or fake tensors."""
    tracker = LiveStorages()
    with FakeTensorMode() if fake else contextlib.nullcontext(), tracker:
        torch.manual_seed(0)
        config = dataclasses.replace(STAGE_C_CONFIGS["tiny"](), dropout=0.1, checkpointing=checkpointing)
        model = tracker.model = StageC(config).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        generator = torch.Generator().manual_seed(1)
        x0 = torch.randn(8, config.c_in, 6, 6, generator=generator)
        cond = {"c": torch.randn(8, 77, config.c_cond, generator=generator)}
        train_steps(model, optimizer, CosineDiffusion(DiffusionConfig()), x0, cond, tracker)
    return tracker


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fake_tensors_hold_what_real_ones_hold_at_the_peak(checkpointing: bool) -> None:
    real = tiny_step_peak(fake=False, checkpointing=checkpointing)
    fake = tiny_step_peak(fake=True, checkpointing=checkpointing)
    assert real.peak > 0
    assert fake.peak == real.peak
    assert (fake.peak_phase, fake.peak_gradients) == (real.peak_phase, real.peak_gradients)


def test_checkpointing_lowers_the_predicted_peak_of_the_reduced_stage_b() -> None:
    eager = predict("b", "ours", frozenset(), "reduced", 16)
    checkpointed = predict("b", "ours", frozenset({"checkpointing"}), "reduced", 16)
    # Both share the weights and AdamW state; checkpointing keeps well under half of the rest (~0.4x).
    assert checkpointed["static"] == eager["static"]
    assert checkpointed["peak"] - checkpointed["static"] < 0.5 * (eager["peak"] - eager["static"])
    reference = predict("b", "reference", frozenset(), "reduced", 16)
    assert reference["static"] == eager["static"]
    assert eager["peak"] < reference["peak"]
    # The same math: the same FLOPs, a backward of about twice the forward's; checkpointing adds at most
    # one more forward (the embedding and the head are not recomputed).
    flops = ("forward_flops", "backward_flops")
    assert [reference[key] for key in flops] == [eager[key] for key in flops]
    assert 1.9 < eager["backward_flops"] / eager["forward_flops"] < 2.1
    assert checkpointed["forward_flops"] == eager["forward_flops"]
    recomputed = checkpointed["backward_flops"] - eager["backward_flops"]
    assert 0.5 * eager["forward_flops"] < recomputed <= eager["forward_flops"]


@pytest.mark.parametrize("stage", ["b", "c"])
def test_predict_counts_the_static_part_of_the_step(stage: str) -> None:
    res = predict(stage, "ours", frozenset(), "reduced", 2)
    # fp32 weights and AdamW's two moments: 12 bytes per parameter (gradients come and go).
    assert res["static"] == pytest.approx(12 * res["params_m"] * 1e6, rel=1e-6)
    assert res["peak"] > res["static"]
