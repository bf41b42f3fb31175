"""Where files live: local folders or object storage, through fsspec, and writes never seen half-done."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import fsspec


@dataclasses.dataclass(frozen=True, kw_only=True)
class StorageConfig:
    """Object-storage settings; credentials otherwise come from the standard AWS settings."""

    endpoint_url: str = ""
    """S3 endpoint (SeaweedFS, MinIO, a region endpoint); empty: $AWS_ENDPOINT_URL or AWS itself."""
    key: str = dataclasses.field(default="", metadata={"secret": True})
    """S3 access key id; empty: $AWS_ACCESS_KEY_ID, ~/.aws or the instance role. Never logged."""
    secret: str = dataclasses.field(default="", metadata={"secret": True})
    """S3 secret access key; empty: as for key. Never logged."""
    max_attempts: int = 10
    """Tries of each S3 request before it fails (botocore's standard retries: exponential backoff,
    at most 20 s apart, about a minute in all), so a restarting or throttling server is ridden out."""

    def __post_init__(self):
        if bool(self.key) != bool(self.secret):
            raise ValueError("set both key and secret, or neither (to use the standard AWS settings)")
        if self.max_attempts < 1:
            raise ValueError(f"storage.max_attempts must be >= 1, got {self.max_attempts}")

    def options(self, protocol: str) -> dict[str, Any]:
        """fsspec keyword arguments for a file system of ``protocol``."""
        if protocol not in ("s3", "s3a"):
            return {}
        # Listings cached by one process go stale when other processes (Ray actors) write.
        options: dict[str, Any] = {
            "use_listings_cache": False,
            "config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": self.max_attempts}},
        }
        if self.endpoint_url:
            options["endpoint_url"] = self.endpoint_url
        if self.key:
            options.update(key=self.key, secret=self.secret)
        return options


def filesystem(url: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system of ``url`` and the path inside it (``s3://b/k`` -> s3fs, ``b/k``)."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    return fsspec.core.url_to_fs(url, **(storage or StorageConfig()).options(protocol))


# Seconds to wait for a connection to the storage when asking whether it can be reached at all.
PROBE_CONNECT_TIMEOUT_S = 5


class StorageUnreachable(ValueError):
    """This process cannot reach a URL's storage at all; the message names the settings to check."""

    @classmethod
    def named_in(cls, text: str) -> StorageUnreachable | None:
        """The one raised in text that quotes it (a traceback): all that Ray keeps of an error raised
        in an actor's ``__init__``."""
        found = re.search(rf"{cls.__module__}\.{cls.__name__}: (.+)", text)
        return cls(found.group(1)) if found else None


def exists(url: str, setting: str, storage: StorageConfig) -> bool:
    """Whether ``url`` exists, asked with two tries and a short connect timeout: storage that this
    process cannot reach at all (endpoint down, wrong or unreachable from this node, no or wrong
    credentials) fails in seconds with one ``StorageUnreachable`` that names ``setting`` and the
    storage settings, rather than after the minutes that ``max_attempts`` retries of each request take."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    options = dataclasses.replace(storage, max_attempts=min(storage.max_attempts, 2)).options(protocol)
    if "config_kwargs" in options:
        options["config_kwargs"] = {**options["config_kwargs"], "connect_timeout": PROBE_CONNECT_TIMEOUT_S}
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
        fs.info(path)  # unlike fs.exists, raises on a refused bucket rather than answering False
        return True
    except FileNotFoundError:
        return False
    except Exception as error:  # botocore's and aiohttp's errors share no base class with OSError
        where = (
            f"storage.endpoint_url={storage.endpoint_url!r}"
            if storage.endpoint_url
            else "storage.endpoint_url unset: $AWS_ENDPOINT_URL where it is set, else AWS itself"
        )
        raise StorageUnreachable(
            f"cannot reach {setting} {url!r} ({where}; credentials from storage.key/secret or the "
            f"standard AWS settings) from {socket.gethostname()}: {type(error).__name__}: {error}"
        ) from None


def join(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *names])


_TEMPORARY = ".tmp-"


def temporary_name(path: str) -> str:
    """A unique name beside ``path`` to write it under until it is complete."""
    return f"{path}{_TEMPORARY}{uuid.uuid4().hex}"


def remove_orphaned_temporaries(fs: fsspec.AbstractFileSystem, folder: str) -> None:
    """Removes the temporaries in ``folder`` left by writers that died; call it only when none is writing."""
    for orphan in fs.glob(f"{folder}/*{_TEMPORARY}*"):
        fs.rm(orphan)


def write_atomically(fs: fsspec.AbstractFileSystem, path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Writes ``path`` through a temporary name, so readers see the whole file or nothing.

    A rename is atomic on local disks; on object stores the final object appears in one PUT
    (copy), so a crash leaves at most an orphaned temporary file, never a partial ``path``.
    """
    temporary = temporary_name(path)
    try:
        with fs.open(temporary, "wb") as stream:
            write(stream)
        fs.mv(temporary, path)
    finally:
        if fs.exists(temporary):
            fs.rm(temporary)


def local_copy(url: str, storage: StorageConfig | None = None, cache_dir: str | None = None) -> str:
    """A local path holding the file at ``url`` (a path is returned as it is; URLs are downloaded once
    per version: a file written again at the same URL, as a rerun's weights are, is downloaded again)."""
    if "://" not in url or url.startswith("file://"):
        return url.removeprefix("file://")
    fs, path = filesystem(url, storage)
    info = fs.info(path)
    version = next(
        (str(info[k]) for k in ("ETag", "LastModified", "Last-Modified", "mtime", "updated") if info.get(k)), ""
    )
    key = hashlib.sha256(f"{url}\n{info.get('size')}\n{version}".encode()).hexdigest()[:16]
    cache = Path(cache_dir or Path.home() / ".cache" / "wuerstchen-ray")
    target = cache / f"{key}-{url.rsplit('/', 1)[-1]}"
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        temporary = Path(temporary_name(str(target)))
        fs.get(path, str(temporary))
        temporary.rename(target)
    return str(target)
