"""Several ranks of one node restoring one checkpoint from S3: one download, never rewritten while read,
and its files' checking shared by the ranks that read that copy; a node that cannot make its copy has
every rank refuse the checkpoint together.

Each test process stands in for a rank: it receives the checkpoint pickled, as Ray Train hands it to
every worker, and enters ``node_local_copy`` as the training loop's restore does. Ray's own ``Checkpoint.as_directory``
fails the first test: the second rank downloads again into the folder the first is reading.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.fs
import pytest
import torch
import torch.distributed as dist
from ray.train import Checkpoint

from cluster.local_cluster import free_port
from pipelines.storage import StorageConfig, filesystem
from pipelines.training.checkpoint import (
    STATE_FILE,
    Checkpointer,
    checking_share,
    file_record,
    files_record,
    node_folder,
    node_local_copy,
    verified_state,
    verify_files,
)


def _storage(endpoint: str) -> StorageConfig:
    return StorageConfig(endpoint_url=endpoint, key="test-key", secret="test-secret")


FILES = {"model.safetensors": 6 << 20, "ema.safetensors": 6 << 20, "optimizer.pt": 12 << 20}


@pytest.fixture(scope="module")
def checkpoint_url(s3_server, tmp_path_factory) -> str:
    """A checkpoint folder on S3 whose files are random bytes."""
    fs, _ = filesystem("s3://restore", _storage(s3_server))
    fs.mkdir("restore")
    local = tmp_path_factory.mktemp("checkpoint")
    for name, size in FILES.items():
        (local / name).write_bytes(random.Random(name).randbytes(size))
        fs.put(str(local / name), f"restore/checkpoint_000001/{name}")
    return "s3://restore/checkpoint_000001"


def _checkpoint(endpoint: str, url: str) -> Checkpoint:
    fs, path = filesystem(url, _storage(endpoint))
    return Checkpoint(path, filesystem=pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)))


def _snapshot(folder: Path) -> dict[str, tuple]:
    """What would change if a file were written again: its inode, modification time and content."""
    return {
        name: ((folder / name).stat().st_ino, (folder / name).stat().st_mtime_ns, file_record(folder / name))
        for name in FILES
    }


def _first_rank(checkpoint, inside, second_done, results):
    with node_local_copy(checkpoint) as folder:
        before = _snapshot(folder)
        inside.set()
        assert second_done.wait(120)
        results.put(("first", str(folder), before, _snapshot(folder)))


def _second_rank(checkpoint, inside, second_done, results):
    assert inside.wait(120)
    with node_local_copy(checkpoint) as folder:
        results.put(("second", str(folder), _snapshot(folder), None))
    second_done.set()


def _rank_restoring_repeatedly(checkpoint, records, seed, results):
    jitter = random.Random(seed)
    failures = []
    for _ in range(4):
        time.sleep(jitter.uniform(0, 0.3))
        try:
            with node_local_copy(checkpoint) as folder:
                verify_files(folder, records)
        except Exception as error:  # noqa: BLE001 - the parent reports every failure
            failures.append(repr(error))
    results.put(failures)


def _copies_left(folder: Path) -> list[str]:
    return [p.name for p in folder.glob("wuerstchen-checkpoint-*") if not p.name.endswith(".lock")]


def _run(targets, tmp_path: Path) -> list:
    """Runs each (function, args) in its own process with ``tmp_path`` as its temporary folder."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    os.environ["TMPDIR"], previous = str(tmp_path), os.environ.get("TMPDIR")
    try:
        processes = [context.Process(target=target, args=(*args, results)) for target, args in targets]
        for process in processes:
            process.start()
        found = [results.get(timeout=300) for _ in processes]
        for process in processes:
            process.join(60)
            assert process.exitcode == 0, f"a rank died with exit code {process.exitcode}"
    finally:
        if previous is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = previous
    return found


def test_a_rank_arriving_after_the_download_reads_the_same_files_unchanged(s3_server, checkpoint_url, tmp_path):
    context = multiprocessing.get_context("spawn")
    inside, second_done = context.Event(), context.Event()
    args = (_checkpoint(s3_server, checkpoint_url), inside, second_done)
    found = {role: rest for role, *rest in _run([(_first_rank, args), (_second_rank, args)], tmp_path)}
    first_folder, before, after = found["first"]
    second_folder, second_view, _ = found["second"]
    assert before == after, "the checkpoint was written again while the first rank read it"
    assert second_folder == first_folder and second_view == before, "the node downloaded the checkpoint twice"
    assert _copies_left(tmp_path) == [], "the last reader left its copy behind"


@pytest.mark.slow
def test_ranks_restoring_at_random_moments_always_read_whole_files(s3_server, checkpoint_url, tmp_path):
    records = {}
    fs, path = filesystem(checkpoint_url, _storage(s3_server))
    for name in FILES:
        fs.get(f"{path}/{name}", str(tmp_path / name))
        records[name] = file_record(tmp_path / name)
        (tmp_path / name).unlink()
    targets = [
        (_rank_restoring_repeatedly, (_checkpoint(s3_server, checkpoint_url), records, seed)) for seed in range(3)
    ]
    failures = [failure for found in _run(targets, tmp_path) for failure in found]
    assert failures == []
    assert _copies_left(tmp_path) == [], "the last reader left its copy behind"


