"""Rows a resumed training run reads again before its first new step, by replay and by position.

Until December a resumed run skipped the batches its checkpoint had consumed by reading and dropping
them: each rank read again every row of its part of the epoch up to the position. The epoch reader
(``pipelines/training/data.py``) opens the piece (at most one file) that holds the position and
skips only the rows of it before the position. This writes synthetic shards (an id and a small
vector column; the counts depend on rows, not bytes), resumes one rank's reader at several
positions of an epoch and reports, per position, the rows replay read again (the rank's rows before
the position) and the rows the reader read again (``EpochReader.rows_reread``, measured: the rows of
the opened piece before the position).

    python bench/resume_reread.py
    python bench/resume_reread.py --files 256 --rows-per-file 10000 --workers 64
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from pipelines.training.config import TrainConfig  # noqa: E402
from pipelines.training.data import EpochReader, TrainingRows, group_counts  # noqa: E402


def synthetic_rows(folder: Path, files: int, rows_per_file: int, row_group: int) -> TrainingRows:
    """``files`` shards of ``rows_per_file`` training rows, counted per row group."""
    paths = []
    for file in range(files):
        ids = np.arange(rows_per_file, dtype=np.int64) + file * rows_per_file
        vectors = np.stack([ids, -ids], axis=1).astype(np.float32)
        table = pa.table({"id": ids, "vector": pa.FixedShapeTensorArray.from_numpy_ndarray(vectors)})
        pq.write_table(table, folder / f"{file:05d}.parquet", row_group_size=row_group)
        paths.append(str(folder / f"{file:05d}.parquet"))
    rows = TrainingRows(files=tuple(paths), columns=("id", "vector"))
    return dataclasses.replace(rows, group_rows=tuple(group_counts([rows], file)[0] for file in range(files)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--rows-per-file", type=int, default=2000)
    parser.add_argument("--row-group", type=int, default=250)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--per-worker", type=int, default=32, help="batch size per worker")
    options = parser.parse_args(argv)
    config = TrainConfig(
        steps=1, global_batch_size=options.workers * options.per_worker, workers=options.workers, seed=0
    )
    with tempfile.TemporaryDirectory() as folder:
        rows = synthetic_rows(Path(folder), options.files, options.rows_per_file, options.row_group)
        rows = dataclasses.replace(rows, batches=rows.rows() // options.workers // options.per_worker)
        print(
            f"{options.files} files x {options.rows_per_file} rows (row groups of {options.row_group}), "
            f"{options.workers} workers x {options.per_worker} rows a batch: {rows.batches} batches per rank and epoch; "
            f"rank 0, epoch 1; Python {platform.python_version()}, pyarrow {pa.__version__}"
        )
        print("| position (batches taken) | replay: rows read again | by position: rows read again |")
        print("|---|---|---|")
        for share in (0.1, 0.3, 0.55, 0.8, 1.0):
            taken = min(rows.batches - 1, int(rows.batches * share))
            reader = EpochReader([rows], config, 0, torch.device("cpu"))
            try:
                next(reader.batches(1, taken))
            finally:
                reader.close()
            print(f"| {taken} of {rows.batches} | {taken * options.per_worker} | {reader.rows_reread} |")


if __name__ == "__main__":
    main()
