"""What OGC API - Features answers, as functions over a DeepEarth context (``cubeset``,
``cache``): landing page, conformance, collections, items, one item.

Items reuse the DeepEarth API's observation query (:func:`server.deepearth.controllers.
observations`): one selection and paging implementation for both APIs.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pandas as pd

from cube_gen import schema as S
from cube_gen.errors import NotFoundError
from cube_gen.query import Query

from ..common.errors import NotFound
from ..common.params import PageRequest
from ..deepearth import controllers as DC

GEOJSON = "application/geo+json"
JSON = "application/json"
CONFORMANCE = (
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/oas30",
)
COLLECTIONS = {
    "observations": ("Observations", "Every plant observation: species, time, split, photos "
                     "and the species' language-embedding UMAP position and cluster", None),
    "observations_with_embeddings": ("Observations with photo embeddings",
                                     "Observations whose photos have V-JEPA 2 embeddings, with "
                                     "the vision-embedding UMAP position of the first photo",
                                     True),
}


def _link(href: str, rel: str, type_: str, title: str | None = None) -> dict[str, str]:
    out = {"href": href, "rel": rel, "type": type_}
    if title:
        out["title"] = title
    return out


def landing(base: str) -> dict[str, Any]:
    return {
        "title": "DeepEarth observations (OGC API - Features)",
        "description": "Plant observations of the DeepEarth cube set as GeoJSON features",
        "links": [_link(base, "self", JSON, "this document"),
                  _link(f"{base}/conformance", "conformance", JSON, "conformance classes"),
                  _link(f"{base}/collections", "data", JSON, "the collections"),
                  _link(base.rsplit("/deepearth/", 1)[0] + "/openapi.json", "service-desc",
                        "application/vnd.oai.openapi+json;version=3.0", "the API definition")],
    }


def conformance() -> dict[str, Any]:
    return {"conformsTo": list(CONFORMANCE)}


def _extent(ctx) -> dict[str, Any]:
    cs = ctx.cubeset

    def make():
        ds = cs.observations
        lat, lon, t = ds.lat.values, ds.lon.values, ds.time.values
        return {"spatial": {"bbox": [[float(lon.min()), float(lat.min()), float(lon.max()),
                                      float(lat.max())]],
                            "crs": "http://www.opengis.net/def/crs/OGC/1.3/CRS84"},
                "temporal": {"interval": [[_iso(t.min()), _iso(t.max())]],
                             "trs": "http://www.opengis.net/def/uom/ISO-8601/0/Gregorian"}}
    return ctx.cache.get_or_compute(("ogc_extent",), make)


def _iso(t) -> str:
    return pd.Timestamp(t).strftime("%Y-%m-%dT%H:%M:%SZ")


def _collection(ctx, base: str, cid: str) -> dict[str, Any]:
    title, description, _ = COLLECTIONS[cid]
    href = f"{base}/collections/{cid}"
    return {"id": cid, "title": title, "description": description, "itemType": "feature",
            "extent": _extent(ctx), "crs": ["http://www.opengis.net/def/crs/OGC/1.3/CRS84"],
            "links": [_link(href, "self", JSON, title),
                      _link(f"{href}/items", "items", GEOJSON, f"{title} as GeoJSON")]}


def collections(ctx, base: str) -> dict[str, Any]:
    return {"links": [_link(f"{base}/collections", "self", JSON)],
            "collections": [_collection(ctx, base, cid) for cid in COLLECTIONS]}


def collection(ctx, base: str, cid: str) -> dict[str, Any]:
    _check(cid)
    return _collection(ctx, base, cid)


def _check(cid: str) -> None:
    if cid not in COLLECTIONS:
        raise NotFound(f"no collection {cid!r}", "collectionId", list(COLLECTIONS), cid)


def _embedding_columns(ctx) -> dict[str, np.ndarray]:
    """Per species: language UMAP and cluster; per embedding: vision UMAP (cached)."""
    cs = ctx.cubeset

    def make():
        sp = cs.species
        return {"species_umap": np.asarray(sp.umap.values, np.float64),
                "cluster": np.asarray(sp.cluster.values, np.int64),
                "vision_umap": np.asarray(cs.vision.umap.values, np.float64)}
    return ctx.cache.get_or_compute(("ogc_embedding_columns",), make)


def _feature(ctx, rec: dict[str, Any], emb: dict[str, np.ndarray],
             table: pd.DataFrame) -> dict[str, Any]:
    s = rec["species_index"]
    su = emb["species_umap"][s]
    props: dict[str, Any] = {
        "gbif_id": rec["gbif_id"], "taxon_name": rec["taxon_name"], "taxon_id": rec["taxon_id"],
        "genus": str(table.genus.iat[s]) if "genus" in table else None,
        "datetime": rec["time"], "time_precision": rec["time_precision"],
        "year": int(rec["time"][:4]), "split": rec["split"], "has_vision": rec["has_vision"],
        "num_images": rec["num_images"], "num_embeddings": rec["num_embeddings"],
        "photo_url": rec["image_urls"][0] if rec["image_urls"] else None,
        "species_cluster": int(emb["cluster"][s]),
        "species_color": str(table.cluster_color.iat[s]),
        **{f"species_umap_{a}": round(float(v), 5) for a, v in zip(S.UMAP_AXES, su,
                                                                   strict=True)},
    }
    vu = [None, None, None]
    if rec["num_embeddings"]:
        pos = ctx.cubeset.images_of(rec["gbif_id"])
        if pos:
            vu = [round(float(v), 5) for v in emb["vision_umap"][pos[0]]]
    props.update({f"vision_umap_{a}": v for a, v in zip(S.UMAP_AXES, vu, strict=True)})
    return {"type": "Feature", "id": rec["gbif_id"],
            "geometry": {"type": "Point", "coordinates": [rec["lon"], rec["lat"]]},
            "properties": props}


def items(ctx, base: str, cid: str, q: Query, page: PageRequest,
          params: dict[str, str]) -> dict[str, Any]:
    """A page of features (``params``: the query's own filter parameters, for the links)."""
    _check(cid)
    has_vision = COLLECTIONS[cid][2]
    if has_vision is not None:
        q = Query(q.bbox, q.start, q.end, q.species, q.split, has_vision)
    res = DC.observations(ctx, q, page)
    emb = _embedding_columns(ctx)
    table = ctx.cubeset.species_table()
    feats = [_feature(ctx, rec, emb, table) for rec in res["observations"]]
    href = f"{base}/collections/{cid}/items"

    def url(offset: int) -> str:
        return f"{href}?{urlencode({**params, 'limit': page.limit, 'offset': offset})}"

    links = [_link(url(page.offset), "self", GEOJSON, "this page"),
             _link(f"{base}/collections/{cid}", "collection", JSON)]
    if res.get("next_offset") is not None:
        links.append(_link(url(int(res["next_offset"])), "next", GEOJSON, "next page"))
    if page.offset > 0:
        links.append(_link(url(max(page.offset - page.limit, 0)), "prev", GEOJSON,
                           "previous page"))
    return {"type": "FeatureCollection", "features": feats,
            "numberMatched": int(res["total"]), "numberReturned": len(feats),
            "timeStamp": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "links": links}


def item(ctx, base: str, cid: str, fid: str) -> dict[str, Any]:
    _check(cid)
    try:
        gbif_id = int(fid)
        pos = ctx.cubeset.obs_position(gbif_id)
    except (ValueError, NotFoundError):
        raise NotFound(f"no feature {fid!r} in {cid}", "featureId",
                       "a gbif_id of the collection", fid) from None
    rec = ctx.cubeset.observation_rows(np.array([pos]))[0]
    if COLLECTIONS[cid][2] and not rec["has_vision"]:
        raise NotFound(f"feature {fid!r} has no photo embedding", "featureId", None, fid)
    feat = _feature(ctx, rec, _embedding_columns(ctx), ctx.cubeset.species_table())
    feat["links"] = [_link(f"{base}/collections/{cid}/items/{fid}", "self", GEOJSON),
                     _link(f"{base}/collections/{cid}", "collection", JSON)]
    return feat
