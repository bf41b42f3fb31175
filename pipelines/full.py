"""The whole Würstchen pipeline: filter, embed, pre-encode, train, generate.

With no arguments it runs the embedded default (``--config tiny``): generated demo data, a local
Ray, a local MLflow store. On a cluster::

    ray job submit --working-dir . -- python pipelines/full.py --config v2 --set data.shards_url=s3://...
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from pipelines.cluster_nodes import NodeRecorder
from pipelines.config import RUNS, load_config
from pipelines.inputs import count_input_rows, prepare_input
from pipelines.overrides import to_flat_dict
from pipelines.phases import PHASES, PhaseContext
from pipelines.plan import check_local_gpus, check_training_memory, dry_run
from pipelines.runtime import init_ray
from pipelines.storage import exists
from pipelines.tracking import Tracker
from pipelines.train_phase import BudgetStop


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny", choices=sorted(RUNS), help="named run (default: tiny)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field by dotted key, e.g. filter.min_side=256 (repeatable)",
    )
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated subset of: {', '.join(PHASES)} (default: all)"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (resources, data volumes, GPU-hours against the budgets) and stop",
    )
    return parser.parse_args(argv)


def select_phases(text: str) -> list[str]:
    wanted = [name.strip() for name in text.split(",") if name.strip()]
    for name in wanted:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r} in --phases; available: {', '.join(PHASES)}")
    return [name for name in PHASES if name in wanted]


def main(argv: list[str] | None = None) -> None:
    try:
        run(parse_args(argv))
    except (ValueError, FileNotFoundError) as error:
        # Errors a user can cause carry a message that says what to change; a traceback adds nothing.
        sys.exit(f"error: {error}")


def run(args: argparse.Namespace) -> None:
    config = load_config(args.config, args.overrides)
    phases = select_phases(args.phases)
    local_gpus = None if config.ray.address or os.environ.get("RAY_ADDRESS") else torch.cuda.device_count()
    if args.dry_run:
        print(dry_run(config, phases, count_input_rows(config.data, config.storage), local_gpus))
        check_training_memory(config, phases)  # after the plan, which shows the step beside the others
        return
    if local_gpus is not None:
        check_local_gpus(config, phases, local_gpus)
    work_dir = config.resolved_work_dir()
    if "://" in work_dir:
        exists(work_dir, "work_dir", config.storage)  # unreachable storage fails here, before any work
    tracker = Tracker(config.tracking, work_dir)
    shards_url = prepare_input(config.data, work_dir, config.storage)
    init_ray(config.ray)
    context = PhaseContext(config=config, work_dir=work_dir, shards_url=shards_url, tracker=tracker)

    done, stopped = [], ""
    with tracker.run(f"full-{config.name}") as pipeline_run, NodeRecorder(pipeline_run) as nodes:
        pipeline_run.log_params({"config": config.name, **to_flat_dict(config)})
        pipeline_run.log_dict(to_flat_dict(config), "config.json")
        pipeline_run.set_tags({"phases": ",".join(phases)})
        for name in phases:
            with tracker.run(name, parent=pipeline_run) as phase_run, nodes.phase(name, phase_run):
                try:
                    summary = PHASES[name](context, phase_run)
                except BudgetStop as stop:
                    # Not a failure: the run saved its checkpoint and a resubmission continues it.
                    stopped, summary = str(stop), f"stopped: {stop}"
            print(f"[{name}] {summary}", file=sys.stderr)
            done.append(name)
            if stopped:
                pipeline_run.set_tags({"stopped": stopped})
                break

    print(f"\n{nodes.summary()}", file=sys.stderr)
    print(f"\nran: {', '.join(done)}", file=sys.stderr)
    if stopped:
        print(f"stopped before: {', '.join(phases[len(done) :])} ({stopped})", file=sys.stderr)
    print(f"outputs: {work_dir}", file=sys.stderr)
    print(
        f"MLflow:  {tracker.uri} (experiment {config.tracking.experiment!r}, run {pipeline_run.run_id})",
        file=sys.stderr,
    )
    print(f"open it: {tracker.ui_command()}", file=sys.stderr)


if __name__ == "__main__":
    main()
