"""The last phase: images from the trained chain for fixed prompts, logged for a person to look at.

text -> Stage C with guidance -> Stage B -> Stage A decode, with the run's own weights. On the
demo data (coloured shapes) it also measures whether the model learned the text conditioning:
the share of images whose dominant colour is the one the prompt names, against the same
pipeline given empty prompts.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import ray
import torch
from PIL import Image

from cluster.resources import GPU, check_gpu_resource, gpu_request
from pipelines import fingerprints, trained_weights
from pipelines.demo_data import BACKGROUNDS, COLOURS
from pipelines.quality import FEATURE_EXTRACTORS
from pipelines.reports import image_grid, to_uint8
from pipelines.storage import StorageConfig, filesystem, write_atomically
from stages.generate import GENERATE_CONFIGS, Wuerstchen, build_models, generate

PHASE = "generate"
SUMMARY_FILE = "summary.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """What the generate phase renders."""

    prompts: tuple[str, ...] = ("a photograph of an astronaut riding a horse", "a red fox in the snow")
    """Prompts rendered at the end of the pipeline; the first eight also make Stage C's training grids."""
    size: int = 1024
    """Image side in pixels."""
    prior_guidance: float = 4.0
    """Classifier-free guidance of Stage C."""
    seed: int = 0
    """Seed of the sampling noise."""
    score_colours: bool = False
    """Score the dominant colour of each image against the colour its prompt names (demo data)."""
    num_gpus: float = 1.0
    """GPUs of the Ray task that renders; 0 renders on CPU."""
    eval_captions: int = 256
    """Held-out captions the chain renders at each evaluation of Stage C's training, scored by CLIP
    score and FID against their real images (pipelines/chain_evaluation.py); 0: none."""
    fid_features: str = "inception-v3-fid"
    """Feature extractor of FID (``pipelines.quality.FEATURE_EXTRACTORS``); FIDs compare only with the same one."""
    gpu_resource: str = GPU
    """The Ray resource ``num_gpus`` asks for: GPU, or a custom resource that a node type offers in
    place of GPUs (the task then renders on CPU there)."""

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("prompts must hold at least one prompt")
        if self.eval_captions < 0 or self.eval_captions == 1:
            raise ValueError(
                f"generate.eval_captions must be 0 (none) or at least 2 (FID needs a covariance), "
                f"got {self.eval_captions}"
            )
        if self.fid_features not in FEATURE_EXTRACTORS:
            raise ValueError(
                f"generate.fid_features: unknown {self.fid_features!r}, choose one of {', '.join(FEATURE_EXTRACTORS)}"
            )
        check_gpu_resource(self.gpu_resource)
        if self.size < 8:
            raise ValueError(f"size must be >= 8 pixels, got {self.size}")

    def outcome(self) -> dict[str, Any]:
        """The settings that decide the images and scores (where they render does not, nor what Stage C's
        evaluations render)."""
        elsewhere = {"num_gpus", "gpu_resource", "eval_captions", "fid_features"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in elsewhere}


def colour_prompts(per_colour: int) -> tuple[str, ...]:
    """``per_colour`` prompts for each demo colour, cycling through shapes and backgrounds."""
    variants = [(shape, background) for background in BACKGROUNDS for shape in ("circle", "square", "triangle")]
    return tuple(
        f"a {colour} {variants[i % len(variants)][0]} on a {variants[i % len(variants)][1]} background"
        for colour in COLOURS
        for i in range(per_colour)
    )


def dominant_colour(image: np.ndarray) -> str | None:
    """The demo colour most pixels of ``image`` (H, W, 3 uint8) are closest to, backgrounds aside.

    None when no pixel is closer to a shape colour than to every background.
    """
    palette = {**COLOURS, **BACKGROUNDS}
    distances = np.stack([np.abs(image.astype(np.int32) - rgb).sum(-1) for rgb in palette.values()])  # (7, H, W)
    nearest = distances.argmin(0)
    counts = [int((nearest == index).sum()) for index in range(len(COLOURS))]
    return list(COLOURS)[int(np.argmax(counts))] if max(counts) else None


def named_colour(prompt: str) -> str | None:
    words = prompt.lower().split()
    return next((colour for colour in COLOURS if colour in words), None)


def colour_scores(images: list[np.ndarray], prompts: list[str]) -> dict[str, float]:
    """Share of images whose dominant colour is the one their prompt names, overall and per colour."""
    return colour_accuracy([dominant_colour(image) for image in images], prompts)


def colour_accuracy(dominant_colours: list[str | None], prompts: list[str]) -> dict[str, float]:
    """``colour_scores`` from each image's dominant colour."""
    hits: dict[str, list[bool]] = {}
    for found, prompt in zip(dominant_colours, prompts, strict=True):
        colour = named_colour(prompt)
        if colour is not None:
            hits.setdefault(colour, []).append(found == colour)
    scores = {f"colour_accuracy/{colour}": float(np.mean(h)) for colour, h in sorted(hits.items())}
    scores["colour_accuracy"] = float(np.mean([x for h in hits.values() for x in h])) if hits else float("nan")
    return scores


def load_chain(
    models_name: str, weights_urls: dict[str, str], storage: StorageConfig, device: torch.device
) -> Wuerstchen:
    """The chain of size ``models_name`` with each named stage's weights, in eval mode on ``device``."""
    models = build_models(models_name)
    for stage, url in weights_urls.items():
        trained_weights.load(getattr(models, stage), url, storage)
    for module in (models.text_c, models.stage_c, models.text_b, models.stage_b, models.stage_a):
        module.to(device).eval()
    return models


