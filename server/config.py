"""The plugin's configuration: the top-level ``DeepEarth`` section of the xcube server config.

Example::

    DeepEarth:
      CubeSet: /data/cubes-demo          # or s3://bucket/prefix (relative: to base_dir)
      StorageOptions: {anon: true}       # fsspec options for s3:// and other URLs
      CacheBytes: 1073741824             # byte-bounded LRU for tensors, images, projections
      MaxWorkers: 4                      # threads for request work (IO loop never blocks)
      RequestTimeout: 120                # seconds before a request gives up (503)
      MaxPageSize: 10000                 # observations per page
      MaxK: 1000                         # nearest neighbours per similarity request
      MaxUmapPoints: 5000                # embeddings per recomputed vision UMAP
      MaxBatchPooled: 10000              # pooled vectors per batch request
      MaxBatchFeatures: 16               # full tensors per batch request
      MaxImageSize: 1024                 # pixels per side of rendered PNGs
      MaxQueued: 256                     # waiting computations per pool before 503 (busy)
      VersionCheckSeconds: 10            # how often a request looks for a new current
                                         # version (0: serve the version opened at start)

A new version published while the server runs (``deepearth gen`` over the same target) is
served within ``VersionCheckSeconds``: between requests, the first request after the interval
reads the root manifest's ``current`` (one small read) and, when it changed, opens the new
version and swaps it in; every request reads one version from start to end, and the results
cache is keyed by version. xcube's grid datasets read through the ``deepearth`` data store
(the default of ``deepearth serve``) follow too; with ``DEEPEARTH_CHECKED_GRIDS=0`` (plain
paths) and in the viewer's observation dots, the version read at start stays until a
restart.
"""

from __future__ import annotations

from xcube.util.jsonschema import (
    JsonIntegerSchema,
    JsonNumberSchema,
    JsonObjectSchema,
    JsonStringSchema,
)

SECTION = "DeepEarth"

DEFAULTS = {
    "CacheBytes": 512 * 1024 * 1024,
    "MaxWorkers": 4,
    "RequestTimeout": 120.0,
    "MaxPageSize": 10_000,
    "MaxK": 1000,
    "MaxUmapPoints": 5000,
    "MaxBatchPooled": 10_000,
    "MaxBatchFeatures": 16,
    "MaxImageSize": 1024,
    "MaxQueued": 256,
    "VersionCheckSeconds": 10.0,
}

DEEPEARTH_SCHEMA = JsonObjectSchema(
    properties=dict(
        CubeSet=JsonStringSchema(
            min_length=1,
            description="Cube set folder or URL (e.g. s3://bucket/prefix); relative paths "
                        "are resolved against the config's base_dir"),
        StorageOptions=JsonObjectSchema(
            additional_properties=True,
            description="fsspec storage options for the cube set URL"),
        CacheBytes=JsonIntegerSchema(minimum=0,
                                     description="capacity of the byte-bounded LRU cache"),
        MaxWorkers=JsonIntegerSchema(minimum=1, maximum=64,
                                     description="worker threads for request computations"),
        RequestTimeout=JsonNumberSchema(exclusive_minimum=0,
                                        description="seconds before a request answers 503"),
        MaxPageSize=JsonIntegerSchema(minimum=1, description="observations per page"),
        MaxK=JsonIntegerSchema(minimum=1, description="neighbours per similarity request"),
        MaxUmapPoints=JsonIntegerSchema(minimum=8,
                                        description="embeddings per recomputed vision UMAP"),
        MaxBatchPooled=JsonIntegerSchema(minimum=1,
                                         description="pooled vectors per batch request"),
        MaxBatchFeatures=JsonIntegerSchema(minimum=1,
                                           description="full tensors per batch request"),
        MaxImageSize=JsonIntegerSchema(minimum=24, maximum=4096,
                                       description="largest PNG side in pixels"),
        MaxQueued=JsonIntegerSchema(minimum=1, description="computations waiting per worker "
                                    "pool before requests answer 503 (busy)"),
        VersionCheckSeconds=JsonNumberSchema(
            minimum=0, description="seconds between checks for a new current version of the "
                                   "cube set (0: never; the version opened at start is served)"),
    ),
    required=["CubeSet"],
    additional_properties=False,
)

CONFIG_SCHEMA = JsonObjectSchema(
    properties={SECTION: DEEPEARTH_SCHEMA},
)


def plain(value):
    """xcube's frozen config values (FrozenDict/FrozenList) as plain dict/list."""
    defrost = getattr(value, "defrost", None)
    return defrost() if callable(defrost) else value
