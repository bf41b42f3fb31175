"""Checkpoints: what training needs to continue, written whole by rank 0 and checked when read.

Each checkpoint holds the model, its EMA, the optimizer, the LR schedule, the step, the data
position and the GPU-hours used; Ray Train persists it only once it is complete, restarts failed
workers from the latest one (``max_failures``), and a resubmitted job with the same work dir
continues from it. Its files are checked against the sizes and SHA-256 digests its state recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.train
import torch
from ray.train import Checkpoint
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from cluster.budget import BudgetMeter
from pipelines.tracking import ATTEMPT_GPU_HOURS, RUN_GPU_HOURS
from pipelines.training.parallel import full_state
from pipelines.training.step import swapped_in

logger = logging.getLogger(__name__)

MODEL_FILE, EMA_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "ema.safetensors", "optimizer.pt", "state.json"


@dataclasses.dataclass(kw_only=True)
class TrainingState:
    """Where training stands, saved with every checkpoint."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    data_position: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    """Per data set, per rank: the file its reading stands in and the training rows of that file before
    the position (pipelines/training/data.py; the epoch and ``batches_in_epoch`` decide it)."""
    gpu_hours_used: float = 0.0
    """GPU-hours of the run at this checkpoint, its earlier attempts included."""
    gpu_hours_attempt: float = 0.0
    """GPU-hours of the attempt that wrote this checkpoint."""
    samples_seen: int = 0
    last_loss: float = math.nan
    stop_reason: str = ""


@dataclasses.dataclass(kw_only=True)
class Resumed:
    """What ``restore_latest`` found: the state to go on from and the EMA weights."""

    state: TrainingState
    ema: list[torch.Tensor]
    candidates: int
    """Checkpoints there were to resume from (0: a fresh start)."""
    checkpoint: str = ""
    """Name of the checkpoint resumed from."""
    unreadable: list[str] = dataclasses.field(default_factory=list)
    """Names of the newer checkpoints that could not be read."""


def restore_latest(model: nn.Module, optimizer, schedule, ema: list[torch.Tensor]) -> Resumed:
    """Model, optimizer, schedule and EMA from the newest readable checkpoint of this run, if it has any;
    raises RuntimeError if it has some and none can be read (never silently start over: that would
    spend the budget again)."""
    candidates = list(_resume_candidates(ray.train.get_checkpoint()))
    unreadable: list[str] = []
    for checkpoint in candidates:
        try:
            state, ema = _restore(checkpoint, model, optimizer, schedule, ema)
            return Resumed(
                state=state,
                ema=ema,
                candidates=len(candidates),
                checkpoint=Path(checkpoint.path).name,
                unreadable=unreadable,
            )
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
            # The next candidate sets model, optimizer, schedule and EMA again, whole.
            logger.warning("checkpoint %s cannot be read (%s): trying the previous one", checkpoint.path, error)
            unreadable.append(Path(checkpoint.path).name)
    if candidates:
        raise RuntimeError(
            f"none of the {len(candidates)} checkpoints beside {candidates[0].path} can be read; "
            "delete them to train from the start"
        )
    return Resumed(state=TrainingState(), ema=ema, candidates=0)


def _resume_candidates(latest: Checkpoint | None) -> Iterator[Checkpoint]:
    """The checkpoint Ray Train resumes from, then the older ones kept beside it, newest first."""
    if latest is None:
        return
    yield latest
    parent = latest.path.rstrip("/").rsplit("/", 1)[0]
    siblings = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    # Ray names them checkpoint_<date>_<time>: the name order is the time order.
    older = sorted(
        (
            info.path
            for info in siblings
            if info.type == pyarrow.fs.FileType.Directory
            and info.base_name.startswith("checkpoint_")
            and info.path < latest.path.rstrip("/")
        ),
        reverse=True,
    )
    for path in older:
        yield Checkpoint(path, filesystem=latest.filesystem)


def _restore(checkpoint: Checkpoint, model, optimizer, schedule, ema: list[torch.Tensor]) -> tuple[TrainingState, list]:
    """Model, optimizer, schedule and EMA from ``checkpoint``; its files are checked against the sizes
    and SHA-256 digests its state recorded, so a truncated or altered file is refused even where its
    format would load it."""
    with node_local_copy(checkpoint) as folder:
        state, files = _read_state(folder)
        verify_files(folder, files)
        # A run stopped by its budget continues when resubmitted (with a larger one).
        state = dataclasses.replace(state, stop_reason="")
        model_state, ema_state = load_file(folder / MODEL_FILE), load_file(folder / EMA_FILE)
        optimizer_state = torch.load(folder / OPTIMIZER_FILE, weights_only=True)
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_state, options=options)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
        schedule.last_epoch = state.step - 1
        schedule.step()
        with swapped_in(model, ema):
            set_model_state_dict(model, ema_state, options=options)
            ema = [p.detach().clone() for p in model.parameters()]
    return state, ema


def _read_state(folder: Path) -> tuple[TrainingState, dict[str, dict[str, Any]]]:
    """A checkpoint's training state and the size and digest each of its files had when written."""
    recorded = json.loads((folder / STATE_FILE).read_text())
    files = recorded.pop("files")
    return TrainingState(**recorded), files


