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

from .pca import pca_scores_fast, single_threaded_blas
from .projection import umap_layout
from .schema import ATTENTION_FRAMES, ATTENTION_METHODS, IMAGE_STATS

UMAP_RGB_EPOCHS = 40  # UMAP-RGB: started from the principal components, it needs fewer


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
