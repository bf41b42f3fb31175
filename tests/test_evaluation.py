"""The held-out loss: a property of the weights alone; for the diffusion stages the training objective
at fixed times, for Stage A its reconstruction terms, for the semantic compressor its probe's error."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from pipelines import schema
from pipelines.trainable import REGISTRY
from pipelines.trainable.base import StageALosses, TaskSpec
from pipelines.trainable.text_conditioned import VALIDATION_TIMES, validation_noise, validation_times
from pipelines.training.evaluation import validation_metrics
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
    first = validation_metrics(task, model, batch_size=3)
    again = validation_metrics(task, model, batch_size=3)
    other_batching = validation_metrics(task, model, batch_size=2)
    assert first == again
    assert other_batching == pytest.approx(first, rel=1e-5)
    times = validation_times(task.diffusion.config.t_min)
    assert set(first) == {"val/loss", *(f"val/loss_r{r:.3f}" for r in times)}
    assert first["val/loss"] == pytest.approx(np.mean([first[f"val/loss_r{r:.3f}"] for r in times]))
    assert model.training, "evaluation left the model in eval mode"

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    assert validation_metrics(task, model, batch_size=3)["val/loss"] != first["val/loss"]


def test_a_validation_loss_is_the_training_objective_at_that_time_without_dropout():
    stage, model, task = _task("stage_c", rows=4)
    group = task.spec.validation_batches[1]
    batch = {name: torch.as_tensor(values) for name, values in group.items()}
    r = validation_times(task.diffusion.config.t_min)[3]
    # The second group's rows are rows 2 and 3 of the evaluation: their noise is theirs.
    noise = torch.stack([validation_noise(batch[schema.STAGE_C_LATENT].shape[1:], row, 3) for row in (2, 3)])
    times = torch.full((2,), r)
    model.eval()
    with torch.no_grad():
        noised = task.diffusion.add_noise(batch[schema.STAGE_C_LATENT], noise, times)
        predicted = model(noised, times, batch[schema.TEXT_STAGE_C])
        by_hand = (predicted - noise).square().flatten(1).mean(1) * task.diffusion.p2_weight(times)
        assert torch.allclose(task.validation_losses(model, batch, first_row=2)[f"loss_r{r:.3f}"], by_hand)


def test_times_are_evenly_spaced_over_the_training_range_and_noise_is_fixed_per_row_and_time():
    times = validation_times(0.0001)
    assert len(times) == VALIDATION_TIMES
    assert np.allclose(np.diff(times), (1 - 0.0001) / VALIDATION_TIMES)
    assert 0.0001 < times[0] and times[-1] < 1
    assert torch.equal(validation_noise(torch.Size([2, 3]), 5, 1), validation_noise(torch.Size([2, 3]), 5, 1))
    assert not torch.equal(validation_noise(torch.Size([2, 3]), 5, 1), validation_noise(torch.Size([2, 3]), 5, 2))
    assert not torch.equal(validation_noise(torch.Size([2, 3]), 5, 1), validation_noise(torch.Size([2, 3]), 6, 1))


def _image_task(stage_name: str, rows: int, losses: StageALosses):
    """A tiny image-trained stage's model and task whose spec holds ``rows`` random 64 px crops in one group."""
    crops = np.random.default_rng(0).integers(0, 256, (rows, 64, 64, 3), dtype=np.uint8)
    spec = TaskSpec(
        stage=stage_name,
        models="tiny",
        caption_dropout=0.0,
        semantic_dropout=0.0,
        semantic_noise=0.0,
        text_from_tokens=False,
        validation_batches=({schema.IMAGE: crops},),
        stage_a_losses=losses,
    )
    stage = REGISTRY[stage_name]
    torch.manual_seed(0)
    return stage.build_model(spec), stage.task(spec, torch.device("cpu"))


@pytest.mark.filterwarnings("ignore:train_a.stage_a_losses.perceptual_weights is empty")
@pytest.mark.parametrize(
    "stage_name, losses, terms",
    [
        ("stage_a", StageALosses(), {"loss", "reconstruction", "quantisation"}),
        # The critic's term is left out of the held-out loss; the perceptual one counts, at its weight.
        (
            "stage_a",
            StageALosses(perceptual_weight=0.5, adversarial_weight=0.8),
            {"loss", "reconstruction", "quantisation", "perceptual"},
        ),
        ("semantic", StageALosses(), {"loss"}),
    ],
)
def test_the_image_stages_held_out_loss_is_the_same_for_the_same_weights_at_any_batch_size(stage_name, losses, terms):
    model, task = _image_task(stage_name, rows=6, losses=losses)
    first = validation_metrics(task, model, batch_size=3)
    assert first == validation_metrics(task, model, batch_size=3)
    assert validation_metrics(task, model, batch_size=4) == pytest.approx(first, rel=1e-5)
    assert set(first) == {f"val/{term}" for term in terms}
    if terms != {"loss"}:  # Stage A: the loss is its terms' weighted sum
        weight = losses.perceptual_weight
        assert first["val/loss"] == pytest.approx(
            sum(first[f"val/{term}"] * (weight if term == "perceptual" else 1) for term in terms - {"loss"})
        )
    assert model.training, "evaluation left the model in eval mode"

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    assert validation_metrics(task, model, batch_size=3)["val/loss"] != first["val/loss"]


def test_stage_as_held_out_reconstruction_is_the_pixels_squared_error_by_hand():
    model, task = _image_task("stage_a", rows=4, losses=StageALosses())
    images = torch.as_tensor(task.spec.validation_batches[0][schema.IMAGE]).permute(0, 3, 1, 2).float() / 255
    model.eval()
    with torch.no_grad():
        reconstruction, vq_loss = model(images, quantize=False)
        expected = (reconstruction - images).square().mean().item()
    metrics = validation_metrics(task, model, batch_size=4)
    assert metrics["val/reconstruction"] == pytest.approx(expected, rel=1e-5)
    assert metrics["val/quantisation"] == pytest.approx(vq_loss.item(), rel=1e-5)


def _score_as_rank(rank: int, world: int, address: str, lockstep: bool, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=address, rank=rank, world_size=world)
    try:
        _, model, task = _task("stage_c", rows=7)
        forwards = []
        losses = task.validation_losses

        def counted(model, batch, first_row):
            forwards.append(first_row)
            return losses(model, batch, first_row)

        task.validation_losses = counted
        metrics = validation_metrics(task, model, batch_size=3, lockstep=lockstep)
        results.put((rank, metrics, forwards))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("lockstep", [False, True])
def test_ranks_share_the_held_out_rows_and_each_gets_the_single_process_figure(lockstep):
    """Seven rows in groups of 3 and 4 at batch 3: batches from rows 0, 3 and 6. Rank 0 scores the
    first and the third, rank 1 the second; in lockstep (FSDP) rank 1 runs one more, dropped."""
    _, model, task = _task("stage_c", rows=7)
    alone = validation_metrics(task, model, batch_size=3)
    context = torch.multiprocessing.get_context("spawn")
    results = context.Queue()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    workers = [context.Process(target=_score_as_rank, args=(rank, 2, address, lockstep, results)) for rank in (0, 1)]
    for worker in workers:
        worker.start()
    by_rank = {rank: (metrics, scored) for rank, metrics, scored in (results.get(timeout=120) for _ in workers)}
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert by_rank[0][1] == [0, 6]
    assert by_rank[1][1] == ([3, 0] if lockstep else [3])
    for metrics, _ in by_rank.values():
        assert metrics == pytest.approx(alone, rel=1e-12)
