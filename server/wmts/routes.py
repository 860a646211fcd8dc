"""HTTP routes of the WMTS: capabilities (REST, KVP), tiles (REST, KVP) and legends.

Thin: parameters are read by the groups below, work runs on the shared ``tiles`` pool
through :mod:`.controllers`, and every error is an OWS ``ExceptionReport`` (the handler
base's envelope, overridden here), never a Python traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xcube.server.api import ApiHandler

from ..common import params as P
from ..common.errors import ApiProblem
from ..common.handler import Handler, endpoint
from ..common.ows import OwsError, exception_report, invalid, missing
from . import controllers as C
from .api import URL_PREFIX, api
from .capabilities import PNG, WMTS_VERSION, ServiceUrls
from .context import WmtsContext
from .tiles import TileRequest, parse_tile_request

_KVP_DOC = {
    "SERVICE": "WMTS",
    "REQUEST": "GetCapabilities or GetTile",
    "VERSION": "1.0.0",
    "LAYER": "layer identifier <dataset>.<variable>",
    "STYLE": "default",
    "FORMAT": "image/png",
    "TILEMATRIXSET": "WorldCRS84Quad or WorldWebMercatorQuad",
    "TILEMATRIX": "zoom level",
    "TILEROW": "tile row",
    "TILECOL": "tile column",
    "TIME": "ISO 8601 time inside a step; absent: the advertised default (latest). On "
            "GetCapabilities: the step to advertise as Default",
}


@dataclass(frozen=True)
class Kvp(P.Group):
    """OGC key-value pairs: names are case-insensitive; the value is a dict with lower-case
    keys (a parameter given twice is an error). ``documented``: the names in the OpenAPI."""

    documented: tuple[str, ...] = tuple(_KVP_DOC)

    def openapi(self) -> list[dict]:
        return [P.query_param(name, _KVP_DOC[name]) for name in self.documented]

    def read(self, inputs: P.Inputs) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, values in inputs.query.items():
            key = name.lower()
            if key in out or len(values) > 1:
                raise invalid(name.upper(), f"parameter {name.upper()} is given more than "
                                            "once")
            out[key] = values[0]
        return out


class WmtsHandler(Handler):
    """Writes OWS exception reports for every error; never a traceback."""

    url_prefix = URL_PREFIX
    log_name = "DeepEarth WMTS"
    strict_query = False  # OGC clients add vendor parameters
    limit_query_size = False
    ctx: WmtsContext

    @property
    def resources(self):
        return self.ctx.resources

    def write_problem(self, problem: ApiProblem) -> Any:
        return self.finish_bytes(exception_report(problem), "application/xml", problem.status)

    def urls(self) -> ServiceUrls:
        return ServiceUrls(rest_capabilities=self.link(f"/{WMTS_VERSION}/WMTSCapabilities.xml"),
                           rest_base=self.link(f"/{WMTS_VERSION}/"), kvp=self.link("/kvp") + "?",
                           legend_base=self.link("/legend/"))

    async def layers(self):
        ready = self.ctx.layers_ready
        return ready if ready is not None else await self.run(C.layers, self.ctx,
                                                              pool="tiles")

    async def send_capabilities(self, time: str | None) -> None:
        xml = await self.run(C.capabilities, self.ctx, self.urls(), time, pool="tiles")
        self.finish_bytes(xml, "application/xml", headers={"Cache-Control": "public, max-age=300"})

    async def send_tile(self, req: TileRequest) -> None:
        png = await self.run(C.tile, self.ctx, req, pool="tiles")
        age = 3600 if req.time_given or req.time_index is None else 300
        self.send_png(png, max_age=age)

    async def _not_allowed(self, *args, **kwargs):
        err = OwsError("OperationNotSupported", "only GET is supported", status=405)
        self.finish_bytes(exception_report(err), "application/xml", 405,
                          {"Allow": "GET, OPTIONS"})

    head = post = put = delete = get = _not_allowed
    options = ApiHandler.options


def route(path: str, operation_id: str, summary: str, **kwargs: Any):
    """Declare a WMTS route at ``/deepearth/wmts<path>``."""
    return endpoint(api, URL_PREFIX + path, operation_id, summary, base=WmtsHandler, **kwargs)


@route("", "getDeepEarthWmtsIndex", "The WMTS capabilities document (same as the REST one)",
       params={"kvp": Kvp(())})
async def index(h: WmtsHandler, kvp: dict[str, str]):
    await h.send_capabilities(kvp.get("time"))


@route(f"/{WMTS_VERSION}/WMTSCapabilities.xml", "getDeepEarthWmtsCapabilities",
       "WMTS capabilities (RESTful); ?time= sets the advertised default time",
       params={"kvp": Kvp(("TIME",))})
async def capabilities(h: WmtsHandler, kvp: dict[str, str]):
    await h.send_capabilities(kvp.get("time"))


@route("/kvp", "invokeDeepEarthWmtsKvp", "WMTS by key-value pairs: GetCapabilities, GetTile",
       params={"q": Kvp()})
async def kvp(h: WmtsHandler, q: dict[str, str]):
    if not q:
        await h.send_capabilities(None)
        return
    service = q.get("service")
    request = q.get("request")
    # QGIS appends SERVICE=WMS&REQUEST=GetCapabilities to a bare URL pasted into its
    # WMS/WMTS dialog and reads the WMTS document it gets back
    qgis_probe = (service or "").upper() == "WMS" and (request or "").lower() == \
        "getcapabilities"
    if service is not None and service.upper() != "WMTS" and not qgis_probe:
        raise invalid("SERVICE", f"SERVICE={service!r}; this is a WMTS (SERVICE=WMTS)")
    if not request:
        raise missing("REQUEST")
    req = request.lower()
    if req == "getcapabilities":
        accept = q.get("acceptversions")
        if accept and WMTS_VERSION not in [v.strip() for v in accept.split(",")]:
            raise OwsError("VersionNegotiationFailed",
                           f"only version {WMTS_VERSION} is offered", "ACCEPTVERSIONS")
        await h.send_capabilities(q.get("time"))
    elif req == "gettile":
        version = q.get("version")
        if version is not None and version != WMTS_VERSION:
            raise invalid("VERSION", f"VERSION={version!r}; use {WMTS_VERSION}")
        tile = parse_tile_request(
            await h.layers(), q.get("layer"), q.get("style"), q.get("tilematrixset"),
            q.get("tilematrix"), q.get("tilerow"), q.get("tilecol"), q.get("time"),
            q.get("format"))
        await h.send_tile(tile)
    elif req == "getfeatureinfo":
        raise OwsError("OperationNotSupported", "GetFeatureInfo is not offered",
                       "REQUEST", status=501)
    else:
        raise invalid("REQUEST", f"REQUEST={request!r}; use GetCapabilities or GetTile")


@route("/legend/{layer}.png", "getDeepEarthWmtsLegend",
       "Colour bar of a WMTS layer (its LegendURL)",
       params={"layer": P.PathSegment("layer", "layer identifier, e.g. grid.observation_count")})
async def legend(h: WmtsHandler, layer: str):
    h.send_png(await h.run(C.legend, h.ctx, layer, pool="tiles"))


_REST_TEMPLATE = (f"{URL_PREFIX}/{WMTS_VERSION}/<layer>/default/<time>/<TileMatrixSet>/"
                  "<TileMatrix>/<TileRow>/<TileCol>.png")
_REST_NAMES = {"layer": "layer", "style": "style", "tms": "TileMatrixSet",
               "level": "TileMatrix", "row": "TileRow", "col": "TileCol", "time": "Time"}


# Declared after the capabilities route, which it would otherwise match.
@route(f"/{WMTS_VERSION}/{{*path}}", "getDeepEarthWmtsTile",
       "WMTS tile (RESTful): {layer}/{style}/{Time}/{TileMatrixSet}/{TileMatrix}/{TileRow}/"
       "{TileCol}.png; Time 'default' is the advertised default (latest)",
       params={"path": P.PathSegment("path", "{layer}/{style}/{Time}/{TileMatrixSet}/"
                                   "{TileMatrix}/{TileRow}/{TileCol}.png", "*path")})
async def rest_tile(h: WmtsHandler, path: str):
    parts = [p for p in path.split("/") if p]
    if len(parts) not in (6, 7) or not parts[-1].lower().endswith(".png"):
        raise OwsError("InvalidParameterValue",
                       f"no WMTS resource at {URL_PREFIX}/{WMTS_VERSION}/{path}; tiles "
                       f"are at {_REST_TEMPLATE}", None, status=404)
    if len(parts) == 7:
        layer_id, style, time, tms_id, z, y, xpng = parts
    else:
        layer_id, style, tms_id, z, y, xpng = parts
        time = None
    tile = parse_tile_request(await h.layers(), layer_id, style, tms_id, z, y, xpng[:-4],
                              time, PNG, _REST_NAMES)
    await h.send_tile(tile)
