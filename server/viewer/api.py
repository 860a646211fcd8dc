"""The ``deepearth-viewer`` xcube server API object (routes are declared in :mod:`.routes`)."""

from __future__ import annotations

from xcube.server.api import Api

from .context import ViewerSupportContext

API_NAME = "deepearth-viewer"
URL_PREFIX = "/explore"  # not under /deepearth: that API answers every path starting so

api = Api(
    API_NAME,
    description="DeepEarth viewer support: the observations place group, the 3-D "
                "embedding space page and its script library",
    required_apis=["places", "datasets", "deepearth"],
    create_ctx=ViewerSupportContext,
)
