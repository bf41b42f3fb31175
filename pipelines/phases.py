"""The phases of the pipeline, in the order ``full.py`` runs them, and what each logs to MLflow."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable

from PIL import Image

from cluster.budget import run_budget
from pipelines import (
    decode,
    embed,
    fingerprints,
    generate_phase,
    metadata_filter,
    pre_encode,
    schema,
    shard_phase,
)
from pipelines.config import RunConfig
from pipelines.ledger import Manifest, read_manifest
from pipelines.overrides import to_flat_dict
from pipelines.reports import histograms, image_grid
from pipelines.schema import DropReason
from pipelines.storage import filesystem
from pipelines.tracking import ATTEMPT_GPU_HOURS, OUTPUT_TAG, RUN_GPU_HOURS, TrackedRun, Tracker
from pipelines.train_phase import BudgetStop, run_training, weights_url
from pipelines.trainable import REGISTRY

SKIPPED = "skipped: output already complete"
_GRID_SIZE = 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class PhaseContext:
    """What every phase gets: the config, where outputs go, where the input is."""

    config: RunConfig
    work_dir: str
    shards_url: str
    tracker: Tracker

    def output_url(self, phase: str) -> str:
        return f"{self.work_dir}/{phase}"

    def finished(self, phase: str) -> Manifest:
        """The manifest of an earlier phase this one reads; a clear error when it never finished."""
        manifest = read_manifest(self.output_url(phase), self.config.storage)
        if manifest is None:
            raise FileNotFoundError(
                f"phase {phase!r} has no finished output in {self.output_url(phase)}: run it first "
                f"(--phases {phase},...)"
            )
        return manifest

    def validation_threshold(self) -> int:
        """The key hash below which a sample is held out of every training phase
        (``pre_encode.validation_threshold`` over the samples embed kept): known once embed has
        finished, so the encoders, which train on the decoded crops before pre-encode runs, leave out
        the keys that pre-encode marks as the validation split."""
        return pre_encode.validation_threshold(
            self.config.pre_encode, self.finished(embed.PHASE), self.output_url(embed.PHASE), self.config.storage
        )


def run_metadata_filter(context: PhaseContext, run: TrackedRun) -> str:
    config = context.config.filter
    manifest, metrics = metadata_filter.run(
        context.shards_url, context.output_url(metadata_filter.PHASE), config, context.config.storage
    )
    return _report(run, "filter", config, manifest, metrics, metadata_filter.METADATA_REASONS)


def run_decode(context: PhaseContext, run: TrackedRun) -> str:
    config = context.config.decode
    filtered = context.finished(metadata_filter.PHASE)
    phase = decode.phase(
        shards_url=context.shards_url,
        filtered_url=context.output_url(metadata_filter.PHASE),
        output_url=context.output_url(decode.PHASE),
        filtered_fingerprint=filtered.config,
        config=config,
        storage=context.config.storage,
    )
    manifest, metrics = shard_phase.run(
        phase, sorted(filtered.shards), context.output_url(decode.PHASE), context.config.storage
    )
    fs, folder = filesystem(context.output_url(decode.PHASE), context.config.storage)
    kept = [
        row
        for rows in shard_phase.iter_rows(fs, f"{folder}/{schema.shard_parquet(min(manifest.shards))}")
        for row in rows
        if row[schema.DROP_REASON] is None
    ][:_GRID_SIZE]
    if kept:
        run.log_image(
            image_grid(
                [Image.open(io.BytesIO(row[schema.IMAGE])) for row in kept], [row[schema.CAPTION] for row in kept]
            ),
            "kept_samples.png",
        )
    return _report(run, "decode", config, manifest, metrics, decode.DECODE_REASONS)


def run_embed(context: PhaseContext, run: TrackedRun) -> str:
    config = context.config.embed
    decoded = context.finished(decode.PHASE)
    output_url = context.output_url(embed.PHASE)
    phase = embed.phase(
        decoded_url=context.output_url(decode.PHASE),
        output_url=output_url,
        decoded_fingerprint=decoded.config,
        config=config,
        storage=context.config.storage,
    )
    manifest, metrics = _run_within_budget(
        context, run, phase, "embed", config.budget_gpu_hours, sorted(decoded.shards), output_url
    )
    fs, folder = filesystem(output_url, context.config.storage)
    scores = {schema.CLIP_SIMILARITY: [], schema.AESTHETIC_SCORE: []}
    for shard in sorted(manifest.shards):
        for rows in shard_phase.iter_rows(fs, f"{folder}/{schema.shard_parquet(shard)}", columns=list(scores)):
            for name, values in scores.items():
                values.extend(row[name] for row in rows)
    if scores[schema.CLIP_SIMILARITY]:
        run.log_figure(
            histograms(
                scores,
                {
                    schema.CLIP_SIMILARITY: config.min_clip_similarity,
                    schema.AESTHETIC_SCORE: config.min_aesthetic_score,
                },
            ),
            "scores.png",
        )
    return _report(run, "embed", config, manifest, metrics, embed.EMBED_REASONS)


def run_pre_encode(context: PhaseContext, run: TrackedRun) -> str:
    config = context.config.pre_encode
    embedded = context.finished(embed.PHASE)
    output_url = context.output_url(pre_encode.PHASE)
    storage = context.config.storage
    encoders = {"stage_a": weights_url(context, "stage_a"), "semantic": weights_url(context, "semantic")}
    config = dataclasses.replace(config, stage_a_weights=encoders["stage_a"], semantic_weights=encoders["semantic"])
    threshold = context.validation_threshold()
    phase = pre_encode.phase(
        decoded_url=context.output_url(decode.PHASE),
        embedded_url=context.output_url(embed.PHASE),
        output_url=output_url,
        embedded_fingerprint=embedded.config,
        crops=context.config.decode.crop_sizes(),
        resolution=context.config.decode.resolution,
        config=config,
        validation_threshold=threshold,
        storage=storage,
    )
    manifest, metrics = _run_within_budget(
        context, run, phase, "pre_encode", config.budget_gpu_hours, sorted(embedded.shards), output_url
    )
    fs, folder = filesystem(output_url, context.config.storage)
    total_bytes = sum(fs.size(f"{folder}/{schema.shard_parquet(shard)}") for shard in manifest.shards)
    run.log_metrics(
        {
            "bytes_per_sample": total_bytes / max(manifest.kept, 1),
            "total_bytes": total_bytes,
            "train": manifest.kept - manifest.validation,
            "validation": manifest.validation,
        }
    )
    summary = _report(run, "pre_encode", config, manifest, metrics, pre_encode.PRE_ENCODE_REASONS)
    return f"{summary}; {manifest.validation} of the kept held out for validation"


def _run_within_budget(
    context: PhaseContext,
    run: TrackedRun,
    phase: shard_phase.ShardPhase,
    section: str,
    budget_gpu_hours: float | None,
    shards: list[str],
    output_url: str,
) -> tuple[Manifest, dict]:
    """``shard_phase.run`` under the phase's budget and the experiment's, counted over the phase's
    attempts at this output and these settings; a BudgetStop when it left shards for the next run."""
    attempts_of = f"{output_url}#{fingerprints.digest(phase.fingerprint)[:16]}"
    used = context.tracker.gpu_hours(output=attempts_of)
    budget = run_budget(
        run_budget=budget_gpu_hours,
        experiment_budget=context.config.tracking.experiment_budget_gpu_hours,
        experiment_used=context.tracker.gpu_hours(),
        run_used=used,
        setting=f"{section}.budget_gpu_hours",
    )
    if budget.limit is not None and budget.limit <= used:
        raise ValueError(
            f"{phase.name} has used {used:.4g} of its {budget.limit:.4g} GPU-hours: raise {budget.setting} to continue"
        )
    run.set_tags({OUTPUT_TAG: attempts_of})
    manifest, metrics = shard_phase.run(
        phase,
        shards,
        output_url,
        context.config.storage,
        budget_gpu_hours=None if budget.limit is None else budget.limit - used,
    )
    if manifest is None:
        left = metrics["shards_left"]
        reason = (
            f"GPU-hour budget reached: used {used + metrics[ATTEMPT_GPU_HOURS]:.4g} of {budget.limit:.4g}; "
            "the next shard would exceed it"
        )
        run.log_metrics({**metrics, RUN_GPU_HOURS: used + metrics[ATTEMPT_GPU_HOURS]})
        run.set_tags({"phase.outcome": "stopped", "stop_reason": reason})
        raise BudgetStop(
            f"{phase.name} stopped with {left} of {len(shards)} shards left: {reason}. The finished "
            f"shards are kept; raise {budget.setting} and run again to continue"
        )
    if metrics:  # it ran: the total over its attempts, as training runs log theirs
        metrics[RUN_GPU_HOURS] = used + metrics[ATTEMPT_GPU_HOURS]
    return manifest, metrics


def _report(
    run: TrackedRun,
    section: str,
    config,
    manifest: Manifest,
    metrics: dict[str, float],
    reasons: tuple[DropReason, ...],
) -> str:
    """Logs a phase's settings, ledger, speed and manifest; returns its console summary."""
    run.log_params(to_flat_dict(config, prefix=f"{section}."))
    run.log_metrics({**ledger_metrics(manifest, reasons), **metrics})
    run.log_dict(manifest.to_json(), "manifest.json")
    outcome = "ran" if metrics else SKIPPED
    run.set_tags({"phase.outcome": outcome})
    return f"{outcome}; {manifest.samples_in} in, {manifest.kept} kept, {manifest.samples_in - manifest.kept} dropped"


