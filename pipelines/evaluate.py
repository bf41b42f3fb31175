"""Scores of a trained chain at any time after its run: ``python -m pipelines.evaluate``.

The chain (Stage C -> Stage B -> Stage A) renders the held-out captions of a pipeline run that
MLflow recorded (``--run``: the first ``generate.eval_captions`` rows of its validation split, with
its generate settings), and is scored as Stage C's evaluations score it during training
(pipelines/chain_evaluation.py): CLIP score, FID against the rows' real images, and on the demo
colour accuracy. Each stage the run trained also gets its held-out loss again, as its training
logged it at each evaluation (pipelines/training/evaluation.py): the same validation rows and
settings, from the run's config, logged as ``<stage>/val/<term>`` (``stage_c/val/loss``). The
weights are the run's final ones, or a path or URL per stage (``--weights stage_c=...``: a
checkpoint exported elsewhere, scored on the same captions and rows). The scores go to MLflow as a
run of their own, ``evaluate``, a child of ``--run``, and to the console.

    python -m pipelines.evaluate --run <the run id full.py printed> --tracking-uri sqlite:///work/tiny/mlflow.db
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipelines import decode, pre_encode, trained_weights
from pipelines.chain_evaluation import ChainEvaluation, ChainScorer, held_out_captions
from pipelines.config import RunConfig, load_config
from pipelines.embed import EmbedConfig
from pipelines.generate_phase import SampleConfig
from pipelines.ledger import read_manifest
from pipelines.overrides import apply_overrides
from pipelines.phases import PhaseContext
from pipelines.quality import FEATURE_EXTRACTORS
from pipelines.sample import Chain, _stage_weights, chain_of_run, loaded_chain
from pipelines.storage import StorageConfig, filesystem
from pipelines.train_phase import training_needed, validation_spec, weights_url
from pipelines.trainable import REGISTRY
from pipelines.training.evaluation import validation_metrics

RUN_NAME = "evaluate"
# The pipeline run's settings the scores depend on, as full.py logs them (params "<section>.<name>").
_SAMPLE_SETTINGS = ("size", "prior_guidance", "seed", "score_colours", "eval_captions", "fid_features")
_EMBED_SETTINGS = ("clip_model", "clip_pretrained", "seed")
# The sections of the run's config its held-out losses depend on: the rows (decode, pre_encode) and
# each stage's loss settings. The storage settings are evaluate's own (the run logs its secrets masked).
_LOSS_SECTIONS = ("decode", "pre_encode", "train_a", "train_semantic", "train_b", "train_c")


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


def config_of_run(client: MlflowClient, run_id: str, storage: StorageConfig) -> RunConfig:
    """The config a pipeline run trained with, as far as its held-out losses depend on it: its
    ``config.json`` (which full.py logs) over the named config, with ``storage``."""
    params = client.get_run(run_id).data.params
    with tempfile.TemporaryDirectory() as folder:
        try:
            flat = json.loads(Path(client.download_artifacts(run_id, "config.json", folder)).read_text())
        except (OSError, MlflowException):
            raise ValueError(f"run {run_id} logged no config.json: is it a run of pipelines/full.py?") from None
    overrides = [f"{key}={_as_override(value)}" for key, value in flat.items() if key.split(".")[0] in _LOSS_SECTIONS]
    config = load_config(params["config"], overrides)
    return dataclasses.replace(config, work_dir=params["work_dir"], storage=storage)


def _as_override(value) -> str:
    """A value of ``config.json`` as ``--set`` takes it."""
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def held_out_losses(config: RunConfig, named: dict[str, str]) -> dict[str, float]:
    """``<stage>/val/<term>`` of each stage the run trained, or that ``named`` gives weights of, on the
    validation rows its training evaluated on; a stage whose weights are not there is skipped with a
    line on stderr, unless it is named."""
    context = PhaseContext(config=config, work_dir=config.work_dir.rstrip("/"), shards_url="", tracker=None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    metrics: dict[str, float] = {}
    for stage in REGISTRY.values():
        if stage.name not in named and not training_needed(config, stage.name):
            continue
        if not stage.exports_its_loss:
            print(f"{stage.name}: no held-out loss: its exported weights leave out what it measures", file=sys.stderr)
            continue
        url = named.get(stage.name) or weights_url(context, stage.name)
        fs, path = filesystem(trained_weights.split_entry(url)[0], config.storage)
        if not fs.exists(path):
            if stage.name in named:
                raise ValueError(f"{stage.name} weights not found at {url}")
            print(f"{stage.name}: no held-out loss: no weights at {url} (has {stage.phase} finished?)", file=sys.stderr)
            continue
        spec = validation_spec(context, stage)
        if not spec.validation_batches:
            print(
                f"{stage.name}: no held-out loss: no validation rows ({stage.config_section}.eval_samples)",
                file=sys.stderr,
            )
            continue
        model = trained_weights.load(stage.export(stage.build_model(spec)), url, config.storage).to(device)
        section = getattr(config, stage.config_section)
        # The batch size of the training loop's evaluation, whose sums the loss reproduces.
        losses = validation_metrics(stage.task(spec, device), model, section.global_batch_size // section.workers)
        metrics.update({f"{stage.name}/{name}": value for name, value in losses.items()})
    return metrics


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
        named = dict(map(_stage_weights, args.weights))
        chain = dataclasses.replace(chain, weights={**chain.weights, **named})
        evaluation = evaluation_of_run(client, chain, storage, args.captions, args.fid_features)
        # The chain first: its load refuses a weights file of another stage by name.
        metrics = evaluate(chain, evaluation, storage)
        metrics.update(held_out_losses(config_of_run(client, chain.pipeline_run_id, storage), named))
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
