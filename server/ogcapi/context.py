"""The OGC API - Features context: the DeepEarth API's cube set and shared resources."""

from __future__ import annotations

import threading

from xcube.server.api import ApiContext, Context

from ..common.errors import Unavailable
from ..common.resources import Resources, resources_of


class OgcContext(ApiContext):
    """Reads through the ``deepearth`` API's context (one cube set, one cache)."""

    def __init__(self, server_ctx: Context):
        super().__init__(server_ctx)
        self._lock = threading.Lock()
        self._own: Resources | None = None

    def on_dispose(self):
        if self._own is not None:
            self._own.shutdown()

    @property
    def resources(self) -> Resources:
        shared = resources_of(self)
        if shared is not None:
            return shared
        with self._lock:
            if self._own is None:
                self._own = Resources()
        return self._own

    @property
    def deepearth(self):
        """The DeepEarth API's context (cube set, cache, settings); 503 without it."""
        try:
            ctx = self.server_ctx.get_api_ctx("deepearth")
        except Exception:  # noqa: BLE001
            ctx = None
        if ctx is None:
            raise Unavailable("the DeepEarth API is not running on this server", "DeepEarth")
        return ctx
