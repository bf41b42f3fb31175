"""Pre-encode throughput with the v2 encoder shapes: the encoders alone, and the phase end to end.

Two measurements in one run, random weights throughout:

- direct (the ceiling): each encoder of the pre-encode phase called on one in-memory batch, as
  ``PreEncodeShard.encode`` calls it: Stage A on ``resolution`` px crops (``stage_b_latent``), the
  semantic compressor on the same crops, resized to 768 px inside it (``stage_c_latent``), and the
  CLIP bigG and CLIP H text towers on 77 tokens (``text_stage_c``, ``text_stage_b``). Samples/s per
  encoder, and combined for the encoders that the end-to-end run uses. Those are timed again after
  the end-to-end run and their faster run is the ceiling, so that a change in machine load between
  the two measurements cannot flatter the ratio.
- end to end: the pre-encode phase itself (``pipelines.pre_encode.phase`` run by
  ``pipelines.shard_phase.run`` on a local Ray, one actor) over generated decode and embed shards
  of JPEG crops: it reads Parquet, decodes the crops, encodes them, converts to float16 and writes
  latent shards. Its steady rate comes from the shards after the first (the time between the first
  and the last shard's commit), so that the actor's start-up, which a long run amortises, stays
  out; the rate with start-up included is printed beside it.

end to end / direct says whether the pipeline keeps the encoders busy (1.0: no overhead at all). The
run also checks what the end-to-end run stored: one batch of image latents, and of text hidden states
when it stored them, against the same encoders called directly (it fails beyond rounding).
``--actors 2`` runs two actors that share the device; ``--calls-per-actor 2`` lets each actor work on
two shards at once (``StepResources.calls_per_actor``).

    python bench/encode.py                                     # CPU, v2 shapes, a handful of samples
    python bench/encode.py --models tiny                       # CPU, every column through Ray, quickly
    python bench/encode.py --device cuda                       # GPU, bf16 autocast, image encoders end to end
    python bench/encode.py --device cuda --text hidden_states  # ... and both text towers in the actor

With v2 the end-to-end run stores tokens only by default (``--text tokens``: the two image encoders,
as the v2 figures of docs/benchmarks.md were taken); ``--text hidden_states`` runs both text towers in
the actor too, as the v2 config does. The v2 towers load their weights from the hub by name, which an
offline machine cannot do, so both runs build them randomly initialised at the v2 architecture
(``pre_encode.text_weights=random``, seeded: the actor and the direct run build the same towers),
which costs what the real ones cost. Tiny towers are random in any case, so with ``--models tiny``
the end-to-end run encodes every column by default.

On CPU the direct run uses torch's threads and the actor as many (``--actor-cpus``). On a machine
that other jobs share, ``OMP_NUM_THREADS=1`` gives steadier figures: threads that must meet at
every parallel region stall whenever another process holds a core.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.decode import load_average, synthetic_image  # noqa: E402
from cluster.resources import StepResources  # noqa: E402
from pipelines import decode, embed, pre_encode, schema, shard_phase  # noqa: E402
from pipelines.pre_encode import PreEncodeConfig  # noqa: E402
from pipelines.runtime import RayConfig, init_ray  # noqa: E402
from pipelines.storage import StorageConfig  # noqa: E402
from stages.semantic import SEMANTIC_CONFIGS, SemanticCompressor  # noqa: E402
from stages.stage_a import STAGE_A_CONFIGS, StageA  # noqa: E402
from stages.text import TEXT_CONFIGS, TextEncoder, tokenize  # noqa: E402

IMAGE_COLUMNS = (schema.STAGE_B_LATENT, schema.STAGE_C_LATENT)
TEXT_COLUMNS = (schema.TEXT_STAGE_C, schema.TEXT_STAGE_B)
ENCODERS = {
    schema.STAGE_B_LATENT: "Stage A",
    schema.STAGE_C_LATENT: "semantic compressor",
    schema.TEXT_STAGE_C: "text tower (bigG in v2)",
    schema.TEXT_STAGE_B: "text tower (H in v2)",
}
# Reference rates handed to the project, measured outside this repository: the diffusers v2
# definitions, random weights, bf16 autocast, eager, one H200. None was given for the CLIP H tower.
H200_REFERENCE = {
    schema.STAGE_B_LATENT: "655 images/s (512 px, batch 64)",
    schema.STAGE_C_LATENT: "737 images/s (768 px, batch 64)",
    schema.TEXT_STAGE_C: "5,110 captions/s (batch 256)",
    schema.TEXT_STAGE_B: "-",
}


class Sizes(NamedTuple):
    """Default sizes of a run: small on CPU, where v2 takes seconds per image, large on a GPU."""

    resolution: int
    batch: int
    steps: int
    warmup: int
    shards: int
    batches_per_shard: int


# Keyed by (device, models). Tiny encoders take milliseconds, so they need more samples to time.
DEFAULT_SIZES = {
    ("cpu", "v2"): Sizes(resolution=512, batch=2, steps=2, warmup=1, shards=3, batches_per_shard=2),
    ("cpu", "tiny"): Sizes(resolution=64, batch=32, steps=10, warmup=2, shards=3, batches_per_shard=4),
    ("cuda", "v2"): Sizes(resolution=512, batch=64, steps=20, warmup=3, shards=8, batches_per_shard=16),
    ("cuda", "tiny"): Sizes(resolution=64, batch=256, steps=20, warmup=3, shards=8, batches_per_shard=16),
}
# Rounding (float16 storage; bf16 on a GPU, where batch composition changes the kernels) stays far
# below this; a latent read from host memory before its copy landed does not.
MAX_DIFFERENCE = 0.05
EMBED_DIM = 768  # CLIP ViT-L/14, the v2 config's embed model: only the embed shards' size depends on it
WORDS = (
    "a",
    "photo",
    "of",
    "the",
    "red",
    "small",
    "dog",
    "house",
    "on",
    "beach",
    "at",
    "sunset",
    "with",
    "painting",
    "portrait",
    "woman",
    "city",
    "street",
    "night",
    "green",
    "forest",
    "mountain",
    "lake",
)


def captions(rng: np.random.Generator, count: int) -> list[str]:
    """Captions of 5 to 40 words (the towers run on all 77 positions whatever the words)."""
    return [" ".join(rng.choice(WORDS, rng.integers(5, 41))) for _ in range(count)]


def seconds_per_batch(encode: Callable[[], torch.Tensor], device: torch.device, warmup: int, steps: int) -> float:
    """Median wall time of one call, under the autocast that ``PreEncodeShard.encode`` uses."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = []
    with torch.inference_mode(), autocast:
        for step in range(warmup + steps):
            start = time.perf_counter()
            encode()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= warmup:
                times.append(time.perf_counter() - start)
    # The median resists the hiccups of a shared machine.
    return statistics.median(times)


