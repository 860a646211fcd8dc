"""OGC WMTS 1.0.0 for the grid layers: the ``deepearth-wmts`` xcube server API.

xcube's own WMTS (``/wmts/...``) does not suit this project's layers (verified in xcube 1.14):
colours are scaled to [0, 1] unless a client passes ``vmin``/``vmax``, which WMTS clients
never do; the REST template has no ``{Time}``; a request without a time gets the first
step although the capabilities advertise "current". This API serves its own WMTS for the
gridded datasets of the server config, reusing xcube's tiling (``compute_rgba_tile`` of
:mod:`xcube.core.tile`) and xcube's datasets context (datasets, styles, colour maps):

* every layer is coloured with its configured colour map and value range (the config's
  ``Styles``/``ColorMappings``, else the variable's ``color_bar_name``/``color_value_min``/
  ``color_value_max`` attributes), the same as in the viewer;
* the time dimension ``Time`` lists every step; ``<Default>`` is the latest step, and it is
  what a tile request without a time gets, by REST (``default``/``current`` in the ``{Time}``
  slot) and by KVP (no ``TIME``); ``TIME`` / ``{Time}`` take any ISO 8601 instant inside a
  step (a step's bounds, e.g. any date of a year for yearly steps);
* one capabilities document with both ``WorldCRS84Quad`` and ``WorldWebMercatorQuad``,
  REST and KVP;
* tiles inside the tile matrix but outside the data are transparent PNGs (HTTP 200);
* errors are OWS exception reports (``ExceptionReport`` XML) naming the parameter, never a
  Python traceback.

URLs (``<base>`` is the server URL, e.g. ``http://localhost:8080``)::

    <base>/deepearth/wmts/1.0.0/WMTSCapabilities.xml[?time=<ISO>]
    <base>/deepearth/wmts/kvp?SERVICE=WMTS&REQUEST=GetCapabilities[&TIME=<ISO>]
    <base>/deepearth/wmts/1.0.0/{layer}/default/{Time}/{TileMatrixSet}/{z}/{row}/{col}.png
    <base>/deepearth/wmts/kvp?SERVICE=WMTS&REQUEST=GetTile&VERSION=1.0.0&LAYER=...&STYLE=default
         &FORMAT=image/png&TILEMATRIXSET=...&TILEMATRIX=z&TILEROW=row&TILECOL=col[&TIME=<ISO>]
    <base>/deepearth/wmts/legend/{layer}.png

``time`` on GetCapabilities makes that step the advertised ``<Default>``: clients that
always use the default (GDAL's WMTS driver) read any step that way.

Layers are ``<dataset>.<variable>`` (e.g. ``grid.observation_count``), plus
``<dataset>.rgb`` when the dataset's style has an RGB mapping.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fnmatch
import functools
import io
import math
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyproj
from xcube.constants import LOG
from xcube.core.tile import TileNotFoundException, compute_rgba_tile
from xcube.core.tilingscheme import (
    EARTH_CIRCUMFERENCE_WGS84,
    GEOGRAPHIC_CRS_NAME,
    WEB_MERCATOR_CRS_NAME,
    TilingScheme,
)
from xcube.server.api import Api, ApiContext, ApiHandler, Context

from .cache import ByteLRU

API_NAME = "deepearth-wmts"
URL_PREFIX = "/deepearth/wmts"
WMTS_VERSION = "1.0.0"
TILE_SIZE = 256
STYLE_ID = "default"
PNG = "image/png"
TIME_DIM = "Time"  # the WMTS dimension identifier, also the {Time} template placeholder
TILE_CACHE_BYTES = 64 * 1024 * 1024
MAX_WORKERS = 4
REQUEST_TIMEOUT = 120.0
DEFAULT_KEYWORDS = ("default", "current", "latest", "{time}")

NS_WMTS = "http://www.opengis.net/wmts/1.0"
NS_OWS = "http://www.opengis.net/ows/1.1"
NS_XLINK = "http://www.w3.org/1999/xlink"
NS_XSI = "http://www.w3.org/2001/XMLSchema-instance"
NS_XML = "http://www.w3.org/XML/1998/namespace"
for _prefix, _uri in (("", NS_WMTS), ("ows", NS_OWS), ("xlink", NS_XLINK), ("xsi", NS_XSI)):
    ET.register_namespace(_prefix, _uri)


# -- tile matrix sets ----------------------------------------------------------------------
_HALF_WORLD_M = math.pi * 6378137.0  # Web Mercator half extent


@dataclass(frozen=True)
class TileMatrixSetDef:
    """A tile matrix set of OGC 17-083r2 (quad tree of 256 x 256 tiles)."""

    identifier: str
    title: str
    crs_urn: str
    crs_name: str  # as xcube's TilingScheme / compute_rgba_tile name it
    bbox: tuple[float, float, float, float]  # in crs units, x/y order
    level0_tiles: tuple[int, int]  # matrix width, height at level 0
    meters_per_unit: float
    well_known_scale_set: str | None = None

    @property
    def level0_resolution(self) -> float:
        return (self.bbox[2] - self.bbox[0]) / (self.level0_tiles[0] * TILE_SIZE)

    def resolution(self, level: int) -> float:
        return self.level0_resolution / (1 << level)

    def scale_denominator(self, level: int) -> float:
        return self.resolution(level) * self.meters_per_unit / 0.00028

    def matrix_size(self, level: int) -> tuple[int, int]:
        return self.level0_tiles[0] << level, self.level0_tiles[1] << level


WORLD_CRS84_QUAD = TileMatrixSetDef(
    identifier="WorldCRS84Quad",
    title="CRS84 for the World",
    crs_urn="urn:ogc:def:crs:OGC:1.3:CRS84",
    crs_name=GEOGRAPHIC_CRS_NAME,
    bbox=(-180.0, -90.0, 180.0, 90.0),
    level0_tiles=(2, 1),
    meters_per_unit=EARTH_CIRCUMFERENCE_WGS84 / 360.0,
    well_known_scale_set="urn:ogc:def:wkss:OGC:1.0:GoogleCRS84Quad",
)
WORLD_WEB_MERCATOR_QUAD = TileMatrixSetDef(
    identifier="WorldWebMercatorQuad",
    title="Google Maps Compatible for the World",
    crs_urn="urn:ogc:def:crs:EPSG::3857",
    crs_name=WEB_MERCATOR_CRS_NAME,
    bbox=(-_HALF_WORLD_M, -_HALF_WORLD_M, _HALF_WORLD_M, _HALF_WORLD_M),
    level0_tiles=(1, 1),
    meters_per_unit=1.0,
    well_known_scale_set="urn:ogc:def:wkss:OGC:1.0:GoogleMapsCompatible",
)
TILE_MATRIX_SETS: dict[str, TileMatrixSetDef] = {
    t.identifier: t for t in (WORLD_CRS84_QUAD, WORLD_WEB_MERCATOR_QUAD)
}
_XCUBE_SCHEMES = {
    WORLD_CRS84_QUAD.identifier: TilingScheme.GEOGRAPHIC,
    WORLD_WEB_MERCATOR_QUAD.identifier: TilingScheme.WEB_MERCATOR,
}


# -- errors --------------------------------------------------------------------------------
class OwsError(Exception):
    """An OWS exception report: ``exceptionCode``, ``locator`` (the parameter), HTTP status."""

    def __init__(self, code: str, message: str, locator: str | None = None,
                 status: int = 400):
        super().__init__(message)
        self.code = code
        self.message = message
        self.locator = locator
        self.status = status

    def to_xml(self) -> bytes:
        root = ET.Element(f"{{{NS_OWS}}}ExceptionReport",
                          {"version": "1.1.0", f"{{{NS_XML}}}lang": "en"})
        attrs = {"exceptionCode": self.code}
        if self.locator:
            attrs["locator"] = self.locator
        exc = ET.SubElement(root, f"{{{NS_OWS}}}Exception", attrs)
        ET.SubElement(exc, f"{{{NS_OWS}}}ExceptionText").text = self.message
        return ET.tostring(root, encoding="UTF-8", xml_declaration=True)


def invalid(locator: str, message: str) -> OwsError:
    return OwsError("InvalidParameterValue", message, locator)


def missing(locator: str) -> OwsError:
    return OwsError("MissingParameterValue", f"parameter {locator} is required", locator)


# -- layers --------------------------------------------------------------------------------
@dataclass
class TimeAxis:
    """The time steps of a layer: values, their WMTS labels and [start, end) bounds."""

    values: np.ndarray  # datetime64[ns], ascending
    labels: list[str]
    starts: np.ndarray
    ends: np.ndarray

    @property
    def default_index(self) -> int:
        return len(self.values) - 1

    def resolve(self, text: str | None, locator: str = "TIME") -> int:
        """Index of the step named by ``text``; the default (latest) step when absent."""
        if text is None or not text.strip() or text.strip().lower() in DEFAULT_KEYWORDS:
            return self.default_index
        text = text.strip()
        if text.lower() == "first":
            return 0
        if text in self._label_index:
            return self._label_index[text]
        start_text = text.split("/", 1)[0]
        try:
            ts = pd.Timestamp(start_text)
        except (ValueError, TypeError):
            ts = None
        if ts is None or pd.isna(ts):
            raise invalid(locator, f"{locator}={text!r} is not an ISO 8601 time; "
                                   f"use one of the layer's Time values ({self._hint()}) "
                                   "or 'default'")
        if ts.tzinfo is not None:
            ts = ts.tz_convert("UTC").tz_localize(None)
        t = np.datetime64(ts.to_datetime64(), "ns")
        hit = np.nonzero((self.starts <= t) & (t < self.ends))[0]
        if len(hit):
            return int(hit[-1])
        exact = np.nonzero(self.values == t)[0]
        if len(exact):
            return int(exact[0])
        raise invalid(locator, f"{locator}={text!r} is outside the layer's time steps "
                               f"({self._hint()})")

    @functools.cached_property
    def _label_index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def _hint(self) -> str:
        if len(self.labels) <= 6:
            return ", ".join(self.labels)
        return ", ".join(self.labels[:3]) + ", ..., " + ", ".join(self.labels[-2:])


def time_labels(values: np.ndarray) -> list[str]:
    """Short ISO 8601 labels: dates when every step is at midnight, else UTC instants."""
    idx = pd.DatetimeIndex(values)
    if len(idx) and (idx == idx.normalize()).all():
        labels = [t.strftime("%Y-%m-%d") for t in idx]
    else:
        labels = [t.strftime("%Y-%m-%dT%H:%M:%SZ") for t in idx]
    if len(set(labels)) != len(labels):
        labels = [t.isoformat() + "Z" for t in idx]
    return labels


def make_time_axis(ds, dim: str = "time") -> TimeAxis | None:
    if dim not in ds.coords or ds.coords[dim].ndim != 1 or ds.sizes.get(dim, 0) == 0:
        return None
    values = np.asarray(ds.coords[dim].values)
    if not np.issubdtype(values.dtype, np.datetime64):
        return None
    values = values.astype("datetime64[ns]")
    order = np.argsort(values)
    if not np.array_equal(order, np.arange(len(values))):
        return None  # unordered time: not a WMTS dimension we can serve sensibly
    bounds_name = ds.coords[dim].attrs.get("bounds", f"{dim}_bnds")
    starts = ends = None
    if bounds_name in ds.variables and ds[bounds_name].shape == (len(values), 2):
        b = np.asarray(ds[bounds_name].values)
        if np.issubdtype(b.dtype, np.datetime64):
            starts, ends = b[:, 0].astype("datetime64[ns]"), b[:, 1].astype("datetime64[ns]")
    if starts is None:
        starts = values.copy()
        ends = np.empty_like(values)
        ends[:-1] = values[1:]
        step = values[-1] - values[-2] if len(values) > 1 else np.timedelta64(1, "D")
        ends[-1] = values[-1] + step
    return TimeAxis(values=values, labels=time_labels(values), starts=starts, ends=ends)


@dataclass
class Layer:
    identifier: str
    title: str
    abstract: str
    dataset_id: str
    var_names: tuple[str, ...]  # one name (colour mapped) or three (RGB)
    cmap_name: str | None
    cmap_norm: str | None
    value_ranges: tuple[tuple[float, float], ...]
    wgs84_bbox: tuple[float, float, float, float]
    max_levels: dict[str, int]
    time: TimeAxis | None = None
    units: str | None = None
    bboxes: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)


def _plain(value: Any) -> Any:
    defrost = getattr(value, "defrost", None)
    return defrost() if callable(defrost) else value


def _expand_names(patterns: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    if not patterns:
        return sorted(available)
    out: list[str] = []
    for pattern in patterns:
        name = str(pattern).split("=", 1)[0].strip()  # "x = expr" assignments: name only
        for candidate in available:
            if fnmatch.fnmatchcase(candidate, name) and candidate not in out:
                out.append(candidate)
    return out


def _bbox_in(tms: TileMatrixSetDef, wgs84: tuple[float, float, float, float]):
    if tms.identifier == WORLD_CRS84_QUAD.identifier:
        return wgs84
    t = pyproj.Transformer.from_crs("OGC:CRS84", "EPSG:3857", always_xy=True)
    lat_max = 85.0511287798066
    x0, y0 = t.transform(wgs84[0], max(wgs84[1], -lat_max))
    x1, y1 = t.transform(wgs84[2], min(wgs84[3], lat_max))
    return float(x0), float(y0), float(x1), float(y1)


def _wgs84_bbox(ml_dataset) -> tuple[float, float, float, float]:
    gm = ml_dataset.grid_mapping
    x0, y0, x1, y1 = (float(v) for v in gm.xy_bbox)
    if gm.crs.is_geographic:
        return x0, y0, x1, y1
    t = pyproj.Transformer.from_crs(gm.crs, "OGC:CRS84", always_xy=True)
    xs, ys = t.transform(np.array([x0, x1, x0, x1]), np.array([y0, y0, y1, y1]))
    return float(np.min(xs)), float(np.min(ys)), float(np.max(xs)), float(np.max(ys))


def _servable(var, yx: tuple[str, str], timed: bool) -> bool:
    """A variable with dims (y, x) or (time, y, x): the shapes a WMTS layer can show."""
    if var.ndim < 2 or tuple(var.dims[-2:]) != tuple(yx):
        return False
    extra = tuple(var.dims[:-2])
    return not extra or (extra == ("time",) and timed)


def _warm_indexes(ml_dataset) -> None:
    """Compute the lazily cached properties of every level's coordinate indexes now.

    pandas builds an index's engine and its uniqueness/monotonicity flags on first use and
    that is not thread-safe: two tiles selecting a time at once on a fresh index can fail
    with "Reindexing only valid with uniquely valued Index objects". Done once here, the
    worker threads only read them.
    """
    for level in range(ml_dataset.num_levels):
        ds = ml_dataset.get_dataset(level)
        for index in ds.xindexes.to_pandas_indexes().values():
            if len(index) == 0:
                continue
            _ = index.is_unique, index.is_monotonic_increasing, index.is_monotonic_decreasing
            if index.is_unique:
                index.get_indexer(index[:1], method="nearest")
                index.get_loc(index[0])


def _fmt_range(r: tuple[float, float]) -> str:
    return f"[{r[0]:g}, {r[1]:g}]"


def build_layers(datasets_ctx) -> dict[str, Layer]:
    """The WMTS layers of every gridded dataset of the server config."""
    layers: dict[str, Layer] = {}
    for config in datasets_ctx.get_dataset_configs():
        ds_id = str(config["Identifier"])
        if config.get("Hidden"):
            continue
        try:
            ml_dataset = datasets_ctx.get_ml_dataset(ds_id)
            ds = ml_dataset.base_dataset
            wgs84 = _wgs84_bbox(ml_dataset)
            max_levels = {tid: int(ml_dataset.derive_tiling_scheme(scheme).max_level)
                          for tid, scheme in _XCUBE_SCHEMES.items()}
            _warm_indexes(ml_dataset)
        except Exception as exc:  # noqa: BLE001 - one bad dataset must not hide the others
            LOG.warning(f"DeepEarth WMTS: dataset {ds_id!r} left out: "
                        f"{type(exc).__name__}: {exc}")
            continue
        x_name, y_name = ml_dataset.grid_mapping.xy_dim_names
        ds_title = str(config.get("Title") or ds.attrs.get("title") or ds_id)
        time_axis = make_time_axis(ds)
        bboxes = {tid: _bbox_in(tms, wgs84) for tid, tms in TILE_MATRIX_SETS.items()}

        def spatial(name: str, ds=ds, yx=(y_name, x_name), timed=time_axis is not None):
            return _servable(ds[name], yx, timed)

        names = [n for n in _expand_names(_plain(config.get("Variables")), list(ds.data_vars))
                 if spatial(n)]
        for name in names:
            var = ds[name]
            cmap_name, cmap_norm, value_range = datasets_ctx.get_color_mapping(ds_id, name)
            vr = (float(value_range[0]), float(value_range[1]))
            long_name = str(var.attrs.get("long_name") or name)
            units = var.attrs.get("units")
            abstract = (f"{long_name} ({name}"
                        + (f", units {units}" if units not in (None, "", "1") else "")
                        + f") of {ds_title}; colour map {cmap_name}, value range "
                        + f"{_fmt_range(vr)}" + (f", {cmap_norm}" if cmap_norm else "")
                        + "; transparent where there is no data")
            layers[f"{ds_id}.{name}"] = Layer(
                identifier=f"{ds_id}.{name}", title=f"{long_name[:1].upper()}{long_name[1:]} ({ds_id})",
                abstract=abstract, dataset_id=ds_id, var_names=(name,),
                cmap_name=cmap_name, cmap_norm=cmap_norm, value_ranges=(vr,),
                wgs84_bbox=wgs84, max_levels=max_levels,
                time=time_axis if "time" in var.dims else None,
                units=None if units is None else str(units), bboxes=bboxes)
        rgb_names, rgb_ranges = datasets_ctx.get_rgb_color_mapping(ds_id)
        if all(rgb_names) and all(n in ds.data_vars and spatial(n) for n in rgb_names):
            has_time = any("time" in ds[n].dims for n in rgb_names)
            ranges = tuple((float(a), float(b)) for a, b in rgb_ranges)
            layers[f"{ds_id}.rgb"] = Layer(
                identifier=f"{ds_id}.rgb", title=f"RGB composite ({ds_id})",
                abstract=(f"RGB composite of {ds_title}: red {rgb_names[0]} "
                          f"{_fmt_range(ranges[0])}, green {rgb_names[1]} "
                          f"{_fmt_range(ranges[1])}, blue {rgb_names[2]} "
                          f"{_fmt_range(ranges[2])}; transparent where there is no data"),
                dataset_id=ds_id, var_names=tuple(rgb_names), cmap_name=None,
                cmap_norm="lin", value_ranges=ranges, wgs84_bbox=wgs84,
                max_levels=max_levels, time=time_axis if has_time else None,
                bboxes=bboxes)
    return layers


# -- capabilities --------------------------------------------------------------------------
def _ows(tag: str) -> str:
    return f"{{{NS_OWS}}}{tag}"


def _wmts(tag: str) -> str:
    return f"{{{NS_WMTS}}}{tag}"


def _sub(parent: ET.Element, tag: str, text: Any = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, {(f"{{{NS_XLINK}}}href" if k == "xlink__href" else k): v
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
        f"{{{NS_XSI}}}schemaLocation": f"{NS_WMTS} http://schemas.opengis.net/wmts/1.0/"
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


# -- tiles ---------------------------------------------------------------------------------
def _png(rgba: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


TRANSPARENT_PNG = _png(np.zeros((TILE_SIZE, TILE_SIZE, 4), dtype=np.uint8))


@dataclass(frozen=True)
class TileRequest:
    layer: Layer
    tms: TileMatrixSetDef
    level: int
    row: int
    col: int
    time_index: int | None
    time_given: bool

    @property
    def key(self) -> tuple:
        return (self.layer.identifier, self.tms.identifier, self.level, self.row, self.col,
                self.time_index)


def parse_tile_request(layers: Mapping[str, Layer], layer_id: str | None,
                       style: str | None, tms_id: str | None, level: str | None,
                       row: str | None, col: str | None, time: str | None,
                       fmt: str | None = PNG, names: Mapping[str, str] | None = None
                       ) -> TileRequest:
    """Validate a GetTile request (REST path segments or KVP parameters)."""
    n = {"layer": "LAYER", "style": "STYLE", "tms": "TILEMATRIXSET", "level": "TILEMATRIX",
         "row": "TILEROW", "col": "TILECOL", "time": "TIME", "format": "FORMAT",
         **(names or {})}
    for key, value in (("layer", layer_id), ("tms", tms_id), ("level", level),
                       ("row", row), ("col", col)):
        if value is None or value == "":
            raise missing(n[key])
    layer = layers.get(layer_id)
    if layer is None:
        raise invalid(n["layer"], f"unknown layer {layer_id!r}; layers: "
                                  + ", ".join(layers))
    if style not in (None, "", "{Style}") and style.lower() != STYLE_ID:
        raise invalid(n["style"], f"unknown style {style!r}; the layer has style "
                                  f"{STYLE_ID!r}")
    if fmt is not None and fmt.lower() not in (PNG, "png"):
        raise invalid(n["format"], f"format {fmt!r} is not offered; use {PNG}")
    tms = TILE_MATRIX_SETS.get(tms_id)
    if tms is None:
        raise invalid(n["tms"], f"unknown tile matrix set {tms_id!r}; use one of "
                                + ", ".join(TILE_MATRIX_SETS))
    max_level = layer.max_levels[tms.identifier]
    z = _int(level, n["level"])
    if not 0 <= z <= max_level:
        raise invalid(n["level"], f"tile matrix {level!r} is not in {tms.identifier} for "
                                  f"this layer; use 0 to {max_level}")
    y, x = _int(row, n["row"]), _int(col, n["col"])
    width, height = tms.matrix_size(z)
    if not (0 <= y < height and 0 <= x < width):
        raise OwsError("TileOutOfRange",
                       f"tile row {y}, column {x} is outside tile matrix {z} of "
                       f"{tms.identifier} (rows 0..{height - 1}, columns 0..{width - 1})",
                       n["row"] if not 0 <= y < height else n["col"])
    t_index = None
    time_given = time is not None and time.strip().lower() not in ("", *DEFAULT_KEYWORDS)
    if layer.time is not None:
        t_index = layer.time.resolve(time, n["time"])
    return TileRequest(layer, tms, z, y, x, t_index, time_given)


def _int(value: str, locator: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise invalid(locator, f"{locator}={value!r} is not an integer") from None


def render_tile(datasets_ctx, req: TileRequest) -> bytes:
    """The PNG of one tile: xcube's ``compute_rgba_tile`` with the layer's colours and time."""
    layer = req.layer
    labels = None
    if req.time_index is not None:
        labels = {"time": layer.time.values[req.time_index]}
    ml_dataset = datasets_ctx.get_ml_dataset(layer.dataset_id)
    try:
        return compute_rgba_tile(
            ml_dataset, layer.var_names, req.col, req.row, req.level,
            datasets_ctx.colormap_registry, crs_name=req.tms.crs_name, tile_size=TILE_SIZE,
            cmap_name=layer.cmap_name, cmap_norm=layer.cmap_norm,
            value_ranges=layer.value_ranges, non_spatial_labels=labels, format="png")
    except TileNotFoundException as exc:
        LOG.debug(f"DeepEarth WMTS: empty tile {req.key}: {exc}")
        return TRANSPARENT_PNG


def render_legend(layer: Layer, colormap_registry) -> bytes:
    """A small colour bar PNG (value range and units) for the layer's LegendURL."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colorbar import ColorbarBase
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2.6, 0.62), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.05, 0.55, 0.9, 0.3))
    if len(layer.var_names) == 1:
        cmap, _ = colormap_registry.get_cmap(layer.cmap_name or "viridis")
        lo, hi = layer.value_ranges[0]
        ColorbarBase(ax, cmap=cmap, norm=Normalize(lo, hi), orientation="horizontal")
        ax.set_xticks([lo, hi])
        ax.tick_params(labelsize=7, length=2, pad=1)
        if layer.units and layer.units != "1":
            ax.set_title(layer.units, fontsize=7, pad=2)
    else:
        ramp = np.linspace(0, 1, 128)
        img = np.zeros((3, 128, 3))
        for i in range(3):
            img[i, :, i] = ramp
        ax.imshow(img, aspect="auto")
        ax.set_yticks([0, 1, 2], ["R", "G", "B"], fontsize=6)
        ax.set_xticks([])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", transparent=True)
    return buf.getvalue()


