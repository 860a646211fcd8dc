"""OGC API - Features of the observations: ``/deepearth/ogcapi`` (QGIS adds it as a vector
layer: Layer > Add Layer > Add WFS / OGC API - Features Layer, URL ``<base>/deepearth/ogcapi``).

Collections ``observations`` and ``observations_with_embeddings``; items as GeoJSON with
``bbox``, ``datetime`` and ``species`` filters and ``limit``/``offset`` paging (``next``
links); properties: species, taxon id, time, split, photos and embedding attributes (the
species' language UMAP position and cluster, the first photo's vision UMAP position).
"""

from . import routes as _routes  # noqa: F401 - declares the routes on the Api object
from .api import API_NAME, URL_PREFIX, api

__all__ = ["api", "API_NAME", "URL_PREFIX"]
