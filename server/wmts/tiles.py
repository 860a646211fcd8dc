"""WMTS tiles and legends: GetTile requests (REST or KVP) validated, rendered by xcube's
``compute_rgba_tile`` with the layer's colours and time; transparent outside the data."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from xcube.constants import LOG
from xcube.core.tile import TileNotFoundException, compute_rgba_tile

from ..common.ows import OwsError, invalid, missing
from ..render import png_bytes
from .capabilities import PNG, STYLE_ID
from .layers import DEFAULT_KEYWORDS, Layer
from .tilematrixsets import TILE_MATRIX_SETS, TILE_SIZE, TileMatrixSetDef

TRANSPARENT_PNG = png_bytes(np.zeros((TILE_SIZE, TILE_SIZE, 4), dtype=np.uint8))


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
