"""HTTP routes of the viewer support API (``/explore``).

* ``/explore/``: static pages from ``server/static/viewer``: a landing page with links and
  the 3-D embedding space (``embedding-space.html``);
* ``/explore/lib/``: ``plotly.min.js`` from the ``plotly`` package, for that page;
* ``/explore/observations/{z}/{x}/{y}``: XYZ tiles of the observations in their species'
  cluster colours (the viewer's ``observations`` overlay, named in ``viewer/config.json``),
  filtered like the dots (``taxa``, ``months``, ``hours``, ``year``, ``time``);
* ``/explore/pick``: the observation nearest to a map click;
* ``/explore/count``: how many observations and species the dots show with the filters,
  and the species layer of a search naming one species;
* ``/explore/places``: the observations with embeddings place group, narrowed like the dots;
* ``/explore/taxa?q=``: suggestions for the species search (clusters, genera, species);
* ``/explore/photos/{gbif_id}/{image_number}.jpg``: the synthetic photos of a synthetic
  cube set (:mod:`cube_gen.photos`).

Work runs on the shared worker pools; errors are the JSON envelope of the handler base.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xcube.constants import LOG

from ..common import params as P
from ..common.errors import ParamError
from ..common.handler import Handler, endpoint
from . import controllers as C
from .api import URL_PREFIX, api
from .context import ViewerSupportContext
from .loop import FILTER_PARAMS, MAX_PICK_RADIUS_M, DotFilter, FilterError

PAGES_DIR = Path(__file__).resolve().parents[1] / "static" / "viewer"
MAX_ZOOM = 22


class ViewerHandler(Handler):
    url_prefix = URL_PREFIX
    log_name = "DeepEarth viewer"
    strict_query = False  # tile URLs carry more parameters than the filters
    limit_query_size = False
    ctx: ViewerSupportContext

    @property
    def resources(self):
        return self.ctx.resources


@dataclass(frozen=True)
class XyzTile(P.Group):
    """``/{z}/{x}/{y}`` of an XYZ Web Mercator tile -> ``(z, x, y)``."""

    def openapi(self) -> list[dict]:
        return [P.path_param(n, d, {"type": "integer", "minimum": 0}) for n, d in (
            ("z", f"zoom level (0..{MAX_ZOOM})"), ("x", "tile column"), ("y", "tile row"))]

    def read(self, inputs: P.Inputs) -> tuple[int, int, int]:
        try:
            z, x, y = (int(inputs.path[k]) for k in ("z", "x", "y"))
            if not (0 <= z <= MAX_ZOOM and 0 <= x < (1 << z) and 0 <= y < (1 << z)):
                raise ValueError
        except ValueError:
            raise ParamError(f"expected {URL_PREFIX}/observations/{{z}}/{{x}}/{{y}} with "
                             f"0 <= z <= {MAX_ZOOM} and 0 <= x, y < 2**z") from None
        return z, x, y


_FILTER_DOC = {
    "taxa": "species, genera, families or clusters to show (e.g. 'Quercus, cluster 3')",
    "months": "months of year a-b (1..12, wraps: 11-2)",
    "hours": "hours of day a-b (0..23, wraps)",
    "year": "years a-b",
    "time": "ISO time of the time step shown (the dots follow the time slider)",
    "dataset": "grid dataset shown: its time steps give the period (a year, a month of year "
               "of the climatology, all years); default: the yearly grid",
}


@dataclass(frozen=True)
class DotFilters(P.Group):
    """The dots' filters -> :class:`~.loop.DotFilter`."""

    def openapi(self) -> list[dict]:
        return [P.query_param(n, _FILTER_DOC.get(n, n))
                for n in (*FILTER_PARAMS, "time", "dataset")]

    def read(self, inputs: P.Inputs) -> DotFilter:
        try:
            return DotFilter.from_query(inputs.query)
        except FilterError as exc:
            raise ParamError(str(exc), exc.parameter) from None


@dataclass(frozen=True)
class ClickPoint(P.Group):
    """``lon``, ``lat`` and ``radius_m`` (default 500) of a map click."""

    def openapi(self) -> list[dict]:
        return [P.query_param("lon", "longitude (degrees)", {"type": "number"}, True),
                P.query_param("lat", "latitude (degrees)", {"type": "number"}, True),
                P.query_param("radius_m", "search radius in metres",
                              {"type": "number", "default": 500.0,
                               "maximum": MAX_PICK_RADIUS_M})]

    def read(self, inputs: P.Inputs) -> tuple[float, float, float]:
        q = inputs.query
        try:
            lon = float(q["lon"][0])
            lat = float(q["lat"][0])
            radius = float(q.get("radius_m", ["500"])[0])
            if not (-180 <= lon <= 180 and -90 <= lat <= 90
                    and 0 < radius <= MAX_PICK_RADIUS_M):
                raise ValueError
        except (KeyError, IndexError, ValueError):
            raise ParamError("expected lon in -180..180, lat in -90..90 and radius_m in "
                             f"(0, {MAX_PICK_RADIUS_M:g}] metres") from None
        return lon, lat, radius


