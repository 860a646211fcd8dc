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

import operator
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from . import schema as S
from .chunkio import LOCAL_THREADS, REMOTE_THREADS, RawLayout, raw_layout, zarr_runs
from .errors import NotFoundError, NotMaterialised
from .integrity import CheckedStore, sub_inventory
from .query import SPLIT_NAMES, Page, Query, mask, paginate
from .release import resolve
from .store import Target, zarr_store
from .timeparse import PRECISIONS

__all__ = ["SPLIT_NAMES", "CubeSet", "Page", "Query", "paginate"]



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


class CubeSet:
    """An opened cube set (local path or URL), one version of it, read consistently.

    ``CubeSet.open(target)`` resolves the target's current version once; everything read
    afterwards comes from that version, even when a newer one is published meanwhile
    (re-open to see it). ``CubeSet.open(target, version=...)`` pins a version. Reads go
    through a :class:`~cube_gen.integrity.CheckedStore`: a chunk the release lists but
    the store lacks (or holds truncated) raises :class:`~cube_gen.errors.ChunkMissing` /
    :class:`~cube_gen.errors.ChunkCorrupt` naming the cube, array and chunk key.

    All caches (tables, columns, memory maps, derived arrays of :mod:`cube_gen.analysis`)
    belong to the cube set: :meth:`memo` adds one, :meth:`clear_caches` drops them all.
    A failed read is never cached.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 version: str | None = None):
        self.url = str(url).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.target = Target(self.url, self.storage_options)
        resolved = resolve(self.target, version)
        self.version: str | None = resolved.version  # None: a cube set without releases
        self.manifest: dict = resolved.manifest
        self.files = resolved.files  # object -> [size, md5]; None without a release
        self.prefix = resolved.prefix  # path parts of the version below the target
        self._lock = threading.RLock()
        self._cache: dict[Any, Any] = {}

    def __reduce__(self):
        # pickles as (url, storage_options, version): an unpickled copy reopens the same
        # version of the cubes
        return (type(self), (self.url, self.storage_options, self.version))

    def clear_caches(self) -> None:
        """Drop every cache of this cube set (tables, columns, maps, derived arrays)."""
        with self._lock:
            layout = self._cache.get("raw_layout")
            if layout is not None:
                layout.maps.clear()
            self._cache.clear()

    def close(self) -> None:
        """Drop open handles, memory maps and cached tables (the object stays usable)."""
        self.clear_caches()

    def __enter__(self) -> CubeSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def open(cls, url: str, storage_options: dict[str, Any] | None = None,
             version: str | None = None) -> CubeSet:
        """Open the current version of the cube set at ``url`` (or ``version``)."""
        return cls(url, storage_options, version)

    # -- caches --------------------------------------------------------------------------
    def memo(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` once per cube set and key (computed outside the lock; errors not cached)."""
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        value = make()
        with self._lock:
            return self._cache.setdefault(key, value)

    def _cached(self, key: str, make):
        with self._lock:
            if key not in self._cache:
                self._cache[key] = make()
            return self._cache[key]

    # -- cubes ---------------------------------------------------------------------------
    def cube_url(self, cube: str, *parts: str) -> str:
        """URL (or local path) of a cube of this version, as any Zarr reader opens it.

        ``cube`` is a name of :data:`cube_gen.schema.CUBE_PATHS` (``vision``) or a path
        (``vision.zarr``); e.g. ``s3://bucket/set/versions/<id>/vision.zarr``.
        """
        return self.target.url_of(*self.prefix, S.CUBE_PATHS.get(cube, cube), *parts)

    def zarr_store(self, cube: str, sub: str = ""):
        """A read-only, checked zarr store of a cube (``sub``: e.g. ``0.zarr`` of the grid)."""
        path = S.CUBE_PATHS.get(cube, cube)

        def make():
            inner = zarr_store(self.cube_url(path, *([sub] if sub else [])),
                               self.storage_options, read_only=True)
            return CheckedStore(inner, sub_inventory(self.files, path), path, self.version,
                                prefix=f"{sub}/" if sub else "")
        return self._cached(("store", path, sub), make)

    def _open(self, cube: str, sub: str = "", chunks: Any = "auto") -> xr.Dataset:
        kw = {} if chunks == "auto" else {"chunks": chunks}
        return xr.open_zarr(self.zarr_store(cube, sub), consolidated=True, **kw)

    def _plain(self, cube: str) -> xr.Dataset:
        """The cube without dask (lazy numpy indexing): cheap small reads, safe after fork."""
        return self._cached(f"plain:{cube}", lambda: self._open(cube, chunks=None))

    @property
    def observations(self) -> xr.Dataset:
        return self._cached("observations", lambda: self._open(S.OBSERVATIONS))

    @property
    def species(self) -> xr.Dataset:
        return self._cached("species", lambda: self._open(S.SPECIES))

    @property
    def vision(self) -> xr.Dataset:
        return self._cached("vision", lambda: self._open(S.VISION))

    def grid(self, level: int = 0, cube: str = S.GRID) -> xr.Dataset:
        """Level ``level`` of a grid pyramid (``cube``: one of :data:`schema.GRID_CUBES`)."""
        return self._cached(f"{cube}:{level}", lambda: self._open(cube, f"{int(level)}.zarr"))

    def zarr_array(self, cube: str, name: str) -> zarr.Array:
        """A zarr array of a cube (read-only, checked)."""
        return self._cached(f"zarr:{cube}/{name}", lambda: zarr.open_array(
            self.zarr_store(cube), path=name, mode="r"))

    _zarr_array = zarr_array

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
            raise NotFoundError(f"no observation with gbif_id {gbif_id}", parameter="gbif_id",
                                value=gbif_id)
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

    def species_index(self, token: int | str) -> int:
        """Species index of an index, taxon id, scientific name or name slug.

        Names and slugs are case-insensitive. Raises :class:`NotFoundError`
        (``parameter="species"``) when nothing matches.
        """
        table = self.species_table()
        if isinstance(token, int | np.integer):
            if 0 <= int(token) < len(table):
                return int(token)
            raise NotFoundError(f"species index {int(token)} is out of range [0, {len(table)})",
                                parameter="species", value=int(token))

        def make():
            lookup: dict[str, int] = {}
            for i, (tid, name) in enumerate(zip(table.taxon_id, table.taxon_name, strict=True)):
                lookup.setdefault(str(tid).lower(), i)
                lookup.setdefault(str(name).lower(), i)
                lookup.setdefault(S.species_slug(str(name)), i)
            return lookup

        key = str(token).strip().lower()
        hit = self.memo("species_lookup", make).get(key)
        if hit is None:
            raise NotFoundError(f"unknown species {str(token)!r} (give a species index, taxon "
                                "id, scientific name or its slug, e.g. 'quercus_virginiana'; "
                                f"{len(table)} species)", parameter="species", value=token)
        return int(hit)

    def species_indices(self, species: Sequence[int | str] | None) -> tuple[int, ...] | None:
        """:meth:`species_index` of each token (None stays None)."""
        if species is None:
            return None
        return tuple(self.species_index(s) for s in species)

    _species_codes = species_indices

    def query_species(self, q: Query) -> tuple[int, ...] | None:
        """The species a query selects: its ``species`` tokens and its ``taxa`` search
        (:func:`cube_gen.taxa.search_species`) together; None when it names none."""
        species = self.species_indices(q.species)
        if q.taxa is None:
            return species
        from .taxa import search_species

        found = search_species(self.species_table(), q.taxa)
        hits = tuple(int(i) for i in found) if found is not None else None
        if species is None or hits is None:
            return hits if species is None else species
        return tuple(i for i in species if i in set(hits))

    def _obs_chunk(self, c: int, chunk: int, n: int) -> dict[str, np.ndarray]:
        """The filter columns of one observation chunk (read once, then cached)."""
        def make():
            sl = slice(c * chunk, min((c + 1) * chunk, n))
            part = self._plain(S.OBSERVATIONS).isel(obs=sl)
            return {k: part[k].values for k in
                    ("lat", "lon", "time", "species_index", "split", "has_vision",
                     "time_precision")}
        return self._cached(f"obs_chunk:{c}", make)

    def select_observations(self, query: Query | None = None, **kwargs) -> np.ndarray:
        """Positions along ``obs`` matching the query, in cube order.

        Only the chunks whose stored extents intersect the bbox and time range are read
        (once: their filter columns are cached).
        """
        q = query or Query.make(**kwargs)
        species = self.query_species(q)
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
            result.append(np.flatnonzero(mask(cols, q, species)) + int(c) * chunk)
        return np.concatenate(result).astype(np.int64) if result else np.zeros(0, np.int64)

    # -- vision --------------------------------------------------------------------------
    def _image_columns(self) -> dict[str, np.ndarray]:
        def make():
            t = self.image_table()
            cols = {k: t[k].to_numpy() for k in t.columns}
            cols["has_vision"] = np.ones(len(t), bool)
            cols["time_precision"] = self._plain(S.OBSERVATIONS).time_precision.values[
                cols["obs_index"]]
            return cols
        return self._cached("image_columns", make)

    def image_position(self, gbif_id: int, image_number: int = 0) -> int:
        """Position along ``image`` of embedding (gbif_id, image_number).

        Raises :class:`NotFoundError` with ``parameter`` ``gbif_id`` (no such observation,
        or one without embeddings) or ``image_number`` (``allowed``: its image numbers).
        """
        cols = self._image_columns()
        ids = cols["gbif_id"]
        lo = int(np.searchsorted(ids, gbif_id, side="left"))
        hi = int(np.searchsorted(ids, gbif_id, side="right"))
        if lo == hi:
            try:
                self.obs_position(gbif_id)
            except NotFoundError:
                raise NotFoundError(f"no observation with gbif_id {gbif_id}",
                                    parameter="gbif_id", value=gbif_id) from None
            raise NotFoundError(f"observation {gbif_id} has no vision embedding",
                                parameter="gbif_id", value=gbif_id)
        numbers = cols["image_number"][lo:hi]
        hit = np.flatnonzero(numbers == image_number)
        if len(hit) == 0:
            raise NotFoundError(f"observation {gbif_id} has no embedding for image "
                                f"{image_number} (image numbers: "
                                f"{', '.join(str(int(x)) for x in numbers)})",
                                parameter="image_number", value=image_number,
                                allowed=[int(x) for x in numbers])
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
        return np.flatnonzero(mask(self._image_columns(), q, self.query_species(q)))

    def features_array(self) -> zarr.Array:
        """The ``features`` zarr array of vision.zarr (shape, dtype, chunks; checked reads)."""
        return self.zarr_array(S.VISION, "features")

    def raw_layout(self) -> RawLayout | None:
        """How to read features as raw bytes from local files, or None (read through zarr)."""
        return self._cached("raw_layout", lambda: raw_layout(
            self.features_array(), self.target,
            os.path.join(self.target.root, *self.prefix, S.CUBE_PATHS[S.VISION], "features"),
            S.CUBE_PATHS[S.VISION], "features", self.version))

    def raw_chunk_path(self, image: int) -> str | None:
        """Local file holding an image's features as raw bytes, else None."""
        layout = self.raw_layout()
        return None if layout is None else layout.file_of(image)[0]

    def check_images(self, images: np.ndarray, n: int | None = None) -> None:
        """Raise :class:`NotFoundError` for positions outside ``[0, n)`` (n: the image count)."""
        images = np.asarray(images, dtype=np.int64)
        if n is None:
            n = len(self.image_table())
        bad = (images < 0) | (images >= n)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise NotFoundError(f"image position {int(images[k])} is out of range [0, {n})"
                                + (f" (item {k} of the batch)" if images.ndim and len(images) > 1
                                   else ""), parameter="image", value=int(images[k]))

    @property
    def simulated(self) -> dict | None:
        """The manifest's ``simulated`` entry of a ``deepearth simulate`` cube set (scale,
        materialised images), None for a cube set built from a real source."""
        return self.manifest.get("simulated") or None

    def check_materialised(self, images: Any, what: str = "features") -> None:
        """Raise :class:`NotMaterialised` (a 404) for an image of a simulated cube set whose
        ``features`` (or ``attention``) are not materialised; no-op for a real cube set."""
        sim = self.simulated
        if sim is None:
            return
        have = self._cached("materialised", lambda: np.asarray(
            sorted(int(i) for i in sim.get("materialised", [])), np.int64))
        images = np.asarray(images, dtype=np.int64).reshape(-1)
        lost = np.flatnonzero(~np.isin(images, have))
        if len(lost):
            image = int(images[lost[0]])
            ds = self._plain(S.VISION)
            gid, num = int(ds.gbif_id.values[image]), int(ds.image_number.values[image])
            raise NotMaterialised(
                f"{what} not materialised in this simulated cube (gbif_id {gid}, image {num}; "
                f"scale {sim.get('scale')}: {len(have)} of {ds.sizes['image']} images hold "
                "full tensors)", parameter="image_number", value=num)

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
        arr = self.features_array()
        n = arr.shape[0]
        try:
            image = operator.index(image)
        except TypeError:
            raise TypeError(f"image must be an integer position, got {image!r}") from None
        if not 0 <= image < n:
            raise NotFoundError(f"image position {image} is out of range [0, {n})")
        self.check_materialised([image])
        result = self._out_for((), frame, dtype, out, arr)
        layout = self.raw_layout()
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
        arr = self.features_array()
        images = np.asarray(images, dtype=np.int64).reshape(-1)
        self.check_images(images, arr.shape[0])
        self.check_materialised(images)
        result = self._out_for((len(images),), frame, dtype, out, arr)
        if len(images) == 0:
            return result
        uniq, first, inverse = np.unique(images, return_index=True, return_inverse=True)
        layout = self.raw_layout()
        todo = uniq
        if layout is not None:
            workers = max_workers or min(LOCAL_THREADS, os.cpu_count() or 1)
            missing = layout.read_many(uniq, result, first, frame, workers)
            todo = uniq[missing]
        if len(todo):
            workers = max_workers or (REMOTE_THREADS if not self.target.is_local
                                      else min(LOCAL_THREADS, os.cpu_count() or 1))
            slot = dict(zip(uniq.tolist(), first.tolist(), strict=True))
            zarr_runs(arr, todo, [slot[int(i)] for i in todo], result, frame, workers)
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
        self.check_images(images.reshape(-1), len(allp))
        return allp[images]

    def attention(self, image: int, method: str = "l2norm", frame: str | int = "mean") -> np.ndarray:
        """Precomputed raw (24, 24) attention map."""
        if method not in S.ATTENTION_METHODS:
            raise ValueError(f"method must be one of {', '.join(S.ATTENTION_METHODS)}")
        if str(frame) not in S.ATTENTION_FRAMES:
            raise ValueError(f"frame must be one of {', '.join(S.ATTENTION_FRAMES)}")
        arr = self._zarr_array(S.VISION, "attention")
        self.check_materialised([image], "attention")
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
        """A few lines about the cube set: version, recipe, counts, cube URLs."""
        m = self.manifest
        lines = [f"cube set {self.url}",
                 f"  version {self.version or '(unversioned layout)'}",
                 f"  recipe {m.get('recipe')}  created {m.get('created')}"]
        if m.get("source_version"):
            lines.append(f"  source {m.get('source_version')}")
        if m.get("bytes") is not None:
            lines.append(f"  {m.get('objects')} objects, {int(m['bytes']) / 1e6:.1f} MB")
        for k, v in (m.get("counts") or {}).items():
            lines.append(f"  {k}: {v}")
        for cube in S.CUBE_PATHS:
            lines.append(f"  {cube}: {self.cube_url(cube)}")
        return "\n".join(lines)

    def page(self, items: Any, offset: int = 0, limit: int | None = None) -> Page:
        """The paging helper (:func:`cube_gen.query.paginate`)."""
        return paginate(items, offset, limit)
