"""The ``deepearth-viewer`` xcube API: what the customised viewer needs from the server.

* its context adds every observation as the ``observations`` place group of each
  configured dataset (in memory, from the cube set the ``deepearth`` API opened), so the
  viewer shows them as selectable points and the panels read the gbif_id from the place id;
* ``/explore/``: static pages from ``server/static/viewer``: a landing page with links and
  the 3-D embedding space (``embedding-space.html``);
* ``/explore/lib/``: ``plotly.min.js`` from the ``plotly`` package, for that page.

The prefix does not start with ``/deepearth``: that API answers every path starting so.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from xcube.constants import LOG
from xcube.server.api import Api, ApiContext, Context

from .viewer_setup import observation_place_group

API_NAME = "deepearth-viewer"
URL_PREFIX = "/explore"
PAGES_DIR = Path(__file__).resolve().parent / "static" / "viewer"

def _dataset_ids(config) -> list[str]:
    """Identifiers of the datasets configured directly or in data stores."""
    ids = [str(d["Identifier"]) for d in config.get("Datasets", []) or [] if "Identifier" in d]
    for store in config.get("DataStores", []) or []:
        ids += [str(d["Identifier"]) for d in store.get("Datasets", []) or []
                if "Identifier" in d]
    return ids


class ViewerSupportContext(ApiContext):
    """Adds the observations place group to the places context when the server starts."""

    def __init__(self, server_ctx: Context):
        super().__init__(server_ctx)
        self.place_group: dict[str, Any] | None = None
        self.error: str | None = None

    def on_update(self, prev_context: Context | None):
        deepearth = self.get_api_ctx("deepearth")
        places = self.get_api_ctx("places")
        ids = _dataset_ids(self.config)
        if deepearth is None or places is None or not ids:
            return
        try:
            cs = deepearth.service.cs
            self.place_group = observation_place_group(cs)
        except Exception as exc:  # noqa: BLE001 - the viewer still works without the points
            self.error = f"{type(exc).__name__}: {exc}"
            LOG.warning(f"DeepEarth viewer: no observations place group ({self.error})")
            return
        places.add_place_group(self.place_group, qualifiers=ids)
        LOG.info(f"DeepEarth viewer: {len(self.place_group['features'])} observations as "
                 f"place group {self.place_group['id']!r} of {', '.join(ids)}")


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
