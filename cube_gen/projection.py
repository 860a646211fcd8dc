"""Neighbours and UMAP layouts of a set of rows: the species and vision projections and
UMAP-RGB of one image's patches (exact neighbours up to :data:`EXACT_KNN_MAX` rows, approximate
above), in NumPy without numba."""

from __future__ import annotations

import numpy as np

from .pca import _pca_scores, pca_basis, single_threaded_blas

UMAP_EPOCHS = 120  # layout epochs of :func:`umap_layout` (umap-learn uses 500 below 10k points)

# -- UMAP ----------------------------------------------------------------------------------
# umap-learn's curve parameters for spread 1.0, min_dist 0.1 (umap.umap_.find_ab_params)
_UMAP_A, _UMAP_B = 1.5769434603113077, 0.8950608779109733


def _knn(x: np.ndarray, k: int, metric: str = "cosine", block: int = 2048):
    """Exact k nearest neighbours of every row (itself first): (indices, distances) (n, k)."""
    n = len(x)
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1)
        x = x / np.where(norms > 0, norms, 1)[:, None]
    elif metric != "euclidean":
        raise ValueError(f"metric must be 'cosine' or 'euclidean', not {metric!r}")
    sq = np.einsum("ij,ij->i", x, x)
    idx = np.empty((n, k), np.int64)
    dist = np.empty((n, k), np.float64)
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        if metric == "cosine":
            d = 1.0 - x[lo:hi] @ x.T
        else:
            d = sq[lo:hi, None] + sq[None, :] - 2 * (x[lo:hi] @ x.T)
        np.maximum(d, 0, out=d)
        d[np.arange(hi - lo), np.arange(lo, hi)] = -1.0  # self first
        part = np.argpartition(d, k - 1, axis=1)[:, :k] if k < n else \
            np.broadcast_to(np.arange(n), (hi - lo, n)).copy()
        kd = np.take_along_axis(d, part, axis=1)
        order = np.argsort(kd, axis=1, kind="stable")
        idx[lo:hi] = np.take_along_axis(part, order, axis=1)
        dist[lo:hi] = np.take_along_axis(kd, order, axis=1)
    dist[:, 0] = 0.0
    if metric == "euclidean":
        np.sqrt(dist, out=dist)
    return idx, dist


EXACT_KNN_MAX = 50_000  # rows: above, :func:`project_3d` finds neighbours approximately
APPROXIMATE_UMAP = "umap (approximate neighbours: HNSW over PCA-64)"


def knn_approximate(x: np.ndarray, k: int, metric: str = "cosine", seed: int = 42,
                    block: int = 65_536):
    """Approximate k nearest neighbours of every row (itself first), as :func:`_knn` returns
    them: (indices, distances) (n, k), the distances exact on the original rows.

    Candidates come from a FAISS HNSW graph (M 16) over a 64-d PCA of the rows (of the unit
    rows for cosine), trained on at most 20,000 of them: O(n log n) where the exact search
    is O(n^2) (about a day at 800,000 rows on two cores). Recall@15 against :func:`_knn` is
    tested (tests/test_embedding_math.py).
    """
    import faiss

    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', not {metric!r}")
    x = np.ascontiguousarray(x, np.float32)
    n, d = x.shape
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    dim = min(64, d)
    sample = x[np.sort(np.random.default_rng(seed).choice(n, size=min(n, 20_000), replace=False))]
    mean = sample.mean(axis=0, dtype=np.float64).astype(np.float32)
    basis = pca_basis(sample, dim, mean)
    y = np.concatenate([(x[lo:lo + block] - mean) @ basis for lo in range(0, n, block)])
    if metric == "cosine":
        y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    index = faiss.IndexHNSWFlat(dim, 16)
    index.hnsw.efConstruction = 40
    index.add(y)
    index.hnsw.efSearch = max(64, 4 * k)
    _, cand = index.search(y, 3 * k)  # three times the neighbours, re-ranked exactly below
    rows = np.arange(n)[:, None]
    valid = (cand >= 0) & (cand != rows)
    cand = np.ascontiguousarray(np.where(valid, cand, rows), np.int64)
    out = np.empty(cand.shape, np.float32)  # exact distances of the candidates (no gather)
    by_idx = faiss.fvec_inner_products_by_idx if metric == "cosine" else faiss.fvec_L2sqr_by_idx
    by_idx(faiss.swig_ptr(out), faiss.swig_ptr(x), faiss.swig_ptr(x), faiss.swig_ptr(cand),
           d, n, cand.shape[1])
    dist = (1.0 - out.astype(np.float64)) if metric == "cosine" else \
        np.sqrt(np.maximum(out.astype(np.float64), 0))
    dist[~valid] = np.inf
    order = np.argsort(dist, axis=1, kind="stable")[:, :k - 1]  # the others, nearest first
    idx = np.concatenate([rows, np.take_along_axis(cand, order, 1)], axis=1)
    dist = np.concatenate([np.zeros((n, 1)), np.take_along_axis(dist, order, 1)], axis=1)
    missing = ~np.isfinite(dist)  # fewer than k - 1 candidates found: repeat the farthest
    if missing.any():
        last = np.where(missing, 0, np.arange(k)).max(axis=1, keepdims=True)
        idx = np.where(missing, np.take_along_axis(idx, last, 1), idx)
        dist = np.where(missing, np.take_along_axis(dist, last, 1), dist)
    return idx.astype(np.int64), dist.astype(np.float64)


