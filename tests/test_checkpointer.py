"""The training loop's checkpointer under Ray Train, on two gloo workers: a preemption's checkpoint
asked for while the one before it is still being written in the background."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import ray.cloudpickle
import ray.train
import ray.train.torch
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn

from cluster.budget import BudgetMeter
from pipelines.training.checkpoint import Checkpointer, TrainingState
from pipelines.training.config import TrainConfig
from pipelines.training.step import build_optimizer, build_schedule

# Ray's workers cannot import a test module: its loop functions travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

WIDTH = 1024  # 4 MiB of weights, 16 MiB with the EMA and AdamW's moments: a write outlasts the next call


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(WIDTH, WIDTH)


def _step(model: nn.Module, optimizer, schedule) -> None:
    model(torch.ones(4, WIDTH)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    schedule.step()


def _training() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, Checkpointer]:
    """A worker's model (under DDP), AdamW, schedule and checkpointer, as the training loop builds them."""
    train = TrainConfig(steps=2, global_batch_size=2, workers=2, gpus_per_worker=0, warmup_steps=0)
    device = torch.device("cpu")
    model = ray.train.torch.prepare_model(_model())
    optimizer = build_optimizer(model, train, device)
    schedule = build_schedule(optimizer, train)
    return (
        model,
        optimizer,
        schedule,
        Checkpointer(model, optimizer, [p.detach().clone() for p in model.parameters()], device),
    )


def _write_two(config: dict) -> None:
    """Step, checkpoint in the background, step, and checkpoint durably while the first is pending."""
    model, optimizer, schedule, checkpoints = _training()
    assert checkpoints.restore_latest(schedule).candidates == 0
    meter = BudgetMeter(units_held=2, budget=None)
    _step(model, optimizer, schedule)
    checkpoints.save(TrainingState(step=1), meter)
    _step(model, optimizer, schedule)
    pending = not checkpoints._write.recorded.done()
    checkpoints.save(TrainingState(step=2), meter, durable=True)
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["pending"]).write_text(json.dumps(pending))
        torch.save(
            {
                "model": {k: v.clone() for k, v in model.module.state_dict().items()},
                "optimizer": optimizer.state_dict(),
            },
            config["expected"],
        )


def _restore(config: dict) -> None:
    model, optimizer, schedule, checkpoints = _training()
    resumed = checkpoints.restore_latest(schedule)
    assert resumed.state.step == 2, resumed
    expected = torch.load(config["expected"])
    for name, value in model.module.state_dict().items():
        assert torch.equal(value, expected["model"][name]), name
    moments = [state["exp_avg_sq"] for state in optimizer.state_dict()["state"].values()]
    expected_moments = [state["exp_avg_sq"] for state in expected["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(moments, expected_moments, strict=True))


def _trainer(loop, config: dict, storage: Path) -> TorchTrainer:
    return TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="checkpointer", storage_path=str(storage)),
    )


@pytest.mark.slow
def test_a_durable_checkpoint_asked_for_during_a_background_write_reports_both_in_order(local_ray, tmp_path):
    config = {"pending": str(tmp_path / "pending.json"), "expected": str(tmp_path / "expected.pt")}
    _trainer(_write_two, config, tmp_path / "ray").fit()
    assert json.loads((tmp_path / "pending.json").read_text()), "the first write ended before the second call"
    (snapshot,) = (tmp_path / "ray").glob("*/checkpoint_manager_snapshot.json")
    reported = json.loads(snapshot.read_text())["checkpoint_results"]
    # The pending one first (Ray Train registers checkpoints in the order they are reported), both
    # before the durable save returned.
    assert [(r["metrics"]["step"], r["metrics"]["reported_at_step"]) for r in reported] == [(1, 2), (2, 2)]
    # A run of the same name resumes from the durable one: its weights and AdamW's moments as written.
    _trainer(_restore, config, tmp_path / "ray").fit()
