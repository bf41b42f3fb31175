"""The training phases: one Ray Train run per stage, its inputs, its budget and its result.

Order in the pipeline: Stage A and the semantic compressor (only when the config trains them
from scratch: their ``pre_encode.*_weights`` setting is ``trained``), then pre-encode, then
Stage B and Stage C. Stage B goes first because it and Stage C learn independently from the
latents, and a trained Stage B lets Stage C's sample grids show images instead of latents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset
import pyarrow.fs
import pyarrow.parquet as pq
import ray.data
from ray.data.expressions import col
from safetensors.torch import load as load_safetensors

from cluster.budget import run_budget
from pipelines import decode, embed, fingerprints, pre_encode, schema, shard_phase, trained_weights
from pipelines.chain_evaluation import ChainEvaluation, held_out_captions
from pipelines.overrides import to_flat_dict
from pipelines.storage import StorageConfig, filesystem
from pipelines.tracking import ATTEMPT_GPU_HOURS, CHECKPOINTS_TAG, RUN_GPU_HOURS
from pipelines.train import WorkerArgs, exported_state, trainer
from pipelines.trainable import REGISTRY, stage_of_phase
from pipelines.trainable.base import TaskSpec, TrainableStage, decode_images
from pipelines.training.checkpoint import read_checkpoint_weights
from pipelines.training.config import TrainConfig
from pipelines.training.data import TRAIN_DATASET, TrainingRows, count_rows

TRAINED = "trained"  # a pre_encode.*_weights value: the output of this run's own training phase
_SAMPLE_ROWS = 8
_CROP_COLUMNS = [schema.CROP_WIDTH, schema.CROP_HEIGHT]  # the bucket of a row of bucketed latent shards


class BudgetStop(Exception):
    """A training run stopped at its GPU-hour budget; the pipeline ends here, cleanly."""


def training_needed(config, stage: str) -> bool:
    """A stage trains unless it is an encoder whose ``pre_encode.*_weights`` setting names weights to use
    instead of this run's own (Stage B and Stage C always train)."""
    setting = REGISTRY[stage].encoder_weights
    return not setting or getattr(config.pre_encode, setting) == TRAINED


def weights_url(context, stage: str) -> str:
    """Where a stage's weights come from: its training phase's result, or the configured path/URL."""
    if training_needed(context.config, stage):
        return f"{context.output_url(REGISTRY[stage].phase)}/{trained_weights.FINAL_FILE}"
    return getattr(context.config.pre_encode, REGISTRY[stage].encoder_weights)


