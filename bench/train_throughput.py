"""Ray Train overhead: the training loop of ``pipelines/train.py`` on Ray Train vs a bare PyTorch loop.

Both make the same steps (``pipelines.train.train_step`` and the EMA update) on the same model and
the same synthetic latents of the stage's shapes. The Ray Train run (one worker) reads them from a
Parquet file through the loop's epoch reader every epoch, or with ``--cache-data`` only in its
first epoch (``train.cache_data``), and reports its samples/s and data-wait fraction to MLflow;
the bare loop holds them as tensors on the device. Short epochs (``--batches-per-epoch``) show
the cost of starting each pass over the data. Startup (worker group, process group, first steps) is left out of both: the Ray figures
are the steady-state log windows after the first, the bare loop skips as many warm-up steps.

    python bench/train_throughput.py                                    # CPU, tiny Stage C
    python bench/train_throughput.py --device cuda --models v2 --batch 32 --steps 200

Prints samples/s of both, their ratio and the Ray run's data-wait fraction.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipelines import schema  # noqa: E402
from pipelines.pre_encode import PreEncodeConfig, output_schema  # noqa: E402
from pipelines.runtime import RayConfig, init_ray  # noqa: E402
from pipelines.train import WorkerArgs, trainer  # noqa: E402
from pipelines.trainable import REGISTRY, build_model, build_task  # noqa: E402
from pipelines.trainable.base import TaskSpec  # noqa: E402
from pipelines.training.config import TrainConfig  # noqa: E402
from pipelines.training.data import TRAIN_DATASET, TrainingRows, count_rows  # noqa: E402
from pipelines.training.step import build_optimizer, train_step, update_ema  # noqa: E402

RESOLUTION = {"tiny": 64, "v2": 512}


def synthetic_columns(spec: TaskSpec, samples: int, resolution: int) -> dict[str, np.ndarray]:
    """Random values of the latent-shard columns the task reads, in their stored shapes and dtypes."""
    fields = output_schema(PreEncodeConfig(models=spec.models), ((resolution, resolution),), resolution)
    rng = np.random.default_rng(0)
    columns = {}
    for name in REGISTRY[spec.stage].columns(spec):
        tensor_type: pa.FixedShapeTensorType = fields.field(name).type
        dtype = tensor_type.value_type.to_pandas_dtype()
        shape = (samples, *tensor_type.shape)
        columns[name] = (
            rng.integers(0, 1000, shape) if np.issubdtype(dtype, np.integer) else rng.standard_normal(shape)
        ).astype(dtype)
    return columns


def bare_loop(
    spec: TaskSpec, config: TrainConfig, columns: dict[str, np.ndarray], device: torch.device, warmup: int
) -> float:
    """Samples/s of the same steps over batches already on the device."""
    torch.manual_seed(config.seed)
    model = build_model(spec).to(device)
    task = build_task(spec, device)
    optimizer = build_optimizer(model, config, device)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ema = [p.detach().clone() for p in model.parameters()]
    samples = len(next(iter(columns.values())))
    batches = [
        {
            name: torch.from_numpy(values[i : i + config.global_batch_size]).to(device)
            for name, values in columns.items()
        }
        for i in range(0, samples - config.global_batch_size + 1, config.global_batch_size)
    ]
    seconds = []
    for step in range(config.steps):
        started = time.perf_counter()
        train_step(model, optimizer, schedule, task, batches[step % len(batches)], config, seed=step)
        update_ema(ema, model, step + 1, config)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    return config.global_batch_size / statistics.mean(seconds[warmup:])


def ray_train_run(
    spec: TaskSpec, config: TrainConfig, columns: dict[str, np.ndarray], folder: Path
) -> tuple[float, float]:
    """Samples/s and data-wait fraction of the Ray Train loop, from its steady-state log windows."""
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    run_id = client.create_run(client.create_experiment("train-throughput")).info.run_id
    samples = len(next(iter(columns.values())))
    pq.write_table(
        pa.table({name: pa.FixedShapeTensorArray.from_numpy_ndarray(values) for name, values in columns.items()}),
        folder / "latents.parquet",
    )
    (data,) = count_rows(
        {TRAIN_DATASET: TrainingRows(files=(str(folder / "latents.parquet"),), columns=tuple(columns))}
    ).values()
    args = WorkerArgs(
        train=config,
        stage=REGISTRY[spec.stage],
        task=spec,
        budget=None,
        used_before=0.0,
        tracking_uri=client.tracking_uri,
        run_id=run_id,
        data={TRAIN_DATASET: dataclasses.replace(data, batches=samples // config.global_batch_size)},
    )
    trainer(
        name="throughput",
        args=args,
        storage_path=str(folder / "ray"),
        storage_filesystem=None,
    ).fit()
    history = {
        name: [m.value for m in sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)]
        for name in ("samples_per_second", "data_wait_fraction")
    }
    assert len(history["samples_per_second"]) >= 3, "too few log windows: raise --steps"
    steady = slice(1, -1)  # the first window holds the warm-up, the last may be a partial one
    return (
        statistics.mean(history["samples_per_second"][steady]),
        statistics.mean(history["data_wait_fraction"][steady]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=["stage_c", "stage_b"], default="stage_c")
    parser.add_argument("--models", choices=sorted(RESOLUTION), default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--cpus", type=int, default=1, help="threads of the training process (CPU runs)")
    parser.add_argument("--log-every-seconds", type=float, default=3.0)
    parser.add_argument("--batches-per-epoch", type=int, default=16)
    parser.add_argument("--cache-data", action="store_true", help="train.cache_data: the shard in worker memory")
    parser.add_argument(
        "--no-dashboard",
        dest="dashboard",
        action="store_false",
        help="local Ray without its dashboard (a minimal ray install has none)",
    )
    options = parser.parse_args()

    device = torch.device(options.device)
    spec = TaskSpec(
        stage=options.stage,
        models=options.models,
        caption_dropout=0.05,
        semantic_dropout=0.1,
        semantic_noise=0.0,
        text_from_tokens=False,
        resolution=RESOLUTION[options.models],
    )
    config = TrainConfig(
        steps=options.steps,
        global_batch_size=options.batch,
        workers=1,
        warmup_steps=0,
        gpus_per_worker=1.0 if device.type == "cuda" else 0.0,
        cpus_per_worker=options.cpus,
        checkpoint_every=options.steps,
        sample_every=0,
        log_every_seconds=options.log_every_seconds,
        ema_start=0,
        ema_every=1,
        cache_data=options.cache_data,
    )
    columns = synthetic_columns(
        spec, samples=options.batches_per_epoch * options.batch, resolution=RESOLUTION[options.models]
    )
    text_columns = {schema.TEXT_STAGE_C, schema.TEXT_STAGE_B} & columns.keys()
    spec = dataclasses.replace(spec, empty_caption={name: columns[name][0] for name in text_columns})
    if device.type == "cpu":
        torch.set_num_threads(options.cpus)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"{options.stage} ({options.models}), batch {options.batch}, {options.steps} steps, "
        f"{options.batches_per_epoch} batches per epoch, cache_data={options.cache_data}, {name}"
    )
    bare = bare_loop(spec, config, columns, device, warmup=options.steps // 10)
    # Printed now: a run cut short by a time limit still leaves it, beside the Ray run's progress lines.
    print(f"  bare PyTorch loop: {bare:9.1f} samples/s", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the Ray Train worker needs the memory the bare loop's allocator kept
    init_ray(RayConfig(num_cpus=max(2, options.cpus + 1), dashboard=options.dashboard))
    with tempfile.TemporaryDirectory() as folder:
        on_ray, data_wait = ray_train_run(spec, config, columns, Path(folder))
    ray.shutdown()

    print(f"  Ray Train loop:    {on_ray:9.1f} samples/s, data wait {data_wait:.1%}")
    print(f"  Ray Train / bare:  {on_ray / bare:.3f} (overhead {1 - on_ray / bare:+.1%})")


if __name__ == "__main__":
    main()
