"""The DeepEarth API (``/deepearth``): observations, species, vision embeddings, projections,
similarity and region statistics of a cube set.

* :mod:`.api`: the xcube ``Api`` object; :mod:`.context`: the opened cube set, settings,
  the shared resources and the storage-fault guard;
* :mod:`.controllers`: what each endpoint computes, plain functions over the context (no
  HTTP), used by the routes, the viewer panels and notebooks;
* :mod:`.params`: the API's parameter groups; :mod:`.routes`: one declaration per endpoint.
"""

from . import routes
from .api import api

# Modules declaring more routes of this API are imported here, before the catch-all.
routes.register_catch_all()  # /deepearth/{*rest} -> JSON 404; must stay the last route

__all__ = ["api"]
