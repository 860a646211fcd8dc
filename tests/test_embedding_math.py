"""Per-embedding products: the fast one-pass path against direct reference computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr
from threadpoolctl import threadpool_limits

from cube_gen import embedding_math as em
from cube_gen import pca, projection
from cube_gen.schema import ATTENTION_METHODS, IMAGE_STATS
from cube_gen.synth import synth_embedding


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    with threadpool_limits(limits=1, user_api="blas"):  # multi-threaded BLAS spin-waits here
        yield


@pytest.fixture(scope="module")
def feats() -> np.ndarray:
    rng = np.random.default_rng(5)
    return synth_embedding(11, rng.normal(0, 1, 1408).astype(np.float32))


def _reference(f: np.ndarray) -> dict:
    """The products written directly from their definitions, in float64, exact PCA by SVD."""
    x = f.astype(np.float64).reshape(8, 576, -1)
    views = np.concatenate([x.mean(axis=0, keepdims=True), x])
    a = np.abs(views)
    p = a / a.sum(axis=-1, keepdims=True)
    entropy = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(axis=-1)
    pca = np.empty((5, 9, 576))
    for v in range(9):
        xc = views[v] - views[v].mean(axis=0)
        u, s, _ = np.linalg.svd(xc, full_matrices=False)
        sc = u[:, :5] * s[:5]
        pca[:, v] = (sc * np.sign(sc[np.abs(sc).argmax(axis=0), np.arange(5)])).T
    return {
        "l2norm": np.sqrt((views ** 2).sum(axis=-1)), "variance": views.var(axis=-1),
        "entropy": entropy, "pca": pca, "pooled": x.reshape(-1, x.shape[-1]).mean(axis=0),
        "stats": {"mean_l2norm": np.linalg.norm(views[0], axis=-1).mean(),
                  "mean_entropy": entropy[0].mean(), "mean_patch_variance": views[0].var(axis=-1).mean(),
                  "frame_variance": x.var(axis=0).mean()},
    }


@pytest.fixture(scope="module")
def reference(feats) -> dict:
    return _reference(feats)


@pytest.mark.parametrize("dtype", ["float16", "float32"])  # same values, two code paths
def test_products_equal_their_definitions(feats, reference, dtype):
    f = feats.astype(dtype)
    ref = reference
    p = em.embedding_products(f, with_umap_rgb=False)
    att = p.attention.reshape(len(ATTENTION_METHODS), 9, 576)
    np.testing.assert_allclose(att[0], ref["l2norm"], rtol=1e-5)
    np.testing.assert_allclose(att[1], ref["variance"], rtol=1e-4)
    np.testing.assert_allclose(att[2], ref["entropy"], rtol=1e-5)
    for c in range(5):  # randomised PCA vs exact SVD: same sign convention, close values
        for v in range(9):
            r = ref["pca"][c, v]
            assert abs(np.corrcoef(att[3 + c, v], r)[0, 1]) >= 0.999, (c, v)
            np.testing.assert_allclose(att[3 + c, v], r, atol=2e-3 * np.abs(r).max())
    np.testing.assert_allclose(p.pooled, ref["pooled"], rtol=1e-5, atol=1e-6)
    assert list(p.stats) == list(IMAGE_STATS)
    for k, v in ref["stats"].items():
        assert p.stats[k] == pytest.approx(v, rel=1e-4), k
    assert p.umap_rgb is None
    # the single-product functions are the same computation
    np.testing.assert_array_equal(em.attention_summaries(f), p.attention)
    np.testing.assert_array_equal(em.pooled_vector(f), p.pooled)
    assert em.image_stats(f) == p.stats


def test_fast_pca_agrees_with_exact_on_planted_and_noise_spectra():
    rng = np.random.default_rng(0)
    fields = rng.normal(0, 1, (576, 6))
    dirs = rng.normal(0, 1, (6, 1408))
    amps = np.array([3.0, 2.0, 1.4, 1.0, 0.7, 0.5])
    planted = ((fields * amps) @ dirs + rng.normal(0, 1, (576, 1408))).astype(np.float32)
    for x in (planted, rng.normal(0, 1, (576, 1408)).astype(np.float32)):  # noise: no gaps
        fast, exact = pca.pca_scores_fast(x), pca._pca_scores(x)
        for c in range(5):
            assert abs(np.corrcoef(fast[:, c], exact[:, c])[0, 1]) >= 0.99
        np.testing.assert_allclose(fast, exact, atol=2e-3 * np.abs(exact).max())


def test_zero_patches_and_tiny_inputs():
    f = np.zeros((8, 4, 4, 16), np.float16)
    f[:, 0, 0, :] = 1
    p = em.embedding_products(f, with_umap_rgb=True)
    assert np.isfinite(p.attention).all() and p.attention.shape == (8, 9, 4, 4)
    assert p.attention[2, 0, 1, 1] == 0  # entropy of an all-zero patch
    assert p.attention[2, 0, 0, 0] == pytest.approx(np.log(16), rel=1e-5)
    assert p.umap_rgb.shape == (4, 4, 3) and p.umap_rgb.dtype == np.uint8


def test_umap_rgb_is_deterministic_and_keeps_feature_neighbourhoods(feats):
    rgb = em.umap_rgb(feats)
    assert rgb.shape == (24, 24, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, em.umap_rgb(feats))
    np.testing.assert_array_equal(rgb, em.embedding_products(feats).umap_rgb)
    assert rgb.reshape(-1, 3).min(axis=0).tolist() == [0, 0, 0]
    assert rgb.reshape(-1, 3).max(axis=0).tolist() == [255, 255, 255]
    # patches of the object are told apart from the background:
    # the colour distances between patches rank-correlate with the feature distances
    mean = feats.astype(np.float32).mean(axis=0).reshape(576, -1)
    rho = spearmanr(pdist(rgb.reshape(576, 3).astype(float)), pdist(mean, "cosine")).statistic
    assert rho > 0.5


def test_project_3d_separates_clusters():
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 1, (4, 64)) * 4
    labels = np.repeat(np.arange(4), 60)
    x = (centres[labels] + rng.normal(0, 1, (240, 64))).astype(np.float32)
    y, method = projection.project_3d(x, metric="euclidean")
    assert method == "umap" and y.shape == (240, 3) and np.isfinite(y).all()
    d = np.linalg.norm(y[:, None] - y[None], axis=-1)
    same = labels[:, None] == labels[None]
    assert np.median(d[same]) * 3 < np.median(d[~same])


def test_whole_set_pca_in_blocks_equals_an_svd():
    """More rows than features: the covariance path, one block or many, equals an SVD."""
    rng = np.random.default_rng(3)
    x = (rng.normal(0, 1, (3000, 8)) * [5, 3, 2, 1, 1, 1, 1, 1]) @ rng.normal(0, 1, (8, 40))
    x = (x + rng.normal(0, 0.1, (3000, 40))).astype(np.float32)
    xc = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    ref = u[:, :5] * s[:5]
    ref *= np.sign(ref[np.abs(ref).argmax(axis=0), np.arange(5)])
    for block in (65_536, 128, 7):
        np.testing.assert_allclose(pca._pca_scores(x, 5, block=block), ref,
                                   atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(pca._pca_scores(x.astype(np.float16), 3)[:, 0], ref[:, 0],
                               atol=2e-2 * np.abs(ref[:, 0]).max())


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_approximate_neighbours_find_the_exact_ones(metric):
    rng = np.random.default_rng(4)  # pooled-like: species centres, latent factors, noise
    centres = rng.normal(0, 1, (30, 256)) * 2
    factors = rng.normal(0, 1, (4000, 24)) @ rng.normal(0, 1, (24, 256))
    x = (centres[rng.integers(0, 30, 4000)] + factors + rng.normal(0, 0.3, (4000, 256)))
    x = x.astype(np.float32)
    idx, dist = projection.knn_approximate(x, 15, metric)
    ex_idx, ex_dist = projection._knn(x, 15, metric)
    assert idx.shape == dist.shape == (4000, 15)
    assert (idx[:, 0] == np.arange(4000)).all() and (dist[:, 0] == 0).all()
    recall = np.mean([len(set(a[1:]) & set(b[1:])) / 14 for a, b in zip(idx, ex_idx, strict=True)])
    assert recall >= 0.9
    assert (np.diff(dist, axis=1) >= 0).all()  # nearest first
    # the distances are the exact ones of the pairs found
    i, j = np.repeat(np.arange(4000), 14), idx[:, 1:].ravel()
    if metric == "cosine":
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        exact = 1 - np.einsum("ij,ij->i", u[i], u[j])
    else:
        exact = np.linalg.norm(x[i] - x[j], axis=1)
    np.testing.assert_allclose(dist[:, 1:].ravel(), exact, atol=1e-4 * exact.max())
    np.testing.assert_allclose(dist[:, 1:].mean(), ex_dist[:, 1:].mean(), rtol=0.05)


def test_project_3d_uses_approximate_neighbours_above_the_limit():
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 1, (4, 64)) * 4
    labels = np.repeat(np.arange(4), 100)
    x = (centres[labels] + rng.normal(0, 1, (400, 64))).astype(np.float32)
    y, method = projection.project_3d(x, metric="cosine", exact_max=100)
    assert method == projection.APPROXIMATE_UMAP and y.shape == (400, 3) and np.isfinite(y).all()
    assert projection.project_3d(x, metric="cosine")[1] == "umap"  # below the limit: exact
    d = np.linalg.norm(y[:, None] - y[None], axis=-1)
    same = labels[:, None] == labels[None]
    assert np.median(d[same]) * 3 < np.median(d[~same])


def test_umap_rgb_agrees_with_the_spectral_start_at_full_epochs(feats):
    """The PCA-started short layout (UMAP_RGB_EPOCHS) against the earlier default (spectral
    start, UMAP_EPOCHS): the patch colour distances rank-correlate; the sparse fuzzy graph
    and the dense one of small inputs are the same graph."""
    mean = em._prepare(feats).mean
    earlier = projection.umap_layout(mean, 3, 15, n_epochs=projection.UMAP_EPOCHS)
    ours = em.umap_rgb(feats).reshape(576, 3).astype(float)
    rho = spearmanr(pdist(ours), pdist(earlier)).statistic
    assert rho > 0.6, rho
    dense = projection._fuzzy_graph(mean, 15)
    limit, projection._DENSE_GRAPH_MAX = projection._DENSE_GRAPH_MAX, 0
    try:
        sparse = projection._fuzzy_graph(mean, 15)
    finally:
        projection._DENSE_GRAPH_MAX = limit
    for a, b in zip(dense[:3], sparse[:3], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
