"""The WMS layers: one per variable of each grid dataset (plus its RGB composite), each
with the geometry of every pyramid level, its time axis and its colours.

Colours come from the grid-variable registry (:mod:`cube_gen.grid_variables`) and the
colour range fitted at build time (the variable's ``color_value_min``/``color_value_max``
attributes): the same colour stops the server config gives xcube (viewer, WMTS).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import xarray as xr

from cube_gen import grid_variables as G

from ..wmts.layers import TimeAxis, make_time_axis


@dataclass(frozen=True)
class LevelGeometry:
    """A level's regular grid: cell size, north-west corner, rows and columns."""

    resolution: float
    north: float
    west: float
    ny: int
    nx: int


@dataclass
class WmsLayer:
    name: str  # <dataset>.<variable> or <dataset>.rgb
    title: str
    abstract: str
    dataset_id: str
    var_names: tuple[str, ...]
    levels: list[LevelGeometry]
    bbox: tuple[float, float, float, float]  # west, south, east, north (degrees)
    time: TimeAxis | None
    units: str = "1"
    legend_title: str = ""
    stops: list[tuple[float, str]] | None = None  # one variable: colour stops in data units
    ranges: tuple[tuple[float, float], ...] = ()  # RGB: value range of each channel
    info_vars: tuple[str, ...] = field(default_factory=tuple)  # GetFeatureInfo values

    @property
    def timed(self) -> bool:
        """Whether the layer has a TIME dimension (more than one step)."""
        return self.time is not None and len(self.time.values) > 1


def geometry(ds: xr.Dataset) -> LevelGeometry:
    lat, lon = ds["lat"].values, ds["lon"].values
    res = float(abs(lon[1] - lon[0])) if len(lon) > 1 else float(ds.attrs.get("spatial_res"))
    north = float(lat.max() + res / 2)
    west = float(lon.min() - res / 2)
    return LevelGeometry(res, north, west, len(lat), len(lon))


def _timed_ok(var: xr.DataArray) -> bool:
    return tuple(var.dims) == ("time", "lat", "lon")


def dataset_layers(dataset_id: str, title: str, levels: Sequence[xr.Dataset],
                   variables: Iterable[str] | None = None) -> list[WmsLayer]:
    """The layers of one grid dataset given its level datasets (level 0 first)."""
    ds0 = levels[0]
    geoms = [geometry(ds) for ds in levels]
    g0 = geoms[0]
    bbox = (g0.west, g0.north - g0.ny * g0.resolution, g0.west + g0.nx * g0.resolution,
            g0.north)
    data_bbox = ds0.attrs.get("data_bbox")  # the grid is padded to whole coarsest cells
    if data_bbox is not None and len(data_bbox) == 4:
        bbox = tuple(float(v) for v in data_bbox)
    axis = make_time_axis(ds0)
    names = [n for n in (variables or ds0.data_vars) if n in ds0.data_vars
             and _timed_ok(ds0[n])]
    info = tuple(names)
    out = []
    for name in names:
        attrs = dict(ds0[name].attrs)
        var = G.lookup(name, attrs)
        if var is None or var.composite:
            continue
        vmin = float(attrs.get("color_value_min", var.color_range.vmin))
        vmax = float(attrs.get("color_value_max", var.color_range.vmax))
        stops = G.color_stops(var, vmin, vmax)
        note = {"log": "logarithmic colour scale", "lin": "linear colour scale"}[
            var.color_range.norm]
        abstract = (f"{var.long_name} ({name}; units {var.units}) of {title}: {note} from "
                    f"{vmin:g} to {vmax:g}; {var.aggregation}."
                    + (f" {attrs['comment']}." if attrs.get("comment") else "")
                    + " Transparent where there is no data.")
        out.append(WmsLayer(f"{dataset_id}.{name}", f"{var.long_name[:1].upper()}"
                            f"{var.long_name[1:]} ({title})", abstract, dataset_id, (name,),
                            geoms, bbox, axis, var.units, var.legend_title, stops=stops,
                            info_vars=info))
    if all(n in names for n in G.RGB_COMPOSITE):
        out.append(WmsLayer(f"{dataset_id}.rgb", f"Vision embedding RGB composite ({title})",
                            f"Red, green, blue: principal components 1-3 of the pooled vision "
                            f"embeddings, each scaled to [0, 1], cell mean, of {title}; "
                            "transparent where there is no embedding.", dataset_id,
                            G.RGB_COMPOSITE, geoms, bbox, axis, "1",
                            "Vision embedding PC1-3 as R, G, B [0, 1]",
                            ranges=((0.0, 1.0),) * 3, info_vars=info))
    return out


def index_layers(layers: Iterable[WmsLayer]) -> dict[str, WmsLayer]:
    return {layer.name: layer for layer in layers}


__all__ = ["LevelGeometry", "WmsLayer", "dataset_layers", "geometry", "index_layers"]
