"""Images from a trained chain at any time after its run: ``python -m pipelines.sample``.

The weights come from a pipeline run that MLflow recorded (``--run``: the stages its work dir
trained, or the files its config named) or from a path or URL per stage (``--weights
stage_c=...``, which also overrides a stage of ``--run``). The images go to ``--out`` as PNG files
and into MLflow as a run of their own, a child of ``--run`` when one is given.

    python -m pipelines.sample --run <the run id full.py printed> \\
        --tracking-uri sqlite:///work/tiny/mlflow.db --size 64 \\
        --prompt "a red circle on a white background" --prompt "a blue square on a black background"
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from PIL import Image

from pipelines import trained_weights
from pipelines.generate_phase import load_chain, render_with
from pipelines.overrides import apply_overrides
from pipelines.reports import image_grid
from pipelines.storage import StorageConfig, filesystem
from pipelines.train_phase import TRAINED
from stages.generate import GENERATE_CONFIGS, Wuerstchen

# The stages a text-to-image chain runs, in order; the semantic compressor only encodes training data.
CHAIN = ("stage_c", "stage_b", "stage_a")
RUN_NAME = "sample"


@dataclasses.dataclass(frozen=True)
class Chain:
    """What to render with: the model sizes and one weights URL per stage."""

    models: str
    weights: dict[str, str]
    pipeline_run_id: str | None = None
    experiment_id: str | None = None


def chain_of_run(client: MlflowClient, run_id: str) -> Chain:
    """The weights a pipeline run used for each stage of the chain, as its generate phase finds them."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ValueError(
            f"no MLflow run {run_id!r} at {client.tracking_uri}: pass the run id full.py printed "
            '("MLflow: ... run <id>") and the store it names with --tracking-uri'
        ) from None
    if MLFLOW_PARENT_RUN_ID in run.data.tags:  # a phase run: its pipeline run holds the settings
        run = client.get_run(run.data.tags[MLFLOW_PARENT_RUN_ID])
    params = run.data.params
    if "work_dir" not in params or "pre_encode.models" not in params:
        raise ValueError(
            f"run {run_id} is not a pipeline run of pipelines/full.py (it has no work_dir and "
            "pre_encode.models params): pass one, or give every stage with --weights"
        )
    weights = {}
    for stage in CHAIN:
        configured = params.get(f"pre_encode.{stage}_weights", TRAINED)  # Stage B and C are always trained
        weights[stage] = (
            f"{params['work_dir']}/train_{stage}/{trained_weights.FINAL_FILE}" if configured == TRAINED else configured
        )
    return Chain(
        models=params["pre_encode.models"],
        weights=weights,
        pipeline_run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
    )


def _stage_weights(text: str) -> tuple[str, str]:
    stage, found, url = text.partition("=")
    if not found or stage not in CHAIN or not url:
        raise ValueError(f"--weights takes STAGE=PATH_OR_URL with STAGE one of {', '.join(CHAIN)}, got {text!r}")
    return stage, url


def checked_weights(chain: Chain, storage: StorageConfig) -> dict[str, str]:
    """Each stage's weights URL, checked to name a file first."""
    missing = [stage for stage in CHAIN if not chain.weights.get(stage)]
    if missing:
        raise ValueError(
            f"no weights for {', '.join(missing)}: give them with --weights "
            + " ".join(f"{stage}=PATH" for stage in missing)
        )
    for stage, url in chain.weights.items():
        path, _ = trained_weights.split_entry(url)
        fs, inside = filesystem(path, storage)
        if not fs.exists(inside):
            raise ValueError(
                f"{stage} weights not found at {path}: has its training phase finished? Else give "
                f"them with --weights {stage}=PATH"
            )
    return dict(chain.weights)


def loaded_chain(chain: Chain, storage: StorageConfig, device: torch.device) -> Wuerstchen:
    """The chain's models with their weights, checked first; a weights file of another stage or size
    is refused by name."""
    weights = checked_weights(chain, storage)
    try:
        return load_chain(chain.models, weights, storage, device)
    except ValueError as error:  # a strict load names the file and the model; its key list can run to pages
        raise ValueError(f"{str(error).splitlines()[0]} (is it a {chain.models!r} checkpoint of that stage?)") from None


