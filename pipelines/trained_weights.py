"""Weights a training phase hands to later phases, and the loader for weights logged to MLflow.

A phase's result is one safetensors file whose metadata holds the phase's fingerprint (its input
and settings), written atomically: the file existing with the current fingerprint is the proof
that the phase is complete (``pipelines/fingerprints.py``).

Weights named in the config are a path or URL, with ``#entry`` appended where the file is a PyTorch
pickle holding several state dicts (``model_v2_stage_b.pt#effnet_state_dict``).
"""

from __future__ import annotations

import json
import struct
from typing import Any

import torch
from mlflow.artifacts import download_artifacts
from safetensors.torch import save
from torch import nn

from pipelines import fingerprints
from pipelines.storage import StorageConfig, filesystem, local_copy, write_atomically
from stages.weights import load_weights

FINAL_FILE = "final.safetensors"
_ENTRY = "#"


def split_entry(url: str) -> tuple[str, str | None]:
    """``file.pt#name`` -> (``file.pt``, ``name``): the state dict ``name`` of a pickle holding several;
    a URL without ``#`` names a file holding one state dict: (url, None)."""
    path, found, entry = url.rpartition(_ENTRY)
    if not found:
        return url, None
    if not entry or "/" in entry:
        raise ValueError(
            f"weights {url!r}: after '#' give the name of a state dict in the file, e.g. "
            "model_v2_stage_b.pt#effnet_state_dict"
        )
    return path, entry


def write(url: str, tensors: dict[str, torch.Tensor], fingerprint: dict[str, Any], storage: StorageConfig) -> bytes:
    """Writes the weights with their fingerprint atomically; returns the file's bytes."""
    data = save(tensors, metadata=fingerprints.metadata(fingerprint))
    fs, path = filesystem(url, storage)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    write_atomically(fs, path, lambda stream: stream.write(data))
    return data


def fingerprint_of(url: str, storage: StorageConfig) -> dict[str, Any] | None:
    """The fingerprint stored in a weights file (read from its header alone), or None without one
    (weights from elsewhere: any file but safetensors, which is the only format phases write)."""
    url, _ = split_entry(url)
    if not url.endswith(".safetensors"):
        return None
    fs, path = filesystem(url, storage)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as stream:
        (length,) = struct.unpack("<Q", stream.read(8))  # safetensors: u64 header size, then JSON
        header = json.loads(stream.read(length))
    return fingerprints.from_metadata(header.get("__metadata__"))


def weights_fingerprint(url: str, storage: StorageConfig) -> Any:
    """What stands for weights in the fingerprint of an output made with them: a phase's own weights
    by the fingerprint in their header; a file elsewhere (a path, object storage) by its URL, size and
    modification mark (mtime, or the ETag on S3), so that weights replaced at the same URL make their
    outputs again; weights over HTTP, and none (empty: random), by the URL alone: pin a revision in it
    (a hub's ``resolve/<commit>``)."""
    file_url, _ = split_entry(url)
    if not url or file_url.split("://", 1)[0] in ("http", "https"):
        return url
    stored = fingerprint_of(url, storage)
    if stored is not None:
        return stored
    fs, path = filesystem(file_url, storage)
    try:
        found = fs.info(path)
    except FileNotFoundError:
        return url  # loading them fails, saying where it looked
    modified = found.get("ETag") or found.get("mtime") or found.get("LastModified")
    return {"url": url, "bytes": found["size"], "modified": str(modified)}


def load(model: nn.Module, url: str, storage: StorageConfig | None = None) -> nn.Module:
    """Loads weights (local path or URL, ``#entry`` selecting a state dict of a pickle) into ``model``, strictly."""
    url, entry = split_entry(url)
    return load_weights(model, local_copy(url, storage), key=entry)


def load_from_mlflow(model: nn.Module, run_id: str, tracking_uri: str, artifact_path: str) -> nn.Module:
    """Loads weights a training run logged (``weights/<stage>.safetensors``) into ``model``."""
    local = download_artifacts(run_id=run_id, artifact_path=artifact_path, tracking_uri=tracking_uri)
    return load_weights(model, local)
