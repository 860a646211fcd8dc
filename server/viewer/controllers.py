"""What the viewer support routes answer: dot tiles and picks, functions over the context."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..common.errors import Unavailable
from .context import ViewerSupportContext
from .loop import DotFilter, pick
from .places import PointTiles


def dot_mask(ctx: ViewerSupportContext, f: DotFilter) -> np.ndarray | None:
    """The observations mask of a dot filter (None: all; cached per filter)."""
    if f.is_empty or ctx.cubeset is None:
        return None
    return ctx.cache.get_or_compute(("mask", f), lambda: f.mask(ctx.cubeset))


def tile_png(ctx: ViewerSupportContext, z: int, x: int, y: int,
             f: DotFilter | None = None) -> bytes:
    """The observations tile (z, x, y) as PNG (cached; empty without a cube set)."""
    f = f or DotFilter()

    def make() -> bytes:
        tiles = ctx.tiles or PointTiles([], [], [])
        return tiles.png(z, x, y, dot_mask(ctx, f))
    return ctx.cache.get_or_compute(("tile", z, x, y, f), make)


def nearest(ctx: ViewerSupportContext, lon: float, lat: float, radius_m: float,
            f: DotFilter | None = None) -> dict[str, Any]:
    """The observation nearest to a map click among those the dot filter keeps."""
    if ctx.cubeset is None:
        raise Unavailable(f"no cube set: {ctx.error or 'not loaded'}")
    return pick(ctx.cubeset, lon, lat, radius_m, dot_mask(ctx, f or DotFilter()))
