"""The WMS context: layers built once from xcube's datasets context; level slices cached in
the server's shared resources."""

from __future__ import annotations

import threading

import numpy as np
from xcube.constants import LOG
from xcube.server.api import ApiContext, Context

from ..common.resources import Resources, resources_of
from ..config import plain
from .errors import WmsError
from .layers import WmsLayer, dataset_layers, index_layers

SLICE_CACHE = "wms-slices"
SLICE_CACHE_BYTES = 128 * 1024 * 1024


class WmsContext(ApiContext):
    """Layers of every gridded dataset of the server config (see :mod:`.layers`)."""

    def __init__(self, server_ctx: Context):
        super().__init__(server_ctx)
        self._layers: dict[str, WmsLayer] | None = None
        self._titles: dict[str, str] = {}
        self._lock = threading.Lock()
        self._own: Resources | None = None
        self.capabilities_cache: dict[str, bytes] = {}

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
    def datasets_ctx(self):
        try:
            ctx = self.server_ctx.get_api_ctx("datasets")
        except Exception:  # noqa: BLE001
            ctx = None
        if ctx is None:
            raise WmsError("NoApplicableCode", "xcube's datasets API is not enabled on this "
                                               "server", status=503)
        return ctx

    def layers(self) -> dict[str, WmsLayer]:
        """The layers (built on first use; blocking: call on a worker thread)."""
        layers = self._layers  # one read: version_changed() may reset it meanwhile
        if layers is None:
            with self._lock:
                layers = self._layers
                if layers is None:
                    layers, self._titles = build_layers(self.datasets_ctx)
                    self._layers = layers
                    LOG.info(f"DeepEarth WMS: {len(layers)} layers")
        return layers

    def version_changed(self) -> None:
        """A new version of the cube set is served: layers and capabilities built again."""
        self._layers = None
        self.capabilities_cache.clear()

    @property
    def titles(self) -> dict[str, str]:
        self.layers()
        return self._titles

    def read(self, dataset_id: str, level: int, name: str, time_index: int) -> np.ndarray:
        """A level's (lat, lon) slice of a variable at a time step (cached)."""
        def load():
            ds = self.datasets_ctx.get_ml_dataset(dataset_id).get_dataset(level)
            var = ds[name]
            if "time" in var.dims:
                var = var.isel(time=time_index)
            return np.ascontiguousarray(var.values, dtype=np.float32)
        cache = self.resources.named_cache(SLICE_CACHE, SLICE_CACHE_BYTES)
        return cache.get_or_compute((dataset_id, level, name, time_index), load)


def build_layers(datasets_ctx) -> tuple[dict[str, WmsLayer], dict[str, str]]:
    """The layers and titles of every gridded dataset of the config (bad ones left out)."""
    layers: list[WmsLayer] = []
    titles: dict[str, str] = {}
    for config in datasets_ctx.get_dataset_configs():
        ds_id = str(config["Identifier"])
        if config.get("Hidden"):
            continue
        try:
            ml = datasets_ctx.get_ml_dataset(ds_id)
            levels = [ml.get_dataset(i) for i in range(ml.num_levels)]
            title = str(config.get("Title") or levels[0].attrs.get("title") or ds_id)
            layers += dataset_layers(ds_id, title, levels, plain(config.get("Variables")))
            titles[ds_id] = title
        except Exception as exc:  # noqa: BLE001 - one bad dataset must not hide the others
            LOG.warning(f"DeepEarth WMS: dataset {ds_id!r} left out: "
                        f"{type(exc).__name__}: {exc}")
    return index_layers(layers), titles
