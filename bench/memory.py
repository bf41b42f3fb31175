"""Memory under load: the data phases on a large generated set, with every process's memory sampled.

Generates a demo set of ``--samples`` samples (the demo's defects included), runs
``pipelines/full.py --phases metadata_filter,decode,embed,pre_encode`` on it (tiny config, random
encoders, a local Ray) and samples, every ``--interval`` seconds, the unique memory (USS: pages
no other process shares, so Ray's shared object store is not counted once per process) of the
driver and of every other process it started (Ray's own and its workers). Prints, per tenth of
the run, the driver's USS, the largest single other process and the sum of all, so a reader can
see whether memory stays flat as the samples go through, and the peaks.

    python bench/memory.py                     # 20,000 samples (40 shards x 500)
    python bench/memory.py --samples 4000      # a quicker look
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SHARD_SIZE = 500


def uss_mib(process: psutil.Process) -> float | None:
    try:
        return process.memory_full_info().uss / 2**20
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples of memory")
    args = parser.parse_args()
    shards = max(1, args.samples // SHARD_SIZE)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as work:
        command = [
            sys.executable,
            str(ROOT / "pipelines" / "full.py"),
            "--phases",
            "metadata_filter,decode,embed,pre_encode",
            "--set",
            f"work_dir={work}",
            "--set",
            f"data.demo.num_shards={shards}",
            "--set",
            f"data.demo.samples_per_shard={SHARD_SIZE}",
            "--set",
            "pre_encode.stage_a_weights=",
            "--set",
            "pre_encode.semantic_weights=",
        ]
        log = Path(work) / "full.log"
        started = time.monotonic()
        with open(log, "w") as out:
            driver = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        series: list[tuple[float, float, float, float, int]] = []  # t, driver, largest other, total, processes
        handle = psutil.Process(driver.pid)
        while driver.poll() is None:
            others = [uss_mib(p) for p in handle.children(recursive=True)]
            others = [m for m in others if m is not None]
            mine = uss_mib(handle)
            if mine is not None:
                series.append(
                    (time.monotonic() - started, mine, max(others, default=0.0), mine + sum(others), len(others))
                )
            time.sleep(args.interval)
        seconds = time.monotonic() - started
        output = log.read_text()
    if driver.returncode != 0:
        sys.exit(f"pipelines/full.py failed ({driver.returncode}):\n{output[-3000:]}")
    print(
        f"{shards * SHARD_SIZE:,} samples in {shards} shards, {seconds:.0f} s; "
        f"{psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.1f} GiB RAM"
    )
    print(
        "\n".join(
            line
            for line in output.splitlines()  # the phase summaries
            if line.startswith(("[metadata_filter]", "[decode]", "[embed]", "[pre_encode]"))
        )
    )
    print(f"\n{'time':>7} {'driver USS':>11} {'largest other':>14} {'all USS':>9} {'processes':>10}")
    for index in range(10):
        window = [row for row in series if index / 10 <= row[0] / seconds < (index + 1) / 10]
        if window:
            t = window[-1][0]
            print(
                f"{t:6.0f}s {max(r[1] for r in window):10.0f}M {max(r[2] for r in window):13.0f}M "
                f"{max(r[3] for r in window):8.0f}M {max(r[4] for r in window):10d}"
            )
    print(
        f"\npeak: driver {max(r[1] for r in series):.0f} MiB, largest other process "
        f"{max(r[2] for r in series):.0f} MiB, all processes {max(r[3] for r in series):.0f} MiB (USS, MiB)"
    )


if __name__ == "__main__":
    main()