_DENSE_GRAPH_MAX = 2048  # rows: up to this many, the fuzzy graph is built as a dense matrix


def _fuzzy_graph(x: np.ndarray, n_neighbors: int, metric: str = "cosine", knn=None):
    """UMAP's fuzzy simplicial set of the rows of x, from exact (or given) k-NN.

    Returns the symmetric membership strengths as (heads, tails, weights) of the
    non-zero entries (both directions) and the sparse matrix, as umap-learn computes them
    (local connectivity 1, bandwidth 1, set operation mix 1).
    """
    from scipy.sparse import csr_matrix

    n = len(x)
    k = min(n_neighbors, n)
    idx, kd = knn if knn is not None else _knn(x, k, metric)
    # rho: distance to the nearest neighbour (local connectivity 1); sigma by bisection
    pos = np.where(kd[:, 1:] > 0, kd[:, 1:], np.inf)
    rho = pos.min(axis=1)
    rho[~np.isfinite(rho)] = 0.0
    target = np.log2(k)
    lo, hi, mid = np.zeros(n), np.full(n, np.inf), np.ones(n)
    rest = kd[:, 1:] - rho[:, None]
    for _ in range(64):
        psum = np.where(rest > 0, np.exp(-np.maximum(rest, 0) / mid[:, None]), 1.0).sum(axis=1)
        done = np.abs(psum - target) < 1e-5
        high = psum > target
        hi = np.where(high & ~done, mid, hi)
        lo = np.where(~high & ~done, mid, lo)
        mid = np.where(done, mid, np.where(np.isfinite(hi), (lo + hi) / 2, mid * 2))
        if done.all():
            break
    floor = 1e-3 * np.where(rho > 0, kd.mean(axis=1), kd.mean())
    sigma = np.maximum(mid, floor)
    w = np.exp(-np.maximum(kd - rho[:, None], 0) / sigma[:, None])
    w[idx == np.arange(n)[:, None]] = 0.0
    rows = np.repeat(np.arange(n), k)
    if n <= _DENSE_GRAPH_MAX:  # one image's patches: dense arithmetic, 5x faster than sparse
        a = np.zeros((n, n))
        a[rows, idx.ravel()] = w.ravel()
        dense = a + a.T - a * a.T
        heads, tails = np.nonzero(dense > 0)
        return heads.astype(np.int64), tails.astype(np.int64), dense[heads, tails], \
            csr_matrix(dense)
    a = csr_matrix((w.ravel(), (rows, idx.ravel())), shape=(n, n))
    g = (a + a.T - a.multiply(a.T)).tocoo()
    keep = g.data > 0
    return g.row[keep].astype(np.int64), g.col[keep].astype(np.int64), g.data[keep], g.tocsr()


def _spectral_init(g: np.ndarray, dim: int, rng: np.random.Generator) -> np.ndarray:
    """umap-learn's spectral initialisation: eigenvectors of the normalised Laplacian."""
    from scipy.sparse import diags
    from scipy.sparse.linalg import eigsh

    n = g.shape[0]
    deg = np.asarray(g.sum(axis=1)).ravel()
    dinv = 1.0 / np.sqrt(np.where(deg > 0, deg, 1))
    m = diags(dinv) @ g @ diags(dinv)
    try:
        vals, vecs = eigsh(m, k=dim + 1, which="LA", v0=np.ones(n), tol=1e-4,
                           ncv=max(2 * dim + 1, 20), maxiter=n * 5)
        init = vecs[:, np.argsort(vals)[::-1][1: dim + 1]]
    except Exception:  # no convergence: random start, as umap-learn falls back
        init = rng.uniform(-10, 10, (n, dim))
    init = init * (10.0 / max(np.abs(init).max(), 1e-12))
    return init + rng.normal(0, 1e-4, init.shape)


