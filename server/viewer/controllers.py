"""What the viewer support routes answer: dot tiles and picks, functions over the context."""

from __future__ import annotations

from typing import Any

import numpy as np

from cube_gen.photos import read_photo
from cube_gen.taxa import suggestions

from ..common.errors import NotFound, Unavailable
from .context import ViewerSupportContext
from .loop import DotFilter, pick, species_layer
from .places import PointTiles, vision_place_group


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


def _cubeset(ctx: ViewerSupportContext):
    if ctx.cubeset is None:
        raise Unavailable(f"no cube set: {ctx.error or 'not loaded'}")
    return ctx.cubeset


def count(ctx: ViewerSupportContext, f: DotFilter) -> dict[str, Any]:
    """How many observations (and species) the dots show with these filters, and the grid
    layer of the species when the search names one (``layer``, else None)."""
    cs = _cubeset(ctx)
    mask = dot_mask(ctx, f)
    species = cs.observations.species_index.values
    shown = species if mask is None else species[mask]
    return {"observations": int(len(shown)), "species": int(len(np.unique(shown))),
            "layer": species_layer(cs, f.taxa)}


def places(ctx: ViewerSupportContext, f: DotFilter) -> dict[str, Any]:
    """The place group of the observations with photo embeddings, narrowed like the dots
    (the viewer's place list follows the filters; cached per filter)."""
    cs = _cubeset(ctx)
    return ctx.cache.get_or_compute(("places", f),
                                    lambda: vision_place_group(cs, dot_mask(ctx, f)))


def taxa(ctx: ViewerSupportContext, text: str, limit: int = 12) -> dict[str, Any]:
    """Suggestions for the species search field (clusters, genera, species)."""
    return {"q": text, "suggestions": suggestions(_cubeset(ctx).species_table(), text, limit)}


def photo(ctx: ViewerSupportContext, gbif_id: int, image_number: int) -> bytes:
    """The synthetic photo of an embedded image (404 when the cube set has none)."""
    data = read_photo(_cubeset(ctx), gbif_id, image_number)
    if data is None:
        raise NotFound(f"no photo {gbif_id}/{image_number} in this cube set (only synthetic "
                       "cube sets carry photos; real observations link iNaturalist)",
                       "gbif_id", None, gbif_id)
    return data
