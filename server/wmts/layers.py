"""The WMTS layers: one per servable variable of each gridded dataset (plus its RGB
composite), with the time axis of its steps.

Layers are ``<dataset>.<variable>`` (e.g. ``grid.observation_count``), plus
``<dataset>.rgb`` when the dataset's style has an RGB mapping. Colours follow the config's
``Styles``/``ColorMappings`` (else the variable's ``color_bar_name``/``color_value_min``/
``color_value_max`` attributes), the same as in the viewer.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyproj
from xcube.constants import LOG

from ..common.datasets import warm_indexes
from ..common.ows import invalid
from ..config import plain
from .tilematrixsets import TILE_MATRIX_SETS, WORLD_CRS84_QUAD, XCUBE_SCHEMES, TileMatrixSetDef

DEFAULT_KEYWORDS = ("default", "current", "latest", "{time}")


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


PIXELS_PER_CELL = 4  # at the deepest tile matrix a finest grid cell spans >= this many pixels
_M_PER_DEGREE = 111319.49079327357


def deep_enough(tms: TileMatrixSetDef, ml_dataset, xcube_max: int) -> int:
    """The deepest tile matrix of a layer: xcube's, or deeper until one cell of the finest
    level spans ``PIXELS_PER_CELL`` tile pixels (so cells render as squares, not slivers)."""
    gm = ml_dataset.grid_mapping
    res = float(min(gm.xy_res))
    if not gm.crs.is_geographic:
        res /= _M_PER_DEGREE
    level = xcube_max
    while level < 24:
        pixel = tms.resolution(level)
        if tms.meters_per_unit == 1.0:  # metres (Web Mercator): at the equator, the coarsest
            pixel /= _M_PER_DEGREE
        if res / pixel >= PIXELS_PER_CELL:
            break
        level += 1
    return level


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
            max_levels = {tid: deep_enough(TILE_MATRIX_SETS[tid], ml_dataset, int(
                ml_dataset.derive_tiling_scheme(scheme).max_level))
                          for tid, scheme in XCUBE_SCHEMES.items()}
            warm_indexes(ml_dataset)
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

        names = [n for n in _expand_names(plain(config.get("Variables")), list(ds.data_vars))
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
