"""Model FLOP utilisation: the FLOPs of a train step (pipelines/flops.py), the GPUs' peaks
(cluster/gpus.py), and what the training loop logs from them."""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import pytest
import torch
from torch import nn

from cluster.budget import BudgetMeter
from cluster.gpus import peak_flops
from pipelines import schema
from pipelines.flops import train_step_flops
from pipelines.trainable import build_task
from pipelines.trainable.base import TaskSpec
from pipelines.trainable.stage_c import STAGE_C
from pipelines.training.checkpoint import TrainingState
from pipelines.training.config import TrainConfig
from pipelines.training.progress import PeakFlops, ProgressWindow, flops_per_sample, log_progress, run_peak_flops
from stages.stage_c import STAGE_C_CONFIGS


def test_a_step_counts_the_forward_and_the_gradients_the_backward_takes() -> None:
    def build() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 6, 1), nn.Flatten(), nn.Linear(6 * 8 * 8, 10)
        )

    x = torch.randn(2, 4, 8, 8)
    # A multiply and an add per output element and input it reads.
    depthwise = 2 * (2 * 4 * 8 * 8) * 9
    pointwise = 2 * (2 * 6 * 8 * 8) * 4
    linear = 2 * 2 * (6 * 8 * 8) * 10
    # The input takes no gradient, so the first convolution's backward is its weight gradient alone (not
    # counted as an ungrouped convolution's, 4x this); the others take input and weight gradients.
    expected = depthwise + pointwise + linear + depthwise + 2 * (pointwise + linear)
    assert train_step_flops(build, lambda model: model(x).sum()) == expected


def test_the_loop_s_count_leaves_the_generators_alone_and_leaves_out_recomputation() -> None:
    config = STAGE_C_CONFIGS["tiny"]()
    spec = TaskSpec(
        stage="stage_c",
        models="tiny",
        caption_dropout=0.5,
        semantic_dropout=0,
        semantic_noise=0,
        text_from_tokens=False,
        empty_caption={schema.TEXT_STAGE_C: np.zeros((1, 77, config.c_cond), np.float32)},
    )
    generator = torch.Generator().manual_seed(0)
    batch = {
        schema.STAGE_C_LATENT: torch.randn(4, config.c_in, 4, 4, generator=generator),
        schema.TEXT_STAGE_C: torch.randn(4, 77, config.c_cond, generator=generator),
    }
    torch.manual_seed(1)
    state = torch.get_rng_state()
    flops = flops_per_sample(STAGE_C, build_task(spec, torch.device("cpu")), batch, per_worker=4, step=0)
    assert torch.equal(torch.get_rng_state(), state)  # model initialisation and dropout drew nothing
    checkpointed = build_task(dataclasses.replace(spec, activation_checkpointing=True), torch.device("cpu"))
    assert flops_per_sample(STAGE_C, checkpointed, batch, per_worker=4, step=0) == flops
    assert flops > 0


@pytest.mark.parametrize(
    "name, flops",
    [
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA H100 80GB HBM3", 989.5e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989.5e12),
        ("NVIDIA GeForce RTX 4090", None),
        ("NVIDIA A10", None),
    ],
)
def test_peak_flops_by_device_name_and_none_for_an_unknown_device(name: str, flops: float | None) -> None:
    assert peak_flops(name) == flops


class _Recorded:
    """The one call of a TrackedRun that log_progress makes."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.metrics.update(metrics)


@pytest.mark.parametrize("peak", [PeakFlops(16e9, "a test's"), None])
def test_progress_logs_mfu_only_against_a_known_peak(peak: PeakFlops | None, caplog) -> None:
    config = TrainConfig(steps=10, global_batch_size=4)
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))])
    window = ProgressWindow()
    for flops in (0.5e9, 1.5e9):  # two buckets' batches: 1e9 per sample on average
        window.add(loss=1.0, grad_norm=1.0, wait=0.0, total=0.5, flops_per_sample=flops)
    run = _Recorded()
    caplog.set_level(logging.INFO, logger="pipelines.train")
    log_progress(
        run,
        TrainingState(step=2),
        window,
        BudgetMeter(units_held=1, budget=None),
        config,
        optimizer,
        torch.device("cpu"),
        peak,
    )
    assert run.metrics["flops_per_sample"] == 1e9
    if peak is None:
        assert "mfu" not in run.metrics
        assert "MFU" not in caplog.text
    else:
        assert run.metrics["mfu"] == pytest.approx(0.5)  # 1e9 FLOPs x 8 samples/s of 16e9 FLOP/s
        assert "8.0 samples/s  MFU 50%  data wait" in caplog.text


def test_a_cpu_run_s_peak_is_its_measured_matrix_product_rate_times_its_workers() -> None:
    config = TrainConfig(steps=1, global_batch_size=4, workers=2, gpus_per_worker=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        peak = run_peak_flops(torch.device("cpu"), config)
        a, b = torch.randn(512, 512), torch.randn(512, 512)
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        one_thread = 4 * 2 * 512**3 / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    # Two workers of one thread each, each at about this thread's rate (a busy machine slows either
    # measurement, so the bounds are wide).
    assert one_thread / 10 < peak.flops / 2 < one_thread * 10, (peak, one_thread)
    assert "on 1 thread(s), times 2 worker(s)" in peak.basis


def test_progress_eta_goes_by_the_typical_step_not_the_run_s_slow_start(caplog) -> None:
    config = TrainConfig(steps=10, global_batch_size=4)
    window = ProgressWindow()
    for total in (30.0, 0.5, 0.5, 0.5):  # the first step also waited for the data pipeline's first blocks
        window.add(loss=1.0, grad_norm=1.0, wait=0.0, total=total, flops_per_sample=None)
    run = _Recorded()
    caplog.set_level(logging.INFO, logger="pipelines.train")
    log_progress(
        run,
        TrainingState(step=4),
        window,
        BudgetMeter(units_held=1, budget=None),
        config,
        torch.optim.AdamW([nn.Parameter(torch.zeros(1))]),
        torch.device("cpu"),
        None,
    )
    assert run.metrics["eta_seconds"] == 6 * 0.5
    assert run.metrics["step_seconds"] == pytest.approx(31.5 / 4)  # samples/s stay the window's own
    assert "median_step_seconds" not in run.metrics
    assert "ETA 0.1 min" in caplog.text
