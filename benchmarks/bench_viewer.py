"""The viewer's exploration loop at the published scale and 10x / 100x (scale simulation).

* selecting a dot: :func:`server.viewer.loop.pick` (a box prefilter, then haversine on the
  few nearby points) vs the haversine over every observation (the brute-force baseline);
* dot tiles with a filter (10% of the observations kept) vs the unfiltered tile;
* bytes a browser loads to make one observation selectable: the earlier approach (every
  observation as a GeoJSON place group, built as ``server.viewer.places`` builds it) vs
  the pick answer plus the observation record of the new loop.

Observations are uniform over the dataset's box (33,665 published; 10x, 100x); medians over
repeats. ``python -m benchmarks.bench_viewer``
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import xarray as xr

from benchmarks.common import fmt_ratio, md_table, median_ms, timed
from server.viewer.loop import EARTH_RADIUS_M, pick
from server.viewer.places import PointTiles

BBOX = (-81.93, 28.03, -80.91, 28.93)
PUBLISHED = 33_665


class _Cs:
    def __init__(self, lon, lat):
        self.observations = xr.Dataset({"lon": ("obs", lon), "lat": ("obs", lat),
                                        "gbif_id": ("obs", np.arange(len(lon)) + 10**9)})


def brute_force(lon, lat, x, y, radius_m):
    p1, p2 = np.radians(y), np.radians(lat)
    a = (np.sin((p2 - p1) / 2) ** 2
         + np.cos(p1) * np.cos(p2) * np.sin(np.radians(lon - x) / 2) ** 2)
    d = 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(a))
    j = int(np.argmin(d))
    return j if d[j] <= radius_m else None


def place_group_bytes(lon, lat) -> int:
    """The earlier all-observations place group's JSON size (same feature layout)."""
    feats = [{"type": "Feature", "id": f"obs-{10**9 + i}",
              "geometry": {"type": "Point", "coordinates": [round(float(x), 6), round(float(y), 6)]},
              "properties": {"label": f"Quercus virginiana · 2021-05-{1 + i % 28:02d}",
                             "color": "#e65050", "gbif_id": 10**9 + i,
                             "species": "Quercus virginiana", "date": "2021-05-01"}}
             for i, (x, y) in enumerate(zip(lon, lat, strict=True))]
    return len(json.dumps({"type": "FeatureCollection", "features": feats}).encode())


def _one(n: int, repeats: int, rng: np.random.Generator, with_old: bool) -> list[str]:
    lon = rng.uniform(BBOX[0], BBOX[2], n)
    lat = rng.uniform(BBOX[1], BBOX[3], n)
    cs = _Cs(lon, lat)
    clicks = [(rng.uniform(-81.6, -81.2), rng.uniform(28.3, 28.7)) for _ in range(repeats)]
    radius = 150.0  # 8 px at zoom 12
    for x, y in clicks:  # the same answers
        r = pick(cs, x, y, radius)
        j = brute_force(lon, lat, x, y, radius)
        assert (r["gbif_id"] is None) == (j is None)
        assert j is None or r["gbif_id"] == 10**9 + j
    t_pick = median_ms([timed(lambda x=x, y=y: pick(cs, x, y, radius)) for x, y in clicks])
    t_brute = median_ms([timed(lambda x=x, y=y: brute_force(lon, lat, x, y, radius))
                         for x, y in clicks])
    tiles = PointTiles(lon, lat, ["#e65050"] * n)
    keep = rng.uniform(size=n) < 0.1
    z, tx, ty = 10, 280, 426
    t_all = median_ms([timed(lambda: tiles.png(z, tx, ty)) for _ in range(repeats)])
    t_kept = median_ms([timed(lambda: tiles.png(z, tx, ty, keep)) for _ in range(repeats)])
    old = place_group_bytes(lon, lat) if with_old else None
    new = len(json.dumps({"gbif_id": 10**9, "distance_m": 12.3, "lon": -81.4,
                          "lat": 28.5}).encode()) + OBSERVATION_RECORD_BYTES
    return [f"{n:,}", f"{t_pick:.2f}", f"{t_brute:.2f}", fmt_ratio(t_brute / t_pick),
            f"{t_all:.1f}", f"{t_kept:.1f}", fmt_ratio(t_kept / t_all),
            f"{old:,}" if old else "–", f"{new:,}", fmt_ratio(old / new) if old else "–"]


OBSERVATION_RECORD_BYTES = 1800  # /deepearth/observations/{id} of the demo, two embeddings


def run(scales=(1, 10, 100), repeats: int = 5, seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [_one(PUBLISHED * s, repeats, rng, with_old=s <= 10) for s in scales]


HEADERS = ["observations", "pick ms", "brute-force ms", "brute / pick", "tile ms (all)",
           "tile ms (10% kept)", "kept / all", "place group bytes (earlier)",
           "bytes per selection (loop)", "earlier / loop"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    print(md_table(HEADERS, run(repeats=args.repeats)))


if __name__ == "__main__":
    main()
