"""The WMTS 1.0.0 capabilities document (both tile matrix sets, REST and KVP, the Time
dimension with its default step)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .layers import Layer
from .tilematrixsets import TILE_MATRIX_SETS, TILE_SIZE

WMTS_VERSION = "1.0.0"
STYLE_ID = "default"
PNG = "image/png"
TIME_DIM = "Time"  # the WMTS dimension identifier, also the {Time} template placeholder

NS_WMTS = "http://www.opengis.net/wmts/1.0"
NS_OWS = "http://www.opengis.net/ows/1.1"
NS_XLINK = "http://www.w3.org/1999/xlink"
NS_XSI = "http://www.w3.org/2001/XMLSchema-instance"
# Names are written with literal prefixes and the root declares them: ElementTree's global
# prefix registry is shared with every other module of the process (the WMS registers its
# own default namespace), so it is not used here.
_NAMESPACES = {"xmlns": NS_WMTS, "xmlns:ows": NS_OWS, "xmlns:xlink": NS_XLINK,
               "xmlns:xsi": NS_XSI}


def _ows(tag: str) -> str:
    return f"ows:{tag}"


def _wmts(tag: str) -> str:
    return tag


def _sub(parent: ET.Element, tag: str, text: Any = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, {("xlink:href" if k == "xlink__href" else k): v
                                     for k, v in attrs.items()})
    if text is not None:
        el.text = str(text)
    return el


def _corner(x: float, y: float) -> str:
    return f"{x!r} {y!r}"


@dataclass(frozen=True)
class ServiceUrls:
    """The absolute URLs written into the capabilities (behind proxies: reverse URLs)."""

    rest_capabilities: str
    rest_base: str  # ends with /1.0.0/
    kvp: str  # ends with ?
    legend_base: str  # ends with /legend/


def capabilities_xml(layers: Mapping[str, Layer], urls: ServiceUrls,
                     pinned: Mapping[str, int] | None = None,
                     provider: Mapping[str, Any] | None = None) -> bytes:
    """WMTSCapabilities.xml with both tile matrix sets; ``pinned``: layer -> default step."""
    root = ET.Element(_wmts("Capabilities"), {
        "version": WMTS_VERSION,
        **_NAMESPACES,
        "xsi:schemaLocation": f"{NS_WMTS} http://schemas.opengis.net/wmts/1.0/"
                                       "wmtsGetCapabilities_response.xsd",
    })
    ident = _sub(root, _ows("ServiceIdentification"))
    _sub(ident, _ows("Title"), "DeepEarth WMTS")
    _sub(ident, _ows("Abstract"),
         "Gridded layers of the DeepEarth cube set (observation counts, species richness, "
         "diversity, vision embedding composites) by year. Colours follow each layer's "
         "configured colour map and value range; the Time dimension selects the year.")
    _sub(ident, _ows("ServiceType"), "OGC WMTS")
    _sub(ident, _ows("ServiceTypeVersion"), WMTS_VERSION)
    _sub(ident, _ows("Fees"), "none")
    _sub(ident, _ows("AccessConstraints"), "none")
    provider = dict(provider or {})
    prov = _sub(root, _ows("ServiceProvider"))
    _sub(prov, _ows("ProviderName"), str(provider.get("ProviderName") or "DeepEarth"))
    if provider.get("ProviderSite"):
        _sub(prov, _ows("ProviderSite"), xlink__href=str(provider["ProviderSite"]))
    _sub(prov, _ows("ServiceContact"))

    ops = _sub(root, _ows("OperationsMetadata"))
    for op, rest in (("GetCapabilities", urls.rest_capabilities), ("GetTile", urls.rest_base)):
        http = _sub(_sub(_sub(ops, _ows("Operation"), name=op), _ows("DCP")), _ows("HTTP"))
        for href, encoding in ((urls.kvp, "KVP"), (rest, "RESTful")):
            get = _sub(http, _ows("Get"), xlink__href=href)
            allowed = _sub(_sub(get, _ows("Constraint"), name="GetEncoding"),
                           _ows("AllowedValues"))
            _sub(allowed, _ows("Value"), encoding)

    contents = _sub(root, _wmts("Contents"))
    max_levels = {tid: 0 for tid in TILE_MATRIX_SETS}
    for layer in layers.values():
        for tid, level in layer.max_levels.items():
            max_levels[tid] = max(max_levels[tid], level)
        el = _sub(contents, _wmts("Layer"))
        _sub(el, _ows("Title"), layer.title)
        _sub(el, _ows("Abstract"), layer.abstract)
        bb = _sub(el, _ows("WGS84BoundingBox"))
        _sub(bb, _ows("LowerCorner"), _corner(*layer.wgs84_bbox[:2]))
        _sub(bb, _ows("UpperCorner"), _corner(*layer.wgs84_bbox[2:]))
        _sub(el, _ows("Identifier"), layer.identifier)
        for tid, tms in TILE_MATRIX_SETS.items():
            box = layer.bboxes[tid]
            bb = _sub(el, _ows("BoundingBox"), crs=tms.crs_urn)
            _sub(bb, _ows("LowerCorner"), _corner(*box[:2]))
            _sub(bb, _ows("UpperCorner"), _corner(*box[2:]))
        style = _sub(el, _wmts("Style"), isDefault="true")
        _sub(style, _ows("Title"), "default")
        _sub(style, _ows("Identifier"), STYLE_ID)
        _sub(style, _wmts("LegendURL"), format=PNG,
             xlink__href=f"{urls.legend_base}{layer.identifier}.png")
        _sub(el, _wmts("Format"), PNG)
        template = f"{urls.rest_base}{layer.identifier}/{{Style}}/"
        if layer.time is not None:
            t = layer.time
            default = (pinned or {}).get(layer.identifier, t.default_index)
            dim = _sub(el, _wmts("Dimension"))
            _sub(dim, _ows("Title"), "time")
            _sub(dim, _ows("Abstract"),
                 "start of the time step; any ISO 8601 instant within a step selects it")
            _sub(dim, _ows("Identifier"), TIME_DIM)
            _sub(dim, _ows("UOM"), "ISO8601")
            _sub(dim, _wmts("Default"), t.labels[default])
            _sub(dim, _wmts("Current"), "false")
            for label in t.labels:
                _sub(dim, _wmts("Value"), label)
            template += f"{{{TIME_DIM}}}/"
        for tid in TILE_MATRIX_SETS:
            _sub(_sub(el, _wmts("TileMatrixSetLink")), _wmts("TileMatrixSet"), tid)
        template += "{TileMatrixSet}/{TileMatrix}/{TileRow}/{TileCol}.png"
        _sub(el, _wmts("ResourceURL"), format=PNG, resourceType="tile", template=template)

    for tid, tms in TILE_MATRIX_SETS.items():
        el = _sub(contents, _wmts("TileMatrixSet"))
        _sub(el, _ows("Title"), tms.title)
        _sub(el, _ows("Identifier"), tid)
        bb = _sub(el, _ows("BoundingBox"), crs=tms.crs_urn)
        _sub(bb, _ows("LowerCorner"), _corner(*tms.bbox[:2]))
        _sub(bb, _ows("UpperCorner"), _corner(*tms.bbox[2:]))
        _sub(el, _ows("SupportedCRS"), tms.crs_urn)
        if tms.well_known_scale_set:
            _sub(el, _wmts("WellKnownScaleSet"), tms.well_known_scale_set)
        for level in range(max_levels[tid] + 1):
            tm = _sub(el, _wmts("TileMatrix"))
            _sub(tm, _ows("Identifier"), level)
            _sub(tm, _wmts("ScaleDenominator"), repr(tms.scale_denominator(level)))
            _sub(tm, _wmts("TopLeftCorner"), _corner(tms.bbox[0], tms.bbox[3]))
            _sub(tm, _wmts("TileWidth"), TILE_SIZE)
            _sub(tm, _wmts("TileHeight"), TILE_SIZE)
            width, height = tms.matrix_size(level)
            _sub(tm, _wmts("MatrixWidth"), width)
            _sub(tm, _wmts("MatrixHeight"), height)

    _sub(root, _wmts("ServiceMetadataURL"), xlink__href=urls.rest_capabilities)
    ET.indent(root)
    return ET.tostring(root, encoding="UTF-8", xml_declaration=True)
