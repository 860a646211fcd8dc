"""Where cubes are written: local folders or object stores through fsspec.

Every cube is built under ``<target>/.staging/`` and published when complete: a rename
on local disks (atomic), a copy with the root metadata copied last on object stores.
Until publication no cube exists at its final path, so a killed run never leaves a cube
that looks complete.
"""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec

STAGING = ".staging"
ROOT_METADATA = ("zarr.json", ".zmetadata", ".zgroup", ".zattrs", ".zlevels")


class Target:
    """A cube set location (local path or URL) with its filesystem."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(
            self.url, **with_timeouts(self.url, self.storage_options))
        tune(self.fs)
        self.is_local = "file" in _protocols(self.fs)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def url_of(self, *parts: str) -> str:
        """URL (or local path) of a child, as xarray/zarr open it."""
        return "/".join([self.url, *parts])

    def staging(self, *parts: str) -> str:
        return self.path(STAGING, *parts)

    def staging_url(self, *parts: str) -> str:
        return self.url_of(STAGING, *parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_json(self, path: str) -> dict | None:
        """The JSON document at ``path``; None when absent or unreadable as JSON.

        Raises :class:`~cube_gen.errors.StorageUnavailable` when the store cannot be reached.
        """
        try:
            with self.fs.open(path, "r") as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        except Exception as exc:
            if is_unavailable(exc):
                from .errors import StorageUnavailable

                raise StorageUnavailable(f"the cube set's storage is unavailable (reading "
                                         f"{path}: {type(exc).__name__})") from exc
            raise

    def write_json(self, path: str, data: dict) -> None:
        """Write JSON atomically (temp + rename locally; one PUT on object stores)."""
        blob = json.dumps(data, indent=2, sort_keys=True, default=str).encode()
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, blob)

    def remove(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def publish(self, staged: str, final: str) -> None:
        """Move a finished cube from staging to its final path."""
        self.remove(final)
        if self.is_local:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.rename(staged, final)
            return
        files = [f for f in self.fs.find(staged) if not f.endswith("/")]
        rel = [f[len(staged):].lstrip("/") for f in files]
        # Object stores: copy the data first and the metadata that makes the cube
        # visible last, deepest first, the top-level metadata very last.
        def last_key(r: str):
            name = r.rsplit("/", 1)[-1]
            return (name in ROOT_METADATA, name in ROOT_METADATA and -r.count("/"), r)

        for r in sorted(rel, key=last_key):
            self.fs.copy(f"{staged}/{r}", f"{final}/{r}")
        self.fs.rm(staged, recursive=True)
        try:
            self.fs.invalidate_cache()
        except Exception:  # noqa: BLE001 - caches are an optimisation
            pass


def _protocols(fs) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def zarr_store(url: str, storage_options: dict[str, Any] | None = None, read_only: bool = False):
    """A zarr-python 3 store for a local path or fsspec URL."""
    from zarr.storage import FsspecStore, LocalStore

    if "://" not in url or url.startswith("file://"):
        path = url[len("file://"):] if url.startswith("file://") else url
        return LocalStore(path, read_only=read_only)
    store = FsspecStore.from_url(url, storage_options=with_timeouts(url, storage_options),
                                 read_only=read_only)
    tune(store.fs)
    return store


_UNAVAILABLE_NAMES = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
    "ConnectionClosedError", "ClientConnectorError", "ServerDisconnectedError",
    "ServerTimeoutError", "ClientOSError", "ProxyConnectionError",
}


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` (or its cause) says the storage could not be reached in time."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, ConnectionError | TimeoutError):
            return True
        if type(exc).__name__ in _UNAVAILABLE_NAMES:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


# Object-store calls fail within seconds instead of hanging on a frozen store.
# botocore retries a timed-out call once (2 attempts); s3fs's own retry loops (default 5,
# nested twice for reads) are cut to one attempt: a frozen store fails after about 8 s.
S3_TIMEOUTS = {"connect_timeout": 2, "read_timeout": 4, "retries": {"max_attempts": 2,
                                                                      "mode": "standard"}}
S3_RETRIES = 1


def with_timeouts(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` with connect/read timeouts for ``s3://`` URLs (user values win).

    Override with ``config_kwargs`` (botocore ``Config``: ``connect_timeout``,
    ``read_timeout``, ``retries``) in the storage options.
    """
    opts = dict(storage_options or {})
    if not str(url).startswith(("s3://", "s3a://")):
        return opts
    config = {**S3_TIMEOUTS, **dict(opts.get("config_kwargs") or {})}
    opts["config_kwargs"] = config
    return opts


def tune(fs):
    """Bound s3fs's own retry loop so that a frozen store fails within about 10 s."""
    if "s3" in _protocols(fs) and getattr(fs, "retries", 0) > S3_RETRIES:
        fs.retries = S3_RETRIES
    return fs
