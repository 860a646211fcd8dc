"""Scale simulation: the same measurements at 1x, 10x and 100x the published counts.

Cube sets from ``deepearth simulate --scale N`` (:mod:`cube_gen.simulate`: 33,665 x N
observations, 7,949 x N embeddings, full tensors for a sample only), built once under
``--root`` (default ``/work/scale``; the build's stage timings are kept next to each set in
``s<N>.build.json``), then measured:

* server start: ``xcube serve`` with the ``deepearth serve`` config until
  ``/deepearth/health`` answers, and the server's RSS then and after the HTTP runs (VmHWM);
* observation query (bbox + time + species, first page of 100): in-process (the
  controller, a fresh query each repeat so no result cache answers; the chunk columns it
  reads stay cached, as in a running server) and over HTTP; p50 and p99;
* a GeoJSON page (1,000 features) of a bbox + time query over HTTP;
* region statistics (bbox + time) in-process and over HTTP;
* similarity top-10 with a bbox + time filter, a different embedding each repeat;
* a filtered vision UMAP (bbox; at most MaxUmapPoints = 5,000 embeddings, recomputed);
* xcube tiles (``/tiles/grid/observation_count``) and WMTS tiles (REST, tile cache missed:
  every request a different tile or time);
* the recipe's stages (from the build), observation and grid above all;
* peer: the observation bbox + time query against DuckDB over the source
  ``observations.parquet`` (the parquet scanned per query, and a table loaded in memory),
  with the same matches as ``CubeSet.select_observations`` (asserted).

``python -m benchmarks.bench_scale [--scales 1,10] [--build] [--repeats 30]``
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import requests

from benchmarks.common import md_table
from cube_gen.access import CubeSet
from cube_gen.query import Query
from server.common.params import PageRequest
from server.deepearth import controllers as C
from server.deepearth.params import EmbeddingId
from server.launch import free_port, make_config, running, write_config

BBOX = (-81.60, 28.25, -81.20, 28.70)  # about a sixth of the region, jittered per repeat
START, END = "2018-01-01", "2022-12-31T23:59:59"
YEARS = (2018, 2022)


def pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, float), q)) * 1e3


def measure(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of ``fn(i)`` for i in range(repeats) (after ``warmup`` calls)."""
    for i in range(warmup):
        fn(-1 - i)
    out = []
    for i in range(repeats):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return out


def bbox_of(i: int) -> tuple[float, float, float, float]:
    d = 0.002 * (i % 97)  # a different box every repeat: no cached answer
    w, s, e, n = BBOX
    return (round(w + d, 4), round(s + d / 2, 4), round(e + d, 4), round(n + d / 2, 4))


def build(root: Path, scale: float, materialise: int, projection: str = "auto") -> dict:
    from cube_gen.simulate import simulate

    cubes = root / f"s{scale:g}"
    info_path = root / f"s{scale:g}.build.json"
    if (cubes / "cubeset.json").exists() and info_path.exists():
        return json.loads(info_path.read_text())
    t = time.perf_counter()
    rss0 = psutil.Process().memory_info().rss
    res = simulate(str(cubes), scale, materialise, progress=True, overwrite=True,
                   projection=projection)
    info = {"seconds": res["seconds"], "total_s": time.perf_counter() - t,
            "counts": res["counts"], "projection": projection, "max_rss_gb": _max_rss_gb(), "rss0_gb": rss0 / 2**30,
            "bytes": {k: _du(p) for k, p in (("cubes", cubes), ("source", f"{cubes}-source"))}}
    info_path.write_text(json.dumps(info, indent=2))
    return info


