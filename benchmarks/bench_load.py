"""Sustained load on ``xcube serve`` with the DeepEarth plugin, from a second process.

The longer version of ``tests/test_hardening.py::test_load_mix_at_16_and_64_connections``:
the same request mix (``tests/load_client.py``: xcube tiles, DeepEarth WMTS tiles by KVP
and REST, full and sliced tensors, attention PNGs, similar embeddings and species) from a
separate client process over loopback, at each connection count for a fixed time, after
one warm-up pass over every request. Reports requests, errors, throughput, p50/p99
latency and the server's peak resident memory (sampled every 50 ms), per level and per
request kind; prints markdown and writes ``benchmarks/out/load.md``.

The cube set is the ``bench_server`` one (48 embeddings, 3000 observations; built once
under ``benchmarks/out/server/``) or, with ``--cubes tiny``, the test suite's tiny set.

    python -m benchmarks.bench_load [--seconds 25] [--connections 16 64] [--cache-mb 64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import requests

from server.common.resources import RESPONSE_BUFFER_BYTES
from server.launch import free_port, make_config, running, write_config
from server.wmts import TILE_CACHE_BYTES

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE.parent / "tests"))
import load_client as L  # noqa: E402 - tests/ holds the client shared with the test suite

MiB = 1024 * 1024


def tiny_cubes(work: Path) -> Path:
    """The test suite's tiny cube set (synthetic 'tiny' source, seed 0), built once."""
    from conftest import tiny_recipe_data

    from cube_gen import schema as S
    from cube_gen.pipeline import run_recipe
    from cube_gen.recipe import parse_recipe
    from cube_gen.synth import write_synthetic

    cubes = work / "tiny-cubes"
    if (cubes / S.MANIFEST).exists():
        return cubes
    shutil.rmtree(work, ignore_errors=True)
    source = work / "tiny-source"
    write_synthetic(str(source), "tiny", seed=0, progress=False)
    run_recipe(parse_recipe(tiny_recipe_data(source, cubes)), progress=False)
    shutil.rmtree(source)
    return cubes


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cubes", choices=["server", "tiny"], default="server",
                    help="bench_server's 48-embedding set (default) or the tests' tiny set")
    ap.add_argument("--seconds", type=float, default=25.0, help="per connection count")
    ap.add_argument("--connections", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--cache-mb", type=int, default=64, help="the plugin's CacheBytes")
    ap.add_argument("--workers", type=int, default=4, help="the plugin's MaxWorkers")
    args = ap.parse_args(argv)

    if args.cubes == "server":
        from benchmarks.bench_server import build

        cubes = build(48)
    else:
        cubes = tiny_cubes(OUT / "load")
    cache_bytes = args.cache_mb * MiB
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    port = free_port()
    config = make_config(str(cubes), port=port, cache_bytes=cache_bytes,
                         plugin={"MaxWorkers": args.workers})
    path = write_config(config, work / "config.yml")
    rows = []
    with running(path, port, work / "xcube-serve.log") as url:
        server = L.find_server_process(port)
        rss_start = L.rss_bytes(server)
        plan = L.build_plan(url)
        with requests.Session() as s:  # warm-up: every request once
            for item in plan:
                r = s.get(url + item["path"], timeout=120)
                r.raise_for_status()
        rss_warm = L.rss_bytes(server)
        for connections in args.connections:
            rows.append(L.run_load(url, plan, connections, args.seconds, work / "client",
                                   timeout=60, server=server))
        health = requests.get(url + "/deepearth/health", timeout=60).json()
    shutil.rmtree(work, ignore_errors=True)

    tensor = 8 * 24 * 24 * 1408 * 2
    bound = (rss_warm + cache_bytes + RESPONSE_BUFFER_BYTES + TILE_CACHE_BYTES
             + args.workers * 2 * tensor + 128 * MiB)
    kinds = sorted(rows[0]["by_kind"])
    counts = {k: sum(1 for p in plan if p["kind"] == k) for k in kinds}
    lines = [
        "## Load: mixed requests from a second process (loopback)",
        "",
        f"Cube set `{args.cubes}` ({cubes.name}); plan of {len(plan)} requests "
        f"({', '.join(f'{k} {v}' for k, v in counts.items())}), walked by every connection "
        f"from its own offset; {args.seconds:g} s per level after one warm-up pass. "
        f"CacheBytes {args.cache_mb} MiB, MaxWorkers {args.workers}; "
        f"{os.cpu_count()} CPU cores shared with the client, load average before "
        f"{os.getloadavg()[0]:.1f}.",
        "",
        "| connections | requests | errors | req/s | p50 ms | p99 ms | peak server RSS MiB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['connections']} | {r['requests']} | {r['errors']} | {r['rps']} | "
                     f"{r['p50_ms']} | {r['p99_ms']} | {r['peak_rss'] // MiB} |")
    lines += [
        "",
        f"Server RSS: {rss_start // MiB} MiB after start, {rss_warm // MiB} MiB after the "
        f"warm-up; bound {bound // MiB} MiB = warm + CacheBytes + response buffer "
        f"({RESPONSE_BUFFER_BYTES // MiB} MiB) + WMTS tile cache ({TILE_CACHE_BYTES // MiB} "
        f"MiB) + {args.workers} workers x 2 tensors + 128 MiB. After the run: cache "
        f"{health['cache']['bytes'] // MiB} MiB of {health['cache']['capacity_bytes'] // MiB}, "
        f"response buffer peak {health['server']['response_buffer']['peak_bytes'] // MiB} MiB "
        f"({health['server']['response_buffer']['waited']} responses waited for it).",
        "",
        "Per request kind (p50 / p99 ms, requests):",
        "",
        "| kind | " + " | ".join(f"{r['connections']} connections" for r in rows) + " |",
        "| --- | " + " | ".join("---:" for _ in rows) + " |",
    ]
    for k in kinds:
        cells = []
        for r in rows:
            b = r["by_kind"].get(k, {})
            cells.append(f"{b.get('p50_ms')} / {b.get('p99_ms')} ({b.get('requests', 0)})")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    errors = [s for r in rows for s in r["error_samples"]]
    if errors:
        lines += ["", "Errors (first ones):", ""] + [f"- `{e}`" for e in errors[:10]]
    table = "\n".join(lines)
    print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "load.md").write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
