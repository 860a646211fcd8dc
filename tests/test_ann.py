"""Similarity search: the FAISS HNSW index (cube_gen.ann) against exact search, filters, storage."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from conftest import copy_cubes, current_dir, reinventory

from cube_gen import analysis, ann
from cube_gen.access import CubeSet
from cube_gen.analysis import top_k_cosine
from cube_gen.errors import CubeError
from cube_gen.query import Query

N = 60_000  # above EXACT_BELOW, so that filters of more than EXACT_SUBSET rows use the graph


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    """Rows like pooled vectors (species centres, low-dimensional variation, noise); labels."""
    rng = np.random.default_rng(0)
    d = 256
    centres = rng.normal(0, 1, (150, d))
    factors = rng.normal(0, 1, (16, d)) / 4
    labels = rng.integers(0, 150, N)
    x = centres[labels] + rng.standard_normal((N, 16)) @ (3 * factors) \
        + 0.3 * rng.standard_normal((N, d))
    return x.astype(np.float32), labels


@pytest.fixture(scope="module")
def unit(clustered) -> np.ndarray:
    return ann.unit(clustered[0])


@pytest.fixture(scope="module")
def index(clustered) -> ann.VectorIndex:
    return ann.VectorIndex.build(clustered[0], dims=48, ef_construction=40, train_size=20_000)


def _recall(got: np.ndarray, want: np.ndarray) -> float:
    return len(set(got.tolist()) & set(want.tolist())) / len(want)


def _mean_recall(unit, index, allowed=None, queries=range(0, N, 600)) -> float:
    rows_allowed = None if allowed is None else np.flatnonzero(allowed)
    recalls = []
    for q in queries:
        rows, scores = ann.search(unit, unit[q], 10, index, allowed, exclude=np.array([q]))
        exact, _ = top_k_cosine(unit, unit[q], 10, rows_allowed, np.array([q]))
        np.testing.assert_allclose(scores, unit[rows] @ unit[q], rtol=1e-5)  # exact scores
        assert q not in rows and np.all(np.diff(scores) <= 0) and len(rows) == 10
        if allowed is not None:
            assert allowed[rows].all()
        recalls.append(_recall(rows, exact))
    return float(np.mean(recalls))


def test_index_recall_against_exact_search(unit, index):
    assert index.attrs["factory"] == "PCA48,HNSW32,Flat" and index.attrs["index_format"] == 2
    assert _mean_recall(unit, index) >= 0.95


def test_filtered_recall_through_the_graph(clustered, unit, index):
    rng = np.random.default_rng(1)
    random_half = rng.random(N) < 0.5  # 30k rows > EXACT_SUBSET: the bitmap selector
    assert _mean_recall(unit, index, random_half) >= 0.95
    species = np.isin(clustered[1], rng.choice(150, 60, replace=False))  # ~24k rows
    assert species.sum() > ann.EXACT_SUBSET
    assert _mean_recall(unit, index, species) >= 0.95


def test_candidates_stay_within_selective_masks(unit, index):
    rng = np.random.default_rng(2)
    for frac in (0.2, 0.02, 0.001):
        allowed = rng.random(N) < frac
        for q in (3, 777, 41_000):
            cand = index.candidates(unit[q], 100, allowed)
            assert 0 < len(cand) <= 100 and allowed[cand].all()
            assert len(cand) == 100 or frac < 0.1  # may miss some (search() is exact there)
    assert len(index.candidates(unit[0], 5, np.zeros(N, bool))) == 0
    with pytest.raises(ValueError, match="mask of 3 rows"):
        index.candidates(unit[0], 5, np.ones(3, bool))


def test_small_subsets_are_searched_exactly(unit, index):
    rng = np.random.default_rng(3)
    for size in (300, ann.EXACT_SUBSET):
        allowed = np.zeros(N, bool)
        allowed[rng.choice(N, size, replace=False)] = True
        for q in (5, 30_001):
            rows, scores = ann.search(unit, unit[q], 10, index, allowed, np.array([q]))
            exact = top_k_cosine(unit, unit[q], 10, np.flatnonzero(allowed), np.array([q]))
            np.testing.assert_array_equal(rows, exact[0])
            np.testing.assert_array_equal(scores, exact[1])
    rows, _ = ann.search(unit, unit[5], 10, index, np.zeros(N, bool))
    assert len(rows) == 0


def test_too_few_candidates_fall_back_to_exact(unit):
    class Blind:  # an index that finds nothing
        def candidates(self, query, n, allowed=None):
            return np.zeros(0, np.int64)

    allowed = np.arange(N) % 2 == 0
    rows, scores = ann.search(unit, unit[8], 10, Blind(), allowed, np.array([8]))
    exact = top_k_cosine(unit, unit[8], 10, np.flatnonzero(allowed), np.array([8]))
    np.testing.assert_array_equal(rows, exact[0])


def test_similarity_zarr_round_trip(tmp_path, clustered, unit, index):
    q = unit[0]
    back = ann.VectorIndex.from_bytes(index.to_bytes(), index.attrs)
    np.testing.assert_array_equal(back.candidates(q, 50), index.candidates(q, 50))
    url = str(tmp_path / ann.SIMILARITY_PATH)
    ann.write_similarity(url, None, index, {"n": N})
    back = ann.read_similarity(url)
    assert back.attrs["kind"] == "hnsw" and back.ef_search == ann.EF_SEARCH
    np.testing.assert_array_equal(back.candidates(q, 50), index.candidates(q, 50))
    _as_format_1(url)
    with pytest.raises(CubeError, match="index format 1 .*reads format 2") as err:
        ann.read_similarity(url)
    assert isinstance(err.value, ann.OutdatedIndex)
    ann.write_similarity(url, None, None, {"n": 10})
    assert ann.read_similarity(url) is None  # exact below the threshold
    assert ann.read_similarity(str(tmp_path / "absent.zarr")) is None


def _as_format_1(url: str) -> None:
    """Mark a similarity.zarr as written by the IVF version (format 1)."""
    group = zarr.open_group(url, mode="r+")
    group.attrs.update({"kind": "ivf", "index_format": 1, "factory": "PCA128,IVF16,Flat"})
    zarr.consolidate_metadata(url)


def test_recipe_writes_exact_marker_and_server_path_uses_an_index(tiny_cubes, tmp_path):
    cs = CubeSet.open(str(tiny_cubes))
    assert ann.open_similarity(cs) is None  # 6 embeddings: exact search
    q = Query.make(split="train")
    exact = analysis.similar_embeddings(cs, 0, k=3, query=q)
    want = [(r["gbif_id"], r["image_number"], r["score"]) for r in exact]
    # the same cube set with an HNSW index (as the recipe writes above EXACT_BELOW)
    cubes = copy_cubes(tiny_cubes, tmp_path / "cubes")
    pooled = CubeSet.open(str(cubes)).pooled()
    idx = ann.VectorIndex.build(pooled, dims=4)
    url = str(current_dir(cubes) / ann.SIMILARITY_PATH)
    ann.write_similarity(url, None, idx, {"n": len(pooled)})
    reinventory(cubes)
    cs2 = CubeSet.open(str(cubes))
    assert ann.open_similarity(cs2) is not None
    got = analysis.similar_embeddings(cs2, 0, k=3, query=q)
    assert [(r["gbif_id"], r["image_number"], r["score"]) for r in got] == want
    # an index of the older format is rebuilt in memory, with a warning
    _as_format_1(url)
    reinventory(cubes)
    cs3 = CubeSet.open(str(cubes))
    with pytest.warns(RuntimeWarning, match="format 1 .*building one in memory"):
        rebuilt = ann.open_similarity(cs3)
    assert rebuilt.attrs["index_format"] == ann.INDEX_FORMAT
    got = analysis.similar_embeddings(cs3, 0, k=3, query=q)
    assert [(r["gbif_id"], r["image_number"], r["score"]) for r in got] == want


def test_selective_filters_scan_the_allowed_rows_pca_vectors(unit, index, monkeypatch):
    rng = np.random.default_rng(5)
    allowed = rng.random(N) < 0.2  # ~12k rows, a share <= SCAN_FRACTION: the scan
    index._subsets.clear()  # (earlier tests' filters)
    pca, codes = index._codes()
    q = unit[123]
    np.testing.assert_allclose(codes[:5], pca.apply(unit[:5]), atol=1e-5)  # the graph's rows
    walked = index.candidates(q, 100, allowed)  # a filter's first query walks the graph
    assert allowed[walked].all() and len(index._subsets) == 0
    cand = index.candidates(q, 100, allowed)  # the second scans the allowed rows
    rows = np.flatnonzero(allowed)
    d = ((codes[rows] - pca.apply(q[None])[0]) ** 2).sum(axis=1)
    np.testing.assert_array_equal(np.sort(cand), np.sort(rows[np.argsort(d)[:100]]))
    assert allowed[cand].all() and len(index._subsets) == 1
    index.candidates(unit[7], 100, allowed)  # the same filter: its gathered rows reused
    assert len(index._subsets) == 1
    monkeypatch.setattr(ann, "SUBSET_CACHE_BYTES", 1)  # at most one filter kept
    other = rng.random(N) < 0.1
    index.candidates(q, 100, other)
    index.candidates(q, 100, other)
    assert len(index._subsets) == 1 and index._key(other) in index._subsets
    wide = rng.random(N) < 0.4  # above SCAN_FRACTION: the graph with the bitmap selector
    assert _mean_recall(unit, index, wide) >= 0.95 and len(index._subsets) == 1
    repeated = rng.random(N) < 0.2
    index.candidates(q, 10, repeated)  # seen once: the queries below scan
    assert _mean_recall(unit, index, repeated) >= 0.99
