"""PNG rendering of attention maps and UMAP-RGB images.

Attention: the raw (24, 24) map is min-max normalised
(:func:`cube_gen.embedding_math.normalise`), resized bilinearly to ``size`` x ``size``,
coloured with a matplotlib colormap and given alpha = value x ``alpha``.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

from cube_gen.embedding_math import normalise


@lru_cache(maxsize=1)
def colormap_names() -> tuple[str, ...]:
    import matplotlib

    return tuple(sorted(matplotlib.colormaps))


def resize_bilinear(values: np.ndarray, size: int) -> np.ndarray:
    """(h, w) float32 -> (size, size) float32 by bilinear interpolation (PIL, pixel centres)."""
    v = np.ascontiguousarray(values, dtype=np.float32)
    if v.shape == (size, size):
        return v.copy()
    img = Image.fromarray(v, mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)


def attention_rgba(raw: np.ndarray, colormap: str = "plasma", alpha: float = 0.7,
                   size: int = 384) -> np.ndarray:
    """(size, size, 4) uint8 RGBA image of a raw attention map."""
    import matplotlib

    norm = normalise(raw)
    values = resize_bilinear(norm, size)
    rgba = matplotlib.colormaps[colormap](values)  # float64 (size, size, 4)
    rgba[..., 3] = values * alpha
    return np.round(rgba * 255).astype(np.uint8)


def png_bytes(image: np.ndarray, compress_level: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG",
                                                      compress_level=compress_level)
    return buf.getvalue()


def attention_png(raw: np.ndarray, colormap: str = "plasma", alpha: float = 0.7,
                  size: int = 384) -> bytes:
    return png_bytes(attention_rgba(raw, colormap, alpha, size))


def rgb_png(rgb: np.ndarray, size: int = 384, resample: str = "nearest") -> bytes:
    """PNG of a (h, w, 3) uint8 image, resized to size x size."""
    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB")
    if img.size != (size, size):
        method = Image.Resampling.NEAREST if resample == "nearest" else \
            Image.Resampling.BILINEAR
        img = img.resize((size, size), method)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
