"""The ``deepearth-ml`` API: predictions of training runs and the STAC catalogue.

Routes (:mod:`.routes`): ``/deepearth/stac`` (catalogue, collections, run items),
``/deepearth/predictions`` (runs; one run; one observation's predictions in every run;
two runs compared; a run's error map as GeoJSON). The context (:mod:`.context`) adds each
run's error map to the viewer as a place group (points green when right, red when wrong,
ids ``obs-<gbif_id>`` so that picking one selects the observation in every panel).
"""

from . import routes  # noqa: F401 - declares the routes on the api
from .api import api

__all__ = ["api"]