@api.static_route(URL_PREFIX + "/lib", summary="plotly.min.js for the 3-D page")
def _plotly_dir() -> str | None:
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        LOG.warning("DeepEarth viewer: the plotly package is missing; the 3-D page will not work")
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "package_data")
    return path if os.path.isfile(os.path.join(path, "plotly.min.js")) else None


# After /explore/lib: tornado takes the first matching static route.
@api.static_route(URL_PREFIX, default_filename="index.html",
                  summary="DeepEarth pages: links, 3-D embedding space")
def _pages_dir() -> str | None:
    return str(PAGES_DIR) if PAGES_DIR.is_dir() else None


def route(path: str, operation_id: str, summary: str, **kwargs: Any):
    """Declare a viewer support route at ``/explore<path>``."""
    return endpoint(api, URL_PREFIX + path, operation_id, summary, base=ViewerHandler, **kwargs)


@route("/observations/{z}/{x}/{y}", "deepearthObservationTile",
       "Observations as coloured dots on an XYZ Web Mercator tile (PNG)",
       params={"tile": XyzTile(), "f": DotFilters()})
async def observation_tile(h: ViewerHandler, tile: tuple[int, int, int], f: DotFilter):
    h.send_png(await h.run(C.tile_png, h.ctx, *tile, f, pool="tiles"))


@route("/pick", "deepearthPick",
       "The observation nearest to a map click (lon, lat, radius_m), among those the dot "
       "filters keep (taxa, months, hours, year, time)",
       params={"point": ClickPoint(), "f": DotFilters()})
async def pick(h: ViewerHandler, point: tuple[float, float, float], f: DotFilter):
    h.send_json(await h.run(C.nearest, h.ctx, *point, f))


@route("/count", "deepearthDotCount",
       "How many observations and species the dots show with these filters (and the "
       "species layer when the search names one species)",
       params={"f": DotFilters()})
async def dot_count(h: ViewerHandler, f: DotFilter):
    h.send_json(await h.run(C.count, h.ctx, f))


@route("/places", "deepearthFilteredPlaces",
       "The observations with photo embeddings as a GeoJSON place group, narrowed by the "
       "dot filters (the viewer's place list)",
       params={"f": DotFilters()})
async def filtered_places(h: ViewerHandler, f: DotFilter):
    h.send_json(await h.run(C.places, h.ctx, f))


@dataclass(frozen=True)
class TaxaText(P.Group):
    """``q``: the species search typed so far."""

    def openapi(self) -> list[dict]:
        return [P.query_param("q", "search text: part of a scientific name, a genus, "
                              "'cluster 3' or 'unclustered' (comma-separated terms)")]

    def read(self, inputs: P.Inputs) -> str:
        values = inputs.query.get("q") or [""]
        return str(values[0])[:200]


@route("/taxa", "deepearthTaxaSuggestions",
       "Suggestions for the species search field: clusters, genera and species",
       params={"text": TaxaText()})
async def taxa_suggestions(h: ViewerHandler, text: str):
    h.send_json(await h.run(C.taxa, h.ctx, text))


@dataclass(frozen=True)
class PhotoPath(P.Group):
    """``/{gbif_id}/{image_number}.jpg`` -> ``(gbif_id, image_number)``."""

    def openapi(self) -> list[dict]:
        return [P.path_param("gbif_id", "GBIF occurrence id", {"type": "integer"}),
                P.path_param("image_number", "image number of the observation",
                             {"type": "integer", "minimum": 0})]

    def read(self, inputs: P.Inputs) -> tuple[int, int]:
        try:
            gbif_id, n = int(inputs.path["gbif_id"]), int(inputs.path["image_number"])
            if n < 0:
                raise ValueError
        except ValueError:
            raise ParamError(f"expected {URL_PREFIX}/photos/{{gbif_id}}/{{image_number}}.jpg "
                             "with integers, image_number >= 0") from None
        return gbif_id, n


@route("/photos/{gbif_id}/{image_number}.jpg", "deepearthSyntheticPhoto",
       "The synthetic photo of an embedded image (synthetic cube sets only)",
       params={"photo": PhotoPath()})
async def synthetic_photo(h: ViewerHandler, photo: tuple[int, int]):
    data = await h.run(C.photo, h.ctx, *photo)
    h.finish_bytes(data, "image/jpeg", headers={"Cache-Control": "public, max-age=86400"})
