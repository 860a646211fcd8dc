"""The plugin's services: what each endpoint computes, with caching, free of HTTP.

Every method is synchronous and runs on a worker thread (never on the IO loop). Lookups
raise :class:`~server.params.NotFound` naming the path parameter; invalid values that
only the data can judge (slices, species names) raise :class:`~server.params.ParamError`.
Computations are delegated to :mod:`cube_gen.access`, :mod:`cube_gen.analysis` and
:mod:`cube_gen.embedding_math`; this module adds lookups, bounds and the byte-bounded cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cube_gen import analysis
from cube_gen import schema as S
from cube_gen.access import CubeSet, Query
from cube_gen.embedding_math import normalise
from cube_gen.embedding_math import umap_rgb as compute_umap_rgb
from cube_gen.errors import NotFoundError

from . import render
from .cache import ByteLRU
from .params import NotFound, ParamError


@dataclass(frozen=True)
class Filters:
    """Parsed filter parameters (species still as given by the client)."""

    bbox: tuple[float, float, float, float] | None = None
    start: pd.Timestamp | None = None
    end: pd.Timestamp | None = None
    species: tuple[str, ...] | None = None
    split: str | None = None
    has_vision: bool | None = None


@dataclass(frozen=True)
class FeatureSlice:
    frame: slice | str  # a slice or "mean"
    patch_y: slice
    patch_x: slice
    feature: slice


class DeepEarthService:
    """Request computations over one cube set, with a shared byte-bounded cache."""

    def __init__(self, cubeset: CubeSet, cache: ByteLRU, settings: dict[str, Any]):
        self.cs = cubeset
        self.cache = cache
        self.settings = settings

    # -- lookups -------------------------------------------------------------------------
    def query(self, f: Filters) -> Query:
        species = None
        if f.species is not None:
            idx = []
            for token in f.species:
                try:
                    idx.append(analysis.resolve_species(self.cs, token))
                except NotFoundError:
                    raise ParamError(
                        f"parameter 'species': unknown species {token!r}", "species",
                        "comma-separated taxon ids, scientific names or slugs; see "
                        "/deepearth/species", token) from None
            species = tuple(idx)
        return Query.make(bbox=f.bbox, start=f.start, end=f.end, species=species,
                          split=f.split, has_vision=f.has_vision)

    def species_index(self, token: str) -> int:
        try:
            return analysis.resolve_species(self.cs, token)
        except NotFoundError as exc:
            raise NotFound(str(exc), "species", "a taxon id, scientific name or slug listed "
                           "by /deepearth/species", token) from None

    def image_position(self, gbif_id: int, image_number: int) -> int:
        positions = self.cs.images_of(gbif_id)
        if not positions:
            try:
                self.cs.obs_position(gbif_id)
                msg = f"observation {gbif_id} has no vision embedding"
            except NotFoundError:
                msg = f"no observation with gbif_id {gbif_id}"
            raise NotFound(msg, "gbif_id", None, gbif_id)
        numbers = self.cs.image_table().image_number.to_numpy()[positions]
        hit = np.flatnonzero(numbers == image_number)
        if len(hit) == 0:
            raise NotFound(f"observation {gbif_id} has no embedding for image {image_number}",
                           "image_number", [int(n) for n in numbers], image_number)
        return int(positions[int(hit[0])])

    def _obs_position(self, gbif_id: int) -> int:
        try:
            return self.cs.obs_position(gbif_id)
        except NotFoundError:
            raise NotFound(f"no observation with gbif_id {gbif_id}", "gbif_id", None,
                           gbif_id) from None

    # -- observations --------------------------------------------------------------------
    def _selected(self, q: Query) -> np.ndarray:
        return self.cache.get_or_compute(("obs_select", q), lambda: self.cs.select_observations(q))

    def observations(self, f: Filters, offset: int, limit: int) -> dict[str, Any]:
        q = self.query(f)
        positions = self._selected(q)
        page = positions[offset:offset + limit]
        records = self.cs.observation_rows(page)
        nxt = offset + len(page)
        return {
            "query": analysis.query_dict(q),
            "total": int(len(positions)),
            "offset": offset,
            "limit": limit,
            "returned": len(records),
            "next_offset": nxt if nxt < len(positions) else None,
            "observations": records,
        }

    def observation(self, gbif_id: int) -> dict[str, Any]:
        pos = self._obs_position(gbif_id)
        rec = self.cs.observation_rows(np.array([pos]))[0]
        t = self.cs.image_table()
        images = []
        for p in self.cs.images_of(gbif_id):
            n = int(t.image_number.iat[p])
            images.append({
                "image_number": n,
                "image_url": rec["image_urls"][n] if n < len(rec["image_urls"]) else None,
                "stats": self._stats_of(p),
            })
        rec["species"] = analysis.species_record(self.cs, rec["species_index"])
        rec["embeddings"] = images
        return rec

    # -- species -------------------------------------------------------------------------
    def species_list(self) -> dict[str, Any]:
        recs = self.cache.get_or_compute(("species_list",),
                                         lambda: analysis.species_records(self.cs))
        return {"count": len(recs), "species": recs}

    def species(self, token: str, offset: int, limit: int) -> dict[str, Any]:
        idx = self.species_index(token)
        rec = analysis.species_record(self.cs, idx)
        umap = self.cs.species.umap.values[idx]
        rec["umap"] = {a: float(v) for a, v in zip(S.UMAP_AXES, umap, strict=True)}
        q = Query.make(species=(idx,))
        positions = self._selected(q)
        page = positions[offset:offset + limit]
        nxt = offset + len(page)
        rec["observations"] = {
            "total": int(len(positions)), "offset": offset, "limit": limit,
            "returned": len(page), "next_offset": nxt if nxt < len(positions) else None,
            "items": self.cs.observation_rows(page),
        }
        rec["embeddings"] = analysis.image_records(self.cs, self.cs.select_images(q))
        return rec

    def similar_species(self, token: str, k: int, include_self: bool) -> dict[str, Any]:
        idx = self.species_index(token)
        return {"species": analysis.species_record(self.cs, idx), "k": k,
                "metric": "cosine of the language embeddings",
                "results": analysis.similar_species(self.cs, idx, k, include_self)}

    def species_umap(self) -> dict[str, Any]:
        return self.cache.get_or_compute(("species_umap",),
                                         lambda: analysis.species_umap(self.cs))

    # -- embeddings ----------------------------------------------------------------------
    def embeddings(self, f: Filters, offset: int, limit: int) -> dict[str, Any]:
        q = self.query(f)
        positions = self.cs.select_images(q)
        page = positions[offset:offset + limit]
        nxt = offset + len(page)
        return {"query": analysis.query_dict(q), "total": int(len(positions)),
                "offset": offset, "limit": limit, "returned": len(page),
                "next_offset": nxt if nxt < len(positions) else None,
                "embeddings": analysis.image_records(self.cs, page)}

    def feature_shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.cs.vision.features.shape[1:])

    def _tensor(self, pos: int) -> np.ndarray:
        return self.cache.get_or_compute(("features", pos), lambda: self.cs.features(pos))

    def features(self, gbif_id: int, image_number: int, sl: FeatureSlice,
                 dtype: str) -> np.ndarray:
        pos = self.image_position(gbif_id, image_number)
        t = self._tensor(pos)
        if sl.frame == "mean":
            part = t[:, sl.patch_y, sl.patch_x, sl.feature].astype(np.float32).mean(
                axis=0, keepdims=True)
        else:
            part = t[sl.frame, sl.patch_y, sl.patch_x, sl.feature]
        return np.ascontiguousarray(part, dtype=np.dtype(dtype).newbyteorder("<"))

    def pooled(self, gbif_id: int, image_number: int, dtype: str) -> np.ndarray:
        pos = self.image_position(gbif_id, image_number)
        return np.ascontiguousarray(self.cs.pooled([pos])[0],
                                    dtype=np.dtype(dtype).newbyteorder("<"))

    def attention(self, gbif_id: int, image_number: int, method: str,
                  frame: str) -> dict[str, Any]:
        pos = self.image_position(gbif_id, image_number)
        raw = np.asarray(self.cs.attention(pos, method, frame), np.float32)
        return {"gbif_id": gbif_id, "image_number": image_number, "method": method,
                "frame": frame, "shape": list(raw.shape),
                "min": float(np.nanmin(raw)), "max": float(np.nanmax(raw)),
                "raw": raw.tolist(), "normalised": normalise(raw).tolist()}

    def attention_png(self, gbif_id: int, image_number: int, method: str, frame: str,
                      colormap: str, alpha: float, size: int) -> bytes:
        pos = self.image_position(gbif_id, image_number)
        key = ("attention_png", pos, method, frame, colormap, alpha, size)

        def make():
            raw = np.asarray(self.cs.attention(pos, method, frame), np.float32)
            return render.attention_png(raw, colormap, alpha, size)
        return self.cache.get_or_compute(key, make)

    def umap_rgb_precomputed(self, gbif_id: int, image_number: int) -> tuple[int, Any]:
        """``(position, rgb array or None when the cube has none)``."""
        pos = self.image_position(gbif_id, image_number)
        return pos, self.cs.umap_rgb(pos)

    def umap_rgb_computed(self, pos: int) -> np.ndarray:
        """UMAP-RGB computed on demand (cached): the cube was built without it."""
        return self.cache.get_or_compute(("umap_rgb", pos),
                                         lambda: compute_umap_rgb(self._tensor(pos)))

    def _stats_of(self, pos: int) -> dict[str, float]:
        """Per-image statistics from columns read once (the whole ``image`` dim)."""
        cols = self.cache.get_or_compute(
            ("stat_columns",),
            lambda: {k: self.cs.vision[f"stat_{k}"].values for k in S.IMAGE_STATS})
        return {k: float(v[pos]) for k, v in cols.items()}

    def image_stats(self, gbif_id: int, image_number: int) -> dict[str, Any]:
        pos = self.image_position(gbif_id, image_number)
        return {"gbif_id": gbif_id, "image_number": image_number,
                "stats": self._stats_of(pos), "descriptions": dict(S.IMAGE_STATS)}

    def similar_embeddings(self, gbif_id: int, image_number: int, k: int, f: Filters,
                           include_self: bool) -> dict[str, Any]:
        pos = self.image_position(gbif_id, image_number)
        q = self.query(f)
        return {"gbif_id": gbif_id, "image_number": image_number, "k": k,
                "metric": "cosine of the mean-pooled vision vectors",
                "query": analysis.query_dict(q),
                "results": analysis.similar_embeddings(self.cs, pos, k, q, include_self)}

    def batch_positions(self, ids: list[tuple[int, int]]) -> np.ndarray:
        def make():
            t = self.cs.image_table()
            return {(int(g), int(n)): i for i, (g, n) in
                    enumerate(zip(t.gbif_id.to_numpy(), t.image_number.to_numpy(), strict=True))}
        index = self.cache.get_or_compute(("pair_index",), make,
                                          lambda d: 200 * len(d) + 64)
        positions = [index.get((int(g), int(n)), -1) for g, n in ids]
        missing = [list(ids[j]) for j, p in enumerate(positions) if p < 0]
        if missing:
            raise NotFound(f"{len(missing)} of the requested embeddings do not exist, "
                           f"e.g. {missing[0]}", "ids", None, missing[:20])
        return np.asarray(positions, np.int64)

    def batch(self, ids: list[tuple[int, int]], kind: str, dtype: str) -> np.ndarray:
        positions = self.batch_positions(ids)
        dt = np.dtype(dtype).newbyteorder("<")
        if kind == "pooled":
            return np.ascontiguousarray(self.cs.pooled(positions), dtype=dt)
        out = np.empty((len(positions), *self.feature_shape()), dt)
        for k in np.argsort(positions, kind="stable"):
            out[k] = self._tensor(int(positions[k]))
        return out

    # -- projections and statistics ------------------------------------------------------
    def vision_umap(self, f: Filters, max_points: int) -> dict[str, Any]:
        q = self.query(f)
        key = ("vision_umap", None, 0) if analysis.is_empty(q) else ("vision_umap", q, max_points)
        return self.cache.get_or_compute(
            key, lambda: analysis.vision_umap(self.cs, q, max_points=max_points))

    def vision_umap_cached(self, f: Filters, max_points: int) -> dict[str, Any] | None:
        """The projection when it needs no computing (whole set, or cached); else None."""
        q = self.query(f)
        if analysis.is_empty(q):
            return self.vision_umap(f, max_points)
        return self.cache.get(("vision_umap", q, max_points))

    def region_stats(self, f: Filters) -> dict[str, Any]:
        q = self.query(f)
        return self.cache.get_or_compute(("region", q),
                                         lambda: analysis.region_statistics(self.cs, q))

    # -- health --------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            manifest = self.cs.target.read_json(self.cs.target.path(S.MANIFEST))
            error = None if manifest is not None else f"{S.MANIFEST} is missing"
        except Exception as exc:  # noqa: BLE001 - reported, never raised
            manifest, error = None, f"{type(exc).__name__}: {exc}"
        latency = time.perf_counter() - t0
        return {
            "reachable": manifest is not None,
            "error": error,
            "latency_ms": round(latency * 1000, 3),
            "manifest": manifest,
        }
