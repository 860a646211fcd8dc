"""The server follows a new version of its cube set between requests (issue 12): within
``VersionCheckSeconds``, every request on one version, caches keyed by version; readers that
opened the old version keep it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import copy_cubes, current_dir
from release_helpers import publish_marked
from server_fixtures import Http, serve_cubeset

from cube_gen import schema as S
from cube_gen.access import CubeSet
from cube_gen.store import Target
from server.common.resources import Workers
from server.common.scope import pinned, request_scope
from server.deepearth import controllers as C
from server.deepearth.params import EmbeddingId, FeatureSlice


@pytest.fixture
def local(tiny_cubes, tmp_path) -> Path:
    return copy_cubes(tiny_cubes, tmp_path / "cubes")


def _publish(local: Path, k: int) -> str:
    """A new current version whose ``features[0]`` and grid ``observation_count`` (every
    level) are all ``k`` (every cube of the set)."""
    parts = tuple(p for p in S.CUBE_PATHS.values() if (current_dir(local) / p).exists())

    def edit(target: Target) -> None:
        for level in sorted(Path(target.staging(S.CUBE_PATHS[S.GRID])).glob("*.zarr")):
            counts = zarr.open_array(str(level), path="observation_count", mode="r+")
            counts[...] = k

    return publish_marked(Target(str(local)), str(current_dir(local)), k, parts=parts,
                          edit=edit)


def _first_embedding(cs: CubeSet) -> EmbeddingId:
    t = cs.image_table()
    return EmbeddingId(int(t.gbif_id[0]), int(t.image_number[0]))


def test_request_scope_pins_a_value_across_worker_threads():
    workers = Workers({"MaxWorkers": 2})
    made = []

    def make():
        made.append(len(made))
        return made[-1]

    async def request():
        with request_scope():
            first = await workers.run(pinned, "k", make)
            return first, await workers.run(pinned, "k", make), pinned("k", make)

    try:
        assert asyncio.run(request()) == (0, 0, 0)
        assert asyncio.run(request()) == (1, 1, 1)  # a new request: made again
        assert pinned("k", make) == 2 and pinned("k", make) == 3  # outside a request
    finally:
        workers.shutdown()


def test_context_follows_a_new_version_between_requests(local):
    from xcube.server.server import Server
    from xcube.server.webservers.tornado import TornadoFramework

    config = {"DeepEarth": {"CubeSet": str(local), "VersionCheckSeconds": 0.2},
              "api_spec": {"includes": ["deepearth"]}}
    ctx = Server(TornadoFramework(), config).ctx.get_api_ctx("deepearth")
    old = ctx.cubeset
    emb = _first_embedding(old)
    before = C.features(ctx, emb, FeatureSlice(), "float32")
    assert not (before == 7).all()
    with request_scope():
        during = ctx.cubeset
        new_id = _publish(local, 7)
        time.sleep(0.3)
        # the request that started before keeps its version and its cache entries
        assert ctx.cubeset is during and ctx.cubeset.version == old.version
        np.testing.assert_array_equal(C.features(ctx, emb, FeatureSlice(), "float32"), before)
    with request_scope():  # the next request: the new version, from start to end
        assert ctx.cubeset.version == new_id
        assert (C.features(ctx, emb, FeatureSlice(), "float32") == 7).all()
        assert C.cubeset_health(ctx)["version"] == new_id
    np.testing.assert_array_equal(old.features(0).astype(np.float32), before)  # opened before


def test_context_with_version_checks_off_keeps_its_version(local):
    from xcube.server.server import Server
    from xcube.server.webservers.tornado import TornadoFramework

    config = {"DeepEarth": {"CubeSet": str(local), "VersionCheckSeconds": 0},
              "api_spec": {"includes": ["deepearth"]}}
    ctx = Server(TornadoFramework(), config).ctx.get_api_ctx("deepearth")
    first = ctx.cubeset.version
    _publish(local, 7)
    assert ctx.follow_version() is None and ctx.cubeset.version == first


def test_served_cubeset_answers_the_new_version_within_the_interval(local, tmp_path):
    interval = 1.0
    with serve_cubeset(str(local), tmp_path / "serve",
                       plugin={"VersionCheckSeconds": interval}) as url:
        http = Http(url)
        old = CubeSet.open(str(local))
        emb = _first_embedding(old)
        path = f"/deepearth/embeddings/{emb.gbif_id}/{emb.image_number}/features"
        assert http.json("/deepearth/health")["cubeset_status"]["version"] == old.version
        before = http.npy(path)  # cached under the old version
        assert not (before == 7).all()
        new_id = _publish(local, 7)
        published = time.monotonic()
        while True:
            health = http.json("/deepearth/health")
            if health["cubeset_status"]["version"] == new_id:
                break
            assert time.monotonic() - published < interval + 5, health["cubeset_status"]
            time.sleep(0.1)
        assert time.monotonic() - published < interval + 5
        assert (http.npy(path) == 7).all()
        species = http.json("/deepearth/species")
        assert species and "Traceback" not in str(species)
        # a reader that opened the old version keeps the old values
        np.testing.assert_array_equal(old.features(0), before)
        assert (CubeSet.open(str(local)).features(0) == 7).all()


def test_xcube_grid_datasets_follow_the_new_version(local):
    from xcube.server.server import Server
    from xcube.server.webservers.tornado import TornadoFramework

    from server.launch import make_config

    config = make_config(str(local))
    config["DeepEarth"]["VersionCheckSeconds"] = 0.1
    config["api_spec"] = {"includes": ["auth", "deepearth", "datasets", "places",
                                      "deepearth-wmts"]}
    server = Server(TornadoFramework(), config)
    ctx = server.ctx.get_api_ctx("deepearth")
    datasets = server.ctx.get_api_ctx("datasets")
    wmts = server.ctx.get_api_ctx("deepearth-wmts")
    old_ml = datasets.get_ml_dataset("grid")
    assert len(wmts.layers()) > 0
    old_counts = old_ml.get_dataset(0).observation_count.values
    assert not (old_counts == 7).all()
    new_id = _publish(local, 7)
    time.sleep(0.2)
    with request_scope():
        assert ctx.cubeset.version == new_id
    new_ml = datasets.get_ml_dataset("grid")
    assert new_ml is not old_ml and new_ml.cubeset.version == new_id
    for level in range(new_ml.num_levels):
        assert (new_ml.get_dataset(level).observation_count.values == 7).all(), level
    # a pyramid looked up before reads its version; the WMTS builds its layers again
    np.testing.assert_array_equal(old_ml.get_dataset(0).observation_count.values, old_counts)
    assert wmts.layers_ready is None and len(wmts.layers()) > 0
