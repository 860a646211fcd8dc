"""xcube plugin entry point (``[project.entry-points.xcube_plugins] deepearth``)."""

from __future__ import annotations

from xcube.constants import EXTENSION_POINT_SERVER_APIS
from xcube.util import extension


def init_plugin(ext_registry: extension.ExtensionRegistry) -> None:
    """Register the DeepEarth server API (imported lazily, when a server starts)."""
    # First: xcube orders APIs by dependency count, then registration, and the "deepearth"
    # API's /deepearth/{*rest} route would otherwise shadow /deepearth/wmts/...
    ext_registry.add_extension(loader=extension.import_component("server.wmts:api"),
                               point=EXTENSION_POINT_SERVER_APIS, name="deepearth-wmts",
                               description="DeepEarth WMTS (grid layers)")
    ext_registry.add_extension(
        loader=extension.import_component("server.routes:api"),
        point=EXTENSION_POINT_SERVER_APIS,
        name="deepearth",
        description="DeepEarth cube set API",
    )
    ext_registry.add_extension(loader=extension.import_component("server.viewer_routes:api"),
                               point=EXTENSION_POINT_SERVER_APIS, name="deepearth-viewer",
                               description="DeepEarth viewer support (observation places)")
