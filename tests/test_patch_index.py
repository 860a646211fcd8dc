"""Patch index (cube_gen.patch_index): exact search on the tiny cubes equals a numpy brute
force, filters are honoured, the compressed index recalls the exact neighbours."""

from __future__ import annotations

import numpy as np
import pytest
from patch_reference import brute, reference_vectors

from cube_gen import patch_index as P
from cube_gen.access import CubeSet, Query


@pytest.fixture(scope="module")
def cs(tiny_cubes) -> CubeSet:
    return CubeSet.open(str(tiny_cubes))


@pytest.fixture(scope="module")
def all_vectors(cs) -> np.ndarray:
    """Brute-force reference: every patch's unit frame-mean vector, computed with numpy."""
    return reference_vectors(cs)


@pytest.fixture(scope="module")
def pindex(cs, tmp_path_factory) -> P.PatchIndex:
    """The patch index of the tiny cubes: built, written to patches.zarr, read back."""
    n = cs.vision.sizes["image"]
    spec = P.IndexSpec()
    index, info = P.build_index(P.cube_reader(cs), n, spec)
    assert info["plan"].kind == "flat"  # 3,456 patches: below exact_below
    url = str(tmp_path_factory.mktemp("patches") / P.PATCHES_PATH)
    attrs = P.index_attrs(info["plan"], spec, info["stats"], 0)
    nbytes = P.write_index(url, None, index, attrs)
    back, attrs = P.read_index(url)
    assert attrs["index_bytes"] == nbytes and back.ntotal == n * 576
    return P.PatchIndex(back, attrs, P.cube_exact_vectors(cs))


def _positions(cs, result):
    return cs.image_positions([r["gbif_id"] for r in result["results"]],
                              [r["image_number"] for r in result["results"]])


@pytest.mark.parametrize("image,py,px", [(0, 12, 12), (3, 0, 23), (5, 20, 4)])
def test_exact_search_equals_brute_force(cs, pindex, all_vectors, image, py, px):
    k = 15
    res = P.similar_patches(cs, pindex, image, P.Window.patch(py, px), k=k)
    allowed = np.ones(cs.vision.sizes["image"], bool)
    allowed[image] = False  # "where else": other images by default
    want_ids, want_scores = brute(all_vectors, all_vectors[P.patch_id(image, py, px)], k,
                                   allowed)
    pos = _positions(cs, res)
    got_ids = P.patch_id(pos, [r["patch_y"] for r in res["results"]],
                         [r["patch_x"] for r in res["results"]])
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose([r["score"] for r in res["results"]], want_scores, atol=2e-6)
    assert [r["rank"] for r in res["results"]] == list(range(1, k + 1))


def test_include_self_finds_the_patch_itself(cs, pindex):
    res = P.similar_patches(cs, pindex, 2, P.Window.patch(7, 9), k=3, include_self=True)
    top = res["results"][0]
    assert _positions(cs, res)[0] == 2 and (top["patch_y"], top["patch_x"]) == (7, 9)
    assert top["score"] == pytest.approx(1.0, abs=1e-5)


def test_window_query_is_the_mean_of_its_patches(cs, pindex, all_vectors):
    w = P.Window(4, 6, 8, 10)  # rows 4..7, columns 6..9
    res = P.similar_patches(cs, pindex, 1, w, k=5)
    ids = [P.patch_id(1, y, x) for y in range(4, 8) for x in range(6, 10)]
    q = all_vectors[ids].mean(axis=0)
    allowed = np.ones(cs.vision.sizes["image"], bool)
    allowed[1] = False
    want_ids, want_scores = brute(all_vectors, q, 5, allowed)
    pos = _positions(cs, res)
    got = P.patch_id(pos, [r["patch_y"] for r in res["results"]],
                     [r["patch_x"] for r in res["results"]])
    np.testing.assert_array_equal(got, want_ids)
    np.testing.assert_allclose([r["score"] for r in res["results"]], want_scores, atol=2e-6)
    for r in res["results"]:  # each match carries a window of the query's size
        (y0, y1), (x0, x1) = r["window"]["patch_y"], r["window"]["patch_x"]  # inclusive
        assert (y1 - y0, x1 - x0) == (3, 3) and y0 <= r["patch_y"] <= y1 and x0 <= r["patch_x"] <= x1


def test_filters_are_honoured(cs, pindex, all_vectors):
    t = cs.image_table()
    species = int(t.species_index.iat[0])
    for q in (Query.make(species=(species,)), Query.make(split="train"),
              Query.make(bbox=(float(t.lon.min()), float(t.lat.min()),
                               float(t.lon.median()), float(t.lat.max()))),
              Query.make(start=t.time.sort_values().iat[2])):
        allowed = np.zeros(len(t), bool)
        allowed[cs.select_images(q)] = True
        allowed[4] = False
        res = P.similar_patches(cs, pindex, 4, P.Window.patch(10, 10), k=8, query=q)
        if not allowed.any():
            assert res["results"] == []
            continue
        pos = _positions(cs, res)
        assert allowed[pos].all(), q
        want, _ = brute(all_vectors, all_vectors[P.patch_id(4, 10, 10)], 8, allowed)
        got = P.patch_id(pos, [r["patch_y"] for r in res["results"]],
                         [r["patch_x"] for r in res["results"]])
        np.testing.assert_array_equal(got, want)