# -- API and context -----------------------------------------------------------------------
class WmtsContext(ApiContext):
    """Layers built once from xcube's datasets context; a tile cache and worker threads."""

    def __init__(self, server_ctx: Context):
        super().__init__(server_ctx)
        self._layers: dict[str, Layer] | None = None
        self._lock = threading.Lock()
        self._capabilities: dict[tuple, bytes] = {}  # (urls, time) -> XML
        self.tile_cache = ByteLRU(TILE_CACHE_BYTES)
        self.executor = concurrent.futures.ThreadPoolExecutor(
            MAX_WORKERS, thread_name_prefix="deepearth-wmts")

    def on_dispose(self):
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.tile_cache.clear()

    @property
    def datasets_ctx(self):
        # Looked up when used: this API declares no required APIs so that it is ordered
        # before the "deepearth" API, whose /deepearth/{*rest} route would shadow ours.
        try:
            ctx = self.server_ctx.get_api_ctx("datasets")
        except Exception:  # noqa: BLE001
            ctx = None
        if ctx is None:
            raise OwsError("NoApplicableCode", "xcube's datasets API is not enabled on this "
                                               "server", status=503)
        return ctx

    async def get_layers(self) -> dict[str, Layer]:
        return self._layers if self._layers is not None else await self.run(self.layers)

    def layers(self) -> dict[str, Layer]:
        if self._layers is None:
            with self._lock:
                if self._layers is None:
                    self._layers = build_layers(self.datasets_ctx)
                    LOG.info(f"DeepEarth WMTS: {len(self._layers)} layers")
        return self._layers

    async def run(self, fn, *args):
        fut = self.run_in_executor(self.executor, fn, *args)
        try:
            return await asyncio.wait_for(fut, REQUEST_TIMEOUT)
        except TimeoutError:
            raise OwsError("NoApplicableCode", f"the request took longer than "
                                               f"{REQUEST_TIMEOUT:g} s", status=503) from None

    # Work done on the executor threads -------------------------------------------------
    def capabilities(self, urls: ServiceUrls, time: str | None) -> bytes:
        time = time.strip() if time and time.strip() else None
        key = (urls, time)
        xml = self._capabilities.get(key)
        if xml is None:
            layers = self.layers()
            pinned = None
            if time is not None:
                pinned = {lid: layer.time.resolve(time) for lid, layer in layers.items()
                          if layer.time is not None}
            provider = _plain(self.config.get("ServiceProvider")) or {}
            xml = capabilities_xml(layers, urls, pinned, provider)
            if len(self._capabilities) >= 64:  # base URLs x pinned times: keep it small
                self._capabilities.clear()
            self._capabilities[key] = xml
        return xml

    def tile(self, req: TileRequest) -> bytes:
        return self.tile_cache.get_or_compute(
            req.key, lambda: render_tile(self.datasets_ctx, req))

    def legend(self, layer_id: str) -> bytes:
        layer = self.layers().get(layer_id)
        if layer is None:
            raise OwsError("InvalidParameterValue", f"unknown layer {layer_id!r}", "layer",
                           status=404)
        return self.tile_cache.get_or_compute(
            ("legend", layer_id),
            lambda: render_legend(layer, self.datasets_ctx.colormap_registry))


