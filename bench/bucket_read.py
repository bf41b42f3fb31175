"""Bytes a per-bucket training data set reads from a bucketed latent shard, against the whole shard.

With ``decode.crop=buckets`` the validation rows are read through one Ray Data set per bucket
(``train_phase.in_bucket``), each a filter on ``crop_width``/``crop_height`` over every latent shard;
training read its buckets so until December (it now reads the row groups of each bucket itself,
``pipelines/training/data.py``). This checks what that costs in reading: it writes a synthetic shard in the v2
bucket shapes through the pre-encode phase's own writer (``shard_phase.ShardOutput``: one row
group per batch, a batch is one crop), reads Stage B's training columns of it through Ray Data
whole and bucket by bucket with ``train_phase.in_bucket``, and counts the bytes each read
pulls from the file (a counting fsspec filesystem, in the read tasks' processes). If Ray pushes
the column selection and the filter into the Parquet read and the read skips row groups by their
statistics, the buckets together read about one shard's training columns; otherwise each reads
all of it.

    python bench/bucket_read.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fsspec  # noqa: E402
import numpy as np  # noqa: E402
import ray.data  # noqa: E402
from fsspec.implementations.local import LocalFileSystem  # noqa: E402

from pipelines import schema, shard_phase, train_phase  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.ledger import ShardCounts  # noqa: E402
from pipelines.pre_encode import TRAINING_ROWS, latent_shapes, output_schema  # noqa: E402
from pipelines.trainable import REGISTRY  # noqa: E402
from pipelines.trainable.base import TaskSpec  # noqa: E402
from stages.text import MAX_LENGTH  # noqa: E402


class CountingFileSystem(LocalFileSystem):
    """The local filesystem, appending the size of every read from an opened file to ``log``."""

    def __init__(self, log: str, **kwargs):
        super().__init__(**kwargs)
        self.log = log

    def _open(self, path, mode="rb", **kwargs):
        opened = super()._open(path, mode=mode, **kwargs)
        if "r" in mode:
            log, read = self.log, opened.read

            def counted_read(*args):
                data = read(*args)
                with open(log, "a") as stream:
                    stream.write(f"{len(data)}\n")
                return data

            opened.read = counted_read
        return opened


def write_shard(path: str, rows_per_batch: int, batches_per_bucket: int) -> list[tuple[int, int]]:
    config = load_config("v2", ["decode.crop=buckets", "pre_encode.text=tokens"])
    crops = config.decode.crop_sizes()
    table_schema = output_schema(config.pre_encode, crops, config.decode.resolution)
    generator = np.random.default_rng(0)
    samples = len(crops) * batches_per_bucket * rows_per_batch
    with shard_phase.ShardOutput(fsspec.filesystem("file"), path, table_schema) as output:
        for crop in crops:
            shapes = latent_shapes(config.pre_encode, crop, config.decode.resolution)
            for batch in range(batches_per_bucket):
                rows = []
                for index in range(rows_per_batch):
                    row = {field.name: None for field in table_schema}
                    row.update(
                        {name: generator.standard_normal(shape).astype(np.float16) for name, shape in shapes.items()}
                    )
                    row.update(
                        {
                            schema.KEY: f"{crop[0]}x{crop[1]}-{batch}-{index}",
                            schema.SPLIT: str(schema.Split.TRAIN),
                            schema.CAPTION: "a photo",
                            schema.CROP_WIDTH: crop[0],
                            schema.CROP_HEIGHT: crop[1],
                            schema.TEXT_TOKENS: np.zeros(MAX_LENGTH, np.int32),
                        }
                    )
                    rows.append(row)
                output.write(rows)
        output.commit(ShardCounts(samples_in=samples, kept=samples, dropped={}), {})
    return list(crops)


def read_bytes(log: Path, dataset: ray.data.Dataset) -> tuple[int, int]:
    log.write_text("")
    rows = dataset.materialize().count()
    return rows, sum(int(line) for line in log.read_text().split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows-per-batch", type=int, default=16)
    parser.add_argument("--batches-per-bucket", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path, log = f"{folder}/00000.parquet", Path(folder) / "reads.log"
        crops = write_shard(path, args.rows_per_batch, args.batches_per_bucket)
        size = Path(path).stat().st_size
        print(
            f"ray {ray.__version__}; a v2 bucketed shard (text=tokens): {len(crops)} buckets x "
            f"{args.batches_per_bucket} row groups x {args.rows_per_batch} rows, {size / 2**20:.1f} MiB"
        )
        # The read tasks unpickle the filesystem: its class by reference, from a module they can import.
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        )
        from bench.bucket_read import CountingFileSystem as Importable

        try:
            stage_b = TaskSpec(
                stage="stage_b",
                models="v2",
                caption_dropout=0.0,
                semantic_dropout=0.0,
                semantic_noise=0.0,
                text_from_tokens=True,
            )
            columns = [*REGISTRY["stage_b"].columns(stage_b), schema.CAPTION]
            everything = (
                ray.data.read_parquet([path], filesystem=Importable(str(log)))
                .filter(expr=TRAINING_ROWS)
                .select_columns([*columns, schema.CROP_WIDTH, schema.CROP_HEIGHT])
            )
            rows, whole = read_bytes(log, everything)
            print(f"whole shard: {rows} rows, {whole / 2**20:.1f} MiB read ({whole / size:.2f} of the file)")
            total = 0
            for width, height in crops:
                rows, read = read_bytes(log, train_phase.in_bucket(everything, (width, height)))
                total += read
                print(
                    f"bucket {width}x{height}: {rows} rows, {read / 2**20:.1f} MiB read ({read / size:.2f} of the file)"
                )
            print(f"all buckets together: {total / whole:.2f}x the bytes of one whole-shard read")
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