def test_grouped_per_image(cs, pindex, all_vectors):
    res = P.similar_patches(cs, pindex, 0, P.Window.patch(12, 12), k=3, group=True,
                            per_image=4, rerank=3456)
    pos = _positions(cs, res)
    assert len(set(pos.tolist())) == len(pos) == 3 and 0 not in pos
    q = all_vectors[P.patch_id(0, 12, 12)]
    best = [max(all_vectors[P.patch_id(i, *np.divmod(np.arange(576), 24))] @ q)
            for i in range(cs.vision.sizes["image"])]
    best[0] = -np.inf
    assert list(pos) == list(np.argsort(best)[::-1][:3])
    for r in res["results"]:
        scores = [p["score"] for p in r["patches"]]
        assert len(scores) == 4 and scores == sorted(scores, reverse=True)
        assert r["score"] == scores[0]


@pytest.mark.parametrize("window,name", [(P.Window(24, 0, 25, 1), "patch_y"),
                                         (P.Window(0, -1, 1, 0), "patch_x"),
                                         (P.Window(5, 5, 5, 9), "patch_y")])
def test_bad_windows_name_the_parameter(window, name):
    with pytest.raises(ValueError, match=name):
        window.check()


@pytest.mark.parametrize("py,px,name", [("24", "0", "py"), ("0", "-1", "px"), ("5-4", "1", "py"),
                                        ("a", "0", "py"), ("3", "4-2-1", "px"), ("3", "", "px")])
def test_parse_window_rejects_bad_coordinates(py, px, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        P.parse_window(py, px)


def test_parse_window_ranges_are_inclusive():
    assert P.parse_window("4-7", "23") == P.Window(4, 23, 8, 24)
    assert P.parse_window("0", "0-23").as_dict() == {"patch_y": [0, 0], "patch_x": [0, 23]}


def test_plan_respects_the_memory_budget():
    plan = P.plan_index(P.IndexSpec(), 7949 * 576)  # the published set
    assert plan.kind == "ivfpq" and plan.estimated_bytes < 2 << 30
    assert plan.estimated_bytes / plan.n_patches < 100  # in memory: codes, ids, tables
    with pytest.raises(ValueError, match="memory_budget_mb"):
        P.plan_index(P.IndexSpec(memory_budget_mb=100), 7949 * 576)
    with pytest.raises(ValueError, match="memory_budget_mb"):  # flat at scale: 26 GB
        P.plan_index(P.IndexSpec(kind="flat"), 7949 * 576)


def test_index_from_the_reused_training_sample_is_the_streamed_index():
    """Training on every patch: adding the sample's rows gives the index that reading every
    image again gives, byte for byte (and reads each image once)."""
    faiss = P._faiss()
    n_images, nf = 24, 256
    vec, _ = P.simulate_patch_vectors(n_images, n_species=8, n_features=nf, seed=5)
    feats = vec.reshape(n_images, 1, 24, 24, nf).astype(np.float16)
    spec = P.IndexSpec(kind="ivfpq", dims=48, pq_bytes=6, train_patches=n_images * 576)
    reads = []

    def read(i):
        reads.append(int(i))
        return feats[i]

    built = {}
    for reuse in (True, False):
        reads.clear()
        index, info = P.build_index(read, n_images, spec, n_features=nf, reuse_sample=reuse)
        built[reuse] = faiss.serialize_index(index).tobytes()
        assert index.ntotal == n_images * 576
        assert sorted(reads) == sorted(list(range(n_images)) * (1 if reuse else 2))
    assert built[True] == built[False]


def test_compressed_index_recall_at_10():
    """IVF-PQ + exact re-ranking against exact search, on structured synthetic patches."""
    n_images, nf = 24, 256
    vec, _ = P.simulate_patch_vectors(n_images, n_species=8, n_features=nf, seed=3)
    # 256 -> 48 dims and 6-byte codes: the production ratios (1408 -> 256, 32 bytes)
    spec = P.IndexSpec(kind="ivfpq", dims=48, pq_bytes=6, train_patches=12_000, nprobe=16)
    index, info = P.build_index(lambda i: vec[i * 576:(i + 1) * 576].reshape(1, 24, 24, nf),
                                n_images, spec, n_features=nf)
    assert info["plan"].kind == "ivfpq" and index.ntotal == len(vec)
    pi = P.PatchIndex.from_index(index, info["plan"], spec, lambda ids: vec[ids])
    raw = P.PatchIndex.from_index(index, info["plan"], spec, None)  # no re-ranking
    rng = np.random.default_rng(0)
    recall, recall_raw = [], []
    for q in rng.choice(len(vec), 30, replace=False):
        exact = set(P.brute_force(vec, vec[q], 10)[0].tolist())
        recall.append(len(exact & {m.patch for m in pi.search(vec[q], 10)}) / 10)
        recall_raw.append(len(exact & {m.patch for m in raw.search(vec[q], 10)}) / 10)
    assert np.mean(recall) >= 0.9, (np.mean(recall), np.mean(recall_raw))
    assert np.mean(recall) > np.mean(recall_raw)  # re-ranking is what gets it there
    # a filter: only even images
    allowed = np.arange(n_images) % 2 == 0
    got = pi.search(vec[5], 10, allowed=allowed)
    assert len(got) == 10 and all(allowed[m.image] for m in got)
