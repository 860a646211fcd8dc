"""Comparing two cube sets value by value (used by resume and S3 tests)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from cube_gen import schema as S

# attributes that legitimately differ between two builds of the same data
VOLATILE_ATTRS = {"date_created", "deepearth_recipe", "source", "history"}


def _clean(ds: xr.Dataset) -> xr.Dataset:
    ds = ds.copy()
    ds.attrs = {k: v for k, v in ds.attrs.items() if k not in VOLATILE_ATTRS}
    return ds


def cube_url(url: str, cube: str, storage_options=None) -> str:
    """URL of a cube in the current version of the cube set at ``url``."""
    from cube_gen.release import resolve
    from cube_gen.store import Target

    prefix = resolve(Target(url, storage_options)).prefix
    return "/".join([url.rstrip("/"), *prefix, S.CUBE_PATHS[cube]])


def open_cube(url: str, cube: str, level: int = 0, storage_options=None) -> xr.Dataset:
    path = cube_url(url, cube, storage_options)
    if cube in S.GRID_CUBES:
        path = f"{path}/{level}.zarr"
    return xr.open_zarr(path, consolidated=True, storage_options=storage_options)


def assert_cubesets_equal(a: str, b: str, a_options=None, b_options=None) -> None:
    """Every variable, coordinate and (non-volatile) attribute of every cube is equal."""
    for cube in S.CUBES:
        levels = [0, 1] if cube in S.GRID_CUBES else [0]
        for level in levels:
            x = _clean(open_cube(a, cube, level, a_options)).load()
            y = _clean(open_cube(b, cube, level, b_options)).load()
            assert set(x.variables) == set(y.variables), (cube, set(x.variables) ^ set(y.variables))
            for name in x.variables:
                vx, vy = x[name].values, y[name].values
                if vx.dtype.kind in "fc":
                    np.testing.assert_array_equal(vx, vy, err_msg=f"{cube}/{name}")
                else:
                    assert vx.tolist() == vy.tolist(), f"{cube}/{name} differs"
                assert x[name].attrs == y[name].attrs, f"{cube}/{name} attrs differ"
            assert x.attrs == y.attrs, f"{cube} attrs differ"
