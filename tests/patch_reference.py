"""Numpy brute-force reference of patch search, shared by the patch index tests."""

from __future__ import annotations

import numpy as np


def reference_vectors(cs) -> np.ndarray:
    """Every patch's unit frame-mean vector (float64, rows are patch ids), by plain numpy."""
    out = [cs.features(i).astype(np.float64).mean(axis=0).reshape(-1, cs.features(i).shape[-1])
           for i in range(cs.vision.sizes["image"])]
    v = np.concatenate(out)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def brute(vectors: np.ndarray, query: np.ndarray, k: int,
          allowed_images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k patch ids and cosines among the patches of the allowed images (ties by id)."""
    ids = np.flatnonzero(np.repeat(allowed_images, 576))
    scores = vectors[ids] @ (query / np.linalg.norm(query))
    order = np.lexsort((ids, -scores))[:k]
    return ids[order], scores[order]
