"""Per-embedding computations, the one implementation used by recipes, server and ML code.

All functions take a (frame, patch_y, patch_x, feature) array (any float dtype) and
compute in float32.
"""

from __future__ import annotations

import functools

import numpy as np
from threadpoolctl import threadpool_limits

from .schema import ATTENTION_FRAMES, ATTENTION_METHODS

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


def _views(feats: np.ndarray) -> np.ndarray:
    """(9, 576, F) float32: the frame mean followed by the 8 frames, patches flattened."""
    f = np.asarray(feats, dtype=np.float32)
    n_frames, py, px, nf = f.shape
    flat = f.reshape(n_frames, py * px, nf)
    return np.concatenate([flat.mean(axis=0, keepdims=True), flat], axis=0)


def _entropy(x: np.ndarray) -> np.ndarray:
    a = np.abs(x)
    p = a / np.maximum(a.sum(axis=-1, keepdims=True), 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -(np.where(p > 0, p * np.log(p), 0.0)).sum(axis=-1)


def _pca_scores(x: np.ndarray, k: int = N_PCA) -> np.ndarray:
    """Scores (patches, k) of the first k principal components of x (patches, features).

    Signs are fixed so that each component's largest-magnitude score is positive,
    which makes the result deterministic.
    """
    xc = (x - x.mean(axis=0, keepdims=True)).astype(np.float32)
    n = xc.shape[0]
    k_eff = min(k, n)
    if n <= xc.shape[1]:
        # eigen-decomposition of the (patches x patches) Gram matrix: scores = U * S
        from scipy.linalg import eigh

        gram = (xc @ xc.T).astype(np.float64)
        w, v = eigh(gram, subset_by_index=[n - k_eff, n - 1])
        order = np.argsort(w)[::-1]
        w, v = np.clip(w[order], 0, None), v[:, order]
        scores = (v * np.sqrt(w)).astype(np.float32)
    else:
        u, s, _ = np.linalg.svd(xc.astype(np.float64), full_matrices=False)
        scores = (u[:, :k_eff] * s[:k_eff]).astype(np.float32)
    idx = np.abs(scores).argmax(axis=0)
    signs = np.sign(scores[idx, np.arange(scores.shape[1])])
    signs[signs == 0] = 1
    scores *= signs
    if scores.shape[1] < k:  # fewer patches than components
        scores = np.pad(scores, ((0, 0), (0, k - scores.shape[1])))
    return scores


@single_threaded_blas
def attention_summaries(feats: np.ndarray) -> np.ndarray:
    """(method 8, frame view 9, patch_y, patch_x) float32 raw (unnormalised) reductions.

    Methods in :data:`ATTENTION_METHODS` order, frame views in :data:`ATTENTION_FRAMES`
    order (``mean`` first).
    """
    n_frames, py, px, _ = np.shape(feats)
    views = _views(feats)
    out = np.empty((len(ATTENTION_METHODS), len(ATTENTION_FRAMES), py * px), np.float32)
    out[0] = np.sqrt(np.einsum("vpf,vpf->vp", views, views))
    out[1] = views.var(axis=-1)
    out[2] = _entropy(views)
    for v in range(views.shape[0]):
        out[3:, v, :] = _pca_scores(views[v]).T
    return out.reshape(len(ATTENTION_METHODS), len(ATTENTION_FRAMES), py, px)


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
    f = np.asarray(feats, dtype=np.float32)
    return f.reshape(-1, f.shape[-1]).mean(axis=0)


def image_stats(feats: np.ndarray) -> dict[str, float]:
    """Per-image statistics, keys as in :data:`cube_gen.schema.IMAGE_STATS`."""
    f = np.asarray(feats, dtype=np.float32)
    n_frames, py, px, nf = f.shape
    flat = f.reshape(n_frames, py * px, nf)
    mean = flat.mean(axis=0)
    return {
        "mean_l2norm": float(np.linalg.norm(mean, axis=-1).mean()),
        "mean_entropy": float(_entropy(mean).mean()),
        "mean_patch_variance": float(mean.var(axis=-1).mean()),
        "frame_variance": float(flat.var(axis=0).mean()),
    }


@single_threaded_blas
def umap_rgb(feats: np.ndarray, n_neighbors: int = 15, seed: int = 42) -> np.ndarray:
    """(patch_y, patch_x, 3) uint8: 3-D UMAP (cosine) of the frame-mean patches as RGB.

    Each UMAP axis is min-max scaled to [0, 255]. Deterministic for a seed.
    """
    import umap

    f = np.asarray(feats, dtype=np.float32)
    n_frames, py, px, nf = f.shape
    mean = f.reshape(n_frames, py * px, nf).mean(axis=0)
    reducer = umap.UMAP(n_components=3, metric="cosine", n_neighbors=n_neighbors,
                        random_state=seed, n_jobs=1, init="spectral")
    emb = reducer.fit_transform(mean)
    rgb = np.stack([normalise(emb[:, i]) for i in range(3)], axis=-1)
    return np.round(rgb * 255).astype(np.uint8).reshape(py, px, 3)


@single_threaded_blas
def project_3d(x: np.ndarray, metric: str = "cosine", n_neighbors: int = 15, seed: int = 42,
               standardise: bool = False) -> tuple[np.ndarray, str]:
    """3-D projection of the rows of x: UMAP when there are enough rows, else PCA.

    Returns ``(coords (n, 3) float32, method)``; method is ``"umap"`` or ``"pca"``.
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
    import umap

    reducer = umap.UMAP(n_components=3, metric=metric, n_neighbors=min(n_neighbors, n - 1),
                        random_state=seed, n_jobs=1)
    return reducer.fit_transform(x).astype(np.float32), "umap"
