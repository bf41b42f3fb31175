"""Checkpoints: what training needs to continue, written by every rank in the background while
training goes on, and checked when read.

Each checkpoint holds the model, its EMA, the optimizer, the LR schedule, the step, the data
position and the GPU-hours used. Every rank writes only its own part (its shards under FSDP; under
DDP torch's distributed checkpoint writes each replicated tensor once, spread over the ranks): the
step that checkpoints waits only for the copy to CPU, and the write, the SHA-256 digests and Ray
Train's upload overlap the next steps. Ray Train persists a checkpoint only once every rank's part
is uploaded, restarts failed workers from the latest one (``max_failures``), and a resubmitted job
with the same work dir continues from it. Its files are checked against the sizes and digests their
writers recorded. The final checkpoint also holds the EMA whole, in one safetensors file, which the
driver exports for inference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import math
import pathlib
import pickle
import shutil
import socket
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.train
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from ray.train import Checkpoint, CheckpointUploadMode
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from cluster.budget import BudgetMeter
from pipelines.tracking import ATTEMPT_GPU_HOURS, RUN_GPU_HOURS
from pipelines.training.parallel import every_rank, full_state, unwrapped
from pipelines.training.step import swapped_in

logger = logging.getLogger(__name__)

EMA_FILE, STATE_FILE = "ema.safetensors", "state.json"


def files_record(rank: int) -> str:
    """The file in which ``rank`` records the size and SHA-256 digest of each file it wrote."""
    return f"files_rank{rank}.json"


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
    """What ``Checkpointer.restore_latest`` found."""

    state: TrainingState
    candidates: int
    """Checkpoints there were to resume from (0: a fresh start)."""
    checkpoint: str = ""
    """Name of the checkpoint resumed from."""
    unreadable: list[str] = dataclasses.field(default_factory=list)
    """Names of the newer checkpoints that could not be read."""


@dataclasses.dataclass(kw_only=True)
class _Write:
    """A checkpoint being written in the background."""

    step: int
    metrics: dict[str, Any]
    folder: Path
    recorded: Future
    """Done when this rank's files are written and its record of them too."""