def umap_layout(x: np.ndarray, n_components: int = 3, n_neighbors: int = 15,
                n_epochs: int = UMAP_EPOCHS, seed: int = 42, metric: str = "cosine",
                knn=None, init: np.ndarray | None = None) -> np.ndarray:
    """UMAP (cosine, min_dist 0.1, spectral start) of the rows of x: (n, n_components) float32.

    umap-learn's graph and loss, optimised with full-batch epochs in NumPy (each edge
    and its five negative samples weighted by their expected sampling rate per epoch)
    instead of per-edge SGD, so it needs no numba compilation (minutes per process on a
    busy machine) and takes tens of milliseconds for 576 points. Deterministic for a seed.
    ``knn`` = (indices, distances), each (n, n_neighbors) with the row itself first, replaces
    the exact neighbour search (e.g. from an approximate index for large n); ``init``
    (n, n_components) replaces the spectral start (e.g. the first principal components).
    """
    x = np.asarray(x, np.float32)
    n = len(x)
    rng = np.random.default_rng(seed)
    if n <= n_components + 1:
        return np.zeros((n, n_components), np.float32)
    heads, tails, w, g = _fuzzy_graph(x, n_neighbors, metric, knn)
    keep = w >= w.max() / n_epochs
    heads, tails, w = heads[keep], tails[keep], w[keep]
    if init is None:
        y = _spectral_init(g, n_components, rng)
    else:
        y = np.asarray(init, np.float64)[:, :n_components]
        y = y * (10.0 / max(float(np.abs(y).max()), 1e-12)) + rng.normal(0, 1e-4, y.shape)
    span = y.max(axis=0) - y.min(axis=0)
    y = 10.0 * (y - y.min(axis=0)) / np.where(span > 0, span, 1)
    a, b = np.float32(_UMAP_A), np.float32(_UMAP_B)
    p = (w / w.max()).astype(np.float32)
    n_neg = np.float32(5.0)  # negative samples per edge sample, drawn as one of weight 5
    e = len(heads)
    src = np.concatenate([heads, heads])
    dst = np.concatenate([tails, tails])
    weight = np.concatenate([p, n_neg * p])
    cols = [np.ascontiguousarray(y[:, c], np.float32) for c in range(n_components)]
    coef = np.empty(2 * e, np.float32)
    c_att, c_rep = np.float32(-2 * _UMAP_A * _UMAP_B), np.float32(2 * _UMAP_B)
    for epoch in range(n_epochs):
        alpha = np.float32(1.0 - epoch / n_epochs)
        dst[e:] = rng.integers(0, n, e)
        diffs = [np.take(col, src) - np.take(col, dst) for col in cols]  # 1-D gathers are fast
        d2 = diffs[0] * diffs[0]
        for dc in diffs[1:]:
            d2 += dc * dc
        pos = d2 > 0
        d2b = np.power(np.where(pos, d2, 1), b)
        denom = 1 + a * d2b
        # attraction on the edges (first half), repulsion from the negative samples
        np.divide(c_att * d2b[:e], np.where(pos[:e], d2[:e], 1) * denom[:e], out=coef[:e])
        np.divide(c_rep, (np.float32(0.001) + d2[e:]) * denom[e:], out=coef[e:])
        coef *= pos
        scale = alpha * weight
        for col, dc in zip(cols, diffs, strict=True):
            np.multiply(coef, dc, out=dc)
            np.clip(dc, -4, 4, out=dc)
            dc *= scale
            col += (np.bincount(src, dc, n) - np.bincount(tails, dc[:e], n)).astype(np.float32)
    y = np.stack(cols, axis=1)
    return y.astype(np.float32)


@single_threaded_blas
def project_3d(x: np.ndarray, metric: str = "cosine", n_neighbors: int = 15, seed: int = 42,
               standardise: bool = False, exact_max: int = EXACT_KNN_MAX
               ) -> tuple[np.ndarray, str]:
    """3-D projection of the rows of x: UMAP (:func:`umap_layout`) when there are enough
    rows, else PCA. Neighbours are exact up to ``exact_max`` rows, approximate above
    (:func:`knn_approximate`).

    Returns ``(coords (n, 3) float32, method)``; method is ``"umap"``,
    ``"umap (approximate neighbours: HNSW over PCA-64)"`` or ``"pca"``.
    """
    x = np.asarray(x, dtype=np.float32)
    if standardise:
        sd = x.std(axis=0)
        x = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1)
    n = x.shape[0]
    if n == 0:
        return np.zeros((0, 3), np.float32), "none"
    if n < 8:
        scores = _pca_scores(x, 3) if n > 1 else np.zeros((n, 3), np.float32)
        return scores[:, :3].astype(np.float32), "pca"
    epochs = 200 if n <= 10_000 else 100  # full-batch epochs converge faster than SGD ones
    k = min(n_neighbors, n - 1)
    knn, method = None, "umap"
    if n > exact_max:
        knn, method = knn_approximate(x, k, metric, seed), APPROXIMATE_UMAP
    return umap_layout(x, 3, k, n_epochs=epochs, seed=seed, metric=metric, knn=knn), method
