"""Point in polygon for region queries: which observations lie inside a drawn polygon.

A polygon is one ring of (lon, lat) vertices (closed or not). The test is the even-odd
rule (ray casting), vectorised over the points and looped over the edges: points on
the boundary may fall either way, like any floating-point polygon test.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MAX_VERTICES = 1000


def parse_ring(value: Any) -> tuple[tuple[float, float], ...]:
    """A polygon ring from ``'lon,lat;lon,lat;...'``, a list of pairs or a GeoJSON Polygon
    (its outer ring). Raises ValueError for fewer than 3 distinct vertices, more than
    MAX_VERTICES or coordinates out of range."""
    if isinstance(value, dict):
        if value.get("type") != "Polygon" or not value.get("coordinates"):
            raise ValueError(f"expected a GeoJSON Polygon, got type {value.get('type')!r}")
        value = value["coordinates"][0]
    if isinstance(value, str):
        try:
            value = [tuple(float(v) for v in p.split(",")) for p in value.split(";") if p.strip()]
        except ValueError:
            raise ValueError("polygon must be 'lon,lat;lon,lat;...' (decimal degrees)") from None
    ring = [(float(p[0]), float(p[1])) for p in value]
    if any(len(p) != 2 for p in value):
        raise ValueError("polygon vertices must be (lon, lat) pairs")
    if len(ring) > 1 and ring[0] == ring[-1]:
        ring = ring[:-1]
    if len(set(ring)) < 3:
        raise ValueError(f"polygon needs at least 3 distinct vertices, got {len(set(ring))}")
    if len(ring) > MAX_VERTICES:
        raise ValueError(f"polygon has {len(ring)} vertices; at most {MAX_VERTICES}")
    for lon, lat in ring:
        if not (-180 <= lon <= 180 and -90 <= lat <= 90):
            raise ValueError(f"polygon vertex ({lon}, {lat}) is outside lon -180..180, "
                             "lat -90..90")
    return tuple(ring)


def ring_bbox(ring) -> tuple[float, float, float, float]:
    xs = [p[0] for p in ring]
    ys = [p[1] for p in ring]
    return min(xs), min(ys), max(xs), max(ys)


def points_in_polygon(lon: np.ndarray, lat: np.ndarray, ring) -> np.ndarray:
    """Boolean mask of the points (lon, lat) inside the polygon ``ring`` (even-odd rule)."""
    x = np.asarray(lon, np.float64)
    y = np.asarray(lat, np.float64)
    inside = np.zeros(x.shape, bool)
    v = np.asarray(ring, np.float64)
    xj, yj = v[-1]
    for xi, yi in v:
        crosses = (yi > y) != (yj > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = (xj - xi) * (y - yi) / (yj - yi) + xi
        inside ^= crosses & (x < x_at)
        xj, yj = xi, yi
    return inside
