"""Read-side access to a cube set, shared by the server plugin and ML code.

``CubeSet.open(url, storage_options)`` checks the manifest and opens the cubes lazily
(local path or any fsspec URL, e.g. ``s3://``). Lookups by gbif_id (+ image number) are
binary searches on sorted ids; bounding-box / time selections read only the observation
chunks whose extents intersect the query, and cache what they read.

Feature reads: an uncompressed local cube (the default recipe: raw float16 chunks, one
image per chunk, optionally sharded, Zarr v3 or v2) is read without zarr: the first read
of a chunk file is one ``preadv`` straight into the result, later reads copy from a
cached memory map of the file (bounded, see ``DEEPEARTH_MMAP_BYTES``), which costs about
what a raw ``np.memmap`` of the same bytes costs. Compressed or remote cubes go through
zarr. A batch reads each distinct image once, in file order, coalescing neighbouring
inner chunks of a shard into one ``preadv``, and through zarr reads contiguous runs in
parallel threads (object stores); results come back in the requested order.
"""

from __future__ import annotations

import mmap
import operator
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from . import schema as S
from .errors import CubeError, NotFoundError
from .store import Target, zarr_store
from .timeparse import PRECISIONS

SPLIT_NAMES = {v: k for k, v in S.SPLIT_CODES.items()}


def _reset_dask_pools() -> None:
    """Forget dask's thread pools in a forked child (their threads did not survive the fork).

    Without this, the first dask computation in a forked process (a DataLoader worker)
    waits forever on the parent's dead pool.
    """
    threaded = sys.modules.get("dask.threaded")
    if threaded is not None:
        threaded.default_pool = None
        threaded.pools.clear()
        threaded.pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_dask_pools)


@dataclass(frozen=True)
class Query:
    """A selection: bbox (west, south, east, north), time range, species, split, has_vision."""

    bbox: tuple[float, float, float, float] | None = None
    start: np.datetime64 | None = None
    end: np.datetime64 | None = None  # inclusive
    species: tuple[int | str, ...] | None = None  # species indices, taxon ids or names
    split: str | None = None
    has_vision: bool | None = None

    @staticmethod
    def make(bbox=None, start=None, end=None, species=None, split=None, has_vision=None) -> Query:
        if bbox is not None:
            bbox = tuple(float(v) for v in bbox)
            if len(bbox) != 4:
                raise ValueError("bbox must be (west, south, east, north)")
        if split is not None and split not in S.SPLIT_CODES:
            raise ValueError(f"split must be one of {', '.join(S.SPLIT_CODES)}")
        if species is not None and (isinstance(species, str) or np.ndim(species) == 0):
            species = (species,)
        return Query(
            bbox, None if start is None else np.datetime64(pd.Timestamp(start), "ns"),
            None if end is None else np.datetime64(pd.Timestamp(end), "ns"),
            None if species is None else tuple(
                s.strip() if isinstance(s, str) else int(s) for s in species),
            split, None if has_vision is None else bool(has_vision),
        )