def ledger_metrics(manifest: Manifest, reasons: tuple[DropReason, ...]) -> dict[str, int]:
    """Counts for MLflow: every reason the phase can give is logged, zeros included."""
    dropped = manifest.dropped()
    assert set(dropped) <= set(reasons), f"unexpected drop reasons {set(dropped) - set(reasons)}"
    return {
        "samples_in": manifest.samples_in,
        "kept": manifest.kept,
        **{f"dropped/{reason}": dropped.get(reason, 0) for reason in reasons},
    }


def run_generate(context: PhaseContext, run: TrackedRun) -> str:
    config = context.config.generate
    weights = {
        "stage_c": weights_url(context, "stage_c"),
        "stage_b": weights_url(context, "stage_b"),
        "stage_a": weights_url(context, "stage_a"),
    }
    run.log_params(to_flat_dict(config, prefix="generate."))
    return generate_phase.run(
        config=config,
        models_name=context.config.pre_encode.models,
        weights_urls=weights,
        output_url=context.output_url(generate_phase.PHASE),
        storage=context.config.storage,
        tracked_run=run,
    )


def _training(phase: str) -> Callable[[PhaseContext, TrackedRun], str]:
    return lambda context, run: run_training(context, run, phase)


# Every phase, in pipeline order. Stage A and the semantic compressor train before pre-encode,
# which needs them; Stage B before Stage C, so Stage C's sample grids can show images.
PHASES: dict[str, Callable[[PhaseContext, TrackedRun], str]] = {
    metadata_filter.PHASE: run_metadata_filter,
    decode.PHASE: run_decode,
    embed.PHASE: run_embed,
    **{stage.phase: _training(stage.phase) for stage in REGISTRY.values() if stage.source_phase == decode.PHASE},
    pre_encode.PHASE: run_pre_encode,
    **{stage.phase: _training(stage.phase) for stage in REGISTRY.values() if stage.source_phase == pre_encode.PHASE},
    generate_phase.PHASE: run_generate,
}
