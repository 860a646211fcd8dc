"""Grid pyramids and map rendering at the demo's (= the published) observation counts.

* grid stage: the four pyramids (cube_gen.grid.build_pyramid, in memory, no I/O) for the demo
  preset's 33,665 observations and for 10x as many (the same points repeated with jitter);
  ratio 10x / 1x;
* a 256 x 256 map of the region (all-years species richness): the WMS's sampler
  (server.wms.render) against xcube's own tile renderer (compute_rgba_tile) on the same
  pyramid, side by side, medians over repeats.

``python -m benchmarks.bench_maps [--repeats 5]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pandas as pd


def _demo_points(factor: int = 1):
    from cube_gen import grid as GR
    from cube_gen import synth

    rng = np.random.default_rng(0)
    p = synth.PRESETS["demo"]
    species = synth._species_table(rng, p.n_species)
    synth._language_embeddings(rng, species)
    obs = synth._observations(rng, p, species)
    t = pd.to_datetime(dict(year=obs.year, month=obs.month.fillna(1), day=obs.day.fillna(1)))
    lat, lon = obs.latitude.to_numpy(), obs.longitude.to_numpy()
    times, sp = t.to_numpy("datetime64[ns]"), obs.sp.to_numpy()
    prec = np.where(obs.month.isna(), 0, 2)
    if factor > 1:
        jit = np.random.default_rng(1)
        lat = np.concatenate([lat + jit.normal(0, 0.003, len(lat)) for _ in range(factor)])
        lon = np.concatenate([lon + jit.normal(0, 0.003, len(lon)) for _ in range(factor)])
        times, sp, prec = (np.tile(a, factor) for a in (times, sp, prec))
    return GR.Points(lat, lon, times, sp, prec), list(species.taxon_name)


def _median(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from cube_gen import grid as GR
    from cube_gen import schema as S
    from cube_gen import source_layout as L
    from cube_gen.recipe import parse_recipe

    cfg = parse_recipe({"source": {"path": "x"}, "target": {"path": "y"}}).cubes["grid"]
    bbox = (L.BBOX["west"], L.BBOX["south"], L.BBOX["east"], L.BBOX["north"])
    none = GR.Points(np.zeros(0), np.zeros(0), np.zeros(0, "datetime64[ns]"),
                     np.zeros(0, np.int64))
    rows = []
    levels_all = None
    for factor in (1, 10):
        pts, names = _demo_points(factor)

        def build(pts=pts, names=names):
            return {c: GR.build_pyramid(d, cfg, bbox, pts, none, None, names, list(range(5)),
                                        {"title": "bench"}) for c, d in GR.GRID_DATASETS.items()}
        secs = _median(build, max(1, args.repeats // 2))
        if factor == 1:
            levels_all = build()[S.GRID_ALL_YEARS]
        rows.append((factor * 33_665, secs))
    print("| observations | 4 pyramids x 6 levels (s, median) | vs 1x |")
    print("| --- | --- | --- |")
    for n, s in rows:
        print(f"| {n:,} | {s:.2f} | {s / rows[0][1]:.2f} |")

    # maps: WMS sampler vs xcube's compute_rgba_tile on the same pyramid
    from xcube.core.mldataset import BaseMultiLevelDataset
    from xcube.core.tile import compute_rgba_tile
    from xcube.util.cmaps import ColormapRegistry

    from server.wms import render as R
    from server.wms.layers import dataset_layers

    layer = {x.name: x for x in dataset_layers(S.GRID_ALL_YEARS, "bench", levels_all)}[
        f"{S.GRID_ALL_YEARS}.species_richness"]

    def read(_d, lv, name, t):
        return levels_all[lv][name].values[t]
    cache: dict = {}

    def read_cached(d, lv, name, t):
        key = (lv, name, t)
        if key not in cache:
            cache[key] = np.ascontiguousarray(read(d, lv, name, t), np.float32)
        return cache[key]
    w, s, e, n = layer.bbox
    view = R.MapView("CRS:84", (w, s, e, n), 256, 256)
    wms = _median(lambda: R.render_map([layer], [0], read_cached, view), args.repeats)
    ml = BaseMultiLevelDataset(levels_all[0].drop_vars(["lat_bnds", "lon_bnds",
                                                        "time_bnds"]).isel(time=0))
    registry = ColormapRegistry()
    # the tile that holds the region at WebMercator zoom 8 (about one tile for the region)
    z, x, y = 8, 69, 107
    xc = _median(lambda: compute_rgba_tile(ml, "species_richness", x, y, z, registry,
                                           crs_name="EPSG:3857", cmap_name="plasma",
                                           value_ranges=(1.0, 40.0)), args.repeats)
    print()
    print("| 256 x 256 map, all-years richness | ms (median) | vs xcube compute_rgba_tile |")
    print("| --- | --- | --- |")
    print(f"| WMS sampler (server.wms.render) | {wms * 1e3:.1f} | {wms / xc:.2f} |")
    print(f"| xcube compute_rgba_tile | {xc * 1e3:.1f} | 1.00 |")


if __name__ == "__main__":
    main()
