"""The same cube set read from S3 and from local disk, in one run.

A synthetic source is converted into a cube set under ``benchmarks/out/s3/`` (reused when
present) and copied to S3: moto's standalone server on a loopback port
(``tests/s3_server.py``), bucket ``deepearth``, prefix ``cubes``. Then, for each store:

* one full embedding (8, 24, 24, 1408) float16 read by ``cube_gen.access.CubeSet.features``
  (a different image each repeat, so nothing comes from a cache of ours);
* one grid tile from a running ``xcube serve`` whose ``deepearth serve`` config points at
  the store: xcube's own ``/tiles`` endpoint (xcube has no tile cache), and the DeepEarth
  WMTS REST tile (a different time step or tile each repeat, so its tile cache never
  hits).

Medians over repeats, interleaved between the stores; prints a markdown table and writes
``benchmarks/out/s3.md``. moto on loopback has no network latency, so the S3 / local ratio
here is a lower bound for a real object store (where the first byte takes 10-50 ms).

    python -m benchmarks.bench_s3 [--embeddings 24] [--repeats 21]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import requests

from cube_gen import schema as S
from cube_gen.access import CubeSet
from cube_gen.pipeline import run_recipe
from cube_gen.recipe import parse_recipe
from cube_gen.synth import Preset, write_synthetic
from server.launch import free_port, make_config, running, write_config

from .common import fmt_ms, fmt_ratio, md_table

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "out"
BUCKET = "deepearth"
PREFIX = "cubes"


def build(n_embeddings: int) -> Path:
    """The benchmark cube set: a small synthetic set, finer grid than the tests' tiny one."""
    work = OUT / "s3"
    cubes = work / f"cubes-{n_embeddings}"
    if (cubes / S.MANIFEST).exists():
        return cubes
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    preset = Preset(n_observations=2000, n_species=30, n_with_images=1800,
                    n_vision_observations=n_embeddings - n_embeddings // 6,
                    n_embeddings=n_embeddings, embeddings_per_file=8, n_test=150,
                    embedding_dtype="float16")
    source = work / "source"
    write_synthetic(str(source), preset, seed=7, progress=False)
    run_recipe(parse_recipe({
        "source": {"path": str(source)}, "target": {"path": str(cubes)},
        "cubes": {"vision": {"umap_rgb": False}, "grid": {"resolution": 0.005}},
        "metadata": {"title": "DeepEarth S3 benchmark cubes"},
        "compute": {"scheduler": "synchronous"},
    }), progress=False)
    shutil.rmtree(source)
    return cubes


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def interleaved(fns: dict[str, Callable[[int], None]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median ms per store; repeat i of every store runs before repeat i + 1 of any."""
    for i in range(warmup):
        for fn in fns.values():
            fn(-1 - i)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn(i)
            times[k].append(time.perf_counter() - t)
    return {k: median_ms(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embeddings", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args(argv)

    sys.path.insert(0, str(REPO / "tests"))
    from s3_server import moto_s3  # the tests' moto helper

    t0 = time.perf_counter()
    cubes = build(args.embeddings)
    build_s = time.perf_counter() - t0
    cube_bytes = sum(p.stat().st_size for p in cubes.rglob("*") if p.is_file())

    with moto_s3() as s3:
        import s3fs

        s3.create_bucket(BUCKET)
        fs = s3fs.S3FileSystem(**s3.storage_options)
        t0 = time.perf_counter()
        fs.put(str(cubes), f"{BUCKET}/{PREFIX}", recursive=True)
        upload_s = time.perf_counter() - t0
        url = f"s3://{BUCKET}/{PREFIX}"
        stores = {"local": (str(cubes), None), "S3": (url, s3.storage_options)}

        # -- one embedding -------------------------------------------------------------
        sets = {k: CubeSet.open(u, so) for k, (u, so) in stores.items()}
        n = len(sets["local"].image_table())
        shape = sets["local"].features(0).shape
        assert np.array_equal(sets["local"].features(n - 1), sets["S3"].features(n - 1))

        def features(cs):
            def read(i):
                arr = cs.features(i % n)
                assert arr.shape == shape
            return read

        emb = interleaved({k: features(cs) for k, cs in sets.items()}, args.repeats)
        nbytes = int(np.prod(shape)) * 2

        # -- one grid tile via xcube serve --------------------------------------------
        grid = sets["local"].grid(0)
        times = [str(t)[:10] for t in grid.time.values]
        lon = float(grid.lon.mean())
        lat = float(grid.lat.mean())
        z = 8  # WorldCRS84Quad: finest level for a 0.005 degree grid
        res = 180.0 / 256 / 2**z
        col, row = int((lon + 180) / (256 * res)), int((90 - lat) / (256 * res))
        tiles = [(row + dy, col + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        combos = [(t, yx) for t in times for yx in tiles]
        rng = np.random.default_rng(0)
        order = rng.permutation(len(combos))
        vmax = float(np.nanmax(grid.observation_count.values)) or 1.0

        servers = {}
        with contextlib.ExitStack() as stack:
            for k, (u, so) in stores.items():
                workdir = OUT / "s3" / f"serve-{k}"
                workdir.mkdir(parents=True, exist_ok=True)
                port = free_port()
                config = make_config(u, port=port, storage_options=so)
                path = write_config(config, workdir / "config.yml")
                servers[k] = stack.enter_context(
                    running(path, port, workdir / "xcube-serve.log", env=s3.env))
            session = requests.Session()

            def xcube_tile(base, offset):
                def get(i):
                    t, (y, x) = combos[order[(i + offset) % len(combos)]]
                    r = session.get(f"{base}/tiles/grid/observation_count/{z}/{y}/{x}",
                                    params={"crs": "CRS84", "time": t, "vmin": 0,
                                            "vmax": vmax})
                    r.raise_for_status()
                return get

            def wmts_tile(base, offset):
                def get(i):
                    t, (y, x) = combos[order[-1 - (i + offset) % len(combos)]]
                    r = session.get(f"{base}/deepearth/wmts/1.0.0/grid.observation_count/"
                                    f"default/{t}/WorldCRS84Quad/{z}/{y}/{x}.png")
                    r.raise_for_status()
                    assert r.headers["Content-Type"] == "image/png"
                return get

            # the same tiles from both servers, each tile once per server (warm-up: 2)
            xt = interleaved({k: xcube_tile(b, 2) for k, b in servers.items()}, args.repeats)
            wt = interleaved({k: wmts_tile(b, 2) for k, b in servers.items()}, args.repeats)
            a = session.get(f"{servers['local']}/deepearth/wmts/1.0.0/grid.observation_count/"
                            f"default/{times[-1]}/WorldCRS84Quad/{z}/{row}/{col}.png").content
            b = session.get(f"{servers['S3']}/deepearth/wmts/1.0.0/grid.observation_count/"
                            f"default/{times[-1]}/WorldCRS84Quad/{z}/{row}/{col}.png").content
            assert a == b, "S3 and local tiles differ"

    rows = [
        (f"one embedding, CubeSet.features ({nbytes / 2**20:.1f} MiB float16)",
         fmt_ms(emb["local"]), fmt_ms(emb["S3"]), fmt_ratio(emb["S3"] / emb["local"])),
        ("one grid tile, xcube /tiles (256 px PNG, level 0 of grid.levels)",
         fmt_ms(xt["local"]), fmt_ms(xt["S3"]), fmt_ratio(xt["S3"] / xt["local"])),
        ("one grid tile, DeepEarth WMTS REST (tile cache missed)",
         fmt_ms(wt["local"]), fmt_ms(wt["S3"]), fmt_ratio(wt["S3"] / wt["local"])),
    ]
    table = md_table(["read", "local disk ms", "S3 (moto, loopback) ms", "S3 / local"], rows)
    header = (
        "# S3 vs local disk: the same cube set\n\n"
        f"Machine: {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}. Cube set: {n} embeddings, grid "
        f"{grid.sizes['lat']} x {grid.sizes['lon']} cells x {grid.sizes['time']} years, "
        f"{cube_bytes / 2**20:.0f} MiB (built in {build_s:.0f} s, uploaded to moto in "
        f"{upload_s:.1f} s). Medians of {args.repeats} repeats after 2 warm-up reads, "
        "interleaved between the stores; local reads come from the page cache. S3 is moto's "
        "standalone server on loopback (no network latency): the ratios are lower bounds "
        "for a real object store.\n\n")
    text = header + table + "\n"
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "s3.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
