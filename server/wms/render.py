"""GetMap, GetFeatureInfo and GetLegendGraphic of the WMS, as pure functions.

A map is sampled, not resampled: every output pixel takes the value of the grid cell under
its centre, at the pyramid level whose cells are closest to (and not smaller than) the
pixels, so colours are exact data colours. EPSG:4326 and EPSG:3857 are separable in
longitude and latitude, so a map is one fancy-indexing read of a level's time slice.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cube_gen import grid_variables as G

from .errors import WmsError
from .layers import LevelGeometry, WmsLayer

EARTH_RADIUS = 6378137.0
MAX_SIZE = 4096
CRS_NAMES = ("EPSG:4326", "EPSG:3857", "CRS:84")
_CRS_ALIASES = {"EPSG:4326": "EPSG:4326", "EPSG:3857": "EPSG:3857", "EPSG:900913": "EPSG:3857",
                "EPSG:102100": "EPSG:3857", "CRS:84": "CRS:84", "OGC:CRS84": "CRS:84"}

# reader(dataset_id, level, variable, time_index) -> 2-D float array (lat, lon)
Reader = Callable[[str, int, str, int], np.ndarray]


@dataclass(frozen=True)
class MapView:
    """Where a map's pixel centres are, in degrees (separable)."""

    crs: str
    bbox: tuple[float, float, float, float]  # in the CRS's x/y order (lon/lat or metres)
    width: int
    height: int

    @property
    def lon(self) -> np.ndarray:
        x0, _, x1, _ = self.bbox
        x = x0 + (np.arange(self.width) + 0.5) * (x1 - x0) / self.width
        return np.degrees(x / EARTH_RADIUS) if self.crs == "EPSG:3857" else x

    @property
    def lat(self) -> np.ndarray:
        _, y0, _, y1 = self.bbox
        y = y1 - (np.arange(self.height) + 0.5) * (y1 - y0) / self.height
        if self.crs == "EPSG:3857":
            return np.degrees(2 * np.arctan(np.exp(y / EARTH_RADIUS)) - math.pi / 2)
        return y

    def lonlat_of_pixel(self, i: int, j: int) -> tuple[float, float]:
        return float(self.lon[i]), float(self.lat[j])

    def degrees_per_pixel(self) -> float:
        lon = self.lon
        if len(lon) > 1:
            return float(abs(lon[-1] - lon[0]) / (len(lon) - 1))
        x0, _, x1, _ = self.bbox
        span = x1 - x0
        return float(np.degrees(span / EARTH_RADIUS) if self.crs == "EPSG:3857" else span)


def parse_crs(text: str | None) -> str:
    if not text:
        raise WmsError("MissingParameterValue", "parameter CRS is required", "CRS")
    crs = _CRS_ALIASES.get(text.strip().upper())
    if crs is None:
        raise WmsError("InvalidCRS", f"CRS={text!r} is not offered; use one of "
                                     f"{', '.join(CRS_NAMES)}", "CRS")
    return crs


