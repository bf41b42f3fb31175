"""The registry of trainable stages: each stage says what training needs in one place, and the loop
trains any registered stage without naming it (a toy stage that exists only here, 2 CPU workers)."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from PIL import Image
from torch import nn

from pipelines.config import RunConfig, load_config
from pipelines.phases import PHASES
from pipelines.tracking import Tracker, TrackingConfig
from pipelines.train import WorkerArgs, exported_state, trainer, worker_torch_settings
from pipelines.trainable import REGISTRY, stage_of_phase, training_phases
from pipelines.trainable.base import Parallelism, Task, TaskSpec, TrainableStage
from pipelines.training.checkpoint import read_checkpoint_weights
from pipelines.training.config import TrainConfig
from pipelines.training.data import TRAIN_DATASET, TrainingRows, count_rows
from pipelines.training.parallel import compile_blocks

TOY_X, TOY_Y = "toy_x", "toy_y"


class ToyRegression(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(x)))


class ToyTask(Task):
    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator, step: int
    ) -> torch.Tensor:
        return F.mse_loss(model(batch[TOY_X].float())[:, 0], batch[TOY_Y].float())

    def sample_grid(self, model: nn.Module, step: int) -> Image.Image:
        return Image.new("RGB", (4, 4))


TOY = TrainableStage(
    name="toy",
    phase="train_toy",
    config_section="train_toy",
    source_phase="pre_encode",
    columns=lambda spec: [TOY_X, TOY_Y],
    build_model=lambda spec: ToyRegression(),
    task=ToyTask,
    export=lambda model: model.head,
    parallelism=Parallelism(sharded_blocks=(nn.Linear,)),
)


def test_every_registered_stage_is_a_phase_with_settings_and_partners_that_exist():
    config = load_config("tiny")
    assert list(REGISTRY) == ["stage_a", "semantic", "stage_b", "stage_c"]
    for name, stage in REGISTRY.items():
        assert stage.name == name and stage_of_phase(stage.phase) is stage
        assert stage.phase in PHASES, stage.phase
        assert isinstance(getattr(config, stage.config_section), TrainConfig), stage.config_section
        assert set(stage.sample_partners) <= set(REGISTRY), stage.sample_partners
        assert stage.source_phase in PHASES and list(PHASES).index(stage.source_phase) < list(PHASES).index(stage.phase)
        spec = TaskSpec(
            stage=name,
            models="tiny",
            caption_dropout=0.0,
            semantic_dropout=0.0,
            semantic_noise=0.0,
            text_from_tokens=True,
        )
        model = stage.build_model(spec)
        # The blocks the loop shards and compiles one by one are the ones the model has.
        compiled = {type(m) for m in model.modules() if isinstance(m, stage.parallelism.compiled_blocks)}
        assert compiled == set(stage.parallelism.compiled_blocks), (name, compiled)
        assert set(stage.parallelism.sharded_blocks) <= compiled
    assert not hasattr(RunConfig, TOY.config_section)


@pytest.mark.slow
def test_a_registered_stage_trains_through_the_real_loop(tmp_path, local_ray, monkeypatch):
    monkeypatch.setitem(REGISTRY, TOY.name, TOY)
    assert training_phases()[TOY.phase] is TOY
    # The toy exists only in this module, which the Ray workers cannot import: it travels by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        generator = np.random.default_rng(0)
        x = generator.normal(size=(64, 4)).astype(np.float32)
        y = (x @ np.array([1.0, -2.0, 0.5, 0.0], np.float32)).astype(np.float32)
        pq.write_table(
            pa.table({TOY_X: pa.FixedShapeTensorArray.from_numpy_ndarray(x), TOY_Y: y}), tmp_path / "toy.parquet"
        )
        (data,) = count_rows(
            {TRAIN_DATASET: TrainingRows(files=(str(tmp_path / "toy.parquet"),), columns=(TOY_X, TOY_Y))}
        ).values()
        config = TrainConfig(
            steps=12,
            global_batch_size=16,
            lr=0.03,
            warmup_steps=0,
            ema_beta=0.0,
            ema_every=1,
            ema_start=0,
            workers=2,
            gpus_per_worker=0,
            cpus_per_worker=0.5,
            checkpoint_every=5,
            sample_every=0,
            log_every_seconds=0,
        )
        spec = TaskSpec(
            stage=TOY.name,
            models="tiny",
            caption_dropout=0.0,
            semantic_dropout=0.0,
            semantic_noise=0.0,
            text_from_tokens=False,
        )
        tracker = Tracker(TrackingConfig(), str(tmp_path))
        with tracker.run(TOY.phase) as run:
            args = WorkerArgs(
                train=config,
                stage=TOY,
                task=spec,
                budget=None,
                used_before=0.0,
                tracking_uri=tracker.uri,
                run_id=run.run_id,
                data={TRAIN_DATASET: dataclasses.replace(data, batches=64 // config.global_batch_size)},
            )
            result = trainer(
                name="toy",
                args=args,
                storage_path=str(tmp_path / "ray"),
                storage_filesystem=None,
            ).fit()
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ema, state = read_checkpoint_weights(result.checkpoint)
    assert state.step == 12 and state.samples_seen == 12 * 16, state
    client = MlflowClient(tracker.uri)
    losses = [m.value for m in sorted(client.get_metric_history(run.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) == 12 and losses[-1] < 0.5 * losses[0], losses
    assert state.last_loss == pytest.approx(losses[-1])
    # Checkpoints every 5 steps and at the end; the stage's grid at the end; its export is its head.
    checkpoints = [path.name for path in (tmp_path / "ray" / "toy").glob("checkpoint_*") if path.is_dir()]
    assert len(checkpoints) == 3, checkpoints
    assert "samples/step_0000012.png" in [a.path for a in client.list_artifacts(run.run_id, "samples")]
    exported = exported_state(TOY, spec, ema)
    assert set(exported) == {"weight", "bias"} and exported["weight"].shape == (1, 8)


def test_the_torch_settings_of_a_worker_and_of_its_compiled_model_are_put_back():
    threads = torch.get_num_threads()
    limit, budget = torch._dynamo.config.recompile_limit, torch._functorch.config.activation_memory_budget
    config = TrainConfig(
        steps=1, global_batch_size=1, cpus_per_worker=threads + 1, compile=True, activation_memory_budget=(0.5,)
    )
    with worker_torch_settings(config, torch.device("cpu")):
        compile_blocks(ToyRegression(), TOY.parallelism, (0.5,))  # compiled whole: the toy has no compiled blocks
        compile_blocks(
            REGISTRY["stage_c"].build_model(
                TaskSpec(
                    stage="stage_c",
                    models="tiny",
                    caption_dropout=0.0,
                    semantic_dropout=0.0,
                    semantic_noise=0.0,
                    text_from_tokens=True,
                )
            ),
            REGISTRY["stage_c"].parallelism,
        )
        assert torch.get_num_threads() == threads + 1
        assert torch._functorch.config.activation_memory_budget == 0.5
        assert torch._dynamo.config.recompile_limit == max(limit, 256)
    assert torch.get_num_threads() == threads
    assert (torch._dynamo.config.recompile_limit, torch._functorch.config.activation_memory_budget) == (limit, budget)
