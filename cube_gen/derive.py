"""Derive step: projections, clusters, colours and grid aggregates (pure functions)."""

from __future__ import annotations

import colorsys

import numpy as np
import pandas as pd

from .embedding_math import _pca_scores, normalise, project_3d


def hex_color(rgb) -> str:
    r, g, b = (int(round(float(np.clip(c, 0, 1)) * 255)) for c in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def species_projection(language: np.ndarray, min_cluster_size: int = 3, seed: int = 42):
    """3-D UMAP (standardised, 30 neighbours), HDBSCAN clusters and colours of the species.

    Returns ``(umap (n, 3), cluster (n,), color list, cluster_color list, method)``.
    """
    from sklearn.cluster import HDBSCAN

    coords, method = project_3d(language, metric="euclidean", n_neighbors=30, seed=seed,
                                standardise=True)
    n = len(language)
    if n >= max(min_cluster_size, 2):
        cluster = HDBSCAN(min_cluster_size=min_cluster_size, copy=True).fit_predict(coords).astype(np.int32)
    else:
        cluster = np.full(n, -1, np.int32)
    scaled = np.stack([normalise(coords[:, i]) for i in range(3)], axis=-1) if n else coords
    colors = [hex_color(0.15 + 0.75 * c) for c in scaled]
    n_clusters = int(cluster.max()) + 1 if n else 0
    palette = [hex_color(colorsys.hsv_to_rgb(i / max(n_clusters, 1), 0.65, 0.9))
               for i in range(n_clusters)]
    cluster_colors = [palette[c] if c >= 0 else "#9e9e9e" for c in cluster]
    return coords, cluster, colors, cluster_colors, method


def vision_projection(pooled: np.ndarray, seed: int = 42):
    """3-D UMAP (cosine) of the pooled vectors; PCA when there are very few."""
    return project_3d(pooled, metric="cosine", n_neighbors=15, seed=seed)


def rgb_components(pooled: np.ndarray) -> np.ndarray:
    """(n, 3) in [0, 1]: first three principal components, each scaled by its 2-98 %iles."""
    if len(pooled) == 0:
        return np.zeros((0, 3), np.float32)
    if len(pooled) == 1:
        return np.full((1, 3), 0.5, np.float32)
    scores = _pca_scores(np.asarray(pooled, np.float32), 3)[:, :3]
    out = np.empty_like(scores)
    for i in range(3):
        lo, hi = np.percentile(scores[:, i], [2, 98])
        out[:, i] = np.clip((scores[:, i] - lo) / (hi - lo), 0, 1) if hi > lo else 0.5
    return out.astype(np.float32)


def grid_axes(bbox: tuple[float, float, float, float], resolution: float):
    """Cell-centre coordinates (lat descending, lon ascending) covering ``bbox`` snapped to the resolution."""
    w, s, e, n = bbox
    w = np.floor(w / resolution) * resolution
    s = np.floor(s / resolution) * resolution
    e = np.ceil(e / resolution) * resolution
    n = np.ceil(n / resolution) * resolution
    nx = max(int(round((e - w) / resolution)), 1)
    ny = max(int(round((n - s) / resolution)), 1)
    lon = w + (np.arange(nx) + 0.5) * resolution
    lat = n - (np.arange(ny) + 0.5) * resolution
    return np.round(lat, 10), np.round(lon, 10), (float(w), float(s), float(w + nx * resolution),
                                                  float(n))


def time_bins(times: np.ndarray, period: str, years: tuple[int, int] | None = None) -> pd.DatetimeIndex:
    """Period starts covering the observation times."""
    t = pd.to_datetime(times)
    start = t.min().to_period("Y").start_time if years is None else pd.Timestamp(f"{years[0]}-01-01")
    end = t.max() if years is None else pd.Timestamp(f"{years[1]}-12-31")
    return pd.date_range(start, end, freq=period)


def grid_aggregates(lat: np.ndarray, lon: np.ndarray, time: np.ndarray, species: np.ndarray,
                    bins: pd.DatetimeIndex, lat_axis: np.ndarray, lon_axis: np.ndarray,
                    resolution: float) -> dict[str, np.ndarray]:
    """Observation counts, species richness and Shannon diversity per (time, lat, lon).

    Points outside the grid are ignored. Returns float32 arrays of shape
    (len(bins), len(lat_axis), len(lon_axis)), NaN where a cell has no observation
    (counts are 0 there, not NaN).
    """
    nt, ny, nx = len(bins), len(lat_axis), len(lon_axis)
    north = lat_axis[0] + resolution / 2
    west = lon_axis[0] - resolution / 2
    iy = np.floor((north - lat) / resolution).astype(np.int64)
    ix = np.floor((lon - west) / resolution).astype(np.int64)
    it = np.searchsorted(bins.values, np.asarray(time, "datetime64[ns]"), side="right") - 1
    ok = (iy >= 0) & (iy < ny) & (ix >= 0) & (ix < nx) & (it >= 0) & (it < nt)
    cell = (it[ok] * ny + iy[ok]) * nx + ix[ok]
    sp = species[ok].astype(np.int64)
    counts = np.bincount(cell, minlength=nt * ny * nx).astype(np.float32)
    richness = np.zeros(nt * ny * nx, np.float32)
    shannon = np.full(nt * ny * nx, np.nan, np.float32)
    if len(cell):
        pairs, pair_counts = np.unique(np.stack([cell, sp]), axis=1, return_counts=True)
        pcell = pairs[0]
        richness += np.bincount(pcell, minlength=nt * ny * nx)
        p = pair_counts / counts[pcell]
        h = np.bincount(pcell, weights=-p * np.log(p), minlength=nt * ny * nx)
        occupied = counts > 0
        shannon[occupied] = h[occupied]
    shape = (nt, ny, nx)
    return {
        "observation_count": counts.reshape(shape),
        "species_richness": richness.reshape(shape),
        "shannon_diversity": shannon.reshape(shape),
        "_cell": (ok, cell),
    }


def grid_mean(ok: np.ndarray, cell: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """Mean of ``values`` (rows aligned with the points) per cell; NaN where empty."""
    v = np.asarray(values, np.float64)[ok]
    n = np.bincount(cell, minlength=size)
    s = np.bincount(cell, weights=v, minlength=size)
    out = np.full(size, np.nan, np.float32)
    out[n > 0] = (s[n > 0] / n[n > 0]).astype(np.float32)
    return out
