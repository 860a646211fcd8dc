"""What the WMTS answers: capabilities, tiles and legends, functions over the context.

Synchronous, free of HTTP; the routes run them on the shared ``tiles`` worker pool.
"""

from __future__ import annotations

from ..common.ows import OwsError
from ..config import plain
from .capabilities import ServiceUrls, capabilities_xml
from .context import WmtsContext
from .layers import Layer
from .tiles import TileRequest, render_legend, render_tile


def layers(ctx: WmtsContext) -> dict[str, Layer]:
    return ctx.layers()


def capabilities(ctx: WmtsContext, urls: ServiceUrls, time: str | None = None) -> bytes:
    """The capabilities document; ``time`` makes that step every layer's advertised default."""
    time = time.strip() if time and time.strip() else None

    def make() -> bytes:
        all_layers = ctx.layers()
        pinned = None
        if time is not None:
            pinned = {lid: layer.time.resolve(time) for lid, layer in all_layers.items()
                      if layer.time is not None}
        provider = plain(ctx.config.get("ServiceProvider")) or {}
        return capabilities_xml(all_layers, urls, pinned, provider)
    return ctx.tile_cache.get_or_compute(("capabilities", urls, time), make)


def tile(ctx: WmtsContext, req: TileRequest) -> bytes:
    """The PNG of one tile (cached)."""
    return ctx.tile_cache.get_or_compute(req.key, lambda: render_tile(ctx.datasets_ctx, req))


def legend(ctx: WmtsContext, layer_id: str) -> bytes:
    """The colour bar PNG of a layer (cached; 404 for an unknown layer)."""
    layer = ctx.layers().get(layer_id)
    if layer is None:
        raise OwsError("InvalidParameterValue", f"unknown layer {layer_id!r}", "layer",
                       status=404)
    return ctx.tile_cache.get_or_compute(
        ("legend", layer_id), lambda: render_legend(layer, ctx.datasets_ctx.colormap_registry))
