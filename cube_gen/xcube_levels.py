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

from . import schema as S
from .access import CubeSet


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
    """An xcube ``Datasets`` entry serving ``cube`` of the cube set through :func:`open_levels`."""
    params: dict[str, Any] = {"url": url, "cube": cube}
    if version is not None:
        params["version"] = version
    if storage_options:
        params["storage_options"] = dict(storage_options)
    return {"Identifier": identifier, "FileSystem": "memory", "Path": __file__,
            "Class": "open_levels", "InputParameters": params, **extra}
