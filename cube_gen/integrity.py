"""Telling data from damage: the chunk inventory of a release and a checking zarr store.

Zarr returns the fill value for a chunk that is absent from the store, which cannot be
told apart from data. A release manifest (:mod:`cube_gen.release`) lists every object of
every cube with its size and MD5; :class:`CheckedStore` wraps a zarr store and raises
:class:`~cube_gen.errors.ChunkMissing` for a listed object that is absent,
:class:`~cube_gen.errors.ChunkCorrupt` for one whose size differs (truncated, partly
uploaded), and :class:`~cube_gen.errors.StorageUnavailable` when the store cannot be
reached. xarray, zarr and xcube read through it like through any zarr store.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable
from typing import Any

from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from .errors import ChunkCorrupt, ChunkMissing, StorageUnavailable
from .store import is_unavailable

Inventory = dict[str, tuple[int, str]]  # object key inside a cube -> (size, md5 hex)
HASH_BLOCK = 8 << 20


def md5_bytes(data: bytes | memoryview) -> str:
    """MD5 hex digest (the checksum recorded per object; also S3's single-part ETag)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5_file(fs, path: str) -> tuple[int, str]:
    """``(size, md5)`` of one object, streamed in blocks (never from cached listings)."""
    if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        fs.invalidate_cache(path)  # a stale size/ETag would fail the read of a changed object
    h = hashlib.md5(usedforsecurity=False)
    size = 0
    with fs.open(path, "rb") as f:
        while True:
            block = f.read(HASH_BLOCK)
            if not block:
                break
            size += len(block)
            h.update(block)
    return size, h.hexdigest()


def split_key(key: str) -> tuple[str, str]:
    """``(array, chunk key)`` of an object key inside a cube.

    ``features/c/3/0/0/0/0`` -> (``features``, ``c/3/0/0/0/0``);
    ``0.zarr/observation_count/c/0/0/0`` -> (``0.zarr/observation_count``, ``c/0/0/0``);
    ``features/3.0.0`` (Zarr v2) -> (``features``, ``3.0.0``).
    """
    if "/c/" in key:
        array, chunk = key.split("/c/", 1)
        return array, f"c/{chunk}"
    if key.startswith("c/"):
        return "", key
    if "/" in key:
        array, chunk = key.rsplit("/", 1)
        return array, chunk
    return "", key


class CheckedStore(WrapperStore):
    """A read-only zarr store that raises instead of returning fill values for lost chunks.

    ``inventory`` maps the cube's object keys to ``(size, md5)``; ``cube`` and
    ``version`` name the cube in errors. Without an inventory (cube sets written before
    releases existed) absent chunks cannot be judged and read as zarr reads them.
    """

    def __init__(self, store: Any, inventory: Inventory | None = None, cube: str = "",
                 version: str | None = None, prefix: str = ""):
        super().__init__(store)
        self.inventory = inventory
        self.cube = cube
        self.version = version
        self.prefix = prefix  # the store's root inside the cube (``0.zarr/`` for a grid level)

    def _with_store(self, store: Any) -> CheckedStore:
        return type(self)(store, self.inventory, self.cube, self.version, self.prefix)

    def __str__(self) -> str:
        return f"checked-{self._store}"

    def _error(self, cls, key: str, detail: str):
        array, chunk = split_key(self.prefix + key)
        return cls(self.cube, array, chunk, detail, url=str(self._store), version=self.version)

    async def get(self, key: str, prototype: BufferPrototype,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        try:
            buf = await self._store.get(key, prototype, byte_range)
        except Exception as exc:
            if is_unavailable(exc):
                raise StorageUnavailable(
                    f"the cube set's storage is unavailable ({self.cube}, reading "
                    f"{self.prefix + key}: {type(exc).__name__})") from exc
            raise
        if self.inventory is None:
            return buf
        expected = self.inventory.get(self.prefix + key)
        if expected is None:
            return buf
        if buf is None:
            raise self._error(ChunkMissing, key, "absent from the store although the release "
                              "manifest lists it")
        if byte_range is None and len(buf) != expected[0]:
            raise self._error(ChunkCorrupt, key, f"{len(buf)} bytes, the release manifest "
                              f"says {expected[0]}")
        return buf

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]
                                 ) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))


def sub_inventory(files: dict[str, Any] | None, cube_path: str) -> Inventory | None:
    """The inventory of one cube (keys relative to it) from a release's ``files`` table."""
    if files is None:
        return None
    prefix = cube_path.rstrip("/") + "/"
    return {k[len(prefix):]: (int(v[0]), str(v[1])) for k, v in files.items()
            if k.startswith(prefix)}