def run_training(context, run, phase: str) -> str:
    """Runs (or resumes, or skips) one stage's training; returns the console summary."""
    stage = stage_of_phase(phase)
    section = stage.config_section
    config: TrainConfig = getattr(context.config, section)
    storage = context.config.storage
    if not training_needed(context.config, stage.name):
        run.set_tags({"phase.outcome": "not needed"})
        return f"not needed: pre_encode.{stage.encoder_weights} names the weights to use"
    source_phase = stage.source_phase
    source = context.finished(source_phase)
    # The decoded crops carry no split: the stages that learn from them leave its keys out themselves.
    held_out_below = context.validation_threshold() if source_phase == decode.PHASE else None
    # Workers get equal rows and drop their last partial batch: a set smaller than one global
    # batch would give epochs without a step. (The decoded crops' manifest does not count the keys
    # held out of them; a set that they leave too small stops at the loop's first epoch.)
    if source.kept - source.validation < config.global_batch_size:
        raise ValueError(
            f"{section}.global_batch_size ({config.global_batch_size}) is larger than the training "
            f"set ({source.kept - source.validation} samples kept by {source_phase}"
            f"{', the validation split left out' if source.validation else ''}): lower it or add data"
        )
    training_data = (
        source.config
        if held_out_below is None
        else fingerprints.of(input=source.config, settings={"held_out_below": held_out_below})
    )
    fingerprint = training_fingerprint(context.config, section, training_data)
    final_url = f"{context.output_url(phase)}/{trained_weights.FINAL_FILE}"
    run.log_params(to_flat_dict(config, prefix=f"{section}."))
    if fingerprints.is_complete(trained_weights.fingerprint_of(final_url, storage), fingerprint):
        run.set_tags({"phase.outcome": "skipped: output already complete"})
        return "skipped: output already complete"

    ray_url, ray_name = f"{context.output_url(phase)}/ray", _ray_run_name(phase, fingerprint)
    checkpoints = f"{ray_url}/{ray_name}"
    run_used = context.tracker.gpu_hours(checkpoints)
    budget = run_budget(
        run_budget=config.budget_gpu_hours,
        experiment_budget=context.config.tracking.experiment_budget_gpu_hours,
        experiment_used=context.tracker.gpu_hours(),
        run_used=run_used,
        setting=f"{section}.budget_gpu_hours",
    )
    datasets = _datasets(context, stage, sorted(source.shards), config, run, held_out_below=held_out_below)
    if not all(rows.batches for rows in datasets.values()):  # the crops' count above holds the held-out keys
        raise ValueError(
            f"{section}.global_batch_size ({config.global_batch_size}) is larger than the training set "
            f"({sum(rows.rows() for rows in datasets.values())} samples to train on): lower it or add data"
        )
    spec = dataclasses.replace(
        _task_spec(context, stage, config, max(datasets.values(), key=lambda rows: rows.batches)),
        validation_batches=validation_spec(context, stage).validation_batches,
        chain_evaluation=_chain_evaluation(context, stage, sorted(source.shards)),
    )
    args = WorkerArgs(
        train=config,
        stage=stage,
        task=spec,
        budget=budget.limit,
        used_before=run_used,
        tracking_uri=context.tracker.uri,
        run_id=run.run_id,
        data=datasets,
        ray_log_level=context.config.ray.log_level,
    )
    # The tag makes this phase run an attempt of the training run; the experiment counts it once.
    run.set_tags({CHECKPOINTS_TAG: checkpoints})
    run.log_params({"budget_gpu_hours": budget.limit, "units_held": config.units_held})
    storage_fs, storage_path = _ray_storage(ray_url, storage)
    result = trainer(name=ray_name, args=args, storage_path=storage_path, storage_filesystem=storage_fs).fit()
    ema, state = read_checkpoint_weights(result.checkpoint)
    # At the final step, so the charts of the figures the workers logged end there.
    run.log_metrics(
        {
            RUN_GPU_HOURS: state.gpu_hours_used,
            ATTEMPT_GPU_HOURS: state.gpu_hours_attempt,
            "final_step": state.step,
            "final_loss": state.last_loss,
            **(
                {"gpu_hours_remaining": max(budget.limit - state.gpu_hours_used, 0.0)}
                if budget.limit is not None
                else {}
            ),
        },
        step=state.step,
    )
    if state.stop_reason:
        run.set_tags({"phase.outcome": "stopped", "stop_reason": state.stop_reason})
        raise BudgetStop(
            f"{phase} stopped at step {state.step} of {config.steps}: {state.stop_reason}. The checkpoint "
            f"is kept; raise {budget.setting} and run again to continue"
        )
    data = trained_weights.write(final_url, exported_state(stage, spec, ema), fingerprint, storage)
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / f"{stage.name}.safetensors"
        local.write_bytes(data)
        run.log_artifact(str(local), "weights")
    run.set_tags({"phase.outcome": "ran"})
    return (
        f"ran; {state.step} steps, loss {state.last_loss:.4f}, {state.gpu_hours_attempt:.4g} GPU-hours "
        f"({state.gpu_hours_used:.4g} over all attempts)"
    )


def training_fingerprint(config, section: str, source_fingerprint: dict) -> dict:
    """What decides a stage's trained weights: its training data (the source phase's fingerprint),
    the model sizes and the ``section``'s settings that decide the weights (``TrainConfig.outcome``),
    the weights it starts from and the perceptual network's as ``trained_weights.weights_fingerprint``
    identifies them."""
    training = getattr(config, section)
    settings = training.outcome()
    settings["init_weights"] = trained_weights.weights_fingerprint(training.init_weights, config.storage)
    settings["stage_a_losses"]["perceptual_weights"] = trained_weights.weights_fingerprint(
        training.stage_a_losses.perceptual_weights, config.storage
    )
    return fingerprints.of(input=source_fingerprint, settings={"models": config.pre_encode.models, **settings})


