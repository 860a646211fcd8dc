"""HTTP routes of OGC API - Features at ``/deepearth/ogcapi`` (thin: parse, run, write)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from cube_gen.query import Query

from ..common import params as P
from ..common.errors import ParamError
from ..common.handler import Handler, endpoint
from . import controllers as C
from .api import URL_PREFIX, api
from .context import OgcContext


@dataclass(frozen=True)
class FeatureFilters(P.Group):
    """``bbox`` (CRS84), ``datetime`` (instant, ``start/end``, ``../end``, ``start/..``) and
    ``species`` (comma-separated taxon ids, names or slugs)."""

    def openapi(self) -> list[dict]:
        return [
            P.query_param("bbox", "west,south,east,north (CRS84 degrees)"),
            P.query_param("datetime", "an instant or an interval start/end ('..' open); "
                                      "dates stand for the whole day, month or year"),
            P.query_param("species", "comma-separated taxon ids, scientific names or slugs"),
            P.query_param("f", "json (GeoJSON); the only encoding"),
        ]

    def read(self, inputs: P.Inputs) -> tuple[Query, dict[str, str]]:
        q = inputs.query
        bbox = P.bbox(q, "bbox")
        text = P.raw(q, "datetime")
        start = end = None
        if text:
            parts = text.split("/")
            if len(parts) > 2:
                raise ParamError(f"parameter 'datetime' must be an instant or start/end; got "
                                 f"{text!r}", "datetime", "instant or interval", text)
            a, b = (parts[0], parts[0]) if len(parts) == 1 else parts
            if a not in ("", ".."):
                start = P.time({"datetime": [a]}, "datetime")
            if b not in ("", ".."):
                end = P.time({"datetime": [b]}, "datetime", end=True)
        species = P.raw(q, "species")
        tokens = tuple(t.strip() for t in species.split(",") if t.strip()) if species else None
        f = P.raw(q, "f")
        if f and f.lower() not in ("json", "geojson", "application/geo+json"):
            raise ParamError(f"parameter 'f' must be json, got {f!r}", "f", ["json"], f)
        echo = {k: v for k, v in (("bbox", P.raw(q, "bbox")), ("datetime", text),
                                  ("species", species)) if v}
        query = Query.make(bbox=bbox, start=None if start is None else pd.Timestamp(start),
                           end=None if end is None else pd.Timestamp(end), species=tokens)
        return query, echo


@dataclass(frozen=True)
class PathValue(P.Group):
    name: str
    description: str

    def openapi(self) -> list[dict]:
        return [P.path_param(self.name, self.description)]

    def read(self, inputs: P.Inputs) -> str:
        return inputs.path.get(self.name, "")


class OgcHandler(Handler):
    url_prefix = URL_PREFIX
    log_name = "DeepEarth OGC API"
    strict_query = False  # clients add their own parameters (f, bbox-crs, ...)
    ctx: OgcContext

    @property
    def resources(self):
        return self.ctx.resources

    @property
    def settings(self):
        return getattr(self.ctx.deepearth, "settings", {})

    def base(self) -> str:
        return self.link("")


_COLLECTION = PathValue("collectionId", "observations or observations_with_embeddings")


def route(path: str, operation_id: str, summary: str, **kwargs: Any):
    return endpoint(api, URL_PREFIX + path, operation_id, summary, base=OgcHandler, **kwargs)


@route("", "getDeepEarthOgcLanding", "OGC API - Features landing page")
async def landing(h: OgcHandler):
    h.send_json(C.landing(h.base()))


@route("/conformance", "getDeepEarthOgcConformance", "OGC API - Features conformance classes")
async def conformance(h: OgcHandler):
    h.send_json(C.conformance())


@route("/collections", "getDeepEarthOgcCollections", "The feature collections")
async def collections(h: OgcHandler):
    h.send_json(await h.run(C.collections, h.ctx.deepearth, h.base()))


@route("/collections/{collectionId}", "getDeepEarthOgcCollection", "One feature collection",
       params={"cid": _COLLECTION})
async def collection(h: OgcHandler, cid: str):
    h.send_json(await h.run(C.collection, h.ctx.deepearth, h.base(), cid))


@route("/collections/{collectionId}/items", "getDeepEarthOgcItems",
       "Features of a collection (GeoJSON), filtered by bbox, datetime and species, paged",
       params={"cid": _COLLECTION, "filters": FeatureFilters(), "page": P.Paging(default=100)})
async def items(h: OgcHandler, cid: str, filters: tuple[Query, dict[str, str]],
                page: P.PageRequest):
    q, echo = filters
    body = await h.run(C.items, h.ctx.deepearth, h.base(), cid, q, page, echo)
    await h.reply_json(body, C.GEOJSON)


@route("/collections/{collectionId}/items/{featureId}", "getDeepEarthOgcItem",
       "One feature (its gbif_id)", params={"cid": _COLLECTION,
                                             "fid": PathValue("featureId", "the gbif_id")})
async def item(h: OgcHandler, cid: str, fid: str):
    h.send_json(await h.run(C.item, h.ctx.deepearth, h.base(), cid, fid), C.GEOJSON)