def parse_view(crs_text: str | None, bbox_text: str | None, width: str | None,
               height: str | None) -> MapView:
    """The map's view from CRS, BBOX (WMS 1.3.0 axis order: lat/lon for EPSG:4326), WIDTH,
    HEIGHT."""
    crs = parse_crs(crs_text)
    if not bbox_text:
        raise WmsError("MissingParameterValue", "parameter BBOX is required", "BBOX")
    try:
        values = [float(v) for v in bbox_text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise WmsError("InvalidParameterValue", f"BBOX={bbox_text!r}: expected four numbers "
                                                "minx,miny,maxx,maxy", "BBOX")
    if crs == "EPSG:4326":  # WMS 1.3.0: axis order of EPSG:4326 is latitude, longitude
        s, w, n, e = values
        bbox = (w, s, e, n)
    else:
        bbox = tuple(values)
    if not (bbox[0] < bbox[2] and bbox[1] < bbox[3]):
        raise WmsError("InvalidParameterValue", f"BBOX={bbox_text!r}: minimum must be below "
                                                "maximum on both axes", "BBOX")
    if crs != "EPSG:3857" and not (-180 <= bbox[0] and bbox[2] <= 180 and -90 <= bbox[1]
                                   and bbox[3] <= 90):
        raise WmsError("InvalidParameterValue", f"BBOX={bbox_text!r} is outside the "
                                                f"{crs} extent", "BBOX")
    sizes = []
    for name, text in (("WIDTH", width), ("HEIGHT", height)):
        try:
            n = int(str(text))
        except (TypeError, ValueError):
            raise WmsError("MissingParameterValue" if text is None else "InvalidParameterValue",
                           f"{name} must be an integer in [1, {MAX_SIZE}], got {text!r}",
                           name) from None
        if not 1 <= n <= MAX_SIZE:
            raise WmsError("InvalidParameterValue",
                           f"{name} must be an integer in [1, {MAX_SIZE}], got {n}", name)
        sizes.append(n)
    return MapView(crs, bbox, sizes[0], sizes[1])  # type: ignore[arg-type]


def pick_level(levels: Sequence[LevelGeometry], degrees_per_pixel: float) -> int:
    """The coarsest level whose cells are not larger than a pixel (level 0 when zoomed in)."""
    best = 0
    for i, g in enumerate(levels):
        if g.resolution <= degrees_per_pixel * 1.0001:
            best = i
    return best


def _indices(g: LevelGeometry, lon: np.ndarray, lat: np.ndarray):
    ix = np.floor((lon - g.west) / g.resolution).astype(np.int64)
    iy = np.floor((g.north - lat) / g.resolution).astype(np.int64)
    okx = (ix >= 0) & (ix < g.nx)
    oky = (iy >= 0) & (iy < g.ny)
    return np.clip(ix, 0, g.nx - 1), okx, np.clip(iy, 0, g.ny - 1), oky


def sample(layer: WmsLayer, reader: Reader, view: MapView, time_index: int,
           level: int | None = None) -> list[np.ndarray]:
    """The layer's values under each pixel centre, one (height, width) array per variable
    (NaN outside the data)."""
    lv = pick_level(layer.levels, view.degrees_per_pixel()) if level is None else level
    g = layer.levels[lv]
    ix, okx, iy, oky = _indices(g, view.lon, view.lat)
    mask = oky[:, None] & okx[None, :]
    out = []
    for name in layer.var_names:
        data = np.asarray(reader(layer.dataset_id, lv, name, time_index), np.float32)
        v = data[np.ix_(iy, ix)]
        out.append(np.where(mask, v, np.nan))
    return out


def colorize(layer: WmsLayer, values: list[np.ndarray]) -> np.ndarray:
    """RGBA uint8 (height, width, 4) of sampled values in the layer's colours."""
    if layer.stops is not None:
        cmap, norm = G.colormap(layer.stops)
        v = values[0]
        rgba = cmap(norm(np.ma.masked_invalid(v)), bytes=True)
        rgba[~np.isfinite(v)] = 0
        return rgba
    h, w = values[0].shape
    rgba = np.zeros((h, w, 4), np.uint8)
    finite = np.ones((h, w), bool)
    for i, (v, (lo, hi)) in enumerate(zip(values, layer.ranges, strict=True)):
        finite &= np.isfinite(v)
        rgba[..., i] = (np.clip((np.nan_to_num(v) - lo) / ((hi - lo) or 1.0), 0, 1)
                        * 255).astype(np.uint8)
    rgba[..., 3] = np.where(finite, 255, 0)
    return rgba


def compose(images: list[np.ndarray], background: tuple[int, int, int] | None) -> np.ndarray:
    """Alpha-composite RGBA images in order (first at the bottom) over the background
    (None: transparent)."""
    h, w, _ = images[0].shape
    acc = np.zeros((h, w, 4), np.float64)
    if background is not None:
        acc[..., :3] = np.array(background, np.float64) / 255
        acc[..., 3] = 1.0
    for img in images:
        src = img.astype(np.float64) / 255
        a = src[..., 3:4]
        out_a = a + acc[..., 3:4] * (1 - a)
        safe = np.where(out_a > 0, out_a, 1)
        acc[..., :3] = (src[..., :3] * a + acc[..., :3] * acc[..., 3:4] * (1 - a)) / safe
        acc[..., 3:4] = out_a
    return np.round(acc * 255).astype(np.uint8)


def png(rgba: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def render_map(layers: Sequence[WmsLayer], time_indices: Sequence[int], reader: Reader,
               view: MapView, transparent: bool = True,
               background: tuple[int, int, int] = (255, 255, 255)) -> bytes:
    """The GetMap PNG of one or more layers (drawn in order)."""
    images = [colorize(layer, sample(layer, reader, view, t))
              for layer, t in zip(layers, time_indices, strict=True)]
    return png(compose(images, None if transparent else background))


# -- GetFeatureInfo ------------------------------------------------------------------------
def feature_info(layer: WmsLayer, reader: Reader, view: MapView, time_index: int, i: int,
                 j: int) -> dict | None:
    """The values of the cell under pixel (i, j) of the map: every variable of the layer's
    dataset at the level the map shows, with the cell's bounds; None outside the data."""
    if not (0 <= i < view.width and 0 <= j < view.height):
        raise WmsError("InvalidPoint", f"pixel ({i}, {j}) is outside the {view.width} x "
                                       f"{view.height} map", "I")
    lon, lat = view.lonlat_of_pixel(i, j)
    lv = pick_level(layer.levels, view.degrees_per_pixel())
    g = layer.levels[lv]
    ix = int(math.floor((lon - g.west) / g.resolution))
    iy = int(math.floor((g.north - lat) / g.resolution))
    if not (0 <= ix < g.nx and 0 <= iy < g.ny):
        return None
    values: dict[str, float | None] = {}
    for name in layer.info_vars:
        v = float(reader(layer.dataset_id, lv, name, time_index)[iy, ix])
        if layer.dataset_id.endswith("species") and v == 0:
            continue  # per-species layers: only the species observed in the cell
        values[name] = None if not math.isfinite(v) else round(v, 6)
    w = g.west + ix * g.resolution
    n = g.north - iy * g.resolution
    time = None
    if layer.time is not None:
        time = layer.time.labels[time_index]
    return {"layer": layer.name, "level": lv, "cell_size_deg": g.resolution,
            "cell_bbox": [round(w, 10), round(n - g.resolution, 10),
                          round(w + g.resolution, 10), round(n, 10)],
            "time": time, "values": values}


def feature_info_text(infos: list[dict]) -> str:
    lines = []
    for info in infos:
        lines.append(f"Layer '{info['layer']}'")
        lines.append(f"  cell [{', '.join(f'{v:g}' for v in info['cell_bbox'])}] "
                     f"(level {info['level']}, {info['cell_size_deg']:g} deg)"
                     + (f", time {info['time']}" if info["time"] else ""))
        for k, v in info["values"].items():
            lines.append(f"  {k} = {'NaN' if v is None else f'{v:g}'}")
    return "\n".join(lines) + "\n" if lines else "no data at this point\n"


def feature_info_html(infos: list[dict]) -> str:
    from html import escape

    parts = ["<html><body>"]
    for info in infos:
        parts.append(f"<h4>{escape(info['layer'])}</h4><p>cell "
                     f"{escape(str(info['cell_bbox']))}, level {info['level']}"
                     + (f", time {escape(info['time'])}" if info["time"] else "") + "</p>")
        parts.append("<table>" + "".join(
            f"<tr><td>{escape(k)}</td><td>{'NaN' if v is None else f'{v:g}'}</td></tr>"
            for k, v in info["values"].items()) + "</table>")
    if not infos:
        parts.append("<p>no data at this point</p>")
    parts.append("</body></html>")
    return "".join(parts)


def feature_info_geojson(infos: list[dict]) -> dict:
    feats = []
    for info in infos:
        w, s, e, n = info["cell_bbox"]
        feats.append({"type": "Feature", "id": info["layer"],
                      "geometry": {"type": "Polygon",
                                   "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]},
                      "properties": {"layer": info["layer"], "time": info["time"],
                                     "level": info["level"], **info["values"]}})
    return {"type": "FeatureCollection", "features": feats}


# -- GetLegendGraphic ----------------------------------------------------------------------
def _fmt(v: float) -> str:
    return f"{v:.3g}"


def render_legend(layer: WmsLayer) -> bytes:
    """A colour bar PNG with the value range, middle value and units of the layer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.4, 0.95 if layer.stops else 1.1), dpi=100)
    FigureCanvasAgg(fig)
    if layer.stops is not None:
        ax = fig.add_axes((0.06, 0.42, 0.88, 0.24))
        cmap, _norm = G.colormap(layer.stops)
        coloured = [(v, c) for v, c in layer.stops if not c.endswith("00")]
        lo, hi = coloured[0][0], coloured[-1][0]
        first, span = layer.stops[0][0], (layer.stops[-1][0] - layer.stops[0][0]) or 1.0
        ax.imshow(np.linspace((lo - first) / span, 1, 256)[None, :], aspect="auto",
                  cmap=cmap, vmin=0, vmax=1, extent=(0, 1, 0, 1))
        mid = coloured[len(coloured) // 2][0]
        ticks = [(v - lo) / ((hi - lo) or 1.0) for v in (lo, mid, hi)]
        ax.set_xticks(ticks, [_fmt(lo), _fmt(mid), f"≥ {_fmt(hi)}"], fontsize=7)
        ax.set_yticks([])
        ax.set_xlim(0, 1)
        ax.tick_params(length=2, pad=1)
    else:
        ax = fig.add_axes((0.2, 0.36, 0.74, 0.4))
        img = np.zeros((3, 128, 3))
        for c in range(3):
            img[c, :, c] = np.linspace(0, 1, 128)
        ax.imshow(img, aspect="auto", extent=(0, 1, 3, 0))
        ax.set_yticks([0.5, 1.5, 2.5], ["R PC1", "G PC2", "B PC3"], fontsize=6)
        ax.set_xticks([0, 1], ["0", "1"], fontsize=7)
        ax.tick_params(length=2, pad=1)
    fig.text(0.5, 0.93, layer.legend_title, ha="center", va="top", fontsize=7, wrap=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", transparent=False, facecolor="white")
    return buf.getvalue()


__all__ = ["MapView", "parse_view", "parse_crs", "pick_level", "sample", "colorize",
           "render_map", "feature_info", "render_legend", "CRS_NAMES"]
