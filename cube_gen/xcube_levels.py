"""The grid pyramids as xcube multi-level datasets read through the checked store.

xcube serves ``grid*.levels`` itself (tiles, WMTS, time series, the viewer). Opened by
path, zarr would give it fill values for lost chunks, drawn as empty map tiles. Listed
in the server config as a computed dataset instead, xcube reads every level through a
:class:`~cube_gen.access.CubeSet` of one release, so a missing or truncated chunk raises
:class:`~cube_gen.errors.ChunkMissing` / :class:`~cube_gen.errors.ChunkCorrupt` naming it::

    Datasets:
      - Identifier: grid
        FileSystem: memory
        Path: <site-packages>/cube_gen/xcube_levels.py
        Class: open_levels
        InputParameters: {url: s3://bucket/set, cube: grid, version: <id>,
                          storage_options: {...}}

(:func:`dataset_config` writes such an entry.)
"""

from __future__ import annotations

from typing import Any

import xarray as xr
from xcube.core.mldataset import LazyMultiLevelDataset
from xcube.core.store import DataStore, DataStoreError, MultiLevelDatasetDescriptor
from xcube.util.jsonschema import JsonObjectSchema, JsonStringSchema

from cube_gen import schema as S
from cube_gen.access import CubeSet


class CheckedLevels(LazyMultiLevelDataset):
    """An xcube multi-level dataset over the levels of one pyramid of one cube set version."""

    def __init__(self, cubeset: CubeSet, cube: str = S.GRID, ds_id: str | None = None):
        super().__init__(ds_id=ds_id)
        self.cubeset = cubeset
        self.cube = cube

    def _get_num_levels_lazily(self) -> int:
        levels = self.cubeset.target.read_json(self.cubeset.target.path(
            *self.cubeset.prefix, S.CUBE_PATHS[self.cube], ".zlevels"))
        if levels and levels.get("num_levels"):
            return int(levels["num_levels"])
        return len([p for p in self.cubeset.target.fs.ls(self.cubeset.target.path(
            *self.cubeset.prefix, S.CUBE_PATHS[self.cube])) if p.endswith(".zarr")])

    def _get_dataset_lazily(self, index: int, parameters: dict[str, Any]) -> xr.Dataset:
        return self.cubeset.grid(index, cube=self.cube)


def open_levels(url: str, cube: str = S.GRID, version: str | None = None,
                storage_options: dict[str, Any] | None = None) -> CheckedLevels:
    """The xcube ``Class`` of a computed dataset entry: a pyramid of a cube set version."""
    return CheckedLevels(CubeSet.open(url, storage_options, version=version), cube)


def dataset_config(identifier: str, url: str, cube: str = S.GRID, version: str | None = None,
                   storage_options: dict[str, Any] | None = None, **extra: Any) -> dict:
    """An xcube ``Datasets`` entry serving ``cube`` of the cube set through :func:`open_levels`.

    (xcube imports this file by path, outside its package: imports here are absolute.)
    """
    params: dict[str, Any] = {"url": url, "cube": cube}
    if version is not None:
        params["version"] = version
    if storage_options:
        params["storage_options"] = dict(storage_options)
    return {"Identifier": identifier, "FileSystem": "memory", "Path": __file__,
            "Class": "open_levels", "InputParameters": params, **extra}


class DeepEarthDataStore(DataStore):
    """An xcube data store (``StoreId: deepearth``) of the grid pyramids of a cube set.

    Registered by the server plugin; in the config
    (see :func:`cube_gen.xcube_config.store_config`)::

        DataStores:
          - Identifier: deepearth
            StoreId: deepearth
            StoreParams: {url: s3://bucket/set, storage_options: {...}}
            Datasets: [{Path: grid, Identifier: grid, Style: ...}]

    Every level is read through the checked store of the version current when the store
    opened (or ``version``); the server moves it to a newer version with :meth:`follow`.
    """

    def __init__(self, url: str, storage_options: dict | None = None,
                 version: str | None = None):
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.version = version
        self._cs: CubeSet | None = None

    @property
    def cubeset(self) -> CubeSet:
        if self._cs is None:
            self._cs = CubeSet.open(self.url, self.storage_options, version=self.version)
        return self._cs

    def follow(self, cubeset: CubeSet) -> bool:
        """Open pyramids of ``cubeset`` (another version of this store's cube set) from now
        on; False, and nothing changed, for another cube set or a store pinned to a version.
        Pyramids opened before keep reading their version."""
        if self.version is not None or self.url.rstrip("/") != cubeset.url:
            return False
        self._cs = cubeset
        return True

    @classmethod
    def get_data_store_params_schema(cls) -> JsonObjectSchema:
        return JsonObjectSchema(properties={
            "url": JsonStringSchema(), "version": JsonStringSchema(),
            "storage_options": JsonObjectSchema(additional_properties=True)},
            required=["url"], additional_properties=False)

    @classmethod
    def get_data_types(cls) -> tuple[str, ...]:
        return ("mldataset",)

    def get_data_types_for_data(self, data_id: str) -> tuple[str, ...]:
        return ("mldataset",)

    def get_data_ids(self, data_type=None, include_attrs=None):
        for cube in S.GRID_CUBES:
            if S.CUBE_PATHS[cube] in (self.cubeset.manifest.get("cubes") or {}).values():
                yield (cube, {}) if include_attrs is not None else cube

    def has_data(self, data_id: str, data_type=None) -> bool:
        return data_id in S.GRID_CUBES

    def describe_data(self, data_id: str, data_type=None):
        ml = self.open_data(data_id)
        return MultiLevelDatasetDescriptor(data_id, num_levels=ml.num_levels)

    def get_data_opener_ids(self, data_id=None, data_type=None) -> tuple[str, ...]:
        return ("mldataset:levels:deepearth",)

    def get_open_data_params_schema(self, data_id=None, opener_id=None) -> JsonObjectSchema:
        return JsonObjectSchema(additional_properties=True)

    def open_data(self, data_id: str, opener_id=None, **open_params) -> CheckedLevels:
        if data_id not in S.GRID_CUBES:
            raise DataStoreError(f"no grid pyramid {data_id!r} (one of "
                                 f"{', '.join(S.GRID_CUBES)})")
        return CheckedLevels(self.cubeset, data_id, ds_id=data_id)

    @classmethod
    def get_search_params_schema(cls, data_type=None) -> JsonObjectSchema:
        return JsonObjectSchema(additional_properties=False)

    def search_data(self, data_type=None, **search_params):
        return iter(())
