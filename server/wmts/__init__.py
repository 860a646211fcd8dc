"""OGC WMTS 1.0.0 for the grid layers: the ``deepearth-wmts`` xcube server API.

xcube's own WMTS (``/wmts/...``) does not suit this project's layers (verified in xcube 1.14):
colours are scaled to [0, 1] unless a client passes ``vmin``/``vmax``, which WMTS clients
never do; the REST template has no ``{Time}``; a request without a time gets the first
step although the capabilities advertise "current". This API serves its own WMTS for the
gridded datasets of the server config, reusing xcube's tiling (``compute_rgba_tile`` of
:mod:`xcube.core.tile`) and xcube's datasets context (datasets, styles, colour maps):

* every layer is coloured with its configured colour map and value range (the config's
  ``Styles``/``ColorMappings``, else the variable's ``color_bar_name``/``color_value_min``/
  ``color_value_max`` attributes), the same as in the viewer;
* the time dimension ``Time`` lists every step; ``<Default>`` is the latest step, and it is
  what a tile request without a time gets, by REST (``default``/``current`` in the ``{Time}``
  slot) and by KVP (no ``TIME``); ``TIME`` / ``{Time}`` take any ISO 8601 instant inside a
  step (a step's bounds, e.g. any date of a year for yearly steps);
* one capabilities document with both ``WorldCRS84Quad`` and ``WorldWebMercatorQuad``,
  REST and KVP;
* tiles inside the tile matrix but outside the data are transparent PNGs (HTTP 200);
* errors are OWS exception reports (``ExceptionReport`` XML) naming the parameter, never a
  Python traceback.

URLs (``<base>`` is the server URL, e.g. ``http://localhost:8080``)::

    <base>/deepearth/wmts/1.0.0/WMTSCapabilities.xml[?time=<ISO>]
    <base>/deepearth/wmts/kvp?SERVICE=WMTS&REQUEST=GetCapabilities[&TIME=<ISO>]
    <base>/deepearth/wmts/1.0.0/{layer}/default/{Time}/{TileMatrixSet}/{z}/{row}/{col}.png
    <base>/deepearth/wmts/kvp?SERVICE=WMTS&REQUEST=GetTile&VERSION=1.0.0&LAYER=...&STYLE=default
         &FORMAT=image/png&TILEMATRIXSET=...&TILEMATRIX=z&TILEROW=row&TILECOL=col[&TIME=<ISO>]
    <base>/deepearth/wmts/legend/{layer}.png

``time`` on GetCapabilities makes that step the advertised ``<Default>``: clients that
always use the default (GDAL's WMTS driver) read any step that way.

Layers are ``<dataset>.<variable>`` (e.g. ``grid.observation_count``), plus
``<dataset>.rgb`` when the dataset's style has an RGB mapping.

Modules: :mod:`.tilematrixsets`, :mod:`.layers` (layers and their time axes),
:mod:`.capabilities` (the XML document), :mod:`.tiles` (GetTile requests, rendering, legends),
:mod:`.context`, :mod:`.controllers`, :mod:`.routes`, :mod:`.api`.
"""

from . import routes  # noqa: F401 - registers the routes on ``api``
from .api import API_NAME, URL_PREFIX, api
from .capabilities import ServiceUrls, capabilities_xml
from .context import TILE_CACHE_BYTES
from .layers import TimeAxis, build_layers
from .tilematrixsets import TILE_MATRIX_SETS
from .tiles import parse_tile_request, render_tile

__all__ = ["api", "API_NAME", "URL_PREFIX", "TimeAxis", "build_layers", "ServiceUrls",
           "capabilities_xml", "parse_tile_request", "render_tile", "TILE_MATRIX_SETS",
           "TILE_CACHE_BYTES"]