class Checkpointer:
    """Restores and writes the checkpoints of one training loop's ``model``, ``optimizer`` and ``ema``
    (the EMA's tensors, restored in place). Every rank makes the same calls at the same steps."""

    def __init__(self, model: nn.Module, optimizer, ema: list[torch.Tensor], device: torch.device):
        self.model, self.optimizer, self.ema, self.device = model, optimizer, ema, device
        # The background write's collectives (DCP's plans) go through a group of their own, apart from
        # the training's on the default group, which they would otherwise interleave with.
        self._group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._rank = dist.get_rank() if dist.is_initialized() else 0
        self._ranks = dist.get_world_size() if dist.is_initialized() else 1
        self._recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-record")
        self._write: _Write | None = None

    def restore_latest(self, schedule) -> Resumed:
        """Model, optimizer, schedule and EMA from the newest readable checkpoint of this run, if it has
        any; raises RuntimeError if it has some and none can be read (never silently start over: that
        would spend the budget again)."""
        candidates = list(_resume_candidates(ray.train.get_checkpoint()))
        unreadable: list[str] = []
        for checkpoint in candidates:
            try:
                state = self._restore(checkpoint, schedule)
                return Resumed(
                    state=state,
                    candidates=len(candidates),
                    checkpoint=Path(checkpoint.path).name,
                    unreadable=unreadable,
                )
            except (OSError, ValueError, RuntimeError, KeyError, TypeError, CheckpointException) as error:
                # The next candidate sets model, optimizer, schedule and EMA again, whole.
                logger.warning("checkpoint %s cannot be read (%s): trying the previous one", checkpoint.path, error)
                unreadable.append(Path(checkpoint.path).name)
        if candidates:
            raise RuntimeError(
                f"none of the {len(candidates)} checkpoints beside {candidates[0].path} can be read; "
                "delete them to train from the start"
            )
        return Resumed(state=TrainingState(), candidates=0)

    def _restore(self, checkpoint: Checkpoint, schedule) -> TrainingState:
        """Model, optimizer, schedule and EMA from ``checkpoint``, each rank reading the parts it holds;
        its files are checked against the sizes and SHA-256 digests their writers recorded, so a
        truncated or altered file is refused even where its format would load it.

        Every rank takes part in each of its collectives, whatever fails on its node, its copy of the
        checkpoint included: a rank that left early would pair this checkpoint's collectives with
        the next one's on the other ranks."""
        with contextlib.ExitStack() as copies:
            try:
                folder: Path | None = copies.enter_context(node_local_copy(checkpoint))
                unavailable = None
            except Exception as error:  # noqa: BLE001 - raised below, once the ranks know
                folder, unavailable = None, error
            share = checking_share(folder, self._group)
            try:
                if unavailable is not None:
                    raise OSError(f"this node's copy of it could not be made: {unavailable!r}") from unavailable
                state = verified_state(folder, share)
            except (OSError, ValueError, KeyError, TypeError):
                every_rank(False, self.device)
                raise
            # Loading is collective: every rank goes on to the previous checkpoint if one refuses this.
            if not every_rank(True, self.device):
                raise ValueError("another rank refused it")
            model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
            load_parts(
                {"model": model_state, "ema": _ema_state(self.model, self.ema), "optimizer": optimizer_state},
                folder,
                self._group,
            )
            set_state_dict(self.model, self.optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
        schedule.last_epoch = state.step - 1
        schedule.step()
        # A run stopped by its budget continues when resubmitted (with a larger one).
        return dataclasses.replace(state, stop_reason="")

    def save(self, state: TrainingState, meter: BudgetMeter, *, durable: bool = False, final: bool = False) -> None:
        """Starts writing a checkpoint of ``state``: returns once the state is copied to CPU, and
        ``report_written`` reports it to Ray Train at a later step, when every rank has written its
        part. ``durable`` (a preemption's) and ``final`` ones are written and uploaded before this
        returns; the final one also holds the EMA whole (``EMA_FILE``), gathered on rank 0."""
        self.report_written(state.step, wait=True)  # Ray Train registers checkpoints in report order
        state.gpu_hours_used, state.gpu_hours_attempt = meter.used(), meter.attempt()
        metrics = {
            "step": state.step,
            "loss": state.last_loss,
            RUN_GPU_HOURS: state.gpu_hours_used,
            ATTEMPT_GPU_HOURS: state.gpu_hours_attempt,
            "final": final,
            "stop_reason": state.stop_reason,
        }
        folder = Path(tempfile.mkdtemp(prefix="wuerstchen-checkpoint-"))
        if final:
            with swapped_in(self.model, self.ema):
                ema_state = full_state(self.model)
            if self._rank == 0:
                save_file({k: v.contiguous() for k, v in ema_state.items()}, folder / EMA_FILE)
        if self._rank == 0:
            (folder / STATE_FILE).write_text(json.dumps({**dataclasses.asdict(state), "ranks": self._ranks}))
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        written = dcp.async_save(
            {"model": model_state, "ema": _ema_state(self.model, self.ema), "optimizer": optimizer_state},
            checkpoint_id=folder,
            process_group=self._group,
        )
        recorded = self._recorder.submit(_record_files, written, folder, self._rank)
        self._write = _Write(step=state.step, metrics=metrics, folder=folder, recorded=recorded)
        if durable or final:
            self.report_written(state.step, wait=True, upload=CheckpointUploadMode.SYNC)
        if final:
            self._recorder.shutdown()

    def report_written(
        self, step: int, *, wait: bool = False, upload: CheckpointUploadMode = CheckpointUploadMode.ASYNC
    ) -> None:
        """Reports the checkpoint being written to Ray Train once every rank has written its part (at
        once with ``wait``), to be uploaded in the background (``upload``: ASYNC) or before this returns
        (SYNC). Every rank calls it after every step: Ray Train's report is a barrier."""
        write = self._write
        if write is None or not (wait or every_rank(write.recorded.done(), self.device)):
            return
        write.recorded.result()  # a failed write fails the step that learns of it
        self._write = None
        ray.train.report(
            {**write.metrics, "reported_at_step": step},
            checkpoint=Checkpoint.from_directory(str(write.folder)),
            checkpoint_upload_mode=upload,
            delete_local_checkpoint_after_upload=True,
        )


def _ema_state(model: nn.Module, ema: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The EMA's tensors by the names of the parameters they follow."""
    return dict(zip((name for name, _ in unwrapped(model).named_parameters()), ema, strict=True))


def _record_files(written: Future, folder: Path, rank: int) -> None:
    """Waits for this rank's part of a checkpoint, then records the size and SHA-256 digest of each of
    its files, beside the training too."""
    written.result()
    files = {path.name: file_record(path) for path in sorted(folder.iterdir())}
    (folder / files_record(rank)).write_text(json.dumps(files))


def load_parts(state_dict: dict[str, Any], folder: Path, group=None) -> None:
    """Loads ``state_dict`` in place from the checkpoint in ``folder`` (each rank the parts it holds),
    refusing to unpickle anything but plain data."""
    dcp.load(state_dict, storage_reader=_PlainDataReader(folder), planner=_PlainDataPlanner(), process_group=group)


class _PlainDataReader(FileSystemReader):
    """DCP's reader, refusing a ``.metadata`` that names anything but DCP's own records, torch's sizes,
    dtypes and layouts, and paths (DCP unpickles it whole: a pickle may run code when loaded)."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as file:
            _MetadataUnpickler(file).load()
        return super().read_metadata(*args, **kwargs)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)
        if (
            (module == dcp.metadata.__name__ and isinstance(found, type))
            or (module, name) in {("torch", "Size"), ("torch.serialization", "_get_layout")}
            or (module == "torch" and isinstance(found, torch.dtype))
            or found is dcp.filesystem._StorageInfo
            or found is pathlib.PosixPath
        ):
            return found
        raise pickle.UnpicklingError(f"a checkpoint's metadata names {module}.{name}: refused")


class _PlainDataPlanner(DefaultLoadPlanner):
    """DCP's load planner, refusing what a checkpoint holds besides tensors (the optimizer's
    hyperparameters) unless ``torch.load(weights_only=True)`` takes it: DCP unpickles it whole."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        torch.load(value, weights_only=True)
        value.seek(0)
        super().load_bytes(read_item, value)


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


def _read_state(folder: Path) -> tuple[TrainingState, int]:
    """A checkpoint's training state and the number of ranks that wrote it."""
    recorded = json.loads((folder / STATE_FILE).read_text())
    ranks = recorded.pop("ranks")
    return TrainingState(**recorded), ranks


def checking_share(folder: Path | None, group=None) -> tuple[int, int]:
    """This rank's place among the ranks that read ``folder`` itself, the same directory on the same
    machine, and how many they are: they share the checking of its files, so a node's copy is hashed
    once, not once per rank on the node. Collective over ``group``; ``folder`` is None on a rank
    without a copy.

    Found from the folder itself, not from Ray's local ranks: those group workers by IP, and two
    workers with one IP can read copies of their own (a node in a mount namespace of its own)."""
    if not dist.is_initialized():
        return 0, 1
    rank = dist.get_rank()
    identity: tuple = ("unavailable", rank)  # without a copy to read, it refuses the checkpoint alone
    if folder is not None:
        with contextlib.suppress(OSError):
            found = folder.stat()
            identity = (_machine(), found.st_dev, found.st_ino)
    identities: list[tuple] = [()] * dist.get_world_size(group)
    dist.all_gather_object(identities, (rank, identity), group=group)
    readers = sorted(other for other, seen in identities if seen == identity)
    return readers.index(rank), len(readers)


def _machine() -> str:
    """This machine's boot, which tells machines apart whose folders have the same device and inode."""
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return socket.gethostname()


def verified_state(folder: Path, share: tuple[int, int]) -> TrainingState:
    """A checkpoint's training state, once its writers' files are found as they recorded them, this
    rank checking its ``share`` of them (its index among ``count`` readers): the largest file first to
    whichever reader has the fewest bytes so far, so that the readers finish together."""
    state, ranks = _read_state(folder)
    files: dict[str, dict[str, Any]] = {}
    for rank in range(ranks):
        files.update(json.loads((folder / files_record(rank)).read_text()))
    index, count = share
    loads, mine = [0] * count, {}
    for name in sorted(files, key=lambda name: (-files[name]["bytes"], name)):
        reader = loads.index(min(loads))
        loads[reader] += files[name]["bytes"]
        if reader == index:
            mine[name] = files[name]
    verify_files(folder, mine)
    return state


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
    folder = node_folder(checkpoint)
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


def node_folder(checkpoint: Checkpoint) -> Path:
    """Where ``node_local_copy`` keeps this node's copy of ``checkpoint`` (beside it: its lock file)."""
    identity = f"{checkpoint.filesystem.type_name}:{checkpoint.path.rstrip('/')}"
    return Path(tempfile.gettempdir()) / f"wuerstchen-checkpoint-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def _download(checkpoint: Checkpoint, folder: Path) -> None:
    """Downloads into a new folder and renames it to ``folder``, which therefore is complete or absent."""
    download = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}.download-"))
    try:
        checkpoint.to_directory(str(download))
    except BaseException:
        shutil.rmtree(download, ignore_errors=True)
        raise
    download.rename(folder)
