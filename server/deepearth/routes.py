"""HTTP routes of the DeepEarth API: one declaration per endpoint, thin functions that run a
controller on a worker thread and write its answer.

Every route is ``async`` and does its work through the shared worker pools, so the tornado
IO loop never blocks. Parameters come from the groups of :mod:`.params` (documented and
validated in one place); errors are JSON ``{"error": {...}}`` bodies with the status of
:data:`server.common.errors.STATUS`, never a traceback.

To add an endpoint: write the controller function in :mod:`.controllers`, then declare
it here with :func:`route` (path, operationId, summary, parameter groups, responses).
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from typing import Any

import numpy as np

from cube_gen import schema as S
from cube_gen.patch_index import Window as PatchWindow
from cube_gen.patch_index import parse_window

from .. import render
from ..common import params as P
from ..common.errors import ApiProblem, NotFound, ParamError
from ..common.handler import Handler, endpoint, error_response, json_ok, png_ok
from ..common.handler import binary_ok as binary_ok
from ..config import DEFAULTS
from . import controllers as C
from . import params as D
from .api import API_VERSION, URL_PREFIX, api
from .context import DeepEarthContext


class DeepEarthHandler(Handler):
    """The DeepEarth API's handlers: JSON errors; work runs storage-guarded."""

    url_prefix = URL_PREFIX
    log_name = "DeepEarth"
    ctx: DeepEarthContext

    async def call(self, controller, *args: Any, pool: str = "default",
                   guard: bool = True) -> Any:
        """``controller(ctx, *args)`` on a worker thread (storage-guarded, see
        :meth:`DeepEarthContext.guarded`)."""
        return await self.ctx.call(controller, *args, pool=pool, guard=guard)


def route(path: str, operation_id: str, summary: str, **kwargs: Any):
    """Declare a DeepEarth endpoint at ``/deepearth<path>`` (see
    :func:`server.common.handler.endpoint`)."""
    return endpoint(api, URL_PREFIX + path, operation_id, summary, base=DeepEarthHandler,
                    **kwargs)


# -- index and health ----------------------------------------------------------------------
@route("", "deepearthIndex", "List the DeepEarth API endpoints",
       responses=json_ok("API name, version and endpoints"))