def direct_seconds(
    models: str, columns: tuple[str, ...], device: torch.device, batch: int, resolution: int, warmup: int, steps: int
) -> dict[str, float]:
    """Seconds per batch of the encoders of ``columns`` on in-memory inputs, keyed by column."""
    rng = np.random.default_rng(0)
    images = np.stack([np.asarray(synthetic_image(rng, resolution, resolution)) for _ in range(batch)])
    # The layout PreEncodeShard.encode hands the encoders: (B, 3, R, R) viewed from (B, R, R, 3), i.e.
    # channels-last strides. CPU convolutions run faster on those (Stage A ~1.3x on the 2-core
    # machine of docs/benchmarks.md), so a contiguous tensor would understate the ceiling.
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).to(device, torch.float32) / 255
    tokens, mask = (t.to(device) for t in tokenize(captions(rng, batch)))
    # Random towers of the configured architecture, as the end-to-end run's (pre_encode.text_weights=random):
    # the cost of a tower does not depend on its weights.
    text = TEXT_CONFIGS[models]().with_random_weights()
    # Built one at a time and freed after their measurement: the v2 bigG tower alone is 2.8 GB in fp32.
    builders: dict[str, Callable[[], Callable[[], torch.Tensor]]] = {
        schema.STAGE_B_LATENT: lambda: StageA(STAGE_A_CONFIGS[models]()).to(device).eval().encode_stage_b_latents,
        schema.STAGE_C_LATENT: lambda: (
            SemanticCompressor(SEMANTIC_CONFIGS[models]()).to(device).eval().encode_stage_c_latents
        ),
        schema.TEXT_STAGE_C: lambda: TextEncoder(text.stage_c).to(device),
        schema.TEXT_STAGE_B: lambda: TextEncoder(text.stage_b).to(device),
    }
    seconds = {}
    for column in columns:
        encoder = builders[column]()
        inputs = (pixels,) if column in IMAGE_COLUMNS else (tokens, mask)
        seconds[column] = seconds_per_batch(functools.partial(encoder, *inputs), device, warmup, steps)
        del encoder
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the end-to-end actor shares this GPU
    return seconds