def _written_checkpoint(folder: Path) -> dict[str, int]:
    """A checkpoint's files as two ranks record them, sizes apart so that the shares are uneven in
    count: random bytes, since checking reads only sizes and digests."""
    sizes = {"__0_0.distcp": 9000, "__1_0.distcp": 7000, ".metadata": 3000, "a.distcp": 2000, "b.distcp": 1000}
    folder.mkdir()
    for name, size in sizes.items():
        (folder / name).write_bytes(random.Random(name).randbytes(size))
    for rank, names in enumerate([[".metadata", "__0_0.distcp", "a.distcp"], ["__1_0.distcp", "b.distcp"]]):
        (folder / files_record(rank)).write_text(json.dumps({name: file_record(folder / name) for name in names}))
    (folder / STATE_FILE).write_text(json.dumps({"step": 7, "ranks": 2}))
    return sizes


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_the_shares_of_a_checkpoints_checking_cover_each_file_once(tmp_path):
    sizes = _written_checkpoint(tmp_path / "checkpoint")
    assert verified_state(tmp_path / "checkpoint", (0, 1)).step == 7
    for name in sizes:
        folder = tmp_path / name.strip(".")
        shutil.copytree(tmp_path / "checkpoint", folder)
        _flip_a_byte(folder / name)
        for count in (1, 2, 3):
            refusing = []
            for index in range(count):
                try:
                    verified_state(folder, (index, count))
                except ValueError as error:
                    assert f"{name} is not what the checkpoint wrote" in str(error)
                    refusing.append(index)
            assert len(refusing) == 1, (name, count, refusing)


def _rank_checking(port: int, rank: int, folder: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
    try:
        share = checking_share(Path(folder))
        try:
            verified_state(Path(folder), share)
            verdict = "read"
        except ValueError:
            verdict = "refused"
    finally:
        dist.destroy_process_group()
    results.put((rank, share, verdict))


def test_ranks_reading_one_copy_share_its_checking_and_a_rank_with_its_own_copy_checks_all(tmp_path):
    # Ranks 0 and 1 read one copy, rank 2 a copy of its own (another node's download), whose files
    # are intact: a damaged file in the shared copy is refused by exactly one of its two readers (the
    # training loop then has every rank refuse the checkpoint), and rank 2 checks all its files alone.
    _written_checkpoint(tmp_path / "shared")
    shutil.copytree(tmp_path / "shared", tmp_path / "own")
    _flip_a_byte(tmp_path / "shared" / "__1_0.distcp")
    port = free_port()
    folders = [tmp_path / "shared", tmp_path / "shared", tmp_path / "own"]
    found = sorted(_run([(_rank_checking, (port, rank, str(folder))) for rank, folder in enumerate(folders)], tmp_path))
    assert [share for _, share, _ in found] == [(0, 2), (1, 2), (0, 1)]
    verdicts = [verdict for _, _, verdict in found]
    assert sorted(verdicts[:2]) == ["read", "refused"] and verdicts[2] == "read", found


def _rank_restoring_one_checkpoint(port: int, rank: int, endpoint: str, url: str, node_tmp: str, results) -> None:
    os.environ["TMPDIR"], tempfile.tempdir = node_tmp, None  # each rank a node of its own
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    try:
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.AdamW(model.parameters())
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        checkpoints = Checkpointer(
            model, optimizer, [p.detach().clone() for p in model.parameters()], model.weight.device
        )
        checkpoint = _checkpoint(endpoint, url)
        if rank == 1:  # this node cannot make its copy: a folder stands where its lock file goes
            Path(f"{node_folder(checkpoint)}.lock").mkdir(parents=True)
        try:
            checkpoints._restore(checkpoint, schedule)
            verdict = "restored"
        except Exception as error:  # noqa: BLE001 - the parent checks what each rank raised
            verdict = repr(error)
    finally:
        dist.destroy_process_group()
    results.put((rank, verdict))


def test_a_rank_whose_node_cannot_copy_the_checkpoint_has_every_rank_refuse_it_together(s3_server, tmp_path):
    # Rank 0 finds the checkpoint whole; rank 1's node cannot make its copy. Both must refuse it at
    # the same collective and go on to the previous checkpoint together: a rank that left before
    # the others' collectives would leave them waiting for it, or pair them with the next checkpoint's.
    fs, _ = filesystem("s3://refused", _storage(s3_server))
    fs.mkdir("refused")
    fs.pipe("refused/checkpoint_000002/a.distcp", random.Random(2).randbytes(5000))
    local = tmp_path / "a.distcp"
    local.write_bytes(fs.cat("refused/checkpoint_000002/a.distcp"))
    fs.pipe("refused/checkpoint_000002/" + files_record(0), json.dumps({"a.distcp": file_record(local)}).encode())
    fs.pipe("refused/checkpoint_000002/" + STATE_FILE, json.dumps({"step": 2, "ranks": 1}).encode())
    port = free_port()
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    found = sorted(
        _run(
            [
                (_rank_restoring_one_checkpoint, (port, rank, s3_server, "s3://refused/checkpoint_000002", str(node)))
                for rank, node in enumerate(nodes)
            ],
            tmp_path,
        )
    )
    assert found[0] == (0, "ValueError('another rank refused it')"), found
    assert found[1][1].startswith("OSError(\"this node's copy of it could not be made: IsADirectoryError"), found
