"""The ``deepearth-viewer`` xcube API: what the customised viewer needs from the server.

* its context adds the observations (all, and those with photo embeddings) as place
  groups of each configured dataset (in memory, from the cube set the ``deepearth`` API
  opened), so the viewer shows them as selectable points and the panels read the gbif_id
  from the place id;
* ``/explore/``: static pages from ``server/static/viewer``: a landing page with links and
  the 3-D embedding space (``embedding-space.html``);
* ``/explore/lib/``: ``plotly.min.js`` from the ``plotly`` package, for that page;
* ``/explore/observations/{z}/{x}/{y}``: XYZ tiles of the observations in their species'
  cluster colours (the viewer's ``observations`` overlay, named in ``viewer/config.json``).

The prefix does not start with ``/deepearth``: that API answers every path starting so.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from xcube.constants import LOG
from xcube.server.api import Api, ApiContext, ApiHandler, Context

from .viewer_loop import MAX_PICK_RADIUS_M, DotFilter, FilterError, pick, warm_time_indexes
from .viewer_setup import PointTiles, observation_place_group, vision_place_group

API_NAME = "deepearth-viewer"
URL_PREFIX = "/explore"
PAGES_DIR = Path(__file__).resolve().parent / "static" / "viewer"
MAX_ZOOM = 22
TILE_CACHE = 2048  # PNG tiles kept (a few MB)
MASK_CACHE = 64  # dot filters kept (one bool per observation each)

def _dataset_ids(config) -> list[str]:
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

    from .service import Filters

    try:
        svc = deepearth.service
        analysis.pooled_unit(svc.cs)
        svc.species_umap()
        svc.vision_umap_cached(Filters(), int(svc.settings.get("MaxUmapPoints", 5000)))
    except Exception as exc:  # noqa: BLE001 - only a warm-up: the panels compute on demand
        LOG.info(f"DeepEarth viewer: warm-up skipped ({type(exc).__name__}: {exc})")


class ViewerSupportContext(ApiContext):
    """Adds the observations place group to the places context when the server starts."""

    def __init__(self, server_ctx: Context):
        super().__init__(server_ctx)
        self.place_groups: list[dict[str, Any]] = []
        self.tiles: PointTiles | None = None
        self.error: str | None = None
        self._pngs: OrderedDict[tuple, bytes] = OrderedDict()
        self._masks: OrderedDict[DotFilter, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.cubeset = None

    def on_update(self, prev_context: Context | None):
        deepearth = self.get_api_ctx("deepearth")
        places = self.get_api_ctx("places")
        ids = _dataset_ids(self.config)
        datasets = self.get_api_ctx("datasets")
        if datasets is not None and ids:
            n = warm_time_indexes(datasets, ids)
            LOG.info(f"DeepEarth viewer: {n} dataset indexes built before serving")
        if deepearth is None or places is None or not ids:
            return
        try:
            cs = deepearth.service.cs
            self.place_groups = [observation_place_group(cs), vision_place_group(cs)]
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


    def dot_mask(self, f: DotFilter):
        """The observations mask of a dot filter (None: all; cached per filter)."""
        if f.is_empty or self.cubeset is None:
            return None
        with self._lock:
            if f in self._masks:
                self._masks.move_to_end(f)
                return self._masks[f]
        mask = f.mask(self.cubeset)
        with self._lock:
            self._masks[f] = mask
            while len(self._masks) > MASK_CACHE:
                self._masks.popitem(last=False)
        return mask

    def tile_png(self, z: int, x: int, y: int, f: DotFilter | None = None) -> bytes:
        """The observations tile (z, x, y) as PNG (cached; empty without a cube set)."""
        f = f or DotFilter()
        key = (z, x, y, f)
        with self._lock:
            if key in self._pngs:
                self._pngs.move_to_end(key)
                return self._pngs[key]
        tiles = self.tiles or PointTiles([], [], [])
        png = tiles.png(z, x, y, self.dot_mask(f))
        with self._lock:
            self._pngs[key] = png
            while len(self._pngs) > TILE_CACHE:
                self._pngs.popitem(last=False)
        return png


api = Api(
    API_NAME,
    description="DeepEarth viewer support: the observations place group, the 3-D "
                "embedding space page and its script library",
    required_apis=["places", "datasets", "deepearth"],
    create_ctx=ViewerSupportContext,
)


@api.static_route(URL_PREFIX + "/lib", summary="plotly.min.js for the 3-D page")
def _plotly_dir() -> str | None:
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        LOG.warning("DeepEarth viewer: the plotly package is missing; the 3-D page will not work")
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "package_data")
    return path if os.path.isfile(os.path.join(path, "plotly.min.js")) else None


# After /explore/lib: tornado takes the first matching static route.
@api.static_route(URL_PREFIX, default_filename="index.html",
                  summary="DeepEarth pages: links, 3-D embedding space")
def _pages_dir() -> str | None:
    return str(PAGES_DIR) if PAGES_DIR.is_dir() else None


@api.route(URL_PREFIX + "/observations/{z}/{x}/{y}")
class ObservationTilesHandler(ApiHandler[ViewerSupportContext]):
    @api.operation(operation_id="deepearthObservationTile",
                   summary="Observations as coloured dots on an XYZ Web Mercator tile (PNG)")
    async def get(self, z: str, x: str, y: str):
        try:
            zi, xi, yi = int(z), int(x), int(y)
            if not (0 <= zi <= MAX_ZOOM and 0 <= xi < (1 << zi) and 0 <= yi < (1 << zi)):
                raise ValueError
        except ValueError:
            self.response.set_status(400)
            self.response.set_header("Content-Type", "application/json")
            self.response.finish(b'{"error": {"status_code": 400, "message": "expected '
                                 b'/explore/observations/{z}/{x}/{y} with 0 <= z <= 22 and '
                                 b'0 <= x, y < 2**z"}}')
            return
        try:
            f = DotFilter.from_query(self.request.query)
        except FilterError as exc:
            _json_error(self, 400, str(exc), exc.parameter)
            return
        png = await self.ctx.run_in_executor(None, self.ctx.tile_png, zi, xi, yi, f)
        self.response.set_header("Content-Type", "image/png")
        self.response.set_header("Cache-Control", "public, max-age=3600")
        self.response.finish(png)



def _json_error(handler, status: int, message: str, parameter: str | None = None) -> None:
    import json

    err: dict[str, Any] = {"status_code": status, "message": message}
    if parameter:
        err["parameter"] = parameter
    handler.response.set_status(status)
    handler.response.set_header("Content-Type", "application/json")
    handler.response.finish(json.dumps({"error": err}).encode())


@api.route(URL_PREFIX + "/pick")
class PickHandler(ApiHandler[ViewerSupportContext]):
    @api.operation(operation_id="deepearthPick",
                   summary="The observation nearest to a map click (lon, lat, radius_m), "
                           "among those the dot filters keep (taxa, months, hours, year, time)")
    async def get(self):
        q = self.request.query
        try:
            lon = float(q["lon"][0])
            lat = float(q["lat"][0])
            radius = float(q.get("radius_m", ["500"])[0])
            if not (-180 <= lon <= 180 and -90 <= lat <= 90 and 0 < radius <= MAX_PICK_RADIUS_M):
                raise ValueError
        except (KeyError, IndexError, ValueError):
            _json_error(self, 400, "expected lon in -180..180, lat in -90..90 and radius_m in "
                        f"(0, {MAX_PICK_RADIUS_M:g}] metres")
            return
        try:
            f = DotFilter.from_query(q)
        except FilterError as exc:
            _json_error(self, 400, str(exc), exc.parameter)
            return
        if self.ctx.cubeset is None:
            _json_error(self, 503, f"no cube set: {self.ctx.error or 'not loaded'}")
            return

        def work():
            return pick(self.ctx.cubeset, lon, lat, radius, self.ctx.dot_mask(f))

        result = await self.ctx.run_in_executor(None, work)
        self.response.set_header("Content-Type", "application/json")
        import json

        self.response.finish(json.dumps(result).encode())
