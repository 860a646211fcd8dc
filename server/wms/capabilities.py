"""The WMS 1.3.0 capabilities document.

One group layer per grid dataset (per year, all years, month of year, species), a named,
queryable layer per variable with its ``time`` dimension (WMS-T, ISO 8601 instants, one per
step; the latest is the default), both CRSs, and a ``LegendURL`` to GetLegendGraphic.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from urllib.parse import quote

from .layers import WmsLayer
from .render import CRS_NAMES, EARTH_RADIUS, MAX_SIZE

WMS_VERSION = "1.3.0"
NS_WMS = "http://www.opengis.net/wms"
NS_XLINK = "http://www.w3.org/1999/xlink"
NS_XSI = "http://www.w3.org/2001/XMLSchema-instance"
GETMAP_FORMATS = ("image/png",)
INFO_FORMATS = ("text/plain", "text/html", "application/json", "application/geo+json")
# Elements are written with literal names (the WMS namespace is the root's default, xlink
# and xsi are declared on the root): no global ElementTree namespace registration, which
# would change how other services (the WMTS) serialise their documents.


def _w(tag: str) -> str:
    return tag


def _sub(parent: ET.Element, tag: str, text=None, **attrs) -> ET.Element:
    el = ET.SubElement(parent, _w(tag), {k: str(v) for k, v in attrs.items()})
    if text is not None:
        el.text = str(text)
    return el


def _online(parent: ET.Element, href: str) -> ET.Element:
    return ET.SubElement(parent, _w("OnlineResource"), {"xlink:type": "simple",
                                                        "xlink:href": href})


def _mercator(lon: float, lat: float) -> tuple[float, float]:
    lat = max(min(lat, 85.0511287798), -85.0511287798)
    x = math.radians(lon) * EARTH_RADIUS
    y = math.log(math.tan(math.pi / 4 + math.radians(lat) / 2)) * EARTH_RADIUS
    return x, y


def _bboxes(parent: ET.Element, bbox: tuple[float, float, float, float]) -> None:
    w, s, e, n = bbox
    geo = _sub(parent, "EX_GeographicBoundingBox")
    for tag, v in (("westBoundLongitude", w), ("eastBoundLongitude", e),
                   ("southBoundLatitude", s), ("northBoundLatitude", n)):
        _sub(geo, tag, repr(round(v, 10)))
    _sub(parent, "BoundingBox", CRS="CRS:84", minx=w, miny=s, maxx=e, maxy=n)
    _sub(parent, "BoundingBox", CRS="EPSG:4326", minx=s, miny=w, maxx=n, maxy=e)
    x0, y0 = _mercator(w, s)
    x1, y1 = _mercator(e, n)
    _sub(parent, "BoundingBox", CRS="EPSG:3857", minx=round(x0, 3), miny=round(y0, 3),
         maxx=round(x1, 3), maxy=round(y1, 3))


def _time_dimension(parent: ET.Element, layer: WmsLayer) -> None:
    axis = layer.time
    _sub(parent, "Dimension", ",".join(axis.labels), name="time", units="ISO8601",
         default=axis.labels[axis.default_index], nearestValue="0", multipleValues="0",
         current="0")


def capabilities_xml(layers: Mapping[str, WmsLayer], base_url: str,
                     titles: Mapping[str, str]) -> bytes:
    """The document; ``base_url`` ends with ``?``; ``titles``: dataset id -> title."""
    root = ET.Element(_w("WMS_Capabilities"), {
        "version": WMS_VERSION, "xmlns": NS_WMS, "xmlns:xlink": NS_XLINK, "xmlns:xsi": NS_XSI,
        "xsi:schemaLocation": f"{NS_WMS} http://schemas.opengis.net/wms/1.3.0/"
                              "capabilities_1_3_0.xsd"})
    service = _sub(root, "Service")
    _sub(service, "Name", "WMS")
    _sub(service, "Title", "DeepEarth WMS")
    _sub(service, "Abstract", "Gridded layers of the DeepEarth cube set: observation counts "
         "and density, sampling effort, species richness, Shannon and Simpson diversity, "
         "vision embedding composites and per-species occurrence, per year (TIME), all years "
         "together and by month of year. Colours follow the layer's legend.")
    kw = _sub(service, "KeywordList")
    for word in ("biodiversity", "species richness", "DeepEarth", "WMS-T"):
        _sub(kw, "Keyword", word)
    _online(service, base_url.rstrip("?"))
    _sub(service, "Fees", "none")
    _sub(service, "AccessConstraints", "none")
    _sub(service, "LayerLimit", 16)
    _sub(service, "MaxWidth", MAX_SIZE)
    _sub(service, "MaxHeight", MAX_SIZE)

    cap = _sub(root, "Capability")
    req = _sub(cap, "Request")
    for op, formats in (("GetCapabilities", ("text/xml",)), ("GetMap", GETMAP_FORMATS),
                        ("GetFeatureInfo", INFO_FORMATS)):
        el = _sub(req, op)
        for f in formats:
            _sub(el, "Format", f)
        get = _sub(_sub(_sub(el, "DCPType"), "HTTP"), "Get")
        _online(get, base_url)
    exc = _sub(cap, "Exception")
    _sub(exc, "Format", "XML")

    top = _sub(cap, "Layer")
    _sub(top, "Title", "DeepEarth grid layers")
    for crs in CRS_NAMES:
        _sub(top, "CRS", crs)
    all_bbox = _union([layer.bbox for layer in layers.values()])
    if all_bbox:
        _bboxes(top, all_bbox)
    groups: dict[str, list[WmsLayer]] = {}
    for layer in layers.values():
        groups.setdefault(layer.dataset_id, []).append(layer)
    for ds_id, members in groups.items():
        group = _sub(top, "Layer")
        _sub(group, "Title", titles.get(ds_id, ds_id))
        _bboxes(group, members[0].bbox)
        for layer in members:
            el = _sub(group, "Layer", queryable="1", opaque="0")
            _sub(el, "Name", layer.name)
            _sub(el, "Title", layer.title)
            _sub(el, "Abstract", layer.abstract)
            _bboxes(el, layer.bbox)
            if layer.timed:
                _time_dimension(el, layer)
            style = _sub(el, "Style")
            _sub(style, "Name", "default")
            _sub(style, "Title", layer.legend_title or "default")
            legend = _sub(style, "LegendURL", width=340, height=95 if layer.stops else 110)
            _sub(legend, "Format", "image/png")
            _online(legend, f"{base_url}SERVICE=WMS&VERSION={WMS_VERSION}&REQUEST="
                            f"GetLegendGraphic&FORMAT=image/png&LAYER={quote(layer.name)}")
    return ET.tostring(root, encoding="UTF-8", xml_declaration=True)


def _union(boxes):
    boxes = list(boxes)
    if not boxes:
        return None
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
            max(b[3] for b in boxes))
