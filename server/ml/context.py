"""The ``deepearth-ml`` context: the DeepEarth API's cube set, its predictions store,
and the error-map place groups of the runs (added to xcube's places when the server starts)."""

from __future__ import annotations

import threading
import time
from typing import Any

from xcube.constants import LOG
from xcube.server.api import ApiContext, Context

from cube_gen.predictions import Predictions

from ..common.errors import Unavailable
from ..common.resources import Resources, resources_of

MAX_ERROR_MAPS = 8  # the most recent runs get an error-map place group


class MlContext(ApiContext):
    """Reads through the ``deepearth`` API's context (one cube set, one cache)."""

    def __init__(self, server_ctx: Context):
        super().__init__(server_ctx)
        self._lock = threading.Lock()
        self._own: Resources | None = None
        self._tables: dict[tuple[str, str], Any] = {}
        self._stac: dict[str, dict] = {}
        self.place_groups: list[dict[str, Any]] = []

    def on_update(self, prev_context: Context | None):
        # This API starts before the places and DeepEarth APIs (it declares no required
        # APIs, see server/plugin.py): add the error maps once both are there.
        threading.Thread(target=self._add_error_maps, daemon=True,
                         name="deepearth-ml-error-maps").start()

    def _add_error_maps(self, timeout: float = 300.0) -> None:
        from ..viewer.context import dataset_ids
        from . import controllers as C

        deadline = time.monotonic() + timeout
        while True:
            places = self.get_api_ctx("places")
            deepearth = self.get_api_ctx("deepearth")
            if places is not None and deepearth is not None:
                break
            if time.monotonic() > deadline:
                return
            time.sleep(0.5)
        ids = dataset_ids(self.config)
        if not ids:
            return
        try:
            runs = self.predictions.runs()[-MAX_ERROR_MAPS:]
            self.place_groups = [C.error_place_group(self, r["run_id"]) for r in runs]
        except Exception as exc:  # noqa: BLE001 - the viewer works without error maps
            LOG.warning(f"DeepEarth ML: no error-map place groups ({type(exc).__name__}: {exc})")
            return
        for group in self.place_groups:
            places.add_place_group(group, qualifiers=ids)
        LOG.info(f"DeepEarth ML: {len(self.place_groups)} error-map place groups")

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
        """The DeepEarth API's context (cube set, settings); 503 without it."""
        try:
            ctx = self.server_ctx.get_api_ctx("deepearth")
        except Exception:  # noqa: BLE001
            ctx = None
        if ctx is None:
            raise Unavailable("the DeepEarth API is not running on this server", "DeepEarth")
        return ctx

    @property
    def settings(self):
        return getattr(self.deepearth, "settings", {})

    @property
    def predictions(self) -> Predictions:
        d = self.deepearth
        return Predictions.of(d.cubeset.url, d.storage_options or None)

    def table(self, run_id: str):
        """A run's predictions table (runs are immutable: cached for the server's life)."""
        store = self.predictions
        entry = store.run(run_id)
        key = (store.root, entry["run_id"])
        with self._lock:
            if key not in self._tables:
                self._tables[key] = (entry, store.table(entry["run_id"]))
            return self._tables[key]

    def stac(self, base: str) -> dict[str, dict]:
        """The catalogue's objects with links below ``base``, rebuilt when runs change."""
        from cube_gen.stac import catalog_dicts

        runs = tuple(r["run_id"] for r in self.predictions.runs())
        key = f"{base}|{','.join(runs)}"
        with self._lock:
            hit = self._stac.get(key)
        if hit is None:
            hit = catalog_dicts(self.deepearth.cubeset, base)
            with self._lock:
                self._stac = {key: hit}
        return hit
