"""Per-embedding computations, the one implementation used by recipes, server and ML code.

All functions take a (frame, patch_y, patch_x, feature) array (float16 or float32) and
compute in float32. :func:`embedding_products` computes every per-image product of the
vision cube in one pass, sharing the frame mean, the per-patch sums and the float32 copy;
the single-product functions (:func:`attention_summaries`, :func:`pooled_vector`,
:func:`image_stats`, :func:`umap_rgb`) return exactly the same values.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from .schema import ATTENTION_FRAMES, ATTENTION_METHODS, IMAGE_STATS

N_PCA = 5
UMAP_EPOCHS = 120  # layout epochs of :func:`umap_layout` (umap-learn uses 500 below 10k points)
UMAP_RGB_EPOCHS = 40  # UMAP-RGB: started from the principal components, it needs fewer


def single_threaded_blas(func):
    """Run ``func`` with one BLAS thread.

    These are small matrix problems run many at a time (Dask workers, server executor
    threads); multi-threaded OpenBLAS spin-waits on a busy machine and gets orders of
    magnitude slower (an eigh of 576 x 576: 12 ms with one thread, 4.7 s with two
    threads on two loaded cores).
    """
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with threadpool_limits(limits=1, user_api="blas"):
            return func(*args, **kwargs)

    return wrapper


# -- shared pieces -------------------------------------------------------------------------
def _entropy(x: np.ndarray) -> np.ndarray:
    """Shannon entropy of |x| normalised along the last axis (reference implementation)."""
    a = np.abs(x)
    p = a / np.maximum(a.sum(axis=-1, keepdims=True), 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -(np.where(p > 0, p * np.log(p), 0.0)).sum(axis=-1)


@functools.cache
def _xlogx_float16() -> np.ndarray:
    """``|v| * log|v|`` (float32) for every float16 bit pattern (0 for v = 0)."""
    v = np.abs(np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
               .astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(v > 0, v * np.log(np.where(v > 0, v, 1.0)), 0.0)
    return out.astype(np.float32)


def _sum_xlogx(abs_values: np.ndarray, f16: np.ndarray | None = None) -> np.ndarray:
    """Sum over the last axis of a * log(a) for non-negative ``abs_values``.

    With the float16 tensor the terms come from a 64k-entry table of every float16 bit
    pattern, about twice as fast as ``np.log`` on millions of float32 values.
    """
    if f16 is not None:  # np.take with mode="clip": no bounds checks, 1.5x faster than []
        return np.take(_xlogx_float16(), f16.view(np.uint16), mode="clip").sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(abs_values)
    logs[abs_values == 0] = 0
    logs *= abs_values
    return logs.sum(axis=-1)


def _entropy_from_sums(s_abs: np.ndarray, s_xlogx: np.ndarray) -> np.ndarray:
    """H = -sum p log p with p = a / S, written as log S - sum(a log a) / S (0 where S = 0)."""
    s = s_abs.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.where(s > 0, np.log(np.where(s > 0, s, 1)) - s_xlogx / np.where(s > 0, s, 1), 0.0)
    return np.maximum(h, 0.0)


@dataclass
class _Prepared:
    """The tensor as (frames, patches, features) float32, with what every product shares."""

    frames: np.ndarray        # (8, P, F) float32
    mean: np.ndarray          # (P, F) float32, the frame mean
    f16: np.ndarray | None    # (8, P, F) float16 view of the input when it was float16
    shape: tuple[int, int, int, int]


def _prepare(feats: np.ndarray) -> _Prepared:
    arr = np.asarray(feats)
    n_frames, py, px, nf = arr.shape
    f16 = arr.reshape(n_frames, py * px, nf) if arr.dtype == np.float16 else None
    frames = arr.reshape(n_frames, py * px, nf).astype(np.float32, copy=False)
    mean = frames.sum(axis=0)
    mean *= np.float32(1.0 / n_frames)
    return _Prepared(frames, mean, f16 if f16 is not None and f16.flags.c_contiguous else None,
                     (n_frames, py, px, nf))


# -- PCA -----------------------------------------------------------------------------------
def _pca_scores(x: np.ndarray, k: int = N_PCA, block: int = 65_536) -> np.ndarray:
    """Scores (rows, k) of the first k principal components of x (rows, features).

    Exact, the one PCA of the project: for rows <= features (one image's 576 patches) an
    eigen-decomposition of the (rows x rows) Gram matrix; for more rows than features (a
    whole set's pooled vectors) of the (features x features) covariance accumulated over
    blocks of ``block`` rows, so memory is one block (an SVD of the float64 rows needed
    about 4 x their float32 size: 18 GB for 800,000 pooled vectors). Signs are fixed so
    that each component's largest-magnitude score is positive (deterministic).
    """
    x = np.asarray(x)
    n, d = x.shape
    k_eff = min(k, n)
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    if n <= d:
        # eigen-decomposition of the (patches x patches) Gram matrix: scores = U * S
        from scipy.linalg import eigh

        xc = x.astype(np.float32) - mean
        gram = (xc @ xc.T).astype(np.float64)
        w, v = eigh(gram, subset_by_index=[n - k_eff, n - 1])
        order = np.argsort(w)[::-1]
        w, v = np.clip(w[order], 0, None), v[:, order]
        scores = (v * np.sqrt(w)).astype(np.float32)
    else:
        top = pca_basis(x, k_eff, mean, block)
        scores = np.concatenate([(x[lo:lo + block].astype(np.float32) - mean) @ top
                                 for lo in range(0, n, block)])
    return _fix_signs(scores, k)


def pca_basis(x: np.ndarray, k: int, mean: np.ndarray | None = None, block: int = 65_536
              ) -> np.ndarray:
    """(features, k) float32: the first k principal axes of the rows of x, from the
    (features x features) covariance accumulated in float64 over blocks of rows."""
    x = np.asarray(x)
    d = x.shape[1]
    if mean is None:
        mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    cov = np.zeros((d, d), np.float64)
    for lo in range(0, len(x), block):  # float32 products of centred rows, summed in float64
        xc = x[lo:lo + block].astype(np.float32) - mean
        cov += xc.T @ xc
    _, vecs = np.linalg.eigh(cov)
    return np.ascontiguousarray(vecs[:, ::-1][:, :k], np.float32)


def _fix_signs(scores: np.ndarray, k: int) -> np.ndarray:
    idx = np.abs(scores).argmax(axis=0)
    signs = np.sign(scores[idx, np.arange(scores.shape[1])])
    signs[signs == 0] = 1
    scores *= signs
    if scores.shape[1] < k:  # fewer patches than components
        scores = np.pad(scores, ((0, 0), (0, k - scores.shape[1])))
    return scores


@functools.cache
def _test_matrix(n_features: int, width: int) -> np.ndarray:
    return np.random.default_rng(20240601).standard_normal((n_features, width)).astype(np.float32)


def pca_scores_fast(x: np.ndarray, k: int = N_PCA, oversample: int = 10, max_iter: int = 12,
                    tol: float = 1e-3, start: np.ndarray | None = None,
                    return_basis: bool = False):
    """Top-k principal component scores of x (patches, features) by randomised subspace
    iteration, with a convergence check and an exact fallback; same signs as :func:`_pca_scores`.

    Block power iteration on the centred data (never forming a centred copy or the Gram
    matrix), Rayleigh-Ritz on the block, stopped when every wanted Ritz vector's residual
    is below ``tol`` times its eigen-gap (Davis-Kahan: the angle to the exact eigenvector
    is then below ``tol``, a score correlation above 1 - tol**2 / 2). Components the data
    does not separate (a gap too small to converge within ``max_iter``) are computed by
    the exact method instead, so the result always matches :func:`_pca_scores`.

    ``start`` (patches, w) is a starting basis, e.g. the converged basis of a similar
    matrix (the frame mean for each frame: one or two iterations instead of four);
    ``return_basis`` returns ``(scores, basis)`` for that.
    """
    x = np.asarray(x, np.float32)
    n, d = x.shape
    width = min(k + oversample, n, d)
    if width <= k or n < 2:
        scores = _pca_scores(x, k)
        return (scores, None) if return_basis else scores
    mu = x.mean(axis=0)

    def cx(b):   # centred x @ b, b (d, w)
        return x @ b - (mu @ b)[None, :]

    def cxt(b):  # centred x.T @ b, b (n, w)
        return x.T @ b - mu[:, None] * b.sum(axis=0)[None, :]

    warm = start is not None and start.shape == (n, width)
    q = start if warm else np.linalg.qr(cx(_test_matrix(d, width)))[0]
    for it in range(max_iter):
        z = cxt(q)                                   # (d, w)
        small = (z.T.astype(np.float64) @ z)         # q.T G q, (w, w)
        theta, vecs = np.linalg.eigh(small)
        theta, vecs = theta[::-1], vecs[:, ::-1]
        if it >= (0 if warm else 2):
            u = q.astype(np.float64) @ vecs[:, : k + 1]          # Ritz vectors (n, k+1)
            gu = cx(z @ vecs[:, : k + 1].astype(np.float32)).astype(np.float64)
            resid = np.linalg.norm(gu - u * theta[None, : k + 1], axis=0)[:k]
            gaps = np.minimum(np.r_[np.inf, -np.diff(theta[:k])],
                              theta[:k] - theta[1: k + 1])
            if np.all(resid <= tol * np.maximum(gaps, 1e-30)):
                scores = (u[:, :k] * np.sqrt(np.clip(theta[:k], 0, None))).astype(np.float32)
                scores = _fix_signs(scores, k)
                if return_basis:
                    return scores, (q @ vecs.astype(np.float32))
                return scores
        q, _ = np.linalg.qr(cx(z))
    scores = _pca_scores(x, k)
    return (scores, None) if return_basis else scores


# -- attention summaries, statistics, pooled vector ---------------------------------------
def _reductions(prep: _Prepared) -> tuple[np.ndarray, dict[str, float]]:
    """(l2norm, variance, entropy) per view (3, 9, P) float32 and the image statistics."""
    frames, mean = prep.frames, prep.mean
    n_frames, _, _, nf = prep.shape
    n_views = n_frames + 1
    out = np.empty((3, n_views, frames.shape[1]), np.float32)
    sq = np.empty((n_views, frames.shape[1]), np.float32)
    sq[0] = np.einsum("pf,pf->p", mean, mean)
    sq[1:] = np.einsum("vpf,vpf->vp", frames, frames)
    s1 = np.empty_like(sq)
    s1[0] = mean.sum(axis=-1)
    s1[1:] = frames.sum(axis=-1)
    out[0] = np.sqrt(sq)
    m1 = s1.astype(np.float64) / nf
    out[1] = np.maximum(sq.astype(np.float64) / nf - m1 * m1, 0.0)
    abs_mean = np.abs(mean)
    abs_frames = np.abs(frames)
    s_abs = np.empty_like(sq)
    s_abs[0] = abs_mean.sum(axis=-1)
    s_abs[1:] = abs_frames.sum(axis=-1)
    s_xlogx = np.empty_like(sq)
    s_xlogx[0] = _sum_xlogx(abs_mean)
    s_xlogx[1:] = _sum_xlogx(abs_frames, prep.f16)
    out[2] = _entropy_from_sums(s_abs, s_xlogx)
    # variance over frames, per (patch, feature), averaged: sum over frames of (x - mean)^2
    diff = np.subtract(frames, mean[None], out=abs_frames)
    frame_var = float(np.einsum("vpf,vpf->vp", diff, diff).sum(dtype=np.float64)) / diff.size
    stats = {
        "mean_l2norm": float(out[0, 0].mean(dtype=np.float64)),
        "mean_entropy": float(out[2, 0].mean(dtype=np.float64)),
        "mean_patch_variance": float(out[1, 0].mean(dtype=np.float64)),
        "frame_variance": frame_var,
    }
    return out, stats


def _summaries(prep: _Prepared, red: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The attention summaries and the frame mean's principal component scores (P, 5)."""
    n_frames, py, px, _ = prep.shape
    out = np.empty((len(ATTENTION_METHODS), n_frames + 1, py * px), np.float32)
    out[:3] = red
    scores, basis = pca_scores_fast(prep.mean, return_basis=True)
    out[3:, 0, :] = scores.T
    for v in range(n_frames):  # frames are close to their mean: start from its basis
        out[3:, v + 1, :] = pca_scores_fast(prep.frames[v], start=basis).T
    return out.reshape(len(ATTENTION_METHODS), len(ATTENTION_FRAMES), py, px), scores


@dataclass
class EmbeddingProducts:
    """Every per-image product of the vision cube for one embedding."""

    attention: np.ndarray           # (method 8, frame view 9, patch_y, patch_x) float32
    pooled: np.ndarray              # (feature,) float32
    stats: dict[str, float]         # keys of :data:`cube_gen.schema.IMAGE_STATS`
    umap_rgb: np.ndarray | None     # (patch_y, patch_x, 3) uint8, when asked for

    @property
    def stats_vector(self) -> np.ndarray:
        return np.array([self.stats[k] for k in IMAGE_STATS], np.float32)


@single_threaded_blas
def embedding_products(feats: np.ndarray, with_umap_rgb: bool = True) -> EmbeddingProducts:
    """All per-image products in one pass (what the recipe's vision stage writes)."""
    prep = _prepare(feats)
    red, stats = _reductions(prep)
    attention, mean_scores = _summaries(prep, red)
    pooled = prep.mean.mean(axis=0, dtype=np.float64).astype(np.float32)
    rgb = _umap_rgb(prep.mean, prep.shape[1], prep.shape[2], init=mean_scores) \
        if with_umap_rgb else None
    return EmbeddingProducts(attention, pooled, stats, rgb)


@single_threaded_blas
def attention_summaries(feats: np.ndarray) -> np.ndarray:
    """(method 8, frame view 9, patch_y, patch_x) float32 raw (unnormalised) reductions.

    Methods in :data:`ATTENTION_METHODS` order, frame views in :data:`ATTENTION_FRAMES`
    order (``mean`` first).
    """
    prep = _prepare(feats)
    red, _ = _reductions(prep)
    return _summaries(prep, red)[0]


def attention_map(feats: np.ndarray, method: str = "l2norm", frame: str | int = "mean") -> np.ndarray:
    """One raw (patch_y, patch_x) attention map computed from the full tensor."""
    m = ATTENTION_METHODS.index(method)
    v = ATTENTION_FRAMES.index(str(frame))
    return attention_summaries(feats)[m, v]


def normalise(values: np.ndarray) -> np.ndarray:
    """Min-max normalisation to [0, 1] (constant input gives zeros)."""
    v = np.asarray(values, dtype=np.float32)
    lo, hi = float(np.nanmin(v)), float(np.nanmax(v))
    if not np.isfinite(lo) or hi - lo <= 0:
        return np.zeros_like(v)
    return (v - lo) / (hi - lo)


def pooled_vector(feats: np.ndarray) -> np.ndarray:
    """Mean over frames and patches: (feature,) float32."""
    return _prepare(feats).mean.mean(axis=0, dtype=np.float64).astype(np.float32)


def image_stats(feats: np.ndarray) -> dict[str, float]:
    """Per-image statistics, keys as in :data:`cube_gen.schema.IMAGE_STATS`."""
    return _reductions(_prepare(feats))[1]


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


def _umap_rgb(mean: np.ndarray, py: int, px: int, n_neighbors: int = 15, seed: int = 42,
              init: np.ndarray | None = None, n_epochs: int = UMAP_RGB_EPOCHS) -> np.ndarray:
    """UMAP-RGB of the frame-mean patches, started from their first three principal
    components (``init``: computed here unless given, as :func:`_summaries` has them)."""
    if init is None:
        init = pca_scores_fast(mean)
    emb = umap_layout(mean, 3, n_neighbors, n_epochs=n_epochs, seed=seed, init=init[:, :3])
    rgb = np.stack([normalise(emb[:, i]) for i in range(3)], axis=-1)
    return np.round(rgb * 255).astype(np.uint8).reshape(py, px, 3)


@single_threaded_blas
def umap_rgb(feats: np.ndarray, n_neighbors: int = 15, seed: int = 42) -> np.ndarray:
    """(patch_y, patch_x, 3) uint8: 3-D UMAP (cosine) of the frame-mean patches as RGB.

    Each UMAP axis is min-max scaled to [0, 255]. Deterministic for a seed.
    """
    prep = _prepare(feats)
    return _umap_rgb(prep.mean, prep.shape[1], prep.shape[2], n_neighbors, seed)


def umap_rgb_reference(feats: np.ndarray, n_neighbors: int = 15, seed: int = 42) -> np.ndarray:
    """UMAP-RGB with umap-learn (the earlier implementation; benchmarks compare to it)."""
    import umap

    mean = _prepare(feats).mean
    py, px = np.shape(feats)[1:3]
    with threadpool_limits(limits=1, user_api="blas"):
        reducer = umap.UMAP(n_components=3, metric="cosine", n_neighbors=n_neighbors,
                            random_state=seed, n_jobs=1, init="spectral")
        emb = reducer.fit_transform(mean)
    rgb = np.stack([normalise(emb[:, i]) for i in range(3)], axis=-1)
    return np.round(rgb * 255).astype(np.uint8).reshape(py, px, 3)


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

