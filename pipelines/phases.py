"""The phases of the pipeline, in the order ``full.py`` runs them, and what each logs to MLflow."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from pipelines import decode, metadata_filter, shard_phase
from pipelines.config import RunConfig
from pipelines.ledger import Manifest, read_manifest
from pipelines.overrides import to_flat_dict
from pipelines.schema import DropReason
from pipelines.tracking import TrackedRun

SKIPPED = "skipped: output already complete"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PhaseContext:
    """What every phase gets: the config, where outputs go, where the input is."""

    config: RunConfig
    work_dir: str
    shards_url: str

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


def run_metadata_filter(context: PhaseContext, run: TrackedRun) -> str:
    config = context.config.filter
    manifest, metrics = metadata_filter.run(context.shards_url, context.output_url(metadata_filter.PHASE), config,
                                            context.config.storage)
    return _report(run, "filter", config, manifest, metrics, metadata_filter.METADATA_REASONS)


def run_decode(context: PhaseContext, run: TrackedRun) -> str:
    config = context.config.decode
    filtered = context.finished(metadata_filter.PHASE)
    phase = decode.phase(shards_url=context.shards_url, filtered_url=context.output_url(metadata_filter.PHASE),
                         output_url=context.output_url(decode.PHASE), filtered_fingerprint=filtered.config,
                         config=config, storage=context.config.storage)
    manifest, metrics = shard_phase.run(phase, sorted(filtered.shards), context.output_url(decode.PHASE),
                                        context.config.storage)
    return _report(run, "decode", config, manifest, metrics, decode.DECODE_REASONS)


def _report(run: TrackedRun, section: str, config, manifest: Manifest, metrics: dict[str, float],
            reasons: tuple[DropReason, ...]) -> str:
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


# Phases that exist, in pipeline order.
PHASES: dict[str, Callable[[PhaseContext, TrackedRun], str]] = {
    metadata_filter.PHASE: run_metadata_filter,
    decode.PHASE: run_decode,
}
# Phases of the design that are not built yet; full.py names them instead of pretending.
NOT_BUILT = ("embed", "pre_encode", "train_stage_c", "train_stage_b", "train_stage_a", "generate")
