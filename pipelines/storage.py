"""File-system helpers for outputs that must never be seen half-written."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import IO

import fsspec


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system of ``url`` and the path inside it (``s3://b/k`` -> s3fs, ``b/k``)."""
    return fsspec.core.url_to_fs(url)


def write_atomically(fs: fsspec.AbstractFileSystem, path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Writes ``path`` through a temporary name, so readers see the whole file or nothing.

    A rename is atomic on local disks; on object stores the final object appears in one PUT
    (copy), so a crash leaves at most an orphaned temporary file, never a partial ``path``.
    """
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open(temporary, "wb") as stream:
            write(stream)
        fs.mv(temporary, path)
    finally:
        if fs.exists(temporary):
            fs.rm(temporary)