def _ray_run_name(phase: str, fingerprint: dict) -> str:
    """The Ray Train run to resume: the same settings share one, whatever the number of steps.

    So a killed or budget-stopped run continues when resubmitted, a longer run extends a shorter
    one, and a run with other settings never resumes from incompatible checkpoints.
    """
    settings = {k: v for k, v in fingerprint.items() if k != "steps"}
    return f"{phase}-{hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]}"


def _datasets(
    context, stage: TrainableStage, shards: list[str], config: TrainConfig, run, *, held_out_below: int | None = None
) -> dict[str, TrainingRows]:
    """The training data: one data set, or with aspect-ratio buckets one per bucket, with the batches
    each worker takes from it per epoch (a bucket too small for one global batch is left out). The
    decoded crops leave out the keys hashed below ``held_out_below`` (which they need); the latent
    shards' own split leaves out their validation rows."""
    storage = context.config.storage
    resolution = context.config.decode.resolution
    source = context.output_url(stage.source_phase)
    files = tuple(f"{source}/{schema.shard_parquet(shard)}" for shard in shards)
    columns = tuple(stage.columns(_spec_stub(context, stage)))
    per_worker = config.global_batch_size // config.workers
    if stage.source_phase == decode.PHASE:
        assert held_out_below is not None, "the crops carry no split: training must be told what to leave out"
        crops = TrainingRows(
            files=files,
            columns=columns,
            storage=storage,
            keep=pc.field(schema.DROP_REASON).is_null(),
            keep_columns=(schema.KEY, schema.DROP_REASON),
            held_out_below=held_out_below,
            resolution=resolution,
        )
        return _with_batches(count_rows({TRAIN_DATASET: crops}), config)
    assert stage.source_phase == pre_encode.PHASE, stage.source_phase
    training = pre_encode.TRAINING_ROWS.to_pyarrow()
    crops = context.config.decode.crop_sizes()
    if len(crops) == 1:
        if stage.check_crop is not None:
            stage.check_crop(context.config, crops[0])
        latents = TrainingRows(
            files=files, columns=columns, storage=storage, keep=training, keep_columns=(schema.SPLIT,)
        )
        return _with_batches(count_rows({TRAIN_DATASET: latents}), config)

    buckets = count_rows(
        {
            f"{TRAIN_DATASET}_{width}x{height}": TrainingRows(
                files=files,
                columns=columns,
                storage=storage,
                keep=training & (pc.field(schema.CROP_WIDTH) == width) & (pc.field(schema.CROP_HEIGHT) == height),
                keep_columns=(schema.SPLIT, *_CROP_COLUMNS),
                ragged_shapes=pre_encode.latent_shapes(context.config.pre_encode, (width, height), resolution),
            )
            for width, height in crops
        }
    )
    rows = {f"{width}x{height}": bucket.rows() for (width, height), bucket in zip(crops, buckets.values(), strict=True)}
    for (width, height), bucket in zip(crops, buckets.values(), strict=True):
        if bucket.rows() // config.workers // per_worker and stage.check_crop is not None:
            stage.check_crop(context.config, (width, height))
    datasets = {name: bucket for name, bucket in _with_batches(buckets, config).items() if bucket.batches}
    if run is not None:
        run.log_params(
            {
                "bucket_samples": json.dumps(rows),
                "bucket_batches_per_worker": json.dumps({name: rows.batches for name, rows in datasets.items()}),
            }
        )
    if not datasets:
        raise ValueError(
            f"no aspect-ratio bucket holds {config.global_batch_size} samples (global_batch_size), "
            f"samples per bucket: {rows}: lower the batch size or use fewer decode.bucket_aspect_ratios"
        )
    return datasets


