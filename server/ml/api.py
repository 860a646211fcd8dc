"""The ``deepearth-ml`` xcube server API object (routes are declared in :mod:`.routes`)."""

from __future__ import annotations

from xcube.server.api import Api

from .context import MlContext

API_NAME = "deepearth-ml"

api = Api(
    API_NAME,
    version="1.0.0",
    description="DeepEarth model predictions (per embedding, per observation, two runs "
                "compared, error maps) and the STAC catalogue of the cube set",
    create_ctx=MlContext,
)
