"""What each DeepEarth endpoint computes: plain functions over the context, free of HTTP.

Every function takes the API context first (anything with ``cubeset``, ``cache`` and
``settings``: :class:`~.context.DeepEarthContext` in a server, :class:`LocalContext` in a
notebook or test) and typed values (``Query``, ``PageRequest``, ...), is synchronous and runs
on a worker thread in the server. The routes, the viewer panels and notebooks call the same
functions, so there is one implementation of each answer.

Lookups are the cube set's (:meth:`CubeSet.image_position`, :meth:`CubeSet.species_index`):
their ``NotFoundError`` names the parameter and answers 404; values only the data can judge
(slices, species names in filters) raise :class:`~server.common.errors.ParamError`.
Computations are delegated to :mod:`cube_gen.access`, :mod:`cube_gen.analysis` and
:mod:`cube_gen.embedding_math`; this module adds lookups, bounds and the byte-bounded cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cube_gen import analysis
from cube_gen import patch_index as PI
from cube_gen import schema as S
from cube_gen.access import CubeSet
from cube_gen.embedding_math import normalise
from cube_gen.embedding_math import umap_rgb as compute_umap_rgb
from cube_gen.errors import NotFoundError
from cube_gen.patch_index import Window
from cube_gen.query import Query, paginate

from .. import render
from ..common.cache import ByteLRU
from ..common.errors import NotFound, ParamError
from ..common.params import PageRequest
from ..config import DEFAULTS
from .params import AttentionMap, AttentionStyle, BatchRequest, EmbeddingId, FeatureSlice


@dataclass
class LocalContext:
    """A context without a server (notebooks, tests): a cube set, a cache and the settings."""

    cubeset: CubeSet
    cache: ByteLRU = field(default_factory=lambda: ByteLRU(DEFAULTS["CacheBytes"]))
    settings: dict[str, Any] = field(default_factory=lambda: dict(DEFAULTS))

    @classmethod
    def open(cls, url: str, storage_options: dict[str, Any] | None = None) -> LocalContext:
        return cls(CubeSet.open(url, storage_options))


# -- lookups (the cube set's own: one species resolver, one image lookup) ---------------
def resolve(ctx, q: Query) -> Query:
    """The query with its species tokens resolved to species indices (400 naming the unknown
    one: a filter value, not a path)."""
    if q.species is None or all(isinstance(s, int | np.integer) for s in q.species):
        return q
    try:
        return replace(q, species=ctx.cubeset.species_indices(q.species))
    except NotFoundError as exc:
        raise ParamError(
            f"parameter 'species': unknown species {exc.value!r}", "species",
            "comma-separated taxon ids, scientific names or slugs; see /deepearth/species",
            exc.value) from None


def species_index(ctx, token: str) -> int:
    """Species index of a path token (404 naming ``species``)."""
    try:
        return ctx.cubeset.species_index(token)
    except NotFoundError as exc:
        raise NotFound(str(exc), "species", "a taxon id, scientific name or slug listed "
                       "by /deepearth/species", token) from None


def image_position(ctx, emb: EmbeddingId) -> int:
    """Position along ``image`` of an embedding (NotFoundError naming gbif_id or
    image_number: a 404)."""
    return ctx.cubeset.image_position(emb.gbif_id, emb.image_number)


def _page(positions: np.ndarray, page: PageRequest) -> tuple[np.ndarray, dict[str, Any]]:
    """The page's positions and its paging fields (total, offset, limit, returned,
    next_offset: null on the last page)."""
    p = paginate(positions, page.offset, page.limit)
    return p.items, p.meta()


# -- observations --------------------------------------------------------------------------
def _selected(ctx, q: Query) -> np.ndarray:
    return ctx.cache.get_or_compute(("obs_select", q),
                                    lambda: ctx.cubeset.select_observations(q))


def observations(ctx, q: Query, page: PageRequest) -> dict[str, Any]:
    q = resolve(ctx, q)
    part, meta = _page(_selected(ctx, q), page)
    return {"query": analysis.query_dict(q), **meta,
            "observations": ctx.cubeset.observation_rows(part)}


def observation(ctx, gbif_id: int) -> dict[str, Any]:
    cs = ctx.cubeset
    pos = cs.obs_position(gbif_id)
    rec = cs.observation_rows(np.array([pos]))[0]
    t = cs.image_table()
    images = []
    for p in cs.images_of(gbif_id):
        n = int(t.image_number.iat[p])
        images.append({
            "image_number": n,
            "image_url": rec["image_urls"][n] if n < len(rec["image_urls"]) else None,
            "stats": _stats_of(ctx, p),
        })
    rec["species"] = analysis.species_record(cs, rec["species_index"])
    rec["embeddings"] = images
    return rec


# -- species -------------------------------------------------------------------------------
def species_list(ctx) -> dict[str, Any]:
    recs = ctx.cache.get_or_compute(("species_list",),
                                    lambda: analysis.species_records(ctx.cubeset))
    return {"count": len(recs), "species": recs}


def species(ctx, token: str, page: PageRequest) -> dict[str, Any]:
    cs = ctx.cubeset
    idx = species_index(ctx, token)
    rec = analysis.species_record(cs, idx)
    umap = cs.species.umap.values[idx]
    rec["umap"] = {a: float(v) for a, v in zip(S.UMAP_AXES, umap, strict=True)}
    q = Query.make(species=(idx,))
    part, meta = _page(_selected(ctx, q), page)
    rec["observations"] = {**meta, "items": cs.observation_rows(part)}
    rec["embeddings"] = analysis.image_records(cs, cs.select_images(q))
    return rec


def similar_species(ctx, token: str, k: int, include_self: bool = False) -> dict[str, Any]:
    idx = species_index(ctx, token)
    return {"species": analysis.species_record(ctx.cubeset, idx), "k": k,
            "metric": "cosine of the language embeddings",
            "results": analysis.similar_species(ctx.cubeset, idx, k, include_self)}


def species_umap(ctx) -> dict[str, Any]:
    return ctx.cache.get_or_compute(("species_umap",),
                                    lambda: analysis.species_umap(ctx.cubeset))


# -- embeddings ----------------------------------------------------------------------------
def embeddings(ctx, q: Query, page: PageRequest) -> dict[str, Any]:
    q = resolve(ctx, q)
    part, meta = _page(ctx.cubeset.select_images(q), page)
    return {"query": analysis.query_dict(q), **meta,
            "embeddings": analysis.image_records(ctx.cubeset, part)}


def feature_shape(ctx) -> tuple[int, ...]:
    return tuple(int(n) for n in ctx.cubeset.vision.features.shape[1:])


def _tensor(ctx, pos: int) -> np.ndarray:
    return ctx.cache.get_or_compute(("features", pos), lambda: ctx.cubeset.features(pos))


def _little(dtype: str) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


def features(ctx, emb: EmbeddingId, sl: FeatureSlice, dtype: str) -> np.ndarray:
    """The (frame, patch_y, patch_x, feature) part of a tensor (``frame=mean``: one frame)."""
    pos = image_position(ctx, emb)
    frame, py, px, feat = sl.resolve(feature_shape(ctx))
    t = _tensor(ctx, pos)
    if frame == "mean":
        part = t[:, py, px, feat].astype(np.float32).mean(axis=0, keepdims=True)
    else:
        part = t[frame, py, px, feat]
    return np.ascontiguousarray(part, dtype=_little(dtype))


def pooled(ctx, emb: EmbeddingId, dtype: str) -> np.ndarray:
    pos = image_position(ctx, emb)
    return np.ascontiguousarray(ctx.cubeset.pooled([pos])[0], dtype=_little(dtype))


def attention(ctx, emb: EmbeddingId, att: AttentionMap) -> dict[str, Any]:
    pos = image_position(ctx, emb)
    raw = np.asarray(ctx.cubeset.attention(pos, att.method, att.frame), np.float32)
    return {"gbif_id": emb.gbif_id, "image_number": emb.image_number, "method": att.method,
            "frame": att.frame, "shape": list(raw.shape),
            "min": float(np.nanmin(raw)), "max": float(np.nanmax(raw)),
            "raw": raw.tolist(), "normalised": normalise(raw).tolist()}


def attention_png(ctx, emb: EmbeddingId, style: AttentionStyle) -> bytes:
    pos = image_position(ctx, emb)
    key = ("attention_png", pos, style.method, style.frame, style.colormap, style.alpha,
           style.size)

    def make():
        raw = np.asarray(ctx.cubeset.attention(pos, style.method, style.frame), np.float32)
        return render.attention_png(raw, style.colormap, style.alpha, style.size)
    return ctx.cache.get_or_compute(key, make)


def umap_rgb_precomputed(ctx, emb: EmbeddingId) -> tuple[int, Any]:
    """``(position, rgb array or None when the cube has none)``."""
    pos = image_position(ctx, emb)
    return pos, ctx.cubeset.umap_rgb(pos)


def umap_rgb_computed(ctx, pos: int) -> np.ndarray:
    """UMAP-RGB computed on demand (cached): the cube was built without it."""
    return ctx.cache.get_or_compute(("umap_rgb", pos),
                                    lambda: compute_umap_rgb(_tensor(ctx, pos)))


def _stats_of(ctx, pos: int) -> dict[str, float]:
    """Per-image statistics from columns read once (the whole ``image`` dim)."""
    cols = ctx.cache.get_or_compute(
        ("stat_columns",),
        lambda: {k: ctx.cubeset.vision[f"stat_{k}"].values for k in S.IMAGE_STATS})
    return {k: float(v[pos]) for k, v in cols.items()}


def image_stats(ctx, emb: EmbeddingId) -> dict[str, Any]:
    pos = image_position(ctx, emb)
    return {"gbif_id": emb.gbif_id, "image_number": emb.image_number,
            "stats": _stats_of(ctx, pos), "descriptions": dict(S.IMAGE_STATS)}


def similar_embeddings(ctx, emb: EmbeddingId, k: int, q: Query | None = None,
                       include_self: bool = False) -> dict[str, Any]:
    pos = image_position(ctx, emb)
    q = resolve(ctx, q or Query())
    return {"gbif_id": emb.gbif_id, "image_number": emb.image_number, "k": k,
            "metric": "cosine of the mean-pooled vision vectors",
            "query": analysis.query_dict(q),
            "results": analysis.similar_embeddings(ctx.cubeset, pos, k, q, include_self)}


def similar_patches(ctx, emb: EmbeddingId, window: Window, k: int, q: Query | None = None,
                    include_self: bool = False, group: bool = False,
                    per_image: int = 3) -> dict[str, Any]:
    """The k patches (or, grouped, images) most like a patch or patch window of one
    embedding, across all images: patch index candidates re-ranked exactly on the stored
    features (:func:`cube_gen.patch_index.similar_patches`)."""
    cs = ctx.cubeset
    pos = image_position(ctx, emb)
    if not PI.has_patch_index(cs):
        raise NotFound("this cube set has no patch index (build it with the recipe key "
                       "cubes.patches.enabled: true)", "patches", None, None)
    q = resolve(ctx, q or Query())
    pindex = cs.memo("patch_index", lambda: PI.open_patch_index(cs))
    result = PI.similar_patches(cs, pindex, pos, window, k, None if analysis.is_empty(q) else q,
                                include_self, group, per_image)
    return {"gbif_id": emb.gbif_id, "image_number": emb.image_number,
            "query": analysis.query_dict(q), "grouped": group, **result}


def patch_crop_png(ctx, emb: EmbeddingId, window: Window, style: AttentionStyle,
                   margin: int) -> bytes:
    """PNG of the attention map around a patch window (``margin`` patches of context),
    normalised over the whole image, the window outlined; longest side ``style.size``."""
    pos = image_position(ctx, emb)
    key = ("patch_crop", pos, window, style, margin)

    def make() -> bytes:
        raw = np.asarray(ctx.cubeset.attention(pos, style.method, style.frame), np.float32)
        grid = raw.shape[0]
        y0, x0 = max(window.y0 - margin, 0), max(window.x0 - margin, 0)
        y1, x1 = min(window.y1 + margin, grid), min(window.x1 + margin, grid)
        scale = max(1, min(-(-style.size // max(y1 - y0, x1 - x0)), 2048 // grid))
        rgba = render.attention_rgba(raw, style.colormap, style.alpha, grid * scale)
        crop = rgba[y0 * scale:y1 * scale, x0 * scale:x1 * scale].copy()
        t, b = (window.y0 - y0) * scale, (window.y1 - y0) * scale
        left, r = (window.x0 - x0) * scale, (window.x1 - x0) * scale
        w = max(1, scale // 8)
        for colour, inset in (((0, 0, 0, 255), 0), ((255, 255, 255, 255), w)):
            a, bb, c, d = t + inset, b - inset, left + inset, r - inset
            crop[a:a + w, c:d] = colour
            crop[bb - w:bb, c:d] = colour
            crop[a:bb, c:c + w] = colour
            crop[a:bb, d - w:d] = colour
        return render.png_bytes(crop)
    return ctx.cache.get_or_compute(key, make)


def batch_positions(ctx, ids: list[tuple[int, int]]) -> np.ndarray:
    def make():
        t = ctx.cubeset.image_table()
        return {(int(g), int(n)): i for i, (g, n) in
                enumerate(zip(t.gbif_id.to_numpy(), t.image_number.to_numpy(), strict=True))}
    index = ctx.cache.get_or_compute(("pair_index",), make, lambda d: 200 * len(d) + 64)
    positions = [index.get((int(g), int(n)), -1) for g, n in ids]
    missing = [list(ids[j]) for j, p in enumerate(positions) if p < 0]
    if missing:
        raise NotFound(f"{len(missing)} of the requested embeddings do not exist, "
                       f"e.g. {missing[0]}", "ids", None, missing[:20])
    return np.asarray(positions, np.int64)


def batch_rows(ctx, req: BatchRequest, q: Query | None = None) -> np.ndarray:
    """Indices into ``req.ids`` of the embeddings that match the filters ``q`` (all
    without filters), ascending."""
    positions = batch_positions(ctx, req.ids)
    q = resolve(ctx, q or Query())
    if analysis.is_empty(q):
        return np.arange(len(positions))
    keep = np.zeros(ctx.cubeset.vision.sizes["image"], bool)
    keep[ctx.cubeset.select_images(q)] = True
    return np.flatnonzero(keep[positions])


def batch(ctx, req: BatchRequest, q: Query | None = None,
          rows: np.ndarray | None = None) -> np.ndarray:
    """Pooled vectors or full tensors of many embeddings, in the order requested; with
    filters ``q`` only those that match (``rows``: :func:`batch_rows`, when known)."""
    positions = batch_positions(ctx, req.ids)
    if q is not None or rows is not None:
        positions = positions[batch_rows(ctx, req, q) if rows is None else rows]
    dt = _little(req.dtype)
    if req.kind == "pooled":
        if len(positions) == 0:  # filters kept none
            return np.empty((0, feature_shape(ctx)[-1]), dt)
        return np.ascontiguousarray(ctx.cubeset.pooled(positions), dtype=dt)
    out = np.empty((len(positions), *feature_shape(ctx)), dt)
    for k in np.argsort(positions, kind="stable"):
        out[k] = _tensor(ctx, int(positions[k]))
    return out


# -- projections and statistics ------------------------------------------------------------
def vision_umap(ctx, q: Query, max_points: int) -> dict[str, Any]:
    q = resolve(ctx, q)
    key = ("vision_umap", None, 0) if analysis.is_empty(q) else ("vision_umap", q, max_points)
    return ctx.cache.get_or_compute(
        key, lambda: analysis.vision_umap(ctx.cubeset, q, max_points=max_points))


def vision_umap_cached(ctx, q: Query, max_points: int) -> dict[str, Any] | None:
    """The projection when it needs no computing (whole set, or cached); else None."""
    q = resolve(ctx, q)
    if analysis.is_empty(q):
        return vision_umap(ctx, q, max_points)
    return ctx.cache.get(("vision_umap", q, max_points))


def region_stats(ctx, q: Query) -> dict[str, Any]:
    q = resolve(ctx, q)
    return ctx.cache.get_or_compute(("region", q),
                                    lambda: analysis.region_statistics(ctx.cubeset, q))


# -- health --------------------------------------------------------------------------------
def cubeset_health(ctx) -> dict[str, Any]:
    """Whether the manifest can be read now, how long that took, and the version served."""
    cs = ctx.cubeset
    t0 = time.perf_counter()
    try:
        manifest = cs.target.read_json(cs.target.path(S.MANIFEST))
        error = None if manifest is not None else f"{S.MANIFEST} is missing"
    except Exception as exc:  # noqa: BLE001 - reported, never raised
        manifest, error = None, f"{type(exc).__name__}: {exc}"
    latency = time.perf_counter() - t0
    return {
        "reachable": manifest is not None,
        "error": error,
        "latency_ms": round(latency * 1000, 3),
        "version": cs.version,
        "manifest": manifest,
    }
