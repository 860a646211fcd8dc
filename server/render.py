"""PNG rendering of attention maps and UMAP-RGB images.

Attention: the raw (24, 24) map is min-max normalised
(:func:`cube_gen.embedding_math.normalise`), resized bilinearly to ``size`` x ``size``,
coloured with a matplotlib colormap and given alpha = value x ``alpha`` (the defaults of
colour map, alpha and size are in :mod:`server.deepearth.params`).
"""

from __future__ import annotations

import struct
import zlib
from functools import lru_cache

import numpy as np
from PIL import Image

from cube_gen.embedding_math import normalise


@lru_cache(maxsize=1)
def colormap_names() -> tuple[str, ...]:
    import matplotlib

    return tuple(sorted(matplotlib.colormaps))


@lru_cache(maxsize=256)
def get_colormap(name: str):
    """A matplotlib colormap, initialised once (the registry hands out fresh copies)."""
    import matplotlib

    cmap = matplotlib.colormaps[name]
    cmap(0.5)  # build the lookup table now, not concurrently on first use
    return cmap


def resize_bilinear(values: np.ndarray, size: int) -> np.ndarray:
    """(h, w) float32 -> (size, size) float32 by bilinear interpolation (PIL, pixel centres)."""
    v = np.ascontiguousarray(values, dtype=np.float32)
    if v.shape == (size, size):
        return v.copy()
    img = Image.fromarray(v, mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)


def attention_rgba(raw: np.ndarray, colormap: str, alpha: float, size: int) -> np.ndarray:
    """(size, size, 4) uint8 RGBA image of a raw attention map."""
    norm = normalise(raw)
    values = resize_bilinear(norm, size)
    rgba = get_colormap(colormap)(values, bytes=True)  # uint8 (size, size, 4)
    rgba[..., 3] = np.round(values * (alpha * 255.0)).astype(np.uint8)
    return rgba


def _chunk(tag: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + tag + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))


def png_bytes(image: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG of an (h, w, 3|4) uint8 image: no row filter, zlib level 1.

    Several times faster than Pillow's adaptive filtering for the same or smaller
    files on these smooth images.
    """
    img = np.ascontiguousarray(image, dtype=np.uint8)
    h, w, c = img.shape
    color_type = {3: 2, 4: 6}[c]
    rows = np.zeros((h, w * c + 1), np.uint8)  # filter byte 0 (None) on every row
    rows[:, 1:] = img.reshape(h, w * c)
    header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(rows.tobytes(), compress_level))
            + _chunk(b"IEND", b""))


def attention_png(raw: np.ndarray, colormap: str, alpha: float, size: int) -> bytes:
    return png_bytes(attention_rgba(raw, colormap, alpha, size))


def rgb_png(rgb: np.ndarray, size: int, resample: str = "nearest") -> bytes:
    """PNG of a (h, w, 3) uint8 image, resized to size x size."""
    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB")
    if img.size != (size, size):
        method = Image.Resampling.NEAREST if resample == "nearest" else \
            Image.Resampling.BILINEAR
        img = img.resize((size, size), method)
    return png_bytes(np.asarray(img))