def write_input_shards(folder: Path, *, shards: int, shard_size: int, resolution: int) -> list[str]:
    """Decode and embed phase outputs of generated samples (JPEG crops, as the v2 config stores them)."""
    rng = np.random.default_rng(0)
    (folder / "decode").mkdir()
    (folder / "embed").mkdir()
    names = [schema.shard_name(index) for index in range(shards)]
    for shard in names:
        decoded = []
        for index, caption in enumerate(captions(rng, shard_size)):
            metadata = {column: None for column in schema.SAMPLE_METADATA}
            metadata.update({schema.KEY: f"{shard}{index:04d}", schema.SHARD: shard})
            crop = decode.encode_crop(synthetic_image(rng, resolution, resolution), "jpeg")
            decoded.append({**metadata, schema.CAPTION: caption, schema.IMAGE: crop, schema.DROP_REASON: None})
        embedded = [
            {
                **row,
                schema.CLIP_IMAGE_EMBEDDING: np.zeros(EMBED_DIM),
                schema.CLIP_TEXT_EMBEDDING: np.zeros(EMBED_DIM),
                schema.CLIP_SIMILARITY: 0.3,
                schema.AESTHETIC_SCORE: 5.5,
            }
            for row in decoded
        ]
        pq.write_table(
            shard_phase.rows_to_table(decoded, decode.OUTPUT_SCHEMA), folder / "decode" / schema.shard_parquet(shard)
        )
        pq.write_table(
            shard_phase.rows_to_table(embedded, embed.output_schema(EMBED_DIM)),
            folder / "embed" / schema.shard_parquet(shard),
        )
    return names


def end_to_end(folder: Path, shards: list[str], config: PreEncodeConfig, resolution: int) -> tuple[float, float]:
    """(steady samples/s, samples/s with the actors' start-up) of the pre-encode phase over the shards."""
    output = folder / "pre_encode"
    storage = StorageConfig()
    phase = pre_encode.phase(decoded_url=str(folder / "decode"), embedded_url=str(folder / "embed"),
                             output_url=str(output), embedded_fingerprint={"bench": "encode"},
                             crops=((resolution, resolution),), resolution=resolution, config=config,
                             validation_threshold=0, storage=storage)  # fmt: skip
    start = time.perf_counter()
    manifest, _ = shard_phase.run(phase, shards, str(output), storage)
    seconds = time.perf_counter() - start
    assert manifest.kept == manifest.samples_in > 0, f"pre-encode dropped generated samples: {manifest.dropped()}"
    # Each actor call takes shards one after another and each output is moved into place when its shard
    # is done, so from the moment every call has committed its first shard to the last commit, the
    # actors wrote all the shards but their first ones (all shards hold the same number of samples).
    first = config.resources.max_actors * config.resources.calls_per_actor
    commits = sorted(os.stat(output / schema.shard_parquet(shard)).st_mtime for shard in shards)
    after_first = manifest.samples_in * (len(shards) - first) / len(shards)
    return after_first / (commits[-1] - commits[first - 1]), manifest.samples_in / seconds