class CubeSet:
    """An opened cube set (local path or URL)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = str(url).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.target = Target(self.url, self.storage_options)
        self.manifest = self.target.read_json(self.target.path(S.MANIFEST))
        if self.manifest is None:
            raise CubeError(f"{self.url} is not a complete cube set ({S.MANIFEST} is missing)")
        self._lock = threading.RLock()
        self._cache: dict[str, Any] = {}

    def __reduce__(self):
        # pickles as (url, storage_options): a process that unpickles it reopens the cubes
        return (type(self), (self.url, self.storage_options))

    def close(self) -> None:
        """Drop open handles, memory maps and cached tables (the object stays usable)."""
        with self._lock:
            layout = self._cache.get("raw_layout")
            if layout is not None:
                layout.maps.clear()
            self._cache.clear()

    def __enter__(self) -> CubeSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def open(cls, url: str, storage_options: dict[str, Any] | None = None) -> CubeSet:
        return cls(url, storage_options)

    # -- cubes ---------------------------------------------------------------------------
    def _open(self, cube: str) -> xr.Dataset:
        url = self.target.url_of(S.CUBE_PATHS[cube])
        return xr.open_zarr(url, consolidated=True,
                            storage_options=self.storage_options or None)

    def _plain(self, cube: str) -> xr.Dataset:
        """The cube without dask (lazy numpy indexing): cheap small reads, safe after fork."""
        url = self.target.url_of(S.CUBE_PATHS[cube])
        return self._cached(f"plain:{cube}", lambda: xr.open_zarr(
            url, consolidated=True, chunks=None, storage_options=self.storage_options or None))

    def _cached(self, key: str, make):
        with self._lock:
            if key not in self._cache:
                self._cache[key] = make()
            return self._cache[key]

    @property
    def observations(self) -> xr.Dataset:
        return self._cached("observations", lambda: self._open(S.OBSERVATIONS))

    @property
    def species(self) -> xr.Dataset:
        return self._cached("species", lambda: self._open(S.SPECIES))

    @property
    def vision(self) -> xr.Dataset:
        return self._cached("vision", lambda: self._open(S.VISION))

    def grid(self, level: int = 0) -> xr.Dataset:
        url = self.target.url_of(S.CUBE_PATHS[S.GRID], f"{level}.zarr")
        return self._cached(f"grid{level}", lambda: xr.open_zarr(
            url, consolidated=True, storage_options=self.storage_options or None))

    def _zarr_array(self, cube: str, name: str) -> zarr.Array:
        def make():
            store = zarr_store(self.target.url_of(S.CUBE_PATHS[cube]), self.storage_options,
                               read_only=True)
            return zarr.open_array(store, path=name, mode="r")

        return self._cached(f"zarr:{cube}/{name}", make)

    def species_table(self) -> pd.DataFrame:
        """Species index, taxon id, name, counts, cluster and colours."""
        def make():
            ds = self._plain(S.SPECIES)
            return pd.DataFrame({
                "species_index": ds.species.values.astype(int),
                "taxon_id": ds.taxon_id.values.astype(object),
                "taxon_name": ds.taxon_name.values.astype(object),
                "genus": ds.genus.values.astype(object),
                "observation_count": ds.observation_count.values,
                "vision_count": ds.vision_count.values,
                "cluster": ds.cluster.values,
                "color": ds.color.values.astype(object),
                "cluster_color": ds.cluster_color.values.astype(object),
            })
        return self._cached("species_table", make)

    def image_table(self) -> pd.DataFrame:
        """One row per embedding: gbif_id, image_number, obs/species index, time, lat, lon, split."""
        def make():
            ds = self._plain(S.VISION)
            names = ("gbif_id", "image_number", "obs_index", "species_index", "time", "lat", "lon",
                     "split")
            return pd.DataFrame({k: ds[k].values for k in names})
        return self._cached("image_table", make)

    # -- observations --------------------------------------------------------------------
    def _id_index(self) -> tuple[np.ndarray, np.ndarray]:
        def make():
            ds = self._plain(S.OBSERVATIONS)
            return ds.gbif_id_sorted.values, ds.gbif_id_order.values
        return self._cached("id_index", make)

    def obs_position(self, gbif_id: int) -> int:
        """Position along ``obs`` of an observation (binary search)."""
        ids, order = self._id_index()
        i = int(np.searchsorted(ids, gbif_id))
        if i >= len(ids) or ids[i] != gbif_id:
            raise NotFoundError(f"no observation with gbif_id {gbif_id}")
        return int(order[i])

    def observation(self, gbif_id: int) -> dict[str, Any]:
        """All fields of one observation, plus its embeddings' image numbers."""
        pos = self.obs_position(gbif_id)
        return self.observation_rows(np.array([pos]))[0]

    def observation_rows(self, positions: np.ndarray) -> list[dict[str, Any]]:
        """Observation records for ``obs`` positions (JSON-ready values)."""
        ds = self.observations
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) == 0:
            return []
        sub = ds.isel(obs=positions)
        names = ("gbif_id", "time", "lat", "lon", "species_index", "taxon_id", "split",
                 "has_vision", "num_images", "num_embeddings", "time_precision", "image_urls")
        cols = {k: sub[k].values for k in names}
        sp = self.species_table()
        out = []
        for i in range(len(positions)):
            s = int(cols["species_index"][i])
            urls = [str(u) for u in cols["image_urls"][i] if str(u)]
            out.append({
                "gbif_id": int(cols["gbif_id"][i]),
                "time": pd.Timestamp(cols["time"][i]).isoformat(),
                "time_precision": PRECISIONS[int(cols["time_precision"][i])],
                "lat": float(cols["lat"][i]),
                "lon": float(cols["lon"][i]),
                "species_index": s,
                "taxon_id": str(cols["taxon_id"][i]),
                "taxon_name": str(sp.taxon_name.iat[s]),
                "split": SPLIT_NAMES[int(cols["split"][i])],
                "has_vision": bool(cols["has_vision"][i]),
                "num_images": int(cols["num_images"][i]),
                "num_embeddings": int(cols["num_embeddings"][i]),
                "image_urls": urls,
            })
        return out

    def _species_codes(self, species: tuple | None) -> tuple[int, ...] | None:
        """Species indices of a query: ints pass through, strings name a taxon_name/taxon_id."""
        if species is None or all(isinstance(s, int | np.integer) for s in species):
            return species
        table = self.species_table()
        by_name = {str(n).lower(): i for i, n in zip(table.species_index, table.taxon_name,
                                                     strict=True)}
        by_id = {str(t): i for i, t in zip(table.species_index, table.taxon_id, strict=True)}
        out = []
        for s in species:
            if isinstance(s, int | np.integer):
                out.append(int(s))
                continue
            key = str(s).strip()
            hit = by_id.get(key, by_name.get(key.lower()))
            if hit is None:
                raise NotFoundError(f"unknown species {s!r} (expected a species index, taxon_id "
                                    f"or taxon_name of species.zarr, {len(table)} species)")
            out.append(int(hit))
        return tuple(out)

    def _obs_chunk(self, c: int, chunk: int, n: int) -> dict[str, np.ndarray]:
        """The filter columns of one observation chunk (read once, then cached)."""
        def make():
            sl = slice(c * chunk, min((c + 1) * chunk, n))
            part = self._plain(S.OBSERVATIONS).isel(obs=sl)
            return {k: part[k].values for k in
                    ("lat", "lon", "time", "species_index", "split", "has_vision")}
        return self._cached(f"obs_chunk:{c}", make)

    def select_observations(self, query: Query | None = None, **kwargs) -> np.ndarray:
        """Positions along ``obs`` matching the query, in cube order.

        Only the chunks whose stored extents intersect the bbox and time range are read
        (once: their filter columns are cached).
        """
        q = query or Query.make(**kwargs)
        species = self._species_codes(q.species)
        ds = self._plain(S.OBSERVATIONS)
        n = ds.sizes["obs"]
        chunk = int(ds.attrs.get("obs_chunk_size", n or 1))
        ext = self._cached("chunk_extents", lambda: {
            k: ds[f"chunk_{k}"].values
            for k in ("lat_min", "lat_max", "lon_min", "lon_max", "time_min", "time_max")})
        keep = np.ones(len(ext["lat_min"]), bool)
        if q.bbox is not None:
            w, s, e, nn = q.bbox
            keep &= (ext["lon_max"] >= w) & (ext["lon_min"] <= e)
            keep &= (ext["lat_max"] >= s) & (ext["lat_min"] <= nn)
        if q.start is not None:
            keep &= ext["time_max"] >= q.start
        if q.end is not None:
            keep &= ext["time_min"] <= q.end
        result = []
        for c in np.flatnonzero(keep):
            cols = self._obs_chunk(int(c), chunk, n)
            mask = _mask(cols, q, species)
            result.append(np.flatnonzero(mask) + int(c) * chunk)
        return np.concatenate(result).astype(np.int64) if result else np.zeros(0, np.int64)

    # -- vision --------------------------------------------------------------------------
    def _image_columns(self) -> dict[str, np.ndarray]:
        def make():
            t = self.image_table()
            cols = {k: t[k].to_numpy() for k in t.columns}
            cols["has_vision"] = np.ones(len(t), bool)
            return cols
        return self._cached("image_columns", make)

    def image_position(self, gbif_id: int, image_number: int = 0) -> int:
        """Position along ``image`` of embedding (gbif_id, image_number)."""
        cols = self._image_columns()
        ids = cols["gbif_id"]
        lo = int(np.searchsorted(ids, gbif_id, side="left"))
        hi = int(np.searchsorted(ids, gbif_id, side="right"))
        if lo == hi:
            raise NotFoundError(f"no vision embedding for gbif_id {gbif_id}")
        numbers = cols["image_number"][lo:hi]
        hit = np.flatnonzero(numbers == image_number)
        if len(hit) == 0:
            raise NotFoundError(f"gbif_id {gbif_id} has no image {image_number} "
                                f"(image numbers: {', '.join(str(int(x)) for x in numbers)})")
        return lo + int(hit[0])

    def image_positions(self, gbif_ids: Sequence[int],
                        image_numbers: Sequence[int] | int = 0) -> np.ndarray:
        """Positions along ``image`` of many (gbif_id, image_number) pairs, in the given order."""
        gid = np.asarray(gbif_ids, dtype=np.int64).reshape(-1)
        num = np.broadcast_to(np.asarray(image_numbers, dtype=np.int64), gid.shape)
        cols = self._image_columns()
        ids, numbers = cols["gbif_id"], cols["image_number"].astype(np.int64)
        # vision.zarr is ordered by (gbif_id, image_number): search on the pair
        lo = np.searchsorted(ids, gid, side="left")
        pos = lo + num
        ok = (num >= 0) & (pos < len(ids))
        ok[ok] &= (ids[pos[ok]] == gid[ok]) & (numbers[pos[ok]] == num[ok])
        if not ok.all():
            k = int(np.flatnonzero(~ok)[0])
            return np.asarray([self.image_position(int(gid[k]), int(num[k]))])  # raises
        return pos.astype(np.int64)

    def images_of(self, gbif_id: int) -> list[int]:
        ids = self._image_columns()["gbif_id"]
        return list(range(int(np.searchsorted(ids, gbif_id)),
                          int(np.searchsorted(ids, gbif_id, side="right"))))

    def select_images(self, query: Query | None = None, **kwargs) -> np.ndarray:
        """Positions along ``image`` matching the query, ascending."""
        q = query or Query.make(**kwargs)
        return np.flatnonzero(_mask(self._image_columns(), q, self._species_codes(q.species)))

    def _features_array(self) -> zarr.Array:
        return self._zarr_array(S.VISION, "features")

    def _raw_layout(self) -> _RawLayout | None:
        """How to read features as raw bytes from local files, or None (use zarr)."""
        return self._cached("raw_layout", lambda: _raw_layout(
            self._features_array(), self.target,
            os.path.join(self.target.root, S.CUBE_PATHS[S.VISION], "features")))

    def _raw_chunk_path(self, image: int) -> str | None:
        """Local file holding an image's features as raw bytes, else None."""
        layout = self._raw_layout()
        return None if layout is None else layout.file_of(image)[0]

    def _check_images(self, images: np.ndarray, n: int) -> None:
        bad = (images < 0) | (images >= n)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise NotFoundError(f"image position {int(images[k])} is out of range [0, {n})"
                                + (f" (item {k} of the batch)" if images.ndim and len(images) > 1
                                   else ""))

    def _out_for(self, lead: tuple[int, ...], frame: int | None, dtype, out: np.ndarray | None,
                 arr: zarr.Array) -> np.ndarray:
        if frame is not None and not 0 <= int(frame) < arr.shape[1]:
            raise ValueError(f"frame must be in [0, {arr.shape[1]}), got {frame}")
        shape = (*lead, *(arr.shape[1:] if frame is None else arr.shape[2:]))
        want = np.dtype(arr.dtype if dtype is None else dtype)
        if out is None:
            return np.empty(shape, want)
        if out.shape != shape or (dtype is not None and out.dtype != want):
            raise ValueError(f"out has shape {out.shape} and dtype {out.dtype}; expected shape "
                             f"{shape}" + (f" and dtype {want}" if dtype is not None else ""))
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out must be a writeable C-contiguous array")
        return out

    def features(self, image: int, dtype: str | None = None, *, frame: int | None = None,
                 out: np.ndarray | None = None) -> np.ndarray:
        """The (frame, patch_y, patch_x, feature) tensor of the image at position ``image``.

        ``frame``: only that frame, (patch_y, patch_x, feature). ``dtype``: convert (e.g.
        float32). ``out``: a preallocated C-contiguous array to read into (returned).
        Uncompressed local cubes are read straight from the chunk (or shard) file into the
        result; anything else (compressed, remote) goes through zarr.
        """
        arr = self._features_array()
        n = arr.shape[0]
        try:
            image = operator.index(image)
        except TypeError:
            raise TypeError(f"image must be an integer position, got {image!r}") from None
        if not 0 <= image < n:
            raise NotFoundError(f"image position {image} is out of range [0, {n})")
        result = self._out_for((), frame, dtype, out, arr)
        layout = self._raw_layout()
        if layout is not None and layout.read([image], [result], frame):
            return result
        data = arr[image] if frame is None else arr[image, int(frame)]
        if out is None:
            return data if result.dtype == data.dtype else data.astype(result.dtype)
        result[...] = data
        return result

    def features_batch(self, images: Sequence[int], dtype: str | None = None, *,
                       frame: int | None = None, out: np.ndarray | None = None,
                       max_workers: int | None = None) -> np.ndarray:
        """Tensors of many images as one (n, ...) array, in the given order.

        Reads are coalesced: each distinct image is read once, in ascending position
        (file) order; neighbouring images of one shard are read by one ``preadv``;
        through zarr (compressed or remote cubes), contiguous runs are read with one
        selection each, runs in parallel on ``max_workers`` threads.
        """
        arr = self._features_array()
        images = np.asarray(images, dtype=np.int64).reshape(-1)
        self._check_images(images, arr.shape[0])
        result = self._out_for((len(images),), frame, dtype, out, arr)
        if len(images) == 0:
            return result
        uniq, first, inverse = np.unique(images, return_index=True, return_inverse=True)
        layout = self._raw_layout()
        todo = uniq
        if layout is not None:
            workers = max_workers or min(_LOCAL_THREADS, os.cpu_count() or 1)
            missing = layout.read_many(uniq, result, first, frame, workers)
            todo = uniq[missing]
        if len(todo):
            workers = max_workers or (_REMOTE_THREADS if not self.target.is_local
                                      else min(_LOCAL_THREADS, os.cpu_count() or 1))
            slot = dict(zip(uniq.tolist(), first.tolist(), strict=True))
            _zarr_runs(arr, todo, [slot[int(i)] for i in todo], result, frame, workers)
        dup = np.flatnonzero(first[inverse] != np.arange(len(images)))
        for k in dup:  # repeated positions: copy the one read
            result[k] = result[first[inverse[k]]]
        return result

    def pooled(self, images: Sequence[int] | None = None) -> np.ndarray:
        """Mean-pooled 1408-d vectors (all, read-only; or a copy for the given positions)."""
        def make():
            allp = self._zarr_array(S.VISION, "pooled")[:]
            allp.flags.writeable = False
            return allp
        allp = self._cached("pooled", make)
        if images is None:
            return allp
        images = np.asarray(images, dtype=np.int64)
        self._check_images(images.reshape(-1), len(allp))
        return allp[images]

    def attention(self, image: int, method: str = "l2norm", frame: str | int = "mean") -> np.ndarray:
        """Precomputed raw (24, 24) attention map."""
        if method not in S.ATTENTION_METHODS:
            raise ValueError(f"method must be one of {', '.join(S.ATTENTION_METHODS)}")
        if str(frame) not in S.ATTENTION_FRAMES:
            raise ValueError(f"frame must be one of {', '.join(S.ATTENTION_FRAMES)}")
        arr = self._zarr_array(S.VISION, "attention")
        return arr[image, S.ATTENTION_METHODS.index(method), S.ATTENTION_FRAMES.index(str(frame))]

    def umap_rgb(self, image: int) -> np.ndarray | None:
        """Precomputed (24, 24, 3) uint8 UMAP-RGB image, or None if the recipe skipped it."""
        arr = self._zarr_array(S.VISION, "umap_rgb")
        if not arr.attrs.get("computed", True):
            return None
        return arr[image]

    def image_stats(self, image: int) -> dict[str, float]:
        ds = self._plain(S.VISION)
        return {k: float(ds[f"stat_{k}"].values[image]) for k in S.IMAGE_STATS}

    def language_embeddings(self) -> np.ndarray:
        return self._cached("language", lambda: self._plain(S.SPECIES).language_embedding.values)

    def describe(self) -> str:
        m = self.manifest
        lines = [f"cube set {self.url}", f"  recipe {m.get('recipe')}  created {m.get('created')}"]
        for k, v in (m.get("counts") or {}).items():
            lines.append(f"  {k}: {v}")
        for cube, path in S.CUBE_PATHS.items():
            lines.append(f"  {cube}: {path}")
        return "\n".join(lines)