def _max_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _du(path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def species_names(cs: CubeSet, k: int = 5) -> list[str]:
    t = cs.species_table().sort_values("observation_count", ascending=False)
    return list(t.taxon_name.iloc[k:2 * k])  # mid-frequency species (ranks 6-10)


def in_process(cubes: Path, repeats: int, umap_repeats: int) -> dict:
    from xcube.server.server import Server
    from xcube.server.webservers.tornado import TornadoFramework

    server = Server(TornadoFramework(), {**make_config(str(cubes)),
                                         "api_spec": {"includes": ["deepearth"]}})
    ctx = server.ctx.get_api_ctx("deepearth")
    cs = ctx.cubeset
    names = species_names(cs)
    table = cs.image_table()
    n_img = len(table)
    out: dict[str, list[float]] = {}
    counts = {}

    def obs(i):
        q = Query.make(bbox=bbox_of(i), start=START, end=END, species=names)
        counts["obs"] = C.observations(ctx, q, PageRequest(0, 100))["total"]

    out["obs"] = measure(obs, repeats)

    def region(i):
        C.region_stats(ctx, Query.make(bbox=bbox_of(i), start=START, end=END))

    out["region"] = measure(region, repeats)
    step = max(n_img // (repeats + 3), 1)

    def similar(i):
        row = table.iloc[(i + 2) * step % n_img]
        emb = EmbeddingId(int(row.gbif_id), int(row.image_number))
        C.similar_embeddings(ctx, emb, 10, Query.make(bbox=bbox_of(i), start=START, end=END))

    out["similar"] = measure(similar, repeats)

    def umap(i):
        counts["umap"] = len(C.vision_umap(ctx, Query.make(bbox=bbox_of(i)), 5000)["points"])

    out["umap"] = measure(umap, umap_repeats)
    server.ctx.on_dispose()
    return {"times": out, "counts": counts}


def _server_proc(config_path: str) -> psutil.Process | None:
    for p in psutil.process_iter(["cmdline"]):
        if config_path in " ".join(p.info["cmdline"] or []):
            return p
    return None


def _hwm_gb(p: psutil.Process) -> float:
    with open(f"/proc/{p.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def over_http(cubes: Path, work: Path, repeats: int, umap_repeats: int,
              tile_repeats: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    path = write_config(make_config(str(cubes), port=port), work / "config.yml")
    cs = CubeSet.open(str(cubes))
    names = species_names(cs)
    table = cs.image_table()
    n_img = len(table)
    grid = cs.grid(0)
    times = [str(t)[:10] for t in grid.time.values]
    out: dict[str, list[float]] = {}
    info: dict[str, float] = {}
    s = requests.Session()
    t0 = time.perf_counter()
    with running(path, port, work / "xcube-serve.log") as base:
        info["start_s"] = time.perf_counter() - t0
        proc = _server_proc(str(path))
        info["rss_start_gb"] = proc.memory_info().rss / 2**30 if proc else float("nan")

        def get(url, **params):
            r = s.get(base + url, params=params, timeout=600)
            r.raise_for_status()
            return r

        def q(i, species=True):
            p = {"bbox": ",".join(map(str, bbox_of(i))), "start": START, "end": END}
            if species:
                p["species"] = ",".join(names)
            return p

        out["obs"] = measure(lambda i: get("/deepearth/observations", limit=100, **q(i)),
                             repeats)
        out["geojson"] = measure(lambda i: get("/deepearth/observations", format="geojson",
                                               limit=1000, **q(i, False)), repeats)
        out["region"] = measure(lambda i: get("/deepearth/stats/region", **q(i, False)),
                                repeats)
        step = max(n_img // (repeats + 3), 1)

        def similar(i):
            row = table.iloc[(i + 2) * step % n_img]
            get(f"/deepearth/embeddings/{int(row.gbif_id)}/{int(row.image_number)}/similar",
                k=10, **q(i, False))

        out["similar"] = measure(similar, repeats)
        out["umap"] = measure(lambda i: get("/deepearth/umap/vision",
                                            bbox=",".join(map(str, bbox_of(i + 50)))),
                              umap_repeats)
        # tiles at level 5 of WorldCRS84Quad around the region's centre, time varied
        z = 5
        res = 180.0 / 256 / 2**z
        col = int((float(grid.lon.mean()) + 180) / (256 * res))
        row = int((90 - float(grid.lat.mean())) / (256 * res))
        combos = [(t, row + dy, col + dx) for t in times for dy in (-1, 0) for dx in (-1, 0)]

        def xtile(i):
            t, y, x = combos[i % len(combos)]
            r = get(f"/tiles/grid/observation_count/{z}/{y}/{x}", crs="CRS84", time=t,
                    vmin=0, vmax=50)
            assert r.headers["Content-Type"].startswith("image/png")

        def wtile(i):
            t, y, x = combos[-1 - i % len(combos)]
            r = get(f"/deepearth/wmts/1.0.0/grid.observation_count/default/{t}/"
                    f"WorldCRS84Quad/{z}/{y}/{x}.png")
            assert r.headers["Content-Type"] == "image/png"

        out["xtile"] = measure(xtile, min(tile_repeats, len(combos) - 1))
        out["wtile"] = measure(wtile, min(tile_repeats, len(combos) - 1))
        if proc:
            info["rss_end_gb"] = proc.memory_info().rss / 2**30
            info["hwm_gb"] = _hwm_gb(proc)
    return {"times": out, "info": info}


def duckdb_peer(cubes: Path, repeats: int) -> dict:
    import duckdb

    cs = CubeSet.open(str(cubes))
    src = cs.simulated["source"] + "/observations.parquet"
    con = duckdb.connect()
    con.execute("SET threads TO 2")
    sql = ("SELECT gbif_id FROM {rel} WHERE longitude BETWEEN ? AND ? AND latitude BETWEEN ? "
           "AND ? AND year BETWEEN ? AND ?")
    t = time.perf_counter()
    con.execute(f"CREATE TABLE obs AS SELECT gbif_id, latitude, longitude, year FROM "
                f"read_parquet('{src}')")
    load_s = time.perf_counter() - t

    def args(i):
        w, s, e, n = bbox_of(i)
        return [w, e, s, n, *YEARS]

    gid = cs._plain("observations").gbif_id.values
    for i in (0, 7):  # the same matches as ours
        ours = np.sort(gid[cs.select_observations(bbox=bbox_of(i), start=START, end=END)])
        theirs = np.sort(con.execute(sql.format(rel=f"read_parquet('{src}')"),
                                     args(i)).fetchnumpy()["gbif_id"])
        assert np.array_equal(ours, theirs), (len(ours), len(theirs))
    matches = len(ours)
    out = {
        "ours": measure(lambda i: cs.select_observations(bbox=bbox_of(i), start=START,
                                                         end=END), repeats),
        "parquet": measure(lambda i: con.execute(sql.format(rel=f"read_parquet('{src}')"),
                                                 args(i)).fetchnumpy(), repeats),
        "table": measure(lambda i: con.execute(sql.format(rel="obs"), args(i)).fetchnumpy(),
                         repeats),
    }
    con.close()
    return {"times": out, "matches": matches, "load_s": load_s, "duckdb": duckdb.__version__}


def p50p99(v) -> str:
    return f"{pct(v, 50):.1f} / {pct(v, 99):.1f}"


def growth(values: list[float], scales: list[float]) -> str:
    """Growth from the first to the last scale, with the exponent of a power law."""
    a, b = values[0], values[-1]
    if not (a > 0 and b > 0) or len(values) < 2:
        return "-"
    k = np.log(b / a) / np.log(scales[-1] / scales[0])
    return f"x{b / a:.2f} (~N^{k:.2f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", default="1,10", help="comma-separated, e.g. 1,10,100")
    ap.add_argument("--root", default="/work/scale", help="where the simulated sets live")
    ap.add_argument("--build", action="store_true", help="build missing sets")
    ap.add_argument("--build-only", action="store_true", help="build missing sets and stop")
    ap.add_argument("--materialise", type=int, default=32)
    ap.add_argument("--projection", default="auto", help="deepearth simulate --projection")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--umap-repeats", type=int, default=3)
    ap.add_argument("--tile-repeats", type=int, default=30)
    ap.add_argument("--out", help="also write the markdown here")
    ap.add_argument("--report-only", action="store_true",
                    help="print the tables of earlier runs (ROOT/s<N>.bench.json)")
    args = ap.parse_args(argv)
    root = Path(args.root)
    scales = [float(s) for s in args.scales.split(",")]
    res = {}
    for scale in scales if args.report_only else ():
        res[scale] = json.loads((root / f"s{scale:g}.bench.json").read_text())
    for scale in () if args.report_only else scales:
        cubes = root / f"s{scale:g}"
        if not (cubes / "cubeset.json").exists() and not (args.build or args.build_only):
            raise SystemExit(f"{cubes} missing: pass --build")
        b = build(root, scale, args.materialise, args.projection)
        print(f"[scale {scale:g}] built: {json.dumps(b['seconds'])}", flush=True)
        if args.build_only:
            continue
        r = {"build": b}
        r["inproc"] = in_process(cubes, args.repeats, args.umap_repeats)
        gc.collect()
        r["http"] = over_http(cubes, root / f"serve-s{scale:g}", args.repeats,
                              args.umap_repeats, args.tile_repeats)
        r["peer"] = duckdb_peer(cubes, args.repeats)
        res[scale] = r
        (root / f"s{scale:g}.bench.json").write_text(json.dumps(r, indent=1, default=float))
        print(f"[scale {scale:g}] measured", flush=True)
    if args.build_only:
        return 0
    text = report(res, scales, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


def report(res: dict, scales: list[float], args) -> str:
    head = ["measure"] + [f"{s:g}x" for s in scales] + ["growth first -> last"]
    counts = [f"{res[s]['build']['counts']['observations']:,} obs / "
              f"{res[s]['build']['counts']['images']:,} emb" for s in scales]
    rows = [["size", *counts, ""]]

    def add(label, vals, fmt, g=None):
        rows.append([label, *[fmt(v) for v in vals], growth(g or vals, scales)])

    def timing(label, where, key, q=50):
        vals = [res[s][where]["times"][key] for s in scales]
        rows.append([label + " p50 / p99 ms", *[p50p99(v) for v in vals],
                     growth([pct(v, q) for v in vals], scales)])

    info = [res[s]["http"]["info"] for s in scales]
    add("server start (to /deepearth/health), s", [i["start_s"] for i in info],
        lambda v: f"{v:.1f}")
    add("server RSS after start, GB", [i.get("rss_start_gb", float("nan")) for i in info],
        lambda v: f"{v:.2f}")
    add("server peak RSS after the HTTP runs (VmHWM), GB",
        [i.get("hwm_gb", float("nan")) for i in info], lambda v: f"{v:.2f}")
    timing("observations bbox+time+species, page of 100, in-process", "inproc", "obs")
    timing("observations bbox+time+species, page of 100, HTTP", "http", "obs")
    timing("GeoJSON page of 1,000 (bbox+time), HTTP", "http", "geojson")
    timing("region statistics (bbox+time), in-process", "inproc", "region")
    timing("region statistics (bbox+time), HTTP", "http", "region")
    timing("similarity top-10 with bbox+time filter, in-process", "inproc", "similar")
    timing("similarity top-10 with bbox+time filter, HTTP", "http", "similar")
    timing("filtered vision UMAP (bbox, <= 5,000 points), in-process", "inproc", "umap")
    timing("filtered vision UMAP (bbox, <= 5,000 points), HTTP", "http", "umap")
    timing("xcube tile /tiles (256 px PNG, z 5), HTTP", "http", "xtile")
    timing("WMTS REST tile (z 5, cache missed), HTTP", "http", "wtile")
    add("UMAP points (filtered)", [res[s]["inproc"]["counts"]["umap"] for s in scales], str)
    stages = ("plan", "source", "read", "vision", "similarity", "species", "observations",
              "grid", "publish")
    for st in stages:
        vals = [res[s]["build"]["seconds"].get(st, float("nan")) for s in scales]
        add(f"build stage `{st}`, s", vals, lambda v: f"{v:.1f}")
    add("build total, s", [res[s]["build"]["total_s"] for s in scales], lambda v: f"{v:.0f}")
    add("build peak RSS, GB", [res[s]["build"]["max_rss_gb"] for s in scales],
        lambda v: f"{v:.1f}")
    add("cube set on disk, GB", [res[s]["build"]["bytes"]["cubes"] / 1e9 for s in scales],
        lambda v: f"{v:.2f}")
    add("simulated source on disk, GB", [res[s]["build"]["bytes"]["source"] / 1e9
                                         for s in scales], lambda v: f"{v:.2f}")
    peer = [res[s]["peer"] for s in scales]
    prow = [["matches (asserted equal)", *[f"{p['matches']:,}" for p in peer], ""]]
    for label, key in (("ours: CubeSet.select_observations (in-process)", "ours"),
                       ("DuckDB over observations.parquet (scan per query)", "parquet"),
                       ("DuckDB over a table loaded in memory", "table")):
        vals = [p["times"][key] for p in peer]
        prow.append([label + " p50 / p99 ms", *[p50p99(v) for v in vals],
                     growth([pct(v, 50) for v in vals], scales)])
    prow.append(["DuckDB speed-up needed to match ours (parquet p50 / ours p50)",
                 *[f"{pct(p['times']['parquet'], 50) / pct(p['times']['ours'], 50):.1f}x"
                   for p in peer], ""])
    prow.append(["DuckDB table load, s", *[f"{p['load_s']:.2f}" for p in peer], ""])
    load = os.getloadavg()
    lines = [
        f"Host: {platform.node()} ({os.cpu_count()} CPUs), load average {load[0]:.2f} "
        f"{load[1]:.2f} {load[2]:.2f} at the end; repeats {args.repeats} (UMAP "
        f"{args.umap_repeats}, tiles {args.tile_repeats}); p99 of {args.repeats} samples is "
        f"close to the maximum. {pd.Timestamp.now(tz='UTC'):%Y-%m-%d %H:%M} UTC.",
        "",
        md_table(head, rows),
        "",
        f"Peer: bbox + time (years {YEARS[0]}-{YEARS[1]}) without species, DuckDB "
        f"{peer[0]['duckdb']} (2 threads):",
        "",
        md_table(head, prow),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
