"""OGC WMS 1.3.0 with TIME (WMS-T) for the grid layers: ``/deepearth/wms``.

Layers ``<dataset>.<variable>`` of every grid dataset (``grid`` per year with a ``time``
dimension, ``grid_all_years``, ``grid_month_of_year`` with 12 month steps, ``grid_species``),
plus ``<dataset>.rgb``; GetMap in EPSG:4326 and EPSG:3857 with the registry's colours,
GetFeatureInfo with the cell's values, GetLegendGraphic with range and units.
"""

from . import routes as _routes  # noqa: F401 - declares the routes on the Api object
from .api import API_NAME, URL_PREFIX, api

__all__ = ["api", "API_NAME", "URL_PREFIX"]
