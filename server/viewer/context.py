"""The viewer support context: the observations as place groups and dot tiles.

When the server starts it adds the observations with photo embeddings as a place group
of each configured dataset (every observation is selected by a click on its dot instead) (in memory, from the cube set the ``deepearth``
API opened), so the viewer shows them as selectable points and the panels read the
gbif_id from the place id. Tiles and dot filters are cached in the server's shared
resources (:mod:`server.common.resources`).
"""

from __future__ import annotations

import threading
from typing import Any

from xcube.constants import LOG
from xcube.server.api import ApiContext, Context

from ..common.cache import ByteLRU
from ..common.resources import Resources, resources_of
from .loop import warm_time_indexes
from .places import PointTiles, vision_place_group

VIEWER_CACHE = "viewer"  # name of the dot tiles and masks cache in the shared resources
VIEWER_CACHE_BYTES = 32 * 1024 * 1024


def dataset_ids(config) -> list[str]:
    """Identifiers of the datasets configured directly or in data stores."""
    ids = [str(d["Identifier"]) for d in config.get("Datasets", []) or [] if "Identifier" in d]
    for store in config.get("DataStores", []) or []:
        ids += [str(d["Identifier"]) for d in store.get("Datasets", []) or []
                if "Identifier" in d]
    return ids


def _warm_up(deepearth) -> None:
    """Read what the first panel callbacks need (they run on the IO loop) in the background:
    the pooled vectors' unit rows for similarity, the species and vision projections."""
    from cube_gen import analysis
    from cube_gen.access import Query

    from ..deepearth import controllers as C

    try:
        analysis.pooled_unit(deepearth.cubeset)
        C.species_umap(deepearth)
        C.vision_umap_cached(deepearth, Query(), int(deepearth.settings["MaxUmapPoints"]))
    except Exception as exc:  # noqa: BLE001 - only a warm-up: the panels compute on demand
        LOG.info(f"DeepEarth viewer: warm-up skipped ({type(exc).__name__}: {exc})")


class ViewerSupportContext(ApiContext):
    """Adds the observations place groups to the places context when the server starts."""

    def __init__(self, server_ctx: Context):
        super().__init__(server_ctx)
        self.place_groups: list[dict[str, Any]] = []
        self.tiles: PointTiles | None = None
        self.error: str | None = None
        self.cubeset = None
        self._own: Resources | None = None
        self._lock = threading.Lock()

    @property
    def resources(self) -> Resources:
        """The DeepEarth API's shared resources (this API's own when those are missing)."""
        shared = resources_of(self)
        if shared is not None:
            return shared
        with self._lock:
            if self._own is None:
                self._own = Resources()
        return self._own

    @property
    def cache(self) -> ByteLRU:
        return self.resources.named_cache(VIEWER_CACHE, VIEWER_CACHE_BYTES)

    def on_update(self, prev_context: Context | None):
        deepearth = self.get_api_ctx("deepearth")
        places = self.get_api_ctx("places")
        ids = dataset_ids(self.config)
        datasets = self.get_api_ctx("datasets")
        if datasets is not None and ids:
            n = warm_time_indexes(datasets, ids)
            LOG.info(f"DeepEarth viewer: {n} dataset indexes built before serving")
        if deepearth is None or places is None or not ids:
            return
        try:
            cs = deepearth.cubeset
            # not every observation as a place group (MBs of GeoJSON): a click on a dot
            # selects it (deepearth-app.js, /explore/pick); the short list stays
            self.place_groups = [vision_place_group(cs)]
            self.tiles = PointTiles.of(cs)
            self.cubeset = cs
        except Exception as exc:  # noqa: BLE001 - the viewer still works without the points
            self.error = f"{type(exc).__name__}: {exc}"
            LOG.warning(f"DeepEarth viewer: no observations place group ({self.error})")
            return
        threading.Thread(target=_warm_up, args=(deepearth,), daemon=True,
                         name="deepearth-viewer-warm-up").start()
        for group in self.place_groups:
            places.add_place_group(group, qualifiers=ids)
            LOG.info(f"DeepEarth viewer: place group {group['id']!r} "
                     f"({len(group['features'])} observations) of {', '.join(ids)}")

    def on_dispose(self):
        if self._own is not None:
            self._own.shutdown()
