"""The WMTS context: layers built once from xcube's datasets context, the shared resources."""

from __future__ import annotations

import threading

from xcube.constants import LOG
from xcube.server.api import ApiContext, Context

from ..common.cache import ByteLRU
from ..common.ows import OwsError
from ..common.resources import Resources, resources_of
from .layers import Layer, build_layers

TILE_CACHE_BYTES = 64 * 1024 * 1024
TILE_CACHE = "wmts-tiles"  # name of the tile cache in the shared resources


class WmtsContext(ApiContext):
    """Layers of every gridded dataset; tiles, legends and capabilities documents cached in
    the server's shared resources."""

    def __init__(self, server_ctx: Context):
        super().__init__(server_ctx)
        self._layers: dict[str, Layer] | None = None
        self._lock = threading.Lock()
        self._own: Resources | None = None

    def on_dispose(self):
        if self._own is not None:
            self._own.shutdown()

    @property
    def resources(self) -> Resources:
        """The DeepEarth API's shared resources; this API's own when that one is not running."""
        shared = resources_of(self)
        if shared is not None:
            return shared
        with self._lock:
            if self._own is None:
                self._own = Resources()
        return self._own

    @property
    def tile_cache(self) -> ByteLRU:
        return self.resources.named_cache(TILE_CACHE, TILE_CACHE_BYTES)

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

    def version_changed(self) -> None:
        """A new version of the cube set is served: build the layers again on next use."""
        self._layers = None

    @property
    def layers_ready(self) -> dict[str, Layer] | None:
        return self._layers

    def layers(self) -> dict[str, Layer]:
        """The layers (built on first use; blocking: call on a worker thread)."""
        layers = self._layers  # one read: version_changed() may reset it meanwhile
        if layers is None:
            with self._lock:
                layers = self._layers
                if layers is None:
                    layers = self._layers = build_layers(self.datasets_ctx)
                    LOG.info(f"DeepEarth WMTS: {len(layers)} layers")
        return layers
