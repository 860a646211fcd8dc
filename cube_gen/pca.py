"""Principal components: the exact (blocked covariance) method for whole sets and a fast
randomised one for the many small per-image problems, with equal results (tested)."""

from __future__ import annotations

import functools

import numpy as np
from threadpoolctl import threadpool_limits

N_PCA = 5


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