api = Api(
    API_NAME,
    version=WMTS_VERSION,
    description="OGC WMTS 1.0.0 for the DeepEarth grid layers: configured colour ranges, "
                "a Time dimension (REST {Time} and KVP TIME), WorldCRS84Quad and "
                "WorldWebMercatorQuad",
    create_ctx=WmtsContext,
)

_KVP_PARAMS = [
    {"name": name, "in": "query", "required": False, "description": desc,
     "schema": {"type": "string"}}
    for name, desc in (
        ("SERVICE", "WMTS"),
        ("REQUEST", "GetCapabilities or GetTile"),
        ("VERSION", "1.0.0"),
        ("LAYER", "layer identifier <dataset>.<variable>"),
        ("STYLE", "default"),
        ("FORMAT", "image/png"),
        ("TILEMATRIXSET", "WorldCRS84Quad or WorldWebMercatorQuad"),
        ("TILEMATRIX", "zoom level"),
        ("TILEROW", "tile row"),
        ("TILECOL", "tile column"),
        ("TIME", "ISO 8601 time inside a step; absent: the advertised default (latest). On "
                 "GetCapabilities: the step to advertise as Default"),
    )
]


class _WmtsHandler(ApiHandler[WmtsContext]):
    """Writes OWS exception reports for every error; never a traceback."""

    def _finish(self, status: int, body: bytes, content_type: str,
                headers: Mapping[str, str] | None = None):
        self.response.set_status(status)
        self.response.set_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.response.set_header(k, v)
        return self.response.finish(body)

    async def _guard(self, work) -> None:
        try:
            await work()
        except OwsError as err:
            await self._finish(err.status, err.to_xml(), "application/xml")
        except Exception:  # noqa: BLE001 - logged with a reference, never sent to the client
            ref = uuid.uuid4().hex[:12]
            LOG.exception(f"DeepEarth WMTS: internal error {ref} for {self._path()}")
            err = OwsError("NoApplicableCode",
                           f"internal error (reference {ref}; see the server log)", status=500)
            await self._finish(500, err.to_xml(), "application/xml")

    def _path(self) -> str:
        try:
            return self.request.url
        except Exception:  # noqa: BLE001
            return "?"

    def _query(self) -> dict[str, str]:
        """Query parameters with lower-case names (WMTS KVP names are case-insensitive)."""
        out: dict[str, str] = {}
        for name, values in self.request.query.items():
            key = name.lower()
            if key in out or len(values) > 1:
                raise invalid(name.upper(), f"parameter {name.upper()} is given more than "
                                            "once")
            out[key] = values[0]
        return out

    def _urls(self) -> ServiceUrls:
        def url(path: str) -> str:
            return self.request.url_for_path(f"{URL_PREFIX}{path}".lstrip("/"), reverse=True)

        return ServiceUrls(rest_capabilities=url(f"/{WMTS_VERSION}/WMTSCapabilities.xml"),
                           rest_base=url(f"/{WMTS_VERSION}/"), kvp=url("/kvp") + "?",
                           legend_base=url("/legend/"))

    async def _capabilities(self, time: str | None) -> None:
        xml = await self.ctx.run(self.ctx.capabilities, self._urls(), time)
        await self._finish(200, xml, "application/xml",
                           {"Cache-Control": "public, max-age=300"})

    async def _tile(self, req: TileRequest) -> None:
        png = await self.ctx.run(self.ctx.tile, req)
        age = 3600 if req.time_given or req.time_index is None else 300
        await self._finish(200, png, PNG, {"Cache-Control": f"public, max-age={age}"})

    async def _not_allowed(self, *args, **kwargs):
        err = OwsError("OperationNotSupported", "only GET is supported", status=405)
        await self._finish(405, err.to_xml(), "application/xml", {"Allow": "GET, OPTIONS"})

    head = post = put = delete = _not_allowed