def sample(
    chain: Chain, prompts: list[str], *, size: int, guidance: float, seed: int, storage: StorageConfig
) -> list[Image.Image]:
    """The chain's images for ``prompts``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = render_with(loaded_chain(chain, storage, device), chain.models, prompts, size, guidance, seed)
    return [Image.fromarray(image) for image in images]


def log_to_mlflow(
    client: MlflowClient,
    experiment_id: str,
    parent: str | None,
    images: list[Image.Image],
    prompts: list[str],
    params: dict[str, str],
) -> str:
    tags = {MLFLOW_PARENT_RUN_ID: parent} if parent else {}
    run_id = client.create_run(experiment_id, run_name=RUN_NAME, tags=tags).info.run_id
    client.log_batch(
        run_id,
        params=[Param(key, str(value)) for key, value in {**params, "prompts": " | ".join(prompts)[:6000]}.items()],
    )
    client.log_image(run_id, image_grid(images, prompts, columns=min(8, len(images))), "samples.png")
    for index, image in enumerate(images):
        client.log_image(run_id, image, f"images/{index:03d}.png")
    client.set_terminated(run_id)
    return run_id


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="the pipeline run (or one of its phase runs) whose weights to use")
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", ""),
        help="the MLflow store of --run, and where the images are logged (default: $MLFLOW_TRACKING_URI)",
    )
    parser.add_argument("--experiment", default="wuerstchen-ray", help="experiment for the images without --run")
    parser.add_argument(
        "--weights",
        action="append",
        default=[],
        metavar="STAGE=PATH_OR_URL",
        help=f"weights of one stage ({', '.join(CHAIN)}); repeatable; overrides --run's",
    )
    parser.add_argument("--models", choices=sorted(GENERATE_CONFIGS), help="model sizes (default: --run's)")
    parser.add_argument("--prompt", action="append", required=True, help="repeatable")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--guidance", type=float, default=4.0, help="Stage C's classifier-free guidance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="folder for the PNG files")
    parser.add_argument(
        "--set",
        dest="storage",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="object storage setting (endpoint_url=..., key=..., secret=...), as storage.* of full.py",
    )
    args = parser.parse_args(argv)
    try:
        storage = apply_overrides(StorageConfig(), args.storage)
        client = MlflowClient(args.tracking_uri) if args.tracking_uri else None
        if args.run and client is None:
            raise ValueError(
                "--run needs the MLflow store that holds it: pass --tracking-uri or set $MLFLOW_TRACKING_URI"
            )
        chain = chain_of_run(client, args.run) if args.run else Chain(models=args.models or "", weights={})
        chain = dataclasses.replace(
            chain,
            models=args.models or chain.models,
            weights={**chain.weights, **dict(map(_stage_weights, args.weights))},
        )
        if not chain.models:
            raise ValueError("without --run, name the model sizes with --models")
        if client is None and not args.out:
            raise ValueError("nowhere to put the images: pass --out, --tracking-uri or both")
        images = sample(chain, args.prompt, size=args.size, guidance=args.guidance, seed=args.seed, storage=storage)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            image.save(Path(args.out) / f"{index:03d}.png")
        print(f"{len(images)} images in {args.out}", file=sys.stderr)
    if client is not None:
        experiment_id = chain.experiment_id or _experiment(client, args.experiment)
        params = {
            "models": chain.models,
            "size": args.size,
            "guidance": args.guidance,
            "seed": args.seed,
            **{f"weights.{stage}": url for stage, url in chain.weights.items()},
        }
        run_id = log_to_mlflow(client, experiment_id, chain.pipeline_run_id, images, args.prompt, params)
        print(f"MLflow: {client.tracking_uri} run {run_id}", file=sys.stderr)


def _experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else client.create_experiment(name)


if __name__ == "__main__":
    main()
