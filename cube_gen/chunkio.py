"""Raw chunk I/O for uncompressed feature arrays: ``preadv``, memory maps, shard indexes.

An uncompressed local cube (the default recipe: raw float16 chunks, one image per chunk,
optionally sharded, Zarr v3 or v2) is read without zarr: the first read of a chunk file
is one ``preadv`` straight into the result, later reads copy from a cached memory map of
the file (bounded, see ``DEEPEARTH_MMAP_BYTES``). A batch reads each distinct image once,
in file order, coalescing neighbouring inner chunks of a shard into one ``preadv``.
:func:`zarr_runs` is the fallback for compressed or remote arrays: contiguous runs read
through zarr in parallel threads.

Public interface (used by :mod:`cube_gen.access`, :mod:`cube_gen.torch_data` and the
benchmarks): :func:`raw_layout`, :class:`RawLayout` (``file_of``, ``read``, ``read_many``,
``write``, ``files``, ``maps``), :class:`FileMaps`, :func:`read_into`, :func:`zarr_runs`,
:class:`TruncatedRead` and the thread constants.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr

from .errors import ChunkCorrupt
from .store import Target


class TruncatedRead(OSError):
    """A chunk file holds fewer bytes than its layout requires (``path``, ``detail``)."""

    def __init__(self, path: str, detail: str):
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail


LOCAL_THREADS = 2  # parallel local reads in a batch (more does not help: memory/disk bound)
REMOTE_THREADS = 8  # parallel zarr selections in a batch (object stores: latency bound)
RUN_MAX = 4  # images per zarr selection in a batch (bounds the bytes in flight)
_IOV_MAX = 512  # buffers per preadv call (Linux allows 1024)
_NO_CHUNK = 2**64 - 1  # shard index entry of a chunk that was never written
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0)


def read_into(fd: int, views: list[np.ndarray], offset: int, path: str) -> None:
    """Fill the uint8 ``views`` from ``fd`` at ``offset`` (one preadv when the kernel allows)."""
    views = list(views)
    pos = offset
    while views:
        if hasattr(os, "preadv"):
            got = os.preadv(fd, views[:_IOV_MAX], pos)
        else:  # pragma: no cover - platforms without preadv (Windows)
            os.lseek(fd, pos, os.SEEK_SET)
            with open(fd, "rb", buffering=0, closefd=False) as f:
                got = f.readinto(views[0]) or 0
        if got == 0:
            raise TruncatedRead(path, f"truncated at byte {pos} (expected "
                                f"{sum(v.nbytes for v in views)} more bytes)")
        pos += got
        while views and got >= views[0].nbytes:
            got -= views[0].nbytes
            views.pop(0)
        if views and got:
            views[0] = views[0][got:]


def default_map_budget() -> int:
    """Bytes of feature files kept memory-mapped per process (a quarter of the RAM).

    Override with the environment variable ``DEEPEARTH_MMAP_BYTES`` (0: never map).
    """
    env = os.environ.get("DEEPEARTH_MMAP_BYTES")
    if env:
        return max(int(float(env)), 0)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # pragma: no cover - no sysconf
        return 4 << 30


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    """What identifies one version of a file: device, inode, size and modification time."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class FileMaps:
    """An LRU of read-only memory maps of feature files, bounded by their total size.

    A file read once with ``preadv`` is mapped for later reads: copying from a mapping
    whose pages are already mapped is a plain memcpy, about twice as fast as a read
    system call on a warm page cache. Evicted maps are dropped, not closed: a copy in
    progress keeps its map alive until it finishes.

    A map is used only while its file is unchanged (same inode, size and modification
    time, one ``stat``): touching the pages of a file truncated after it was mapped
    kills the process with SIGBUS, and a replaced file must be read anew.
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.used = 0
        self._maps: OrderedDict[str, tuple[mmap.mmap, tuple]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str) -> tuple[mmap.mmap, tuple] | None:
        """``(map, file signature)`` while the file is unchanged, else None."""
        with self._lock:
            item = self._maps.get(path)
            if item is None:
                return None
        try:
            current = _signature(os.stat(path))
        except OSError:
            current = None
        with self._lock:
            if current != item[1]:  # changed, truncated or gone: forget the map
                if self._maps.get(path) is item:
                    del self._maps[path]
                    self.used -= len(item[0])
                return None
            if path in self._maps:
                self._maps.move_to_end(path)
            return item

    def add(self, path: str, fd: int, size: int) -> None:
        if not 0 < size <= self.budget:
            return
        try:
            sig = _signature(os.fstat(fd))
            if sig[2] != size:  # changed while it was read: do not map it
                return
            m = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # pragma: no cover - unmappable file: keep reading it
            return
        with self._lock:
            if path in self._maps:
                return
            self._maps[path] = (m, sig)
            self.used += size
            while self.used > self.budget and self._maps:
                _, (old, _) = self._maps.popitem(last=False)
                self.used -= len(old)

    def clear(self) -> None:
        with self._lock:
            self._maps.clear()
            self.used = 0


class RawLayout:
    """Where each image's features lie as raw bytes in local files.

    Applies to uncompressed Zarr v3 arrays (bytes codec only; optionally sharded with an
    uncompressed inner chunk per image) and uncompressed C-order Zarr v2 arrays, whose
    chunks hold exactly one image each. Like the rest of a CubeSet, it is a snapshot:
    reopen the cube set after rebuilding it in place.
    """

    def __init__(self, root: str, dtype: np.dtype, shape: tuple[int, ...], key, per_file: int,
                 index_at_end: bool, cube: str = "vision.zarr", array: str = "features",
                 version: str | None = None):
        self.root = root
        self.cube = cube  # names used in errors
        self.array = array
        self.version = version
        self.dtype = dtype  # stored dtype, with its byte order
        self.shape = shape
        self.key = key  # file index -> chunk key
        self.per_file = per_file  # images per file: 1 (plain chunks) or the shard size
        self.index_at_end = index_at_end
        self.item_nbytes = int(np.prod(shape)) * dtype.itemsize
        self.frame_nbytes = self.item_nbytes // shape[0]
        self._index: dict[str, np.ndarray] = {}
        self.maps = FileMaps(default_map_budget())

    def file_of(self, image: int) -> tuple[str, int]:
        f, slot = divmod(int(image), self.per_file)
        return os.path.join(self.root, *self.key(f).split("/")), slot

    def write(self, image: int, values: np.ndarray) -> None:
        """Write one image's chunk file as its raw bytes (plain chunks only: one image per
        file), through a temporary file and a rename, as zarr's bytes codec would."""
        if self.per_file != 1:
            raise ValueError(f"{self.cube}/{self.array}: sharded chunks are written by zarr")
        values = np.ascontiguousarray(values, self.dtype)
        if values.shape != self.shape:
            raise ValueError(f"{self.cube}/{self.array}: an image of shape {values.shape}, "
                             f"expected {self.shape}")
        path, _ = self.file_of(image)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(memoryview(values).cast("B"))
        os.replace(tmp, path)

    def _shard_index(self, path: str, size: int, read, version: tuple = ()) -> np.ndarray:
        key = (path, *version)  # a rewritten shard has a new index
        index = self._index.get(key)
        if index is None:
            nbytes = 16 * self.per_file
            at = size - nbytes - 4 if self.index_at_end else 0
            if at < 0:
                raise TruncatedRead(path, f"shard of {size} bytes is too small for its index")
            index = read(at, nbytes).view("<u8").reshape(self.per_file, 2)
            if len(self._index) > 4096:  # old versions of rewritten shards
                self._index.clear()
            self._index[key] = index  # a dict store is atomic: no lock needed
        return index

    def _locate(self, path: str, size: int, items, frame: int | None, read,
                version: tuple = ()):
        """(offset, out) of the items present, sorted by offset, and the missing items' indices."""
        located, missing = [], []
        span = self.item_nbytes if frame is None else self.frame_nbytes
        if self.per_file == 1 and size != self.item_nbytes:  # one uncompressed image
            what = "chunk data is truncated" if size < self.item_nbytes else \
                "chunk file is longer than one image"
            raise TruncatedRead(path, f"{what} ({size} bytes, expected {self.item_nbytes})")
        for k, (slot, out) in enumerate(items):
            if self.per_file == 1:
                off = 0
            else:
                off, nbytes = (int(v) for v in
                               self._shard_index(path, size, read, version)[slot])
                if off == _NO_CHUNK:
                    missing.append(k)
                    continue
                if nbytes != self.item_nbytes:
                    raise TruncatedRead(path, f"inner chunk {slot} has {nbytes} bytes, "
                                        f"expected {self.item_nbytes} (uncompressed)")
            if frame is not None:
                off += int(frame) * self.frame_nbytes
            if off + span > size:
                raise TruncatedRead(path, f"chunk data is truncated ({size} bytes, expected "
                                    f"at least {off + span})")
            located.append((off, out))
        located.sort(key=lambda t: t[0])
        return located, missing

    def files(self, n_images: int) -> list[str]:
        """Paths of the chunk (or shard) files holding images ``0 .. n_images - 1``."""
        return [self.file_of(f * self.per_file)[0]
                for f in range(-(-int(n_images) // self.per_file))]

    def chunk_key(self, path: str) -> str:
        """The chunk key (``c/3/0/0/0/0``) of a chunk file of this array."""
        return os.path.relpath(path, self.root).replace(os.sep, "/")

    def read_file(self, path: str, items: list[tuple[int, np.ndarray]],
                  frame: int | None) -> list[int]:
        """Read ``(slot, out)`` items of one file; returns the indices of missing chunks.

        A truncated or inconsistent file raises :class:`~cube_gen.errors.ChunkCorrupt`
        naming the cube, array and chunk key.
        """
        try:
            return self._read_file(path, items, frame)
        except TruncatedRead as exc:
            raise ChunkCorrupt(self.cube, self.array, self.chunk_key(path), exc.detail,
                               url=path, version=self.version) from None

    def _read_file(self, path: str, items: list[tuple[int, np.ndarray]],
                   frame: int | None) -> list[int]:
        mapped = self.maps.get(path)  # None when the file changed since it was mapped
        if mapped is not None:  # mapped: copy straight from the page cache
            m, version = mapped

            def from_map(at: int, nbytes: int) -> np.ndarray:
                return np.frombuffer(m, np.uint8, nbytes, at).copy()

            located, missing = self._locate(path, len(m), items, frame, from_map, version)
            for off, out in located:
                src = np.frombuffer(m, self.dtype, out.size, off).reshape(out.shape)
                np.copyto(out, src, casting="unsafe")
            return missing
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            return list(range(len(items)))
        try:
            st = os.fstat(fd)
            size = st.st_size

            def from_fd(at: int, nbytes: int) -> np.ndarray:
                buf = np.empty(nbytes, np.uint8)
                read_into(fd, [buf], at, path)
                return buf

            located, missing = self._locate(path, size, items, frame, from_fd,
                                            _signature(st))
            span = self.item_nbytes if frame is None else self.frame_nbytes
            run: list[np.ndarray] = []
            start = end = -1
            for off, out in located:  # coalesce back-to-back inner chunks into one preadv
                if run and off != end:
                    self._flush(fd, path, run, start)
                    run = []
                if not run:
                    start = off
                run.append(out)
                end = off + span
            if run:
                self._flush(fd, path, run, start)
            self.maps.add(path, fd, size)
        finally:
            os.close(fd)
        return missing

    def _flush(self, fd: int, path: str, outs: list[np.ndarray], offset: int) -> None:
        direct = [o.dtype == self.dtype for o in outs]
        bufs = [o if d else np.empty(o.shape, self.dtype) for o, d in zip(outs, direct, strict=True)]
        read_into(fd, [b.reshape(-1).view(np.uint8) for b in bufs], offset, path)
        for o, b, d in zip(outs, bufs, direct, strict=True):
            if not d:
                o[...] = b

    def read(self, images: Sequence[int], outs: Sequence[np.ndarray], frame: int | None) -> bool:
        """Read single images (all in one file); False when a chunk was never written."""
        path, _ = self.file_of(images[0])
        items = [(self.file_of(i)[1], o) for i, o in zip(images, outs, strict=True)]
        return not self.read_file(path, items, frame)

    def read_many(self, images: np.ndarray, result: np.ndarray, rows: np.ndarray,
                  frame: int | None, workers: int) -> np.ndarray:
        """Read sorted distinct ``images`` into ``result[rows]``; mask of the missing ones."""
        groups: dict[str, list[int]] = {}
        for k, image in enumerate(images.tolist()):
            groups.setdefault(self.file_of(image)[0], []).append(k)

        def one(path_ks):
            path, ks = path_ks
            items = [(self.file_of(int(images[k]))[1], result[rows[k]]) for k in ks]
            return [ks[m] for m in self.read_file(path, items, frame)]

        jobs = list(groups.items())
        if workers > 1 and len(jobs) > 1:
            with ThreadPoolExecutor(min(workers, len(jobs))) as pool:
                found = list(pool.map(one, jobs))
        else:
            found = [one(j) for j in jobs]
        missing = np.zeros(len(images), bool)
        for ks in found:
            missing[ks] = True
        return missing


def raw_layout(arr: zarr.Array, target: Target, root: str, cube: str = "vision.zarr",
               array: str = "features", version: str | None = None) -> RawLayout | None:
    """The raw layout of an uncompressed local array when it has one (else read through zarr).

    ``root`` is the array's folder; ``cube``, ``array`` and ``version`` name it in errors.
    """
    names = {"cube": cube, "array": array, "version": version}
    if not target.is_local:
        return None
    try:
        from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

        meta = arr.metadata
        shape = tuple(int(s) for s in arr.shape[1:])
        ndim = len(shape) + 1
        if meta.zarr_format == 2:
            if meta.compressor is not None or meta.filters or meta.order != "C":
                return None
            if tuple(arr.chunks) != (1, *shape):
                return None
            sep = meta.dimension_separator or "."
            dtype = np.dtype(meta.dtype.to_native_dtype())
            return RawLayout(root, dtype, shape,
                              lambda f: sep.join([str(f)] + ["0"] * (ndim - 1)), 1, True, **names)
        codecs = list(meta.codecs)
        per_file, at_end = 1, True
        if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
            sh = codecs[0]
            idx = list(sh.index_codecs)
            outer = tuple(meta.chunk_grid.chunk_shape)
            if (tuple(sh.chunk_shape) != (1, *shape) or outer[1:] != shape
                    or len(idx) != 2 or not isinstance(idx[0], BytesCodec)
                    or str(getattr(idx[0].endian, "value", idx[0].endian)) != "little"
                    or not isinstance(idx[1], Crc32cCodec)):
                return None
            per_file = int(outer[0])
            at_end = str(getattr(sh.index_location, "value", sh.index_location)) == "end"
            codecs = list(sh.codecs)
        elif tuple(arr.chunks) != (1, *shape):
            return None
        if len(codecs) != 1 or not isinstance(codecs[0], BytesCodec):
            return None
        endian = str(getattr(codecs[0].endian, "value", codecs[0].endian))
        dtype = np.dtype(arr.dtype).newbyteorder(">" if endian == "big" else "<")
        enc = meta.chunk_key_encoding
        return RawLayout(root, dtype, shape,
                          lambda f: enc.encode_chunk_key((f,) + (0,) * (ndim - 1)), per_file,
                         at_end, **names)
    except (AttributeError, TypeError, ValueError):  # an unfamiliar zarr layout: use zarr
        return None


def zarr_runs(arr: zarr.Array, positions: np.ndarray, rows: Sequence[int], result: np.ndarray,
               frame: int | None, workers: int) -> None:
    """Read sorted distinct ``positions`` through zarr into ``result[rows]``, run by run."""
    positions = np.asarray(positions, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    runs = [seg[k:k + RUN_MAX] for seg in np.split(np.arange(len(positions)), breaks)
            for k in range(0, len(seg), RUN_MAX)]

    def fetch(seg: np.ndarray) -> None:
        a, b = int(positions[seg[0]]), int(positions[seg[-1]]) + 1
        data = arr[a:b] if frame is None else arr[a:b, int(frame)]
        for j, k in enumerate(seg):
            result[rows[k]] = data[j]

    if workers > 1 and len(runs) > 1:
        with ThreadPoolExecutor(min(workers, len(runs))) as pool:
            list(pool.map(fetch, runs))
    else:
        for seg in runs:
            fetch(seg)