@api.route(URL_PREFIX)
class WmtsIndexHandler(_WmtsHandler):
    @api.operation(operation_id="getDeepEarthWmtsIndex",
                   summary="The WMTS capabilities document (same as the REST one)")
    async def get(self):
        async def work():
            await self._capabilities(self._query().get("time"))
        await self._guard(work)


@api.route(URL_PREFIX + f"/{WMTS_VERSION}/WMTSCapabilities.xml")
class WmtsCapabilitiesHandler(_WmtsHandler):
    @api.operation(operation_id="getDeepEarthWmtsCapabilities",
                   summary="WMTS capabilities (RESTful); ?time= sets the advertised default "
                           "time", parameters=[_KVP_PARAMS[-1]])
    async def get(self):
        async def work():
            await self._capabilities(self._query().get("time"))
        await self._guard(work)


@api.route(URL_PREFIX + "/kvp")
class WmtsKvpHandler(_WmtsHandler):
    @api.operation(operation_id="invokeDeepEarthWmtsKvp",
                   summary="WMTS by key-value pairs: GetCapabilities, GetTile",
                   parameters=_KVP_PARAMS)
    async def get(self):
        async def work():
            q = self._query()
            if not q:
                await self._capabilities(None)
                return
            service = q.get("service")
            if service is not None and service.upper() != "WMTS":
                raise invalid("SERVICE", f"SERVICE={service!r}; this is a WMTS (SERVICE=WMTS)")
            request = q.get("request")
            if not request:
                raise missing("REQUEST")
            req = request.lower()
            if req == "getcapabilities":
                accept = q.get("acceptversions")
                if accept and WMTS_VERSION not in [v.strip() for v in accept.split(",")]:
                    raise OwsError("VersionNegotiationFailed",
                                   f"only version {WMTS_VERSION} is offered", "ACCEPTVERSIONS")
                await self._capabilities(q.get("time"))
            elif req == "gettile":
                version = q.get("version")
                if version is not None and version != WMTS_VERSION:
                    raise invalid("VERSION", f"VERSION={version!r}; use {WMTS_VERSION}")
                layers = await self.ctx.get_layers()
                tile = parse_tile_request(
                    layers, q.get("layer"), q.get("style"), q.get("tilematrixset"),
                    q.get("tilematrix"), q.get("tilerow"), q.get("tilecol"), q.get("time"),
                    q.get("format"))
                await self._tile(tile)
            elif req == "getfeatureinfo":
                raise OwsError("OperationNotSupported", "GetFeatureInfo is not offered",
                               "REQUEST", status=501)
            else:
                raise invalid("REQUEST", f"REQUEST={request!r}; use GetCapabilities or "
                                         "GetTile")
        await self._guard(work)


