"""Patch search over HTTP: the tiny cube set built by a recipe with ``cubes.patches``, served
by ``xcube serve``; results equal a numpy brute force, filters honoured, bad patch
coordinates answer 400 naming the parameter."""

from __future__ import annotations

import io

import numpy as np
import pytest
from patch_reference import brute, reference_vectors
from PIL import Image
from server_fixtures import SERVED_PLUGIN, Http, problem_of, serve_cubeset

from cube_gen import patch_index as P
from cube_gen.access import CubeSet


@pytest.fixture(scope="module")
def http(patch_cubes, tmp_path_factory):
    with serve_cubeset(patch_cubes, tmp_path_factory.mktemp("patch-served"),
                       plugin=SERVED_PLUGIN, timeout=300) as url:
        yield Http(url)


@pytest.fixture(scope="module")
def cs(patch_cubes) -> CubeSet:
    return CubeSet.open(str(patch_cubes))


@pytest.fixture(scope="module")
def vectors(cs) -> np.ndarray:
    return reference_vectors(cs)


def _path(cs, image: int, py: str, px: str, suffix: str = "similar") -> str:
    t = cs.image_table()
    return (f"/deepearth/embeddings/{int(t.gbif_id.iat[image])}/{int(t.image_number.iat[image])}"
            f"/patches/{py}/{px}/{suffix}")


def _got_ids(cs, results):
    pos = cs.image_positions([r["gbif_id"] for r in results],
                             [r["image_number"] for r in results])
    return P.patch_id(pos, [r["patch_y"] for r in results], [r["patch_x"] for r in results])


def test_the_stage_built_and_listed_the_index(cs, patch_cubes):
    assert cs.manifest["cubes"]["patches"] == "patches.zarr"
    assert P.has_patch_index(cs)
    pindex = P.open_patch_index(cs)
    assert pindex.attrs["kind"] == "flat" and pindex.n_patches == cs.vision.sizes["image"] * 576
    assert pindex.attrs["deepearth_recipe"] == cs.manifest["recipe"]


def test_similar_patches_equal_brute_force(http, cs, vectors):
    body = http.json(_path(cs, 1, "12", "8"), k=12)
    allowed = np.ones(cs.vision.sizes["image"], bool)
    allowed[1] = False
    want, scores = brute(vectors, vectors[P.patch_id(1, 12, 8)], 12, allowed)
    np.testing.assert_array_equal(_got_ids(cs, body["results"]), want)
    np.testing.assert_allclose([r["score"] for r in body["results"]], scores, atol=2e-6)
    r0 = body["results"][0]
    assert {"gbif_id", "image_number", "patch_y", "patch_x", "score", "taxon_name", "time",
            "lat", "lon", "split", "links"} <= set(r0)
    crop = http.get(r0["links"]["crop"].split(http.base, 1)[-1])
    assert crop.status_code == 200 and crop.headers["Content-Type"] == "image/png"


def test_window_variant_and_filters(http, cs, vectors):
    t = cs.image_table()
    species = int(t.species_index.iat[0])
    name = str(cs.species_table().taxon_name.iat[species])
    body = http.json(_path(cs, 0, "3-6", "10-13"), k=5, species=name, include_self="true")
    allowed = (t.species_index.to_numpy() == species)
    ids = [P.patch_id(0, y, x) for y in range(3, 7) for x in range(10, 14)]
    want, _ = brute(vectors, vectors[ids].mean(axis=0), 5, allowed)
    np.testing.assert_array_equal(_got_ids(cs, body["results"]), want)
    assert body["window"] == {"patch_y": [3, 6], "patch_x": [10, 13]}
    assert all(r["taxon_name"] == name for r in body["results"])
    # bbox excluding every image: nothing to find
    empty = http.json(_path(cs, 0, "3", "3"), bbox="0,0,1,1")
    assert empty["results"] == []


def test_grouped_per_image(http, cs):
    body = http.json(_path(cs, 2, "5", "5"), k=2, group="true", per_image=2)
    assert body["grouped"] is True and len(body["results"]) == 2
    keys = [(r["gbif_id"], r["image_number"]) for r in body["results"]]
    assert len(set(keys)) == 2
    for r in body["results"]:
        assert len(r["patches"]) == 2 and r["score"] == r["patches"][0]["score"]
        assert "crop" in r["patches"][0]["links"]


@pytest.mark.parametrize("py,px,name", [("24", "0", "py"), ("0", "99", "px"), ("5-4", "1", "py"),
                                        ("-1", "0", "py"), ("a", "0", "py"), ("3", "4-2", "px")])
def test_bad_patch_coordinates_are_400_naming_the_parameter(http, cs, py, px, name):
    err = problem_of(http.get(_path(cs, 0, py, px)), 400)
    assert err["parameter"] == name, err


def test_crop_png(http, cs):
    r = http.get(_path(cs, 0, "0-1", "22-23", "crop.png"), size=96, margin=2)
    assert r.status_code == 200
    img = np.asarray(Image.open(io.BytesIO(r.content)))
    # window at the grid's top-right corner: crop of 4 x 4 patches (2 of margin inside the grid)
    assert img.shape[0] == img.shape[1] and img.shape[2] == 4 and img.shape[0] >= 96
    problem_of(http.get(_path(cs, 0, "0", "24", "crop.png")), 400)


def test_no_patch_index_is_404(served, tiny_cubes):
    """The shared served cube set was built without the patch index."""
    t = CubeSet.open(str(tiny_cubes)).image_table()
    err = problem_of(served.http.get(f"/deepearth/embeddings/{int(t.gbif_id.iat[0])}/"
                                     f"{int(t.image_number.iat[0])}/patches/1/1/similar"), 404)
    assert "patch index" in err["message"]
