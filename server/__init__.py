"""DeepEarth xcube server plugin: the DeepEarth API, its WMTS and viewer support beside xcube's.

Package map (see docs/architecture.md):

* :mod:`server.plugin`: the ``xcube_plugins`` entry point, registering the APIs below;
* :mod:`server.common`: what every API shares (handler base, errors and their HTTP status,
  parameter groups, worker pools, caches);
* :mod:`server.deepearth`, :mod:`server.wmts`, :mod:`server.viewer`: one package per API
  (``api.py``, ``context.py``, ``controllers.py``, ``routes.py``);
* :mod:`server.config` (the ``DeepEarth`` config section), :mod:`server.launch`
  (``deepearth serve``), :mod:`server.render` (PNG rendering).
"""