@api.route(URL_PREFIX + "/legend/{layer}.png")
class WmtsLegendHandler(_WmtsHandler):
    @api.operation(operation_id="getDeepEarthWmtsLegend",
                   summary="Colour bar of a WMTS layer (its LegendURL)",
                   parameters=[{"name": "layer", "in": "path", "required": True,
                                "description": "layer identifier, e.g. grid.observation_count",
                                "schema": {"type": "string"}}])
    async def get(self, layer: str):
        async def work():
            png = await self.ctx.run(self.ctx.legend, layer)
            await self._finish(200, png, PNG, {"Cache-Control": "public, max-age=3600"})
        await self._guard(work)


_REST_TEMPLATE = (f"{URL_PREFIX}/{WMTS_VERSION}/<layer>/default/<time>/<TileMatrixSet>/"
                  "<TileMatrix>/<TileRow>/<TileCol>.png")


# Registered after the capabilities route, which it would otherwise match.
@api.route(URL_PREFIX + f"/{WMTS_VERSION}/{{*path}}")
class WmtsRestTileHandler(_WmtsHandler):
    @api.operation(operation_id="getDeepEarthWmtsTile",
                   summary="WMTS tile (RESTful): {layer}/{style}/{Time}/{TileMatrixSet}/"
                           "{TileMatrix}/{TileRow}/{TileCol}.png; Time 'default' is the "
                           "advertised default (latest)",
                   parameters=[{"name": "*path", "in": "path", "required": True,
                                "description": "{layer}/{style}/{Time}/{TileMatrixSet}/"
                                               "{TileMatrix}/{TileRow}/{TileCol}.png",
                                "schema": {"type": "string"}}])
    async def get(self, path: str = ""):
        async def work():
            parts = [p for p in path.split("/") if p]
            if len(parts) not in (6, 7) or not parts[-1].lower().endswith(".png"):
                raise OwsError("InvalidParameterValue",
                               f"no WMTS resource at {URL_PREFIX}/{WMTS_VERSION}/{path}; tiles "
                               f"are at {_REST_TEMPLATE}", None, status=404)
            names = {"layer": "layer", "style": "style", "tms": "TileMatrixSet",
                     "level": "TileMatrix", "row": "TileRow", "col": "TileCol",
                     "time": "Time"}
            if len(parts) == 7:
                layer_id, style, time, tms_id, z, y, xpng = parts
            else:
                layer_id, style, tms_id, z, y, xpng = parts
                time = None
            layers = await self.ctx.get_layers()
            tile = parse_tile_request(layers, layer_id, style, tms_id, z, y, xpng[:-4], time,
                                      PNG, names)
            await self._tile(tile)
        await self._guard(work)


__all__ = ["api", "API_NAME", "URL_PREFIX", "OwsError", "TimeAxis", "build_layers",
           "capabilities_xml", "parse_tile_request", "render_tile", "TILE_MATRIX_SETS"]