def _with_batches(datasets: dict[str, TrainingRows], config: TrainConfig) -> dict[str, TrainingRows]:
    """``datasets``, each with the batches every worker takes of it per epoch (the same on every rank:
    DDP needs the same steps everywhere; the rows short of a global batch wait for another epoch)."""
    per_worker = config.global_batch_size // config.workers
    return {
        name: dataclasses.replace(rows, batches=rows.rows() // config.workers // per_worker)
        for name, rows in datasets.items()
    }


def _validation_batches(
    context, stage: TrainableStage, shards: list[str], config: TrainConfig, *, held_out_below: int | None = None
) -> tuple[dict[str, np.ndarray], ...]:
    """The held-out rows each evaluation uses: the first ``eval_samples`` of the validation split in
    shard order (shared equally among the buckets), in the training columns, one group per bucket."""
    if not config.eval_samples:
        return ()
    if stage.source_phase == decode.PHASE:
        assert held_out_below is not None
        crops = _held_out_crops(context, shards, config.eval_samples, held_out_below)
        return (crops,) if crops is not None else ()
    fs, folder = filesystem(context.output_url(stage.source_phase), context.config.storage)
    files = [f"{folder}/{schema.shard_parquet(shard)}" for shard in shards]
    columns = stage.columns(_spec_stub(context, stage))
    source = ray.data.read_parquet(files, filesystem=fs).filter(expr=pre_encode.VALIDATION_ROWS)
    source.context.execution_options.preserve_order = True  # the same rows on every run
    crops = context.config.decode.crop_sizes()
    if len(crops) == 1:
        groups = [source.select_columns(columns)]
    else:
        shapes = {
            crop: pre_encode.latent_shapes(context.config.pre_encode, crop, context.config.decode.resolution)
            for crop in crops
        }
        source = source.select_columns([*columns, *_CROP_COLUMNS])
        groups = [
            in_bucket(source, crop)
            .map_batches(shard_phase.unflatten_ragged, fn_kwargs={"shapes": shapes[crop]})
            .select_columns(columns)
            for crop in crops
        ]
    each = max(1, config.eval_samples // len(groups))
    batches = []
    for group in groups:
        batch = next(iter(group.limit(each).iter_batches(batch_size=each, batch_format="numpy")), None)
        if batch is not None:
            batches.append({name: np.asarray(values) for name, values in batch.items()})
    return tuple(batches)


def _held_out_crops(context, shards: list[str], count: int, held_out_below: int) -> dict[str, np.ndarray] | None:
    """The images of the first ``count`` validation rows in shard order, decoded as the image-trained
    stages' batches are: the held-out keys that embed kept, which pre-encode marks ``validation``
    (it encodes the samples embed kept); None if there are none."""
    storage = context.config.storage
    embedded, embedded_folder = filesystem(context.output_url(embed.PHASE), storage)
    decoded, decoded_folder = filesystem(context.output_url(decode.PHASE), storage)
    images: list[bytes] = []
    for shard in shards:
        if len(images) >= count:
            break
        kept = pq.read_table(
            f"{embedded_folder}/{schema.shard_parquet(shard)}",
            filesystem=embedded,
            columns=[schema.KEY],
            filters=pc.field(schema.DROP_REASON).is_null(),
        )[schema.KEY].to_pylist()
        wanted = [key for key, out in zip(kept, pre_encode.held_out(kept, held_out_below)) if out]
        table = pq.read_table(
            f"{decoded_folder}/{schema.shard_parquet(shard)}",
            filesystem=decoded,
            columns=[schema.KEY, schema.IMAGE],
            filters=pc.field(schema.KEY).isin(wanted),
        )
        image_of = dict(zip(table[schema.KEY].to_pylist(), table[schema.IMAGE].to_pylist()))
        images += [image_of[key] for key in wanted[: count - len(images)]]
    if not images:
        return None
    crops = decode_images({schema.IMAGE: images}, context.config.decode.resolution)
    return {schema.IMAGE: crops[schema.IMAGE]}


def _chain_evaluation(context, stage: TrainableStage, shards: list[str]) -> ChainEvaluation | None:
    """What a stage that ``evaluates_chain`` scores the chain on: the first ``generate.eval_captions``
    held-out captions and their real images."""
    sample = context.config.generate
    if not stage.evaluates_chain or not sample.eval_captions:
        return None
    held_out = held_out_captions(
        context.output_url(stage.source_phase),
        context.output_url(decode.PHASE),
        shards,
        sample.eval_captions,
        context.config.storage,
    )
    if held_out is None:
        return None
    return ChainEvaluation(
        held_out=held_out, sample=sample, embed=context.config.embed, models=context.config.pre_encode.models
    )


def in_bucket(dataset: ray.data.Dataset, crop: tuple[int, int]) -> ray.data.Dataset:
    """The rows of ``dataset`` cut to ``crop``: an expression Ray Data pushes into the Parquet read,
    which then skips the other buckets' row groups by their statistics."""
    width, height = crop
    return dataset.filter(expr=(col(schema.CROP_WIDTH) == width) & (col(schema.CROP_HEIGHT) == height))


def validation_spec(context, stage: TrainableStage) -> TaskSpec:
    """What a stage's held-out loss depends on, as its training phase hands it to the workers: the
    model sizes, the loss's settings and the validation rows; the training draws and the sample grid
    left out. ``pipelines/evaluate.py`` recomputes the loss from it."""
    source = context.finished(stage.source_phase)
    held_out_below = context.validation_threshold() if stage.source_phase == decode.PHASE else None
    return dataclasses.replace(
        _spec_stub(context, stage),
        validation_batches=_validation_batches(
            context,
            stage,
            sorted(source.shards),
            getattr(context.config, stage.config_section),
            held_out_below=held_out_below,
        ),
    )


def _spec_stub(context, stage: TrainableStage) -> TaskSpec:
    """The settings of a stage's model and held-out loss, without its data."""
    config: TrainConfig = getattr(context.config, stage.config_section)
    return TaskSpec(
        stage=stage.name,
        models=context.config.pre_encode.models,
        caption_dropout=0.0,
        semantic_dropout=0.0,
        semantic_noise=0.0,
        text_from_tokens=context.config.pre_encode.text == "tokens",
        resolution=context.config.decode.resolution,
        stage_a_losses=config.stage_a_losses,
        loss_weights=stage.loss_weights(config),
        storage=context.config.storage,
    )


def _task_spec(context, stage: TrainableStage, config: TrainConfig, rows: TrainingRows) -> TaskSpec:
    storage = context.config.storage
    file = next(file for file, groups in enumerate(rows.group_rows) if sum(groups))
    with_captions = dataclasses.replace(rows, columns=(*rows.columns, schema.CAPTION))  # the grid's titles
    sample = with_captions.read(file, 0, min(_SAMPLE_ROWS, sum(rows.group_rows[file])))
    empty: dict[str, np.ndarray] = {}
    if stage.text_column and context.config.pre_encode.text == "hidden_states":
        fs, path = filesystem(f"{context.output_url(pre_encode.PHASE)}/{pre_encode.EMPTY_CAPTION_FILE}", storage)
        with fs.open(path, "rb") as stream:
            empty = {name: tensor.numpy() for name, tensor in load_safetensors(stream.read()).items()}
    partners = {}
    for partner in stage.sample_partners:
        url = weights_url(context, partner)
        fs, path = filesystem(url, storage)
        if url and fs.exists(path):
            partners[partner] = url
    return dataclasses.replace(
        _spec_stub(context, stage),
        caption_dropout=config.caption_dropout,
        semantic_dropout=config.semantic_dropout,
        semantic_noise=config.semantic_noise,
        empty_caption=empty,
        sample_prompts=tuple(context.config.generate.prompts[:_SAMPLE_ROWS]),
        sample_batch={name: np.asarray(value) for name, value in sample.items()},
        partner_weights=partners,
        activation_checkpointing=config.activation_checkpointing,
    )


def _ray_storage(url: str, storage: StorageConfig) -> tuple[pyarrow.fs.FileSystem | None, str]:
    """Ray Train's storage for checkpoints: a local folder, or object storage through fsspec."""
    if "://" not in url or url.startswith("file://"):
        return None, url.removeprefix("file://")
    fs, path = filesystem(url, storage)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path
