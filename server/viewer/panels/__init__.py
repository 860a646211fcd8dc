"""DeepEarth panels for xcube Viewer (a chartlets extension).

The server config names ``server.viewer.panels.extension`` under ``Viewer: Augmentation:
Extensions`` (see :func:`server.viewer.setup.viewer_section`); the panels live in this
importable package so that a config file anywhere finds them.

* :mod:`.observation`: the observation selected on the map, attention maps, statistics,
  similar embeddings;
* :mod:`.embedding_space`: language and vision UMAPs as interactive scatter plots;
* :mod:`.region`: species composition, counts per year and month, diversity of a region.

Panel modules do not use ``from __future__ import annotations``: chartlets reads the
callbacks' annotations as types to describe them to the viewer.
"""

from chartlets import Extension

from .embedding_space import panel as embedding_space_panel
from .observation import panel as observation_panel
from .region import panel as region_panel

extension = Extension(__name__)
extension.add(observation_panel)
extension.add(embedding_space_panel)
extension.add(region_panel)

from ...ml.panel import panel as predictions_panel  # noqa: E402 - issue 16 (H4)

extension.add(predictions_panel)

__all__ = ["extension", "observation_panel", "embedding_space_panel", "region_panel"]