def largest_difference(
    folder: Path, shard: str, config: PreEncodeConfig, resolution: int, device: torch.device
) -> dict[str, float]:
    """Per stored column (image latents, and text hidden states when stored), the largest difference
    between what the end-to-end run stored for the shard's first batch and the same encoders (an actor
    built the same way: same weights) called directly on those crops and captions.

    The direct call copies to the host synchronously, so a copy that the pipeline read before it had
    landed shows up here; in float16 and bf16 the two differ only by rounding."""
    step = pre_encode.PreEncodeShard(
        decoded_url=str(folder / "decode"),
        embedded_url=str(folder / "embed"),
        output_url=str(folder / "pre_encode"),
        config=config,
        crops=((resolution, resolution),),
        resolution=resolution,
        validation_threshold=0,
        fingerprint={},
        storage=StorageConfig(),
    )
    stored = pq.read_table(folder / "pre_encode" / schema.shard_parquet(shard)).slice(0, config.resources.batch_size)
    decoded = {
        row[schema.KEY]: row[schema.IMAGE]
        for row in pq.read_table(folder / "decode" / schema.shard_parquet(shard)).to_pylist()
    }
    crops = [np.asarray(Image.open(io.BytesIO(decoded[key])).convert("RGB")) for key in stored[schema.KEY].to_pylist()]
    pixels = torch.from_numpy(np.stack(crops)).to(device).permute(0, 3, 1, 2).float() / 255
    tokens, mask = (t.to(device) for t in tokenize(stored[schema.CAPTION].to_pylist()))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.inference_mode(), autocast:
        direct = {
            schema.STAGE_B_LATENT: step.stage_a.encode_stage_b_latents(pixels),
            schema.STAGE_C_LATENT: step.semantic.encode_stage_c_latents(pixels),
            **{name: encoder(tokens, mask) for name, encoder in step.text_encoders.items()},
        }
    differences = {}
    for name, value in direct.items():
        written = torch.from_numpy(stored[name].combine_chunks().to_numpy_ndarray().astype(np.float32))
        differences[name] = (written - value.float().cpu()).abs().max().item() / value.float().abs().max().item()
    return differences


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="sizes left unset, per --device and --models:\n"
        + "\n".join(f"  {device} {models}: {sizes}" for (device, models), sizes in DEFAULT_SIZES.items()),
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", default="v2", choices=sorted(STAGE_A_CONFIGS), help="encoder sizes")
    parser.add_argument("--resolution", type=int, default=None, help="side of the decoded crops in pixels")
    parser.add_argument("--batch", type=int, default=None, help="images per forward pass")
    parser.add_argument("--steps", type=int, default=None, help="timed batches per encoder")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches first")
    parser.add_argument("--shards", type=int, default=None, help="end-to-end input shards")
    parser.add_argument("--shard-size", type=int, default=None, help="samples per end-to-end input shard")
    parser.add_argument(
        "--text",
        default=None,
        choices=["tokens", "hidden_states"],
        help="what the end-to-end run stores (default: tokens when the text towers load from "
        "the hub, as v2's do; else hidden_states); the text towers are random either way",
    )
    parser.add_argument(
        "--actor-cpus",
        type=float,
        default=None,
        help="CPUs of the pre-encode actor; Ray gives it as many torch threads (default: the "
        "threads of the direct run on cpu, 8 on cuda as in the v2 config)",
    )
    parser.add_argument(
        "--actors",
        type=int,
        default=1,
        help="pre-encode actors; on cuda they share the one GPU (each holds 1/actors of it)",
    )
    parser.add_argument("--calls-per-actor", type=int, default=1, help="shards each actor works on at once")
    parser.add_argument(
        "--no-dashboard",
        dest="dashboard",
        action="store_false",
        help="local Ray without its dashboard (a minimal ray install has none)",
    )
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU")
    sizes = DEFAULT_SIZES[args.device, args.models]
    resolution, batch = args.resolution or sizes.resolution, args.batch or sizes.batch
    steps, warmup = args.steps or sizes.steps, args.warmup if args.warmup is not None else sizes.warmup
    shards, shard_size = args.shards or sizes.shards, args.shard_size or batch * sizes.batches_per_shard
    if shards <= args.actors * args.calls_per_actor:
        parser.error(
            "--shards must exceed --actors x --calls-per-actor: the steady rate is measured over the "
            "shards after each actor call's first"
        )
    towers = TEXT_CONFIGS[args.models]()
    text_from_hub = any(tower.pretrained for tower in (towers.stage_c, towers.stage_b))
    text = args.text or ("tokens" if text_from_hub else "hidden_states")
    actor_cpus = args.actor_cpus or (8 if cuda else torch.get_num_threads())
    device = torch.device(args.device)
    device_name = (
        torch.cuda.get_device_name()
        if cuda
        else (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    )
    print(f"device: {device_name}; torch {torch.__version__}; models {args.models}; {resolution} px crops; "
          f"batch {batch}; bf16 autocast {cuda}")  # fmt: skip
    print(f"load average at start: {load_average()}")

    used = IMAGE_COLUMNS + (TEXT_COLUMNS if text == "hidden_states" else ())
    seconds = direct_seconds(args.models, tuple(ENCODERS), device, batch, resolution, warmup, steps)
    init_ray(RayConfig(progress_bars=False, dashboard=args.dashboard))
    # Random text towers only where the actor builds them: with tokens, the setting is refused as ignored.
    text_weights = "random" if text == "hidden_states" else "pretrained"
    config = PreEncodeConfig(
        models=args.models,
        stage_a_weights="",
        semantic_weights="",
        text=text,
        text_weights=text_weights,
        resources=StepResources(
            num_cpus=actor_cpus,
            num_gpus=int(cuda) / args.actors,
            min_actors=args.actors,
            max_actors=args.actors,
            batch_size=batch,
            calls_per_actor=args.calls_per_actor,
        ),
    )
    with tempfile.TemporaryDirectory(prefix="bench-encode-") as folder:
        names = write_input_shards(Path(folder), shards=shards, shard_size=shard_size, resolution=resolution)
        steady, with_startup = end_to_end(Path(folder), names, config, resolution)
        ray.shutdown()  # Ray's own processes must not compete with the measurements below
        differences = largest_difference(Path(folder), names[-1], config, resolution, device)
    # Timed again after the end-to-end run; the faster run of each is the ceiling (see the docstring).
    again = direct_seconds(args.models, used, device, batch, resolution, warmup, steps)

    print(f"\ndirect: encoders on in-memory batches ({steps} timed after {warmup} warm-up, median; "
          f"before / after the end-to-end run)")  # fmt: skip
    for column, value in seconds.items():
        after = f" / {batch / again[column]:9.2f}" if column in again else " " * 12
        reference = f"   [H200 reference: {H200_REFERENCE[column]}]" if args.models == "v2" else ""
        print(f"  {column:15s} {ENCODERS[column]:24s} {batch / value:9.2f}{after} samples/s{reference}")
    best = {column: min(value, again.get(column, value)) for column, value in seconds.items()}
    direct_all = batch / sum(best.values())
    direct_used = batch / sum(best[column] for column in used)
    print(f"  all four encoders, one after another (best runs): {direct_all:9.2f} samples/s")
    if len(used) < len(ENCODERS):
        print(f"  {' + '.join(used)} (best runs): {direct_used:9.2f} samples/s (the end-to-end run's work)")
    gpus = f" and {1 / args.actors:g} GPU" if cuda else ""
    random_towers = ", text towers randomly initialised" if text == "hidden_states" else ""
    print(f"\nend to end: pre-encode phase through Ray Data, text={text}{random_towers}, {shards} shards x {shard_size} samples, "
          f"{args.actors} actor(s) with {actor_cpus:g} CPUs{gpus} and {args.calls_per_actor} call(s) at once each")  # fmt: skip
    print(f"  steady (after each call's first shard):  {steady:9.2f} samples/s")
    print(f"  with the actors' start-up:               {with_startup:9.2f} samples/s")
    print(f"end to end / direct (same encoders): {steady / direct_used:.2f}x")
    print(
        "stored vs direct, first batch of the last shard (largest difference / largest value): "
        + ", ".join(f"{name} {value:.2e}" for name, value in differences.items())
    )
    assert max(differences.values()) < MAX_DIFFERENCE, (
        f"the stored latents are not what the encoders compute (more than {MAX_DIFFERENCE} of the largest value)"
    )
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
