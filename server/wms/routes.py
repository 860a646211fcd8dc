"""HTTP route of the WMS: one KVP endpoint, ``/deepearth/wms``.

Without parameters (or with ``REQUEST=GetCapabilities``) it answers the capabilities, so the
bare URL works pasted into QGIS (which appends ``SERVICE=WMS&REQUEST=GetCapabilities``).
Errors are WMS ``ServiceExceptionReport`` XML, never a traceback.
"""

from __future__ import annotations

from typing import Any

from xcube.server.api import ApiHandler

from ..common.errors import ApiProblem
from ..common.handler import Handler, endpoint
from ..wmts.routes import Kvp
from . import controllers as C
from .api import URL_PREFIX, api
from .capabilities import WMS_VERSION
from .context import WmsContext
from .errors import WmsError, exception_report

_DOC = {
    "SERVICE": "WMS", "VERSION": WMS_VERSION,
    "REQUEST": "GetCapabilities, GetMap, GetFeatureInfo or GetLegendGraphic",
    "LAYERS": "comma-separated layer names <dataset>.<variable>, e.g. "
              "grid_all_years.species_richness",
    "STYLES": "empty or 'default' per layer", "CRS": "EPSG:4326 (lat/lon axis order), "
    "EPSG:3857 or CRS:84", "BBOX": "minx,miny,maxx,maxy in the CRS's axis order",
    "WIDTH": "map width in pixels", "HEIGHT": "map height in pixels",
    "FORMAT": "image/png", "TRANSPARENT": "TRUE (default) or FALSE",
    "BGCOLOR": "0xRRGGBB (with TRANSPARENT=FALSE)",
    "TIME": "ISO 8601 instant (or start/end) inside a step of the layer; default: latest",
    "QUERY_LAYERS": "GetFeatureInfo: layers to query", "I": "GetFeatureInfo: pixel column",
    "J": "GetFeatureInfo: pixel row",
    "INFO_FORMAT": "GetFeatureInfo: text/plain, text/html, application/json",
    "LAYER": "GetLegendGraphic: the layer",
}
_KVP_DOCS = dict(_DOC)


class WmsHandler(Handler):
    url_prefix = URL_PREFIX
    log_name = "DeepEarth WMS"
    strict_query = False  # OGC clients add vendor parameters
    limit_query_size = False
    ctx: WmsContext

    @property
    def resources(self):
        return self.ctx.resources

    def write_problem(self, problem: ApiProblem) -> Any:
        return self.finish_bytes(exception_report(problem), "text/xml", problem.status)

    async def _not_allowed(self, *args, **kwargs):
        err = WmsError("OperationNotSupported", "only GET is supported", status=405)
        self.finish_bytes(exception_report(err), "text/xml", 405, {"Allow": "GET, OPTIONS"})

    head = post = put = delete = get = _not_allowed
    options = ApiHandler.options


class _Kvp(Kvp):
    def openapi(self) -> list[dict]:
        from ..common import params as P

        return [P.query_param(name, _KVP_DOCS[name]) for name in self.documented]


@endpoint(api, URL_PREFIX, "invokeDeepEarthWms",
          "WMS 1.3.0 by key-value pairs: GetCapabilities (also without parameters), GetMap, "
          "GetFeatureInfo, GetLegendGraphic", base=WmsHandler,
          params={"q": _Kvp(tuple(_DOC))})
async def wms(h: WmsHandler, q: dict[str, str]):
    service = q.get("service")
    if service is not None and service.strip().upper() not in ("WMS", ""):
        raise WmsError("InvalidParameterValue", f"SERVICE={service!r}; this is a WMS "
                                                "(SERVICE=WMS)", "SERVICE")
    request = (q.get("request") or "GetCapabilities").strip().lower()
    if request in ("getcapabilities", "capabilities"):
        xml = await h.run(C.capabilities, h.ctx, h.link("") + "?", pool="tiles")
        h.finish_bytes(xml, "text/xml", headers={"Cache-Control": "public, max-age=300"})
    elif request == "getmap":
        h.send_png(await h.run(C.get_map, h.ctx, q, pool="tiles"), max_age=300)
    elif request == "getfeatureinfo":
        body, ctype = await h.run(C.get_feature_info, h.ctx, q, pool="tiles")
        h.finish_bytes(body, ctype)
    elif request == "getlegendgraphic":
        h.send_png(await h.run(C.get_legend_graphic, h.ctx, q, pool="tiles"))
    else:
        raise WmsError("OperationNotSupported", f"REQUEST={q.get('request')!r}; use "
                       "GetCapabilities, GetMap, GetFeatureInfo or GetLegendGraphic",
                       "REQUEST", status=400)
