"""The ``deepearth-wmts`` xcube server API object (routes are declared in :mod:`.routes`)."""

from __future__ import annotations

from xcube.server.api import Api

from .capabilities import WMTS_VERSION
from .context import WmtsContext

API_NAME = "deepearth-wmts"
URL_PREFIX = "/deepearth/wmts"

api = Api(
    API_NAME,
    version=WMTS_VERSION,
    description="OGC WMTS 1.0.0 for the DeepEarth grid layers: configured colour ranges, "
                "a Time dimension (REST {Time} and KVP TIME), WorldCRS84Quad and "
                "WorldWebMercatorQuad",
    create_ctx=WmtsContext,
)