def render(
    models_name: str,
    weights_urls: dict[str, str],
    storage: StorageConfig,
    prompts: list[str],
    size: int,
    guidance: float,
    seed: int,
) -> np.ndarray:
    """Images (N, size, size, 3) uint8 for ``prompts``, on a GPU when the task holds one. The weights
    are read here, on the task's node: a copy the driver made would be on the driver's node only."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return render_with(
        load_chain(models_name, weights_urls, storage, device), models_name, prompts, size, guidance, seed
    )


def render_with(
    models: Wuerstchen, models_name: str, prompts: list[str], size: int, guidance: float, seed: int
) -> np.ndarray:
    """Images (N, size, size, 3) uint8 of the loaded chain ``models`` for ``prompts``, on its device."""
    device = next(models.stage_c.parameters()).device
    config = dataclasses.replace(GENERATE_CONFIGS[models_name](), prior_guidance=guidance)
    generated = generate(
        prompts,
        models=models,
        config=config,
        height=size,
        width=size,
        generator=torch.Generator(device).manual_seed(seed),
    )
    return to_uint8(generated.images)


def render_args(
    config: SampleConfig, models_name: str, weights_urls: dict[str, str], storage: StorageConfig
) -> dict[str, tuple]:
    """The arguments of each ``render`` task: the prompts, and with ``score_colours`` as many empty ones."""
    prompts = list(config.prompts)
    sets = {"prompted": prompts, **({"empty": [""] * len(prompts)} if config.score_colours else {})}
    return {
        name: (models_name, weights_urls, storage, texts, config.size, config.prior_guidance, config.seed)
        for name, texts in sets.items()
    }


def fingerprint(config: SampleConfig, models_name: str, weights: dict[str, Any]) -> dict[str, Any]:
    """What decides the phase's images: the weights (``weights_fingerprints``), the model sizes and the settings."""
    return fingerprints.of(input=weights, settings={"models": models_name, **config.outcome()})


def weights_fingerprints(weights_urls: dict[str, str], storage: StorageConfig) -> dict[str, Any]:
    """Each stage's weights, as ``trained_weights.weights_fingerprint`` identifies them."""
    return {stage: trained_weights.weights_fingerprint(url, storage) for stage, url in weights_urls.items() if url}


def read_summary(output_url: str, storage: StorageConfig) -> dict[str, Any] | None:
    """The summary of a finished run of the phase (fingerprint and metrics), or None."""
    fs, path = filesystem(f"{output_url}/{SUMMARY_FILE}", storage)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as file:
        return json.load(file)


def write_summary(
    output_url: str, fingerprint: dict[str, Any], metrics: dict[str, float], storage: StorageConfig
) -> None:
    fs, folder = filesystem(output_url, storage)
    fs.makedirs(folder, exist_ok=True)
    summary = json.dumps({"fingerprint": fingerprint, "metrics": metrics}, indent=1, sort_keys=True).encode()
    write_atomically(fs, f"{folder}/{SUMMARY_FILE}", lambda stream: stream.write(summary))


def run(
    *,
    config: SampleConfig,
    models_name: str,
    weights_urls: dict[str, str],
    output_url: str,
    storage: StorageConfig,
    tracked_run,
) -> str:
    current = fingerprint(config, models_name, weights_fingerprints(weights_urls, storage))
    previous = read_summary(output_url, storage)
    if previous is not None and fingerprints.is_complete(previous["fingerprint"], current):
        tracked_run.log_metrics(previous["metrics"])
        tracked_run.set_tags({"phase.outcome": "skipped: output already complete"})
        return "skipped: output already complete"
    # An empty URL (pre_encode.stage_a_weights empty: plumbing tests) leaves that stage random.
    weights_urls = {stage: url for stage, url in weights_urls.items() if url}
    for stage, url in weights_urls.items():
        weights_fs, path = filesystem(url, storage)
        if not weights_fs.exists(path):
            raise FileNotFoundError(f"no {stage} weights at {url}: run its training phase first")
    task = ray.remote(num_cpus=1, **gpu_request(config.num_gpus, config.gpu_resource))(render)
    prompts = list(config.prompts)
    jobs = {name: task.remote(*args) for name, args in render_args(config, models_name, weights_urls, storage).items()}
    images = {name: ray.get(job) for name, job in jobs.items()}
    tracked_run.log_image(
        image_grid([Image.fromarray(i) for i in images["prompted"]], prompts, columns=8), "samples.png"
    )
    metrics: dict[str, float] = {}
    if config.score_colours:
        metrics = colour_scores(list(images["prompted"]), prompts)
        metrics["empty_prompt_colour_accuracy"] = colour_scores(list(images["empty"]), prompts)["colour_accuracy"]
        tracked_run.log_image(
            image_grid([Image.fromarray(i) for i in images["empty"]], ["(empty prompt)"] * len(prompts), columns=8),
            "samples_empty_prompt.png",
        )
        tracked_run.log_metrics(metrics)
    write_summary(output_url, current, metrics, storage)
    tracked_run.set_tags({"phase.outcome": "ran"})
    scored = (
        f"; colour accuracy {metrics['colour_accuracy']:.2f} (empty prompts {metrics['empty_prompt_colour_accuracy']:.2f})"
        if metrics
        else ""
    )
    return f"ran; {len(prompts)} images{scored}"