async def index(h: DeepEarthHandler):
    """The DeepEarth API: its endpoints."""
    ops = []
    for r in api.routes:
        for method in ("get", "post"):
            op = getattr(getattr(r.handler_cls, method, None), "__openapi__", None)
            if op:
                ops.append({"method": method.upper(), "path": r.path,
                            "operation_id": op["operationId"],
                            "summary": op.get("summary", "")})
    h.send_json({"api": "deepearth", "version": API_VERSION,
                 "openapi": h.request.url_for_path("openapi.json", reverse=True),
                 "endpoints": ops})


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "schema": S.SCHEMA_VERSION}
    for dist in ("deepearth-cube", "xcube-core", "xarray", "zarr", "numpy", "tornado"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "unknown"
    return out


@route("/health", "deepearthHealth", "Service health: cube set reachable, versions, caches",
       responses={**json_ok("Healthy"),
                  "503": error_response("Not configured or cube set unreachable")})
async def health(h: DeepEarthHandler):
    """Health of the service: cube set reachable, versions, cache statistics."""
    ctx = h.ctx
    res = ctx.resources
    body: dict[str, Any] = {
        "status": "ok", "api_version": API_VERSION, "versions": _versions(),
        "configured": ctx.configured, "cubeset": ctx.cubeset_url,
        "settings": ctx.settings, "server": ctx.status(),
        "cache": res.cache.stats() if res else None,
        "caches": res.cache_stats() if res else None,
    }
    try:
        body["cubeset_status"] = await h.call(C.cubeset_health, guard=False)
    except ApiProblem as problem:
        body["cubeset_status"] = {"reachable": False, "error": problem.message}
    if not body["cubeset_status"].get("reachable"):
        body["status"] = "unavailable"
    h.send_json(body, status=200 if body["status"] == "ok" else 503)


# -- observations --------------------------------------------------------------------------
_OBS_FORMAT = P.Choice("format", "response format", ["json", "geojson"], "json")


@route("/observations", "deepearthObservations", "Query observations (JSON or GeoJSON, paged)",
       params={"q": D.FILTERS_WITH_VISION, "page": D.PAGING, "fmt": _OBS_FORMAT},
       responses={**json_ok("A page of observations"),
                  "200": {"description": "A page of observations",
                          "content": {"application/json": {"schema": {"type": "object"}},
                                      "application/geo+json": {
                                          "schema": {"type": "object"}}}}})
async def observations(h: DeepEarthHandler, q, page: P.PageRequest, fmt: str):
    """Observations in cube order (year, then space-filling curve). ``total`` counts
    all matches; page with ``offset`` and ``limit`` (``next_offset`` is null on the last
    page). ``format=geojson`` answers a FeatureCollection of points."""
    result = await h.call(C.observations, q, page)
    if fmt == "json":
        await h.reply_json(result)
        return
    await h.reply_json(await h.run(_feature_collection, result),
                       content_type="application/geo+json")


def _feature_collection(page: dict[str, Any]) -> dict[str, Any]:
    features = [{"type": "Feature", "id": r["gbif_id"],
                 "geometry": {"type": "Point", "coordinates": [r["lon"], r["lat"]]},
                 "properties": r} for r in page["observations"]]
    return {"type": "FeatureCollection", "numberMatched": page["total"],
            "numberReturned": page["returned"], "offset": page["offset"],
            "limit": page["limit"], "next_offset": page["next_offset"],
            "query": page["query"], "features": features}


_EMBEDDING_LINKS = (("features", "/features"), ("pooled", "/pooled"),
                    ("attention", "/attention.png"), ("attention_values", "/attention.json"),
                    ("umap_rgb", "/umap_rgb.png"), ("stats", "/stats"), ("similar", "/similar"))


@route("/observations/{gbif_id}", "deepearthObservation",
       "One observation with all fields and its images", params={"gbif_id": D.GBIF_ID},
       responses=json_ok("The observation"))
async def observation(h: DeepEarthHandler, gbif_id: int):
    """All fields of the observation, its species, its photo URLs and its vision
    embeddings (image number, photo, statistics and links to the tensor endpoints)."""
    rec = await h.call(C.observation, gbif_id)
    for e in rec["embeddings"]:
        base = f"/embeddings/{gbif_id}/{e['image_number']}"
        e["links"] = {k: h.link(base + suffix) for k, suffix in _EMBEDDING_LINKS}
    await h.reply_json(rec)


# -- species -------------------------------------------------------------------------------
@route("/species", "deepearthSpeciesList", "Species: names, counts, colours, clusters",
       responses=json_ok("All species in species.zarr order"))
async def species_list(h: DeepEarthHandler):
    """All species."""
    await h.reply_json(await h.call(C.species_list))


@route("/species/{species}", "deepearthSpecies",
       "One species with its observations (paged) and embeddings",
       params={"species": D.SPECIES, "page": D.PAGING}, responses=json_ok("The species"))
async def species(h: DeepEarthHandler, species: str, page: P.PageRequest):
    """One species."""
    await h.reply_json(await h.call(C.species, species, page))


@route("/species/{species}/similar", "deepearthSimilarSpecies",
       "k most similar species (cosine of the language embeddings, exact)",
       params={"species": D.SPECIES, "k": D.k_param(),
               "include_self": D.include_self("include the species itself")},
       responses=json_ok("Ranked species with scores"))
async def similar_species(h: DeepEarthHandler, species: str, k: int, include_self: bool):
    """Species similar to one species."""
    await h.reply_json(await h.call(C.similar_species, species, k, include_self))


# -- embeddings ----------------------------------------------------------------------------
@route("/embeddings", "deepearthEmbeddings", "List vision embeddings (paged)",
       params={"q": D.FILTERS, "page": D.PAGING},
       responses=json_ok("A page of (gbif_id, image_number) records"))
async def embeddings(h: DeepEarthHandler, q, page: P.PageRequest):
    """Vision embeddings selected by bounding box, time range, species and split."""
    await h.reply_json(await h.call(C.embeddings, q, page))


def row_ranges(rows: np.ndarray) -> str:
    """Ascending indices as ranges: ``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``."""
    out, rows = [], [int(r) for r in rows]
    i = 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1:
            j += 1
        out.append(str(rows[i]) if i == j else f"{rows[i]}-{rows[j]}")
        i = j + 1
    return ",".join(out)


@route("/embeddings/batch", "deepearthEmbeddingsBatch",
       "Batch retrieval of pooled vectors or full tensors, optionally filtered", method="post",
       params={"req": D.BATCH, "q": D.FILTERS}, request_body=D.BatchBody.request_body(),
       responses=binary_ok("(n, feature) pooled vectors or (n, frame, patch_y, patch_x, "
                           "feature) tensors in the order requested (with filters: the "
                           "matching ones, their indices in X-DeepEarth-Rows)"))
async def batch(h: DeepEarthHandler, req: D.BatchRequest, q):
    """POST a JSON body ``{"ids": [[gbif_id, image_number], ...], "kind": "pooled" |
    "features", "dtype": "float16" | "float32", "format": "npy" | "raw"}``. At most
    ``MaxBatchPooled`` pooled vectors or ``MaxBatchFeatures`` tensors per request. The
    query's filters (species, ``taxa``, ``months``, ``hours``, ``year``, ...) keep the ids
    that match; ``X-DeepEarth-Rows`` lists their indices in ``ids`` (``0-2,5``)."""
    rows = await h.call(C.batch_rows, req, q)
    h.response.set_header("X-DeepEarth-Rows", row_ranges(rows))
    h.response.set_header("X-DeepEarth-Matched", str(len(rows)))
    async with h.response_buffer(2 * req.nbytes()):  # the array, then its encoded bytes
        arr = await h.call(C.batch, req, q, rows)
        await h.reply_array(arr, req.format, f"batch-{req.kind}")


@route("/embeddings/{gbif_id}/{image_number}/features", "deepearthFeatures",
       "Vision features of one embedding as binary (.npy or raw)",
       params={"emb": D.EMBEDDING, "dtype": D.dtype("float16"),
               "fmt": D.array_format("npy: a .npy file; raw: little-endian values, dtype and "
                                     "shape in the X-DeepEarth-Dtype / X-DeepEarth-Shape "
                                     "headers"),
               "sl": D.FEATURE_SLICE},
       responses=binary_ok("(frame, patch_y, patch_x, feature) array; slicing keeps all "
                           "four axes"))
async def features(h: DeepEarthHandler, emb: D.EmbeddingId, dtype: str, fmt: str,
                   sl: D.FeatureSlice):
    """The full (8, 24, 24, 1408) tensor by default (float16, the native precision)."""
    async with h.response_buffer(2 * sl.nbytes(dtype)):  # the array, then its encoded bytes
        arr = await h.call(C.features, emb, sl, dtype)
        await h.reply_array(arr, fmt, f"features-{emb.gbif_id}-{emb.image_number}")


@route("/embeddings/{gbif_id}/{image_number}/pooled", "deepearthPooled",
       "Mean-pooled 1408-d vector of one embedding",
       params={"emb": D.EMBEDDING, "dtype": D.dtype("float32"),
               "fmt": D.array_format("npy, raw or json", ("npy", "raw", "json"))},
       responses=binary_ok("(feature,) vector (or JSON with format=json)"))
async def pooled(h: DeepEarthHandler, emb: D.EmbeddingId, dtype: str, fmt: str):
    """The mean-pooled vector of one embedding."""
    arr = await h.call(C.pooled, emb, dtype)
    if fmt == "json":
        await h.reply_json({"gbif_id": emb.gbif_id, "image_number": emb.image_number,
                            "dtype": dtype, "pooled": arr.astype(np.float64).tolist()})
    else:
        await h.reply_array(arr, fmt, f"pooled-{emb.gbif_id}-{emb.image_number}")


@route("/embeddings/{gbif_id}/{image_number}/attention.png", "deepearthAttentionPng",
       "Attention map as PNG (colormap, alpha, size)",
       params={"emb": D.EMBEDDING, "style": D.ATTENTION_STYLE}, responses=png_ok("RGBA PNG"))
async def attention_png(h: DeepEarthHandler, emb: D.EmbeddingId, style: D.AttentionStyle):
    """The precomputed 24 x 24 map, min-max normalised, resized bilinearly to
    ``size``, coloured with ``colormap``, alpha = value x ``alpha``."""
    h.send_png(await h.call(C.attention_png, emb, style))


@route("/embeddings/{gbif_id}/{image_number}/attention.json", "deepearthAttentionJson",
       "Attention map values (24 x 24 raw and normalised)",
       params={"emb": D.EMBEDDING, "att": D.ATTENTION},
       responses=json_ok("raw and min-max normalised values, row-major"))
async def attention_json(h: DeepEarthHandler, emb: D.EmbeddingId, att: D.AttentionMap):
    """Attention map values of one embedding."""
    await h.reply_json(await h.call(C.attention, emb, att))


_RESAMPLE = P.Choice("resample", "resampling from 24 x 24", ["nearest", "bilinear"],
                     "nearest")


@route("/embeddings/{gbif_id}/{image_number}/umap_rgb.png", "deepearthUmapRgb",
       "UMAP-RGB of the patches as PNG (precomputed, or computed once and cached)",
       params={"emb": D.EMBEDDING, "size": D.image_size("image side in pixels"),
               "resample": _RESAMPLE},
       responses=png_ok("RGB PNG"))
async def umap_rgb(h: DeepEarthHandler, emb: D.EmbeddingId, size: int, resample: str):
    """The 24 x 24 RGB image of the 3-D UMAP (cosine, 15 neighbours) of the frame-mean
    patches. The ``X-DeepEarth-Source`` header says ``precomputed`` or ``computed``."""
    pos, rgb = await h.call(C.umap_rgb_precomputed, emb)
    source = "precomputed"
    if rgb is None:
        rgb = await h.call(C.umap_rgb_computed, pos, pool="heavy")
        source = "computed"
    png = await h.run(render.rgb_png, rgb, size, resample)
    h.send_png(png, headers={"X-DeepEarth-Source": source})


@route("/embeddings/{gbif_id}/{image_number}/stats", "deepearthEmbeddingStats",
       "Per-embedding statistics", params={"emb": D.EMBEDDING},
       responses=json_ok("statistics with descriptions"))
async def image_stats(h: DeepEarthHandler, emb: D.EmbeddingId):
    """Statistics of one embedding."""
    await h.reply_json(await h.call(C.image_stats, emb))


@route("/embeddings/{gbif_id}/{image_number}/similar", "deepearthSimilarEmbeddings",
       "k nearest embeddings (cosine of pooled vectors, exact), optionally filtered",
       params={"emb": D.EMBEDDING, "k": D.k_param(), "q": D.FILTERS,
               "include_self": D.include_self("include the query embedding")},
       responses=json_ok("Ranked embeddings with cosine scores"))
async def similar_embeddings(h: DeepEarthHandler, emb: D.EmbeddingId, k: int, q,
                             include_self: bool):
    """Embeddings similar to one embedding."""
    await h.reply_json(await h.call(C.similar_embeddings, emb, k, q, include_self))


@dataclass(frozen=True)
class _PatchWindowPath(P.Group):
    """``/{py}/{px}``: a patch (``7/12``) or a patch window, first-last inclusive
    (``4-7/10-13``: rows 4 to 7, columns 10 to 13)."""

    def openapi(self) -> list[dict]:
        return [P.path_param(n, f"patch {axis}: an integer in [0, 23] or a range first-last "
                             "(inclusive)", {"type": "string", "example": ex})
                for n, axis, ex in (("py", "row", "12"), ("px", "column", "10-13"))]

    def read(self, inputs: P.Inputs) -> PatchWindow:
        try:
            return parse_window(inputs.path["py"], inputs.path["px"])
        except ValueError as exc:
            name = str(exc).split(":", 1)[0]
            raise ParamError(f"parameter {exc}", name, "an integer in [0, 23] or a range "
                             "first-last with 0 <= first <= last <= 23",
                             inputs.path[name][:50]) from None


_PATCH_WINDOW = _PatchWindowPath()
_PATCH_LINKS = "/embeddings/{gbif_id}/{image_number}/patches/{py}/{px}"


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def _patch_links(h: DeepEarthHandler, gbif_id: int, image_number: int, py: int, px: int,
                 size: tuple[int, int]) -> dict[str, str]:
    """Links of a match: its patch crop, a search from it, its observation."""
    (y0, y1), (x0, x1) = PatchWindow(0, 0, *size).around(py, px).as_dict().values()
    base = _PATCH_LINKS.format(gbif_id=gbif_id, image_number=image_number,
                               py=_span(y0, y1), px=_span(x0, x1))
    return {"crop": h.link(base + "/crop.png"), "similar": h.link(base + "/similar"),
            "observation": h.link(f"/observations/{gbif_id}")}


@route(_PATCH_LINKS + "/similar", "deepearthSimilarPatches",
       "k most similar patches (or patch windows) across all images, optionally filtered",
       params={"emb": D.EMBEDDING, "window": _PATCH_WINDOW, "k": D.k_param(), "q": D.FILTERS,
               "include_self": D.include_self("include patches of the query image itself"),
               "group": P.Boolean("group", "group the results per image: k images, each "
                                  "with its best matching patches", False),
               "per_image": P.Integer("per_image", "patches listed per image when grouped",
                                      3, 1, 50)},
       responses=json_ok("Ranked patches (or images) with gbif_id, image, patch position, "
                         "cosine score, species, time and place"))
async def similar_patches(h: DeepEarthHandler, emb: D.EmbeddingId, window: PatchWindow,
                          k: int, q, include_self: bool, group: bool, per_image: int):
    """Where else does a part that looks like this occur? The query is the frame-mean
    vector of patch (``py``, ``px``), or the mean over a window ``py=a-b``, ``px=c-d``
    (first-last, inclusive). Candidates come from the cube set's patch index (IVF-PQ or flat) and
    are re-ranked exactly (cosine of the stored frame-mean patch vectors). Patches of the
    query image are left out unless ``include_self``. 404 when the cube set has no patch
    index."""
    result = await h.call(C.similar_patches, emb, window, k, q, include_self, group,
                          per_image)
    size = window.size
    for rec in result["results"]:
        for p in rec["patches"] if group else [rec]:
            p["links"] = _patch_links(h, rec["gbif_id"], rec["image_number"], p["patch_y"],
                                      p["patch_x"], size)
    await h.reply_json(result)


@route(_PATCH_LINKS + "/crop.png", "deepearthPatchCrop",
       "Attention map around a patch window as PNG, the window outlined",
       params={"emb": D.EMBEDDING, "window": _PATCH_WINDOW, "style": D.ATTENTION_STYLE,
               "margin": P.Integer("margin", "patches of context around the window", 2, 0,
                                   12)},
       responses=png_ok("RGBA PNG"))
async def patch_crop(h: DeepEarthHandler, emb: D.EmbeddingId, window: PatchWindow,
                     style: D.AttentionStyle, margin: int):
    """The attention map (``method``, ``frame``, ``colormap``, ``alpha``; normalised over
    the whole image) cropped to the window plus ``margin`` patches, longest side about
    ``size`` pixels, the window outlined black and white: the thumbnail of a patch match."""
    h.send_png(await h.call(C.patch_crop_png, emb, window, style, margin))


# -- projections and statistics ------------------------------------------------------------
@route("/umap/species", "deepearthSpeciesUmap",
       "Language UMAP of the species: 3-D coordinates, clusters, colours",
       responses=json_ok("species with x, y, z and clusters"))
async def species_umap(h: DeepEarthHandler):
    """Language UMAP of the species."""
    await h.reply_json(await h.call(C.species_umap))


_MAX_POINTS = P.Integer("max_points", "most embeddings projected when filtering (a seeded "
                        "random subset when more match)", DEFAULTS["MaxUmapPoints"], 1,
                        DEFAULTS["MaxUmapPoints"], "MaxUmapPoints",
                        default_setting="MaxUmapPoints")


@route("/umap/vision", "deepearthVisionUmap",
       "Vision UMAP of pooled vectors: whole set (precomputed) or filtered "
       "(recomputed, bounded, cached)",
       params={"q": D.FILTERS, "max_points": _MAX_POINTS},
       responses=json_ok("points with gbif_id, image_number, species, x, y, z"))
async def vision_umap(h: DeepEarthHandler, q, max_points: int):
    """Without filters: the precomputed ``umap`` variable of vision.zarr. With filters:
    the matching embeddings projected again (UMAP, cosine; PCA below 8 points)."""
    result = await h.call(C.vision_umap_cached, q, max_points)
    if result is None:
        result = await h.call(C.vision_umap, q, max_points, pool="heavy")
    await h.reply_json(result)


@route("/stats/region", "deepearthRegionStats",
       "Region statistics: species composition, yearly and monthly counts, diversity",
       params={"q": D.FILTERS},
       responses=json_ok("counts and diversity indices (richness, Shannon, Simpson)"))
async def region_stats(h: DeepEarthHandler, q):
    """Statistics of the observations in ``bbox`` and [``start``, ``end``] (all when
    omitted): species composition, counts per year and per month of year, richness,
    Shannon H' (natural log), Simpson dominance sum(p^2), Gini-Simpson 1 - sum(p^2),
    inverse Simpson and Pielou evenness."""
    await h.reply_json(await h.call(C.region_stats, q))


# -- last: any other path under /deepearth -------------------------------------------------
class NotFoundHandler(DeepEarthHandler):
    """Any other path under /deepearth answers a JSON 404 (no operations)."""

    async def get(self, rest: str = ""):
        self.write_problem(NotFound(f"no endpoint {URL_PREFIX}/{rest}; see {URL_PREFIX} for "
                                    "the list", "path", None, f"{URL_PREFIX}/{rest}"))


def register_catch_all() -> None:
    """Register the ``/deepearth/{*rest}`` 404 route; call it after every other route of
    the API is declared (tornado takes the first matching route)."""
    api.route(URL_PREFIX + "/{*rest}")(NotFoundHandler)
