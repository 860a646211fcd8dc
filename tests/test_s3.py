"""The pipeline on S3 (moto's standalone server on loopback): read, write, open."""

from __future__ import annotations

import json

import numpy as np
import s3fs
import xarray as xr
from cubecompare import assert_cubesets_equal

from cube_gen import schema as S
from cube_gen.access import CubeSet
from cube_gen.reader import SourceDataset


def test_reader_reads_the_source_from_s3(s3, s3_cubes, tiny_source):
    remote = SourceDataset("s3://deepearth/source", s3.storage_options)
    local = SourceDataset(str(tiny_source))
    a, b = remote.read_observations(), local.read_observations()
    assert a.gbif_id.tolist() == b.gbif_id.tolist()
    ra = next(remote.iter_embeddings())
    rb = next(local.iter_embeddings())
    assert (ra.gbif_id, ra.image_number) == (rb.gbif_id, rb.image_number)
    np.testing.assert_array_equal(ra.features, rb.features)


def test_recipe_writes_a_complete_cube_set_to_s3(s3, s3_cubes):
    fs = s3fs.S3FileSystem(**s3.storage_options)
    names = set(p.rsplit("/", 1)[-1] for p in fs.ls("deepearth/cubes"))
    assert names == {"versions", S.MANIFEST}  # no aliases on object stores
    assert not fs.exists("deepearth/cubes/.staging")
    current = json.loads(fs.cat_file(f"deepearth/cubes/{S.MANIFEST}"))["current"]
    cubes = set(p.rsplit("/", 1)[-1] for p in fs.ls(f"deepearth/cubes/versions/{current}"))
    assert {"observations.zarr", "species.zarr", "vision.zarr", "grid.levels",
            "release.json"} <= cubes
    # consolidated metadata present in every cube; plain zarr readers open a version by URL
    for cube in (S.OBSERVATIONS, S.SPECIES, S.VISION):
        ds = xr.open_zarr(f"{s3_cubes}/versions/{current}/{S.CUBE_PATHS[cube]}",
                          consolidated=True, storage_options=s3.storage_options)
        assert ds.attrs["deepearth_cube"] == cube
    assert CubeSet.open(s3_cubes, s3.storage_options).version == current


def test_s3_cubes_equal_the_local_build(s3, s3_cubes, tiny_cubes):
    assert_cubesets_equal(str(tiny_cubes), s3_cubes, b_options=s3.storage_options)


def test_access_api_reads_from_s3(s3, s3_cubes, tiny_cubes):
    remote = CubeSet.open(s3_cubes, s3.storage_options)
    local = CubeSet.open(str(tiny_cubes))
    t = local.image_table()
    for i in range(len(t)):
        pos = remote.image_position(int(t.gbif_id[i]), int(t.image_number[i]))
        np.testing.assert_array_equal(remote.features(pos), local.features(i))
    np.testing.assert_array_equal(remote.pooled(), local.pooled())
    q = dict(bbox=(-81.6, 28.2, -81.0, 28.9), start="2014-01-01", end="2022-12-31")
    np.testing.assert_array_equal(remote.select_observations(**q), local.select_observations(**q))
