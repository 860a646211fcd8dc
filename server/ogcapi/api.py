"""The ``deepearth-ogcapi`` xcube server API object (routes are declared in :mod:`.routes`)."""

from __future__ import annotations

from xcube.server.api import Api

from .context import OgcContext

API_NAME = "deepearth-ogcapi"
URL_PREFIX = "/deepearth/ogcapi"

api = Api(
    API_NAME,
    version="1.0.0",
    description="OGC API - Features (Part 1: Core, GeoJSON) of the DeepEarth observations: "
                "bbox, datetime and species filters, paging",
    create_ctx=OgcContext,
)
