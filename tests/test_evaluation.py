"""The held-out loss: a property of the weights alone, the training objective at fixed times."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines import schema
from pipelines.trainable import REGISTRY
from pipelines.trainable.base import TaskSpec
from pipelines.training.evaluation import VALIDATION_TIMES, validation_metrics, validation_noise, validation_times
from stages.text import TEXT_CONFIGS


def _task(stage_name: str, rows: int, seed: int = 0):
    """A tiny stage's model and task whose spec holds ``rows`` random validation rows in two groups."""
    rng = np.random.default_rng(seed)
    text = TEXT_CONFIGS["tiny"]()
    spec = TaskSpec(
        stage=stage_name,
        models="tiny",
        caption_dropout=0.5,
        semantic_dropout=0.5,
        semantic_noise=0.3,
        text_from_tokens=False,
    )
    stage = REGISTRY[stage_name]
    group = {
        schema.STAGE_C_LATENT: rng.standard_normal((rows, 16, 4, 4)).astype(np.float32),
        schema.TEXT_STAGE_C: rng.standard_normal((rows, 77, text.stage_c.hidden_size)).astype(np.float32),
        schema.STAGE_B_LATENT: rng.standard_normal((rows, 4, 16, 16)).astype(np.float32),
        schema.TEXT_STAGE_B: rng.standard_normal((rows, 77, text.stage_b.hidden_size)).astype(np.float32),
    }
    columns = stage.columns(spec)
    halves = (
        {name: group[name][: rows // 2] for name in columns},
        {name: group[name][rows // 2 :] for name in columns},
    )
    empty = {stage.text_column: np.zeros((1, *group[stage.text_column].shape[1:]), np.float32)}
    spec = TaskSpec(**{**spec.__dict__, "validation_batches": halves, "empty_caption": empty})
    torch.manual_seed(0)
    return stage, stage.build_model(spec), stage.task(spec, torch.device("cpu"))


@pytest.mark.parametrize("stage_name", ["stage_c", "stage_b"])
def test_the_same_weights_give_the_same_validation_loss_at_any_batch_size(stage_name):
    stage, model, task = _task(stage_name, rows=6)
    first = validation_metrics(stage, task, model, batch_size=3)
    again = validation_metrics(stage, task, model, batch_size=3)
    other_batching = validation_metrics(stage, task, model, batch_size=2)
    assert first == again
    assert other_batching == pytest.approx(first, rel=1e-5)
    times = validation_times(task.diffusion.config.t_min)
    assert set(first) == {"val/loss", *(f"val/loss_r{r:.3f}" for r in times)}
    assert first["val/loss"] == pytest.approx(np.mean([first[f"val/loss_r{r:.3f}"] for r in times]))
    assert model.training, "evaluation left the model in eval mode"

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    assert validation_metrics(stage, task, model, batch_size=3)["val/loss"] != first["val/loss"]


def test_a_validation_loss_is_the_training_objective_at_that_time_without_dropout():
    stage, model, task = _task("stage_c", rows=4)
    group = task.spec.validation_batches[0]
    batch = {name: torch.as_tensor(values) for name, values in group.items()}
    r = validation_times(task.diffusion.config.t_min)[3]
    noise = torch.stack([validation_noise(batch[schema.STAGE_C_LATENT].shape[1:], row, 3) for row in range(2)])
    times = torch.full((2,), r)
    model.eval()
    with torch.no_grad():
        noised = task.diffusion.add_noise(batch[schema.STAGE_C_LATENT], noise, times)
        predicted = model(noised, times, batch[schema.TEXT_STAGE_C])
        by_hand = (predicted - noise).square().flatten(1).mean(1) * task.diffusion.p2_weight(times)
        assert torch.allclose(task.validation_losses(model, batch, noise, r), by_hand)


def test_times_are_evenly_spaced_over_the_training_range_and_noise_is_fixed_per_row_and_time():
    times = validation_times(0.0001)
    assert len(times) == VALIDATION_TIMES
    assert np.allclose(np.diff(times), (1 - 0.0001) / VALIDATION_TIMES)
    assert 0.0001 < times[0] and times[-1] < 1
    assert torch.equal(validation_noise(torch.Size([2, 3]), 5, 1), validation_noise(torch.Size([2, 3]), 5, 1))
    assert not torch.equal(validation_noise(torch.Size([2, 3]), 5, 1), validation_noise(torch.Size([2, 3]), 5, 2))
    assert not torch.equal(validation_noise(torch.Size([2, 3]), 5, 1), validation_noise(torch.Size([2, 3]), 6, 1))
