"""The phases of the pipeline, in the order ``full.py`` runs them, and what each logs to MLflow."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from pipelines import metadata_filter
from pipelines.config import RunConfig
from pipelines.ledger import Manifest
from pipelines.overrides import to_flat_dict
from pipelines.schema import DropReason
from pipelines.tracking import TrackedRun


@dataclasses.dataclass(frozen=True, kw_only=True)
class PhaseContext:
    """What every phase gets: the config, where outputs go, where the input is."""

    config: RunConfig
    work_dir: str
    shards_url: str

    def output_url(self, phase: str) -> str:
        return f"{self.work_dir}/{phase}"


def run_metadata_filter(context: PhaseContext, run: TrackedRun) -> str:
    config = context.config.filter
    manifest, metrics = metadata_filter.run(context.shards_url, context.output_url(metadata_filter.PHASE), config)
    run.log_params(to_flat_dict(config, prefix="filter."))
    run.log_metrics({**ledger_metrics(manifest, metadata_filter.METADATA_REASONS), **metrics})
    run.log_dict(manifest.to_json(), "manifest.json")
    outcome = "ran" if metrics else "skipped: output already complete"
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
}
# Phases of the design that are not built yet; full.py names them instead of pretending.
NOT_BUILT = ("decode", "embed", "pre_encode", "train_stage_c", "train_stage_b", "train_stage_a", "generate")