# -- selections --------------------------------------------------------------------------------
def _mask(cols: dict[str, np.ndarray], q: Query, species: tuple[int, ...] | None) -> np.ndarray:
    """Rows of ``cols`` (lat, lon, time, species_index, split, has_vision) matching ``q``."""
    mask = np.ones(len(cols["lat"]), bool)
    if q.bbox is not None:
        w, s, e, n = q.bbox
        lat, lon = cols["lat"], cols["lon"]
        mask &= (lon >= w) & (lon <= e) & (lat >= s) & (lat <= n)
    if q.start is not None:
        mask &= cols["time"] >= q.start
    if q.end is not None:
        mask &= cols["time"] <= q.end
    if species is not None:
        mask &= np.isin(cols["species_index"], np.asarray(species, dtype=np.int64))
    if q.split is not None:
        mask &= cols["split"] == S.SPLIT_CODES[q.split]
    if q.has_vision is not None:
        mask &= cols["has_vision"] == bool(q.has_vision)
    return mask


# -- raw reads of uncompressed features ----------------------------------------------------
_LOCAL_THREADS = 2  # parallel local reads in a batch (more does not help: memory/disk bound)
_REMOTE_THREADS = 8  # parallel zarr selections in a batch (object stores: latency bound)
_RUN_MAX = 4  # images per zarr selection in a batch (bounds the bytes in flight)
_IOV_MAX = 512  # buffers per preadv call (Linux allows 1024)
_NO_CHUNK = 2**64 - 1  # shard index entry of a chunk that was never written
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0)


