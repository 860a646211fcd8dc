"""Similarity search: the FAISS index (cube_gen.ann) against exact search, filters, storage."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import copy_cubes, current_dir, reinventory

from cube_gen import analysis, ann
from cube_gen.access import CubeSet
from cube_gen.analysis import top_k_cosine
from cube_gen.query import Query


@pytest.fixture(scope="module")
def clustered() -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (200, 64))
    labels = rng.integers(0, 200, 20_000)
    return (centres[labels] + rng.normal(0, 0.6, (20_000, 64))).astype(np.float32)


@pytest.fixture(scope="module")
def index(clustered) -> ann.VectorIndex:
    return ann.VectorIndex.build(clustered, dims=32, nlist=128, nprobe=16, train_size=8000)


def _recall(got: np.ndarray, want: np.ndarray) -> float:
    return len(set(got.tolist()) & set(want.tolist())) / len(want)


def test_index_recall_against_exact_search(clustered, index):
    unit = ann.unit(clustered)
    recalls = []
    for q in range(0, 20_000, 400):
        rows, scores = ann.search(unit, unit[q], 10, index, exclude=np.array([q]))
        exact, exact_scores = top_k_cosine(unit, unit[q], 10, None, np.array([q]))
        np.testing.assert_allclose(scores, unit[rows] @ unit[q], rtol=1e-6)  # exact scores
        assert q not in rows and np.all(np.diff(scores) <= 0)
        recalls.append(_recall(rows, exact))
    assert np.mean(recalls) >= 0.95


def test_filters_are_honoured(clustered, index):
    unit = ann.unit(clustered)
    rng = np.random.default_rng(1)
    for frac in (0.5, 0.05):  # through the index (bitmap selector) ...
        allowed = rng.random(len(unit)) < frac
        for q in (3, 777):
            rows, _ = ann.search(unit, unit[q], 10, index, allowed)
            assert len(rows) == 10 and allowed[rows].all()
            exact, _ = top_k_cosine(unit, unit[q], 10, np.flatnonzero(allowed))
            assert _recall(rows, exact) >= 0.8
    allowed = np.zeros(len(unit), bool)  # ... and exactly when few rows remain
    allowed[rng.choice(len(unit), 300, replace=False)] = True
    rows, scores = ann.search(unit, unit[5], 10, index, allowed)
    exact = top_k_cosine(unit, unit[5], 10, np.flatnonzero(allowed))
    np.testing.assert_array_equal(rows, exact[0])
    np.testing.assert_array_equal(scores, exact[1])
    rows, _ = ann.search(unit, unit[5], 10, index, np.zeros(len(unit), bool))
    assert len(rows) == 0
    with pytest.raises(ValueError, match="mask of 3 rows"):
        index.candidates(unit[0], 5, np.ones(3, bool))


def test_similarity_zarr_round_trip(tmp_path, clustered, index):
    url = str(tmp_path / ann.SIMILARITY_PATH)
    ann.write_similarity(url, None, index, {"n": len(clustered)})
    back = ann.read_similarity(url)
    q = ann.unit(clustered[:1])[0]
    np.testing.assert_array_equal(back.candidates(q, 50), index.candidates(q, 50))
    ann.write_similarity(url, None, None, {"n": 10})
    assert ann.read_similarity(url) is None  # exact below the threshold
    assert ann.read_similarity(str(tmp_path / "absent.zarr")) is None


def test_recipe_writes_exact_marker_and_server_path_uses_an_index(tiny_cubes, tmp_path):
    cs = CubeSet.open(str(tiny_cubes))
    assert ann.open_similarity(cs) is None  # 6 embeddings: exact search
    q = Query.make(split="train")
    exact = analysis.similar_embeddings(cs, 0, k=3, query=q)
    # the same cube set with an IVF index (as the recipe writes above EXACT_BELOW)
    cubes = copy_cubes(tiny_cubes, tmp_path / "cubes")
    pooled = CubeSet.open(str(cubes)).pooled()
    idx = ann.VectorIndex.build(pooled, dims=4, nlist=2)
    ann.write_similarity(str(current_dir(cubes) / ann.SIMILARITY_PATH), None, idx,
                         {"n": len(pooled)})
    reinventory(cubes)
    cs2 = CubeSet.open(str(cubes))
    assert ann.open_similarity(cs2) is not None
    got = analysis.similar_embeddings(cs2, 0, k=3, query=q)
    assert [(r["gbif_id"], r["image_number"], r["score"]) for r in got] == \
        [(r["gbif_id"], r["image_number"], r["score"]) for r in exact]
