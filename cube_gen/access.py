"""Read-side access to a cube set, shared by the server plugin and ML code.

``CubeSet.open(url)`` checks the manifest and opens the cubes lazily. Lookups by
gbif_id are binary searches on sorted ids; bounding-box / time selections read only
the observation chunks whose extents intersect the query; one embedding is one chunk
read, and a batch of embeddings is read in sorted, coalesced order.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
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


@dataclass(frozen=True)
class Query:
    """A selection: bbox (west, south, east, north), time range, species, split, has_vision."""

    bbox: tuple[float, float, float, float] | None = None
    start: np.datetime64 | None = None
    end: np.datetime64 | None = None  # inclusive
    species: tuple[int, ...] | None = None  # species indices
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
        if species is not None and np.ndim(species) == 0:
            species = (species,)
        return Query(
            bbox, None if start is None else np.datetime64(pd.Timestamp(start), "ns"),
            None if end is None else np.datetime64(pd.Timestamp(end), "ns"),
            None if species is None else tuple(int(s) for s in species), split, has_vision,
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

    @classmethod
    def open(cls, url: str, storage_options: dict[str, Any] | None = None) -> CubeSet:
        return cls(url, storage_options)

    # -- cubes ---------------------------------------------------------------------------
    def _open(self, cube: str) -> xr.Dataset:
        url = self.target.url_of(S.CUBE_PATHS[cube])
        return xr.open_zarr(url, consolidated=True,
                            storage_options=self.storage_options or None)

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
            ds = self.species
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
            ds = self.vision
            names = ("gbif_id", "image_number", "obs_index", "species_index", "time", "lat", "lon",
                     "split")
            return pd.DataFrame({k: ds[k].values for k in names})
        return self._cached("image_table", make)

    # -- observations --------------------------------------------------------------------
    def _id_index(self) -> tuple[np.ndarray, np.ndarray]:
        def make():
            ds = self.observations
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

    def select_observations(self, query: Query | None = None, **kwargs) -> np.ndarray:
        """Positions along ``obs`` matching the query, in cube order.

        Only the chunks whose stored extents intersect the bbox and time range are read.
        """
        q = query or Query.make(**kwargs)
        ds = self.observations
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
            sl = slice(int(c) * chunk, min((int(c) + 1) * chunk, n))
            part = ds.isel(obs=sl)
            mask = np.ones(sl.stop - sl.start, bool)
            if q.bbox is not None:
                w, s, e, nn = q.bbox
                lat, lon = part.lat.values, part.lon.values
                mask &= (lon >= w) & (lon <= e) & (lat >= s) & (lat <= nn)
            if q.start is not None or q.end is not None:
                t = part.time.values
                if q.start is not None:
                    mask &= t >= q.start
                if q.end is not None:
                    mask &= t <= q.end
            if q.species is not None:
                mask &= np.isin(part.species_index.values, q.species)
            if q.split is not None:
                mask &= part.split.values == S.SPLIT_CODES[q.split]
            if q.has_vision is not None:
                mask &= part.has_vision.values == bool(q.has_vision)
            result.append(np.flatnonzero(mask) + sl.start)
        return np.concatenate(result) if result else np.zeros(0, np.int64)

    # -- vision --------------------------------------------------------------------------
    def image_position(self, gbif_id: int, image_number: int = 0) -> int:
        """Position along ``image`` of embedding (gbif_id, image_number)."""
        t = self.image_table()
        ids = t.gbif_id.to_numpy()
        lo = int(np.searchsorted(ids, gbif_id, side="left"))
        hi = int(np.searchsorted(ids, gbif_id, side="right"))
        if lo == hi:
            raise NotFoundError(f"no vision embedding for gbif_id {gbif_id}")
        numbers = t.image_number.to_numpy()[lo:hi]
        hit = np.flatnonzero(numbers == image_number)
        if len(hit) == 0:
            raise NotFoundError(f"gbif_id {gbif_id} has no image {image_number} "
                                f"(image numbers: {', '.join(str(int(x)) for x in numbers)})")
        return lo + int(hit[0])

    def images_of(self, gbif_id: int) -> list[int]:
        t = self.image_table()
        ids = t.gbif_id.to_numpy()
        return list(range(int(np.searchsorted(ids, gbif_id)),
                          int(np.searchsorted(ids, gbif_id, side="right"))))

    def select_images(self, query: Query | None = None, **kwargs) -> np.ndarray:
        """Positions along ``image`` matching the query."""
        q = query or Query.make(**kwargs)
        t = self.image_table()
        mask = np.ones(len(t), bool)
        if q.bbox is not None:
            w, s, e, n = q.bbox
            mask &= (t.lon >= w).to_numpy() & (t.lon <= e).to_numpy()
            mask &= (t.lat >= s).to_numpy() & (t.lat <= n).to_numpy()
        if q.start is not None:
            mask &= (t.time.to_numpy() >= q.start)
        if q.end is not None:
            mask &= (t.time.to_numpy() <= q.end)
        if q.species is not None:
            mask &= np.isin(t.species_index.to_numpy(), q.species)
        if q.split is not None:
            mask &= t.split.to_numpy() == S.SPLIT_CODES[q.split]
        return np.flatnonzero(mask)

    def _features_array(self) -> zarr.Array:
        return self._zarr_array(S.VISION, "features")

    def _raw_chunk_path(self, image: int) -> str | None:
        """Local file of an image's chunk when it can be read as raw bytes, else None."""
        def info():
            arr = self._features_array()
            meta = arr.metadata
            if not self.target.is_local or getattr(meta, "zarr_format", 3) != 3:
                return None
            codecs = [type(c).__name__ for c in meta.codecs]
            if codecs != ["BytesCodec"] or arr.chunks[0] != 1:
                return None
            if tuple(arr.chunks[1:]) != tuple(arr.shape[1:]):
                return None
            sep = meta.chunk_key_encoding.separator
            prefix = meta.chunk_key_encoding.name
            return (os.path.join(self.target.root, S.CUBE_PATHS[S.VISION], "features"), sep,
                    prefix, arr.dtype, arr.shape[1:])
        spec = self._cached("raw_chunk", info)
        if spec is None:
            return None
        root, sep, prefix, _, _ = spec
        key = sep.join(["c" if prefix == "default" else "", str(image), "0", "0", "0", "0"])
        key = key if prefix == "default" else key.lstrip(sep)
        return os.path.join(root, *key.split(sep)) if sep == "/" else os.path.join(root, key)

    def features(self, image: int, dtype: str | None = None) -> np.ndarray:
        """The (frame, patch_y, patch_x, feature) tensor of the image at position ``image``."""
        arr = self._features_array()
        if not 0 <= image < arr.shape[0]:
            raise NotFoundError(f"image position {image} is out of range [0, {arr.shape[0]})")
        path = self._raw_chunk_path(image)
        if path is not None and os.path.exists(path):
            out = np.fromfile(path, dtype=arr.dtype).reshape(arr.shape[1:])
        else:
            out = arr[image]
        return out if dtype is None else out.astype(dtype, copy=False)

    def features_batch(self, images: Sequence[int], dtype: str | None = None) -> np.ndarray:
        """Tensors of many images, read in ascending order and returned in the given order."""
        images = np.asarray(images, dtype=np.int64)
        arr = self._features_array()
        out = np.empty((len(images), *arr.shape[1:]), dtype=dtype or arr.dtype)
        for k in np.argsort(images, kind="stable"):
            out[k] = self.features(int(images[k]))
        return out

    def pooled(self, images: Sequence[int] | None = None) -> np.ndarray:
        """Mean-pooled 1408-d vectors (all, or of the given positions)."""
        allp = self._cached("pooled", lambda: self._zarr_array(S.VISION, "pooled")[:])
        return allp if images is None else allp[np.asarray(images, dtype=np.int64)]

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
        ds = self.vision
        return {k: float(ds[f"stat_{k}"].values[image]) for k in S.IMAGE_STATS}

    def language_embeddings(self) -> np.ndarray:
        return self._cached("language", lambda: self.species.language_embedding.values)

    def describe(self) -> str:
        m = self.manifest
        lines = [f"cube set {self.url}", f"  recipe {m.get('recipe')}  created {m.get('created')}"]
        for k, v in (m.get("counts") or {}).items():
            lines.append(f"  {k}: {v}")
        for cube, path in S.CUBE_PATHS.items():
            lines.append(f"  {cube}: {path}")
        return "\n".join(lines)
