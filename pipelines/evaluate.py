"""Scores of a trained chain at any time after its run: ``python -m pipelines.evaluate``.

The chain (Stage C -> Stage B -> Stage A) renders the held-out captions of a pipeline run that
MLflow recorded (``--run``: the first ``generate.eval_captions`` rows of its validation split, with
its generate settings), and is scored as Stage C's evaluations score it during training
(pipelines/chain_evaluation.py): CLIP score, FID against the rows' real images, and on the demo
colour accuracy. The weights are the run's final ones, or a path or URL per stage (``--weights
stage_c=...``: a checkpoint exported elsewhere, scored on the same captions). The scores go to
MLflow as a run of their own, ``evaluate``, a child of ``--run``, and to the console.

    python -m pipelines.evaluate --run <the run id full.py printed> --tracking-uri sqlite:///work/tiny/mlflow.db
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipelines import decode, pre_encode
from pipelines.chain_evaluation import ChainEvaluation, ChainScorer, held_out_captions
from pipelines.embed import EmbedConfig
from pipelines.generate_phase import SampleConfig
from pipelines.ledger import read_manifest
from pipelines.overrides import apply_overrides
from pipelines.quality import FEATURE_EXTRACTORS
from pipelines.sample import Chain, _stage_weights, chain_of_run, loaded_chain
from pipelines.storage import StorageConfig

RUN_NAME = "evaluate"
# The pipeline run's settings the scores depend on, as full.py logs them (params "<section>.<name>").
_SAMPLE_SETTINGS = ("size", "prior_guidance", "seed", "score_colours", "eval_captions", "fid_features")
_EMBED_SETTINGS = ("clip_model", "clip_pretrained", "seed")


def settings_of_run(params: dict[str, str]) -> tuple[SampleConfig, EmbedConfig]:
    """The generate and CLIP settings a pipeline run scored its chain with."""

    def overrides(section: str, names: tuple[str, ...]) -> list[str]:
        return [f"{name}={params[f'{section}.{name}']}" for name in names if f"{section}.{name}" in params]

    return (
        apply_overrides(SampleConfig(), overrides("generate", _SAMPLE_SETTINGS)),
        apply_overrides(EmbedConfig(), overrides("embed", _EMBED_SETTINGS)),
    )


def evaluation_of_run(
    client: MlflowClient, chain: Chain, storage: StorageConfig, captions: int | None, fid_features: str | None
) -> ChainEvaluation:
    """The held-out captions and settings of the pipeline run ``chain`` came from."""
    params = client.get_run(chain.pipeline_run_id).data.params
    sample, embed = settings_of_run(params)
    sample = dataclasses.replace(
        sample, eval_captions=captions or sample.eval_captions, fid_features=fid_features or sample.fid_features
    )
    work_dir = params["work_dir"].rstrip("/")
    manifest = read_manifest(f"{work_dir}/{pre_encode.PHASE}", storage)
    if manifest is None:
        raise ValueError(
            f"run {chain.pipeline_run_id} has no finished pre_encode phase in {work_dir}: its "
            "validation rows, the held-out captions, are marked there"
        )
    held_out = held_out_captions(
        f"{work_dir}/{pre_encode.PHASE}",
        f"{work_dir}/{decode.PHASE}",
        sorted(manifest.shards),
        sample.eval_captions,
        storage,
    )
    if held_out is None:
        raise ValueError(
            f"run {chain.pipeline_run_id} held out no samples (pre_encode.validation_fraction and "
            "validation_min were 0): there is nothing to evaluate on"
        )
    return ChainEvaluation(held_out=held_out, sample=sample, embed=embed, models=chain.models)


def evaluate(chain: Chain, evaluation: ChainEvaluation, storage: StorageConfig) -> dict[str, float]:
    """The chain's scores; a weights file of another stage or size is refused by name."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = loaded_chain(chain, storage, device)
    with torch.no_grad():
        return ChainScorer(evaluation, device)(models)


def log_to_mlflow(client: MlflowClient, chain: Chain, evaluation: ChainEvaluation, metrics: dict[str, float]) -> str:
    run_id = client.create_run(
        chain.experiment_id, run_name=RUN_NAME, tags={MLFLOW_PARENT_RUN_ID: chain.pipeline_run_id}
    ).info.run_id
    params = {
        "models": chain.models,
        "captions": len(evaluation.held_out.captions),
        "fid_features": evaluation.sample.fid_features,
        "size": evaluation.sample.size,
        **{f"weights.{stage}": url for stage, url in chain.weights.items()},
    }
    client.log_batch(
        run_id,
        params=[Param(key, str(value)) for key, value in params.items()],
        metrics=[Metric(key, value, 0, 0) for key, value in metrics.items()],
    )
    client.set_terminated(run_id)
    return run_id


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the pipeline run (or one of its phase runs) to evaluate")
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", ""),
        help="the MLflow store of --run, where the scores are logged (default: $MLFLOW_TRACKING_URI)",
    )
    parser.add_argument(
        "--weights",
        action="append",
        default=[],
        metavar="STAGE=PATH_OR_URL",
        help="weights of one stage of the chain; repeatable; overrides --run's",
    )
    parser.add_argument(
        "--captions", type=int, help="held-out captions to render (default: the run's generate.eval_captions)"
    )
    parser.add_argument(
        "--fid-features",
        choices=sorted(FEATURE_EXTRACTORS),
        help="FID's feature extractor (default: the run's generate.fid_features)",
    )
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
        if not args.tracking_uri:
            raise ValueError(
                "--run needs the MLflow store that holds it: pass --tracking-uri or set $MLFLOW_TRACKING_URI"
            )
        if args.captions is not None and args.captions < 2:
            raise ValueError(f"--captions must be at least 2 (FID needs a covariance), got {args.captions}")
        storage = apply_overrides(StorageConfig(), args.storage)
        client = MlflowClient(args.tracking_uri)
        chain = chain_of_run(client, args.run)
        chain = dataclasses.replace(chain, weights={**chain.weights, **dict(map(_stage_weights, args.weights))})
        evaluation = evaluation_of_run(client, chain, storage, args.captions, args.fid_features)
        metrics = evaluate(chain, evaluation, storage)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    run_id = log_to_mlflow(client, chain, evaluation, metrics)
    for name, value in sorted(metrics.items()):
        print(f"{name} {value:.4g}")
    print(
        f"{len(evaluation.held_out.captions)} held-out captions; MLflow: {client.tracking_uri} run {run_id}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
