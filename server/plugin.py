"""xcube plugin entry point (``[project.entry-points.xcube_plugins] deepearth``).

To add an API package ``server/<name>/``: give it an ``api.py`` with an ``Api`` object and
its routes imported by the package (see :mod:`server.deepearth`), then register it in
:data:`APIS` below.
"""

from __future__ import annotations

from xcube.constants import EXTENSION_POINT_DATA_STORES, EXTENSION_POINT_SERVER_APIS
from xcube.util import extension

# (extension name, "module:attribute" of the Api object, description), in registration order.
# The WMTS first: xcube orders APIs by dependency count, then registration, and the
# "deepearth" API's /deepearth/{*rest} route would otherwise shadow /deepearth/wmts/...
APIS: tuple[tuple[str, str, str], ...] = (
    ("deepearth-wmts", "server.wmts:api", "DeepEarth WMTS (grid layers)"),
    ("deepearth-wms", "server.wms:api", "DeepEarth WMS 1.3.0 with TIME (grid layers)"),
    ("deepearth-ogcapi", "server.ogcapi:api", "DeepEarth OGC API - Features (observations)"),
    ("deepearth-ml", "server.ml:api", "DeepEarth predictions and STAC catalogue"),
    ("deepearth", "server.deepearth:api", "DeepEarth cube set API"),
    ("deepearth-viewer", "server.viewer:api", "DeepEarth viewer support (observation places)"),
)


def init_plugin(ext_registry: extension.ExtensionRegistry) -> None:
    """Register the DeepEarth server APIs (imported lazily, when a server starts), and keep
    Python tracebacks out of every HTTP response of the process."""
    from .common.safety import hide_tracebacks

    hide_tracebacks()
    for name, component, description in APIS:
        ext_registry.add_extension(loader=extension.import_component(component),
                                   point=EXTENSION_POINT_SERVER_APIS, name=name,
                                   description=description)
    # the grid pyramids for xcube's own endpoints, read through the checked store (H2)
    ext_registry.add_extension(
        loader=extension.import_component("cube_gen.xcube_levels:DeepEarthDataStore"),
        point=EXTENSION_POINT_DATA_STORES, name="deepearth",
        description="DeepEarth cube set grid pyramids (checked reads of one release)")
