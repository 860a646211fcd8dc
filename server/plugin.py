"""xcube plugin entry point (``[project.entry-points.xcube_plugins] deepearth``)."""

from __future__ import annotations

from xcube.constants import EXTENSION_POINT_SERVER_APIS
from xcube.util import extension


def init_plugin(ext_registry: extension.ExtensionRegistry) -> None:
    """Register the DeepEarth server API (imported lazily, when a server starts)."""
    ext_registry.add_extension(
        loader=extension.import_component("server.routes:api"),
        point=EXTENSION_POINT_SERVER_APIS,
        name="deepearth",
        description="DeepEarth cube set API",
    )
