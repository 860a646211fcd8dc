"""The ``deepearth`` xcube server API object (routes are declared in :mod:`.routes`)."""

from __future__ import annotations

from xcube.server.api import Api

from ..config import CONFIG_SCHEMA
from .context import DeepEarthContext

API_NAME = "deepearth"
API_VERSION = "1.0.0"
URL_PREFIX = "/deepearth"

api = Api(
    API_NAME,
    version=API_VERSION,
    description="DeepEarth API: observations, species, vision embeddings (features, "
                "attention, UMAP-RGB, statistics), projections, similarity search and region "
                "statistics of a DeepEarth cube set",
    config_schema=CONFIG_SCHEMA,
    create_ctx=DeepEarthContext,
)
