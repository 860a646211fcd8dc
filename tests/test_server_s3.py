"""The DeepEarth xcube plugin serving a cube set from S3 (moto), with credentials in the
storage options: xcube reads the grid through a ``DataStores`` entry, the plugin reads the
tables and tensors through fsspec."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from cube_gen import schema as S
from cube_gen.access import CubeSet
from server.launch import serving

TIMEOUT = 60


@pytest.fixture(scope="module")
def s3_server(s3, s3_cubes: str, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("xcube-serve-s3")
    with serving(s3_cubes, workdir, storage_options=s3.storage_options) as url:
        yield url, yaml.safe_load((workdir / "config.yml").read_text())


def test_s3_config_uses_a_data_store(s3_server, s3):
    _, cfg = s3_server
    assert "Datasets" not in cfg
    # the plugin's checked store: xcube reads the grid of the current version through it
    (store,) = cfg["DataStores"]
    assert store["StoreId"] == "deepearth"
    assert store["StoreParams"]["url"] == "s3://deepearth/cubes"
    assert store["StoreParams"]["storage_options"] == s3.storage_options
    assert cfg["DeepEarth"]["CubeSet"] == "s3://deepearth/cubes"


def test_s3_plugin_and_grid(s3_server, s3, s3_cubes, tiny_cubes: Path):
    url, _ = s3_server
    health = requests.get(url + "/deepearth/health", timeout=TIMEOUT).json()
    assert health["status"] == "ok" and health["cubeset"] == "s3://deepearth/cubes"
    local = CubeSet.open(str(tiny_cubes))
    remote = CubeSet.open(s3_cubes, s3.storage_options)
    t = remote.image_table()
    gid, num = int(t.gbif_id[1]), int(t.image_number[1])
    r = requests.get(f"{url}/deepearth/embeddings/{gid}/{num}/features", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.load(io.BytesIO(r.content)), remote.features(1))
    np.testing.assert_array_equal(remote.features(1), local.features(1))
    page = requests.get(url + "/deepearth/observations", params={"limit": 5},
                        timeout=TIMEOUT).json()
    assert page["total"] == 240
    datasets = requests.get(url + "/datasets", timeout=TIMEOUT).json()["datasets"]
    assert sorted(d["id"] for d in datasets) == sorted(S.GRID_CUBES)
    r = requests.get(url + "/tiles/grid/observation_count/0/0/0", timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/png"
