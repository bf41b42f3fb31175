"""The per-shard ledger of a phase: every sample that came in was kept or dropped for one reason.

A phase writes its manifest last, after all of its shard outputs; a manifest that records the
current fingerprint is the proof that the phase is complete, so a rerun skips it
(``pipelines/fingerprints.py``).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from typing import Any

from pipelines.storage import StorageConfig, filesystem, write_atomically

MANIFEST_FILE = "manifest.json"


@dataclasses.dataclass(kw_only=True)
class ShardCounts:
    """What happened to the samples of one input shard."""

    samples_in: int
    kept: int
    dropped: dict[str, int]
    validation: int = 0
    """Of the kept samples, those held out for evaluation (the validation split; pre-encode only)."""

    def __post_init__(self):
        assert self.samples_in == self.kept + sum(self.dropped.values()), f"ledger does not balance: {self}"
        assert 0 <= self.validation <= self.kept, f"more held out than kept: {self}"


@dataclasses.dataclass(kw_only=True)
class Manifest:
    """A finished phase: its config and its ledger, shard by shard."""

    phase: str
    config: dict[str, Any]
    """The phase's fingerprint: its settings that decide the output and its input's fingerprint."""
    shards: dict[str, ShardCounts]

    @property
    def samples_in(self) -> int:
        return sum(s.samples_in for s in self.shards.values())

    @property
    def kept(self) -> int:
        return sum(s.kept for s in self.shards.values())

    @property
    def validation(self) -> int:
        return sum(s.validation for s in self.shards.values())

    def dropped(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for shard in self.shards.values():
            total.update(shard.dropped)
        return dict(sorted(total.items()))

    def to_json(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "config": self.config,
            "totals": {
                "samples_in": self.samples_in,
                "kept": self.kept,
                "validation": self.validation,
                "dropped": self.dropped(),
            },
            "shards": {name: dataclasses.asdict(counts) for name, counts in sorted(self.shards.items())},
        }


def write_manifest(folder_url: str, manifest: Manifest, storage: StorageConfig | None = None) -> None:
    fs, folder = filesystem(folder_url, storage)
    data = json.dumps(manifest.to_json(), indent=1, sort_keys=True).encode()
    write_atomically(fs, f"{folder}/{MANIFEST_FILE}", lambda stream: stream.write(data))


def read_manifest(folder_url: str, storage: StorageConfig | None = None) -> Manifest | None:
    """The phase's manifest, or None when the phase never finished there."""
    fs, folder = filesystem(folder_url, storage)
    path = f"{folder}/{MANIFEST_FILE}"
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as file:
        data = json.load(file)
    return Manifest(
        phase=data["phase"],
        config=data["config"],
        shards={name: ShardCounts(**counts) for name, counts in data["shards"].items()},
    )


def remove_manifest(folder_url: str, storage: StorageConfig | None = None) -> None:
    fs, folder = filesystem(folder_url, storage)
    fs.rm(f"{folder}/{MANIFEST_FILE}")
