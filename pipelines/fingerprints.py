"""The skip rule every phase follows: an output is complete when it carries the fingerprint that the
current settings and input would give it.

A fingerprint is the phase's input's fingerprint under ``"input"`` beside the settings that decide
the output, in canonical JSON form (what ``json`` reads back: tuples are lists, keys strings), so the
fingerprint formed now and the one read back from an output compare equal exactly when they should.
Settings that only say how wide or how long a phase runs (resources, GPU-hour budgets, actor and
worker counts) stay out: changing them never redoes work. A phase's input is an earlier phase's
output, identified by that phase's fingerprint, so a change anywhere upstream reaches every later
phase; the raw shards, which no phase wrote, by their folder's listing (``folder_fingerprint``).

The fingerprint is stored in the same atomic write as the output (a Parquet footer or safetensors
header under ``METADATA_KEY``, a manifest's or summary's JSON), so the output existing with the current
fingerprint is the proof that it is complete. Any other fingerprint, or none (an output written by an
older version), means the output is made again, never misread.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pipelines.storage import StorageConfig, filesystem

INPUT = "input"
METADATA_KEY = "wuerstchen.fingerprint"
"""The key of the fingerprint in a file's own metadata (Parquet footer, safetensors header)."""


def of(*, input: Any, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint of an output made from ``input`` (its fingerprint) with ``settings`` (those that
    decide the output; see the module's docstring)."""
    assert INPUT not in settings, f"a setting may not be called {INPUT!r}: it would hide the input"
    return json.loads(to_text({INPUT: input, **settings}))


def to_text(fingerprint: Mapping[str, Any]) -> str:
    """The stored form: JSON with sorted keys, so equal fingerprints give equal text."""
    return json.dumps(fingerprint, sort_keys=True)


def digest(fingerprint: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the stored form: a short name for the output a fingerprint describes."""
    return hashlib.sha256(to_text(fingerprint).encode()).hexdigest()


def metadata(fingerprint: Mapping[str, Any]) -> dict[str, str]:
    """The entry to add to a file's key-value metadata."""
    return {METADATA_KEY: to_text(fingerprint)}


def from_metadata(metadata: Mapping[str | bytes, str | bytes] | None) -> dict[str, Any] | None:
    """The fingerprint in a file's key-value metadata (Parquet gives bytes), or None without one."""
    for key, value in (metadata or {}).items():
        if (key.decode() if isinstance(key, bytes) else key) == METADATA_KEY:
            return json.loads(value)
    return None


def is_complete(stored: Mapping[str, Any] | None, fingerprint: Mapping[str, Any]) -> bool:
    """The one check: whether an output whose stored fingerprint is ``stored`` (None: no output, or
    none recorded) is this phase's output for ``fingerprint``."""
    assert fingerprint == json.loads(to_text(fingerprint)), "form the fingerprint with fingerprints.of"
    return stored is not None and stored == fingerprint


def folder_fingerprint(url: str, storage: StorageConfig) -> dict[str, str]:
    """An input folder no phase wrote (the img2dataset shards), by its URL and a digest of its files'
    listing: their names, sizes and modification marks (mtime locally, ETag on S3) as the storage
    reports them. Regenerated or replaced files at the same URL give another fingerprint."""
    fs, folder = filesystem(url, storage)
    listing = sorted(fs.ls(folder, detail=True), key=lambda entry: entry["name"])
    return {"url": url, "files": hashlib.sha256(json.dumps(listing, sort_keys=True, default=str).encode()).hexdigest()}