def verify_files(folder: Path, files: dict[str, dict[str, Any]]) -> None:
    """Raises ValueError unless each file has the size and SHA-256 digest recorded when it was written."""
    for name, written in files.items():
        found = {"bytes": (folder / name).stat().st_size}
        if found["bytes"] == written["bytes"]:
            found["sha256"] = _sha256(folder / name)
        if found != written:
            raise ValueError(f"{name} is not what the checkpoint wrote ({found} != {written})")


def file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(model, ema, optimizer, state: TrainingState, meter: BudgetMeter, *, final=False) -> None:
    """Writes a checkpoint from rank 0 and reports it to Ray Train with the step's figures; every rank
    must call this at the same step (the state dicts are gathered from all)."""
    state.gpu_hours_used, state.gpu_hours_attempt = meter.used(), meter.attempt()
    model_state = full_state(model)
    with swapped_in(model, ema):
        ema_state = full_state(model)
    optimizer_state = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    metrics = {
        "step": state.step,
        "loss": state.last_loss,
        RUN_GPU_HOURS: state.gpu_hours_used,
        ATTEMPT_GPU_HOURS: state.gpu_hours_attempt,
        "final": final,
        "stop_reason": state.stop_reason,
    }
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_file({k: v.contiguous() for k, v in model_state.items()}, Path(folder) / MODEL_FILE)
        save_file({k: v.contiguous() for k, v in ema_state.items()}, Path(folder) / EMA_FILE)
        torch.save(optimizer_state, Path(folder) / OPTIMIZER_FILE)
        # Hashing costs about a second per 2 GB on rank 0 (v2 Stage C: ~14 GB with the optimizer).
        files = {name: file_record(Path(folder) / name) for name in (MODEL_FILE, EMA_FILE, OPTIMIZER_FILE)}
        (Path(folder) / STATE_FILE).write_text(json.dumps({**dataclasses.asdict(state), "files": files}))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))


def read_checkpoint_weights(checkpoint: Checkpoint) -> tuple[dict[str, torch.Tensor], TrainingState]:
    """The EMA weights and the training state of a finished run's last checkpoint."""
    with node_local_copy(checkpoint) as folder:
        return load_file(folder / EMA_FILE), _read_state(folder)[0]


@contextlib.contextmanager
def node_local_copy(checkpoint: Checkpoint) -> Iterator[Path]:
    """A local folder holding ``checkpoint``'s files, downloaded once per node and never rewritten while
    a process reads it; the last reader to leave deletes it.

    Ray's ``Checkpoint.as_directory`` downloads again into the same folder when a second rank arrives
    after the first download has finished, truncating files the first rank may have memory-mapped
    (SIGBUS, or a torn read). Here the download goes to a fresh folder that is renamed into place, and
    readers hold a shared lock that the deleting process must take exclusively."""
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    identity = f"{checkpoint.filesystem.type_name}:{checkpoint.path.rstrip('/')}"
    folder = Path(tempfile.gettempdir()) / f"wuerstchen-checkpoint-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
    with open(f"{folder}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        # Converting a flock drops it first: whoever holds it shared after the loop holds a folder
        # that no one can delete, however the other processes came and went in between.
        while not folder.is_dir():
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not folder.is_dir():
                _download(checkpoint, folder)
            fcntl.flock(lock, fcntl.LOCK_SH)
        try:
            yield folder
        finally:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # another process still reads it and deletes it when it leaves
            else:
                shutil.rmtree(folder, ignore_errors=True)


def _download(checkpoint: Checkpoint, folder: Path) -> None:
    """Downloads into a new folder and renames it to ``folder``, which therefore is complete or absent."""
    download = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}.download-"))
    try:
        checkpoint.to_directory(str(download))
    except BaseException:
        shutil.rmtree(download, ignore_errors=True)
        raise
    download.rename(folder)
