"""The ``deepearth-wms`` xcube server API object (routes are declared in :mod:`.routes`)."""

from __future__ import annotations

from xcube.server.api import Api

from .capabilities import WMS_VERSION
from .context import WmsContext

API_NAME = "deepearth-wms"
URL_PREFIX = "/deepearth/wms"

api = Api(
    API_NAME,
    version=WMS_VERSION,
    description="OGC WMS 1.3.0 with TIME (WMS-T) for the DeepEarth grid layers: "
                "GetCapabilities, GetMap (EPSG:4326, EPSG:3857), GetFeatureInfo, "
                "GetLegendGraphic",
    create_ctx=WmsContext,
)
