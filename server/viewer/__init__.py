"""Viewer support: the ``deepearth-viewer`` API (``/explore``), the viewer's server config and
prepared build, and the chartlets panels.

* :mod:`.api`, :mod:`.context`, :mod:`.controllers`, :mod:`.routes`: the API (place groups,
  dot tiles, pick, static pages);
* :mod:`.setup`: the ``Viewer`` config section, styles fitted to the data, the prepared copy
  of xcube's bundled viewer (:mod:`.bundle`: the hooks patched into it);
* :mod:`.places`: the observations as place groups and dot tiles; :mod:`.loop`: the dots'
  filters and picking;
* :mod:`.panels`: the chartlets panels (they call :mod:`server.deepearth.controllers`).
"""

from . import routes  # noqa: F401 - registers the routes on ``api``
from .api import api

__all__ = ["api"]