def _read_into(fd: int, views: list[np.ndarray], offset: int, path: str) -> None:
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
            raise CubeError(f"{path}: chunk data is truncated at byte {pos} (expected "
                            f"{sum(v.nbytes for v in views)} more bytes)")
        pos += got
        while views and got >= views[0].nbytes:
            got -= views[0].nbytes
            views.pop(0)
        if views and got:
            views[0] = views[0][got:]


def _default_map_budget() -> int:
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


class _FileMaps:
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


class _RawLayout:
    """Where each image's features lie as raw bytes in local files.

    Applies to uncompressed Zarr v3 arrays (bytes codec only; optionally sharded with an
    uncompressed inner chunk per image) and uncompressed C-order Zarr v2 arrays, whose
    chunks hold exactly one image each. Like the rest of a CubeSet, it is a snapshot:
    reopen the cube set after rebuilding it in place.
    """

    def __init__(self, root: str, dtype: np.dtype, shape: tuple[int, ...], key, per_file: int,
                 index_at_end: bool):
        self.root = root
        self.dtype = dtype  # stored dtype, with its byte order
        self.shape = shape
        self.key = key  # file index -> chunk key
        self.per_file = per_file  # images per file: 1 (plain chunks) or the shard size
        self.index_at_end = index_at_end
        self.item_nbytes = int(np.prod(shape)) * dtype.itemsize
        self.frame_nbytes = self.item_nbytes // shape[0]
        self._index: dict[str, np.ndarray] = {}
        self.maps = _FileMaps(_default_map_budget())

    def file_of(self, image: int) -> tuple[str, int]:
        f, slot = divmod(int(image), self.per_file)
        return os.path.join(self.root, *self.key(f).split("/")), slot

    def _shard_index(self, path: str, size: int, read, version: tuple = ()) -> np.ndarray:
        key = (path, *version)  # a rewritten shard has a new index
        index = self._index.get(key)
        if index is None:
            nbytes = 16 * self.per_file
            at = size - nbytes - 4 if self.index_at_end else 0
            if at < 0:
                raise CubeError(f"{path}: shard of {size} bytes is too small for its index")
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
            raise CubeError(f"{path}: {what} ({size} bytes, expected {self.item_nbytes})")
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
                    raise CubeError(f"{path}: inner chunk {slot} has {nbytes} bytes, expected "
                                    f"{self.item_nbytes} (uncompressed)")
            if frame is not None:
                off += int(frame) * self.frame_nbytes
            if off + span > size:
                raise CubeError(f"{path}: chunk data is truncated ({size} bytes, expected at "
                                f"least {off + span})")
            located.append((off, out))
        located.sort(key=lambda t: t[0])
        return located, missing

    def read_file(self, path: str, items: list[tuple[int, np.ndarray]],
                  frame: int | None) -> list[int]:
        """Read ``(slot, out)`` items of one file; returns the indices of missing chunks."""
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
                _read_into(fd, [buf], at, path)
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
        _read_into(fd, [b.reshape(-1).view(np.uint8) for b in bufs], offset, path)
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


def _raw_layout(arr: zarr.Array, target: Target, root: str) -> _RawLayout | None:
    """The raw layout of the features array when it has one (else reads go through zarr)."""
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
            return _RawLayout(root, dtype, shape,
                              lambda f: sep.join([str(f)] + ["0"] * (ndim - 1)), 1, True)
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
        return _RawLayout(root, dtype, shape,
                          lambda f: enc.encode_chunk_key((f,) + (0,) * (ndim - 1)), per_file,
                          at_end)
    except (AttributeError, TypeError, ValueError):  # an unfamiliar zarr layout: use zarr
        return None


def _zarr_runs(arr: zarr.Array, positions: np.ndarray, rows: Sequence[int], result: np.ndarray,
               frame: int | None, workers: int) -> None:
    """Read sorted distinct ``positions`` through zarr into ``result[rows]``, run by run."""
    positions = np.asarray(positions, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    runs = [seg[k:k + _RUN_MAX] for seg in np.split(np.arange(len(positions)), breaks)
            for k in range(0, len(seg), _RUN_MAX)]

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
