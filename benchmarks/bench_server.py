"""The DeepEarth API over HTTP against the same work done in-process.

Same run, same data: a synthetic source is converted into a cube set under
``benchmarks/out/server/`` (reused when present), served by plain ``xcube serve`` with
the ``deepearth serve`` config on a loopback port, and measured:

* one full (8, 24, 24, 1408) float16 tensor over HTTP (``.npy``, decoded) vs
  ``CubeSet.features`` in-process;
* the same tensor as raw bytes (``format=raw``) vs a static file server (python's
  ``http.server``) sending the embedding's chunk file (the same bytes), same client;
* an attention PNG (384 x 384, parameters varied so no request hits the PNG cache) vs
  ``CubeSet.attention`` + ``server.render.attention_png`` in-process;
* similarity top-10 over all pooled vectors (exact cosine) vs plain numpy brute force;
* throughput with 8 concurrent clients vs 1 (a mix of attention PNGs, similarity
  searches, pooled vectors and statistics).

Medians over repeated runs; prints a markdown table and writes benchmarks/out/server.md.

    python -m benchmarks.bench_server [--embeddings 48] [--repeats 15]
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests

from cube_gen import schema as S
from cube_gen.access import CubeSet
from cube_gen.pipeline import run_recipe
from cube_gen.recipe import parse_recipe
from cube_gen.synth import Preset, write_synthetic
from server import render
from server.launch import free_port, serving

OUT = Path(__file__).resolve().parent / "out"


def build(n: int) -> Path:
    """The benchmark cube set (built once per embedding count)."""
    work = OUT / "server"
    cubes = work / f"cubes-{n}"
    if (cubes / S.MANIFEST).exists():
        return cubes
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    preset = Preset(n_observations=3000, n_species=40, n_with_images=2700,
                    n_vision_observations=n - n // 8, n_embeddings=n, embeddings_per_file=16,
                    n_test=250, embedding_dtype="float16")
    source = work / "source"
    write_synthetic(str(source), preset, seed=3, progress=False)
    run_recipe(parse_recipe({
        "source": {"path": str(source)}, "target": {"path": str(cubes)},
        "cubes": {"vision": {"umap_rgb": False}, "grid": {"resolution": 0.01}},
        "compute": {"scheduler": "synchronous"},
    }), progress=False)
    shutil.rmtree(source)
    return cubes


def median_ms(fn, repeats: int) -> float:
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def static_server(root: str):
    """python's ``http.server`` serving ``root`` on a loopback port: (process, base URL)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                             "127.0.0.1", "--directory", root],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            requests.get(base + "/", timeout=1)
            return proc, base
        except requests.ConnectionError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("http.server did not start")


def throughput(base: str, requests_list: list[str], clients: int, seconds: float) -> float:
    """Completed requests per second with ``clients`` concurrent clients."""
    stop = time.monotonic() + seconds
    counts = [0] * clients
    errors = []

    def client(k: int):
        s = requests.Session()
        it = itertools.cycle(requests_list[k::clients] or requests_list)
        while time.monotonic() < stop:
            r = s.get(base + next(it), timeout=120)
            if r.status_code != 200:
                errors.append(r.status_code)
            counts[k] += 1

    t = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests: {errors[:5]}")
    return sum(counts) / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--embeddings", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--seconds", type=float, default=6.0, help="per throughput window")
    args = ap.parse_args(argv)

    cubes = build(args.embeddings)
    cs = CubeSet.open(str(cubes))
    t = cs.image_table()
    ids = list(zip(t.gbif_id.tolist(), t.image_number.tolist(), strict=True))
    n = len(ids)
    pooled = cs.pooled()
    session = requests.Session()
    methods = S.ATTENTION_METHODS
    frames = S.ATTENTION_FRAMES
    rows = []

    with serving(str(cubes), OUT / "server" / "serve") as base:
        api = base + "/deepearth"
        # warm both sides (imports, first reads, page cache)
        for gid, num in ids[:4]:
            session.get(f"{api}/embeddings/{gid}/{num}/features").raise_for_status()
            session.get(f"{api}/embeddings/{gid}/{num}/similar?k=10").raise_for_status()
            cs.features(ids.index((gid, num)))

        # 1. full tensor
        def http_tensor(i):
            gid, num = ids[i % n]
            r = session.get(f"{api}/embeddings/{gid}/{num}/features", stream=True)
            r.raise_for_status()
            arr = np.load(io.BytesIO(r.raw.read(decode_content=True)))  # no 10 kB chunking
            assert arr.shape == (8, 24, 24, 1408)

        def local_tensor(i):
            cs.features(i % n)

        nbytes = cs.features(0).nbytes
        rows.append((f"one full tensor, float16 ({nbytes / 2**20:.1f} MiB)",
                     median_ms(http_tensor, args.repeats),
                     median_ms(local_tensor, args.repeats), "CubeSet.features in-process"))

        # 1b. the same bytes: our raw format vs a static file server sending the chunk file
        root = str(cubes)
        chunk = [os.path.relpath(cs.raw_chunk_path(i), root) for i in range(n)]
        proc, static = static_server(root)
        try:
            def http_raw(i):
                gid, num = ids[i % n]
                r = session.get(f"{api}/embeddings/{gid}/{num}/features",
                                params={"format": "raw"})
                r.raise_for_status()
                assert len(r.content) == nbytes

            def static_file(i):
                r = session.get(f"{static}/{chunk[i % n]}")
                r.raise_for_status()
                assert len(r.content) == nbytes

            for i in range(4):  # warm both (page cache, connections)
                http_raw(i)
                static_file(i)
            raw_ms, static_ms = [], []
            for _ in range(3):  # interleaved rounds: both sides see the same machine
                raw_ms.append(median_ms(http_raw, args.repeats))
                static_ms.append(median_ms(static_file, args.repeats))
        finally:
            proc.terminate()
            proc.wait(10)
        rows.append((f"one full tensor, raw float16 ({nbytes / 2**20:.1f} MiB)",
                     statistics.median(raw_ms), statistics.median(static_ms),
                     "http.server sending the chunk file"))

        # 2. attention PNG (distinct parameters every time: no cache hits)
        combos = [(i, m, f) for m in methods for f in frames for i in range(n)]
        rng = np.random.default_rng(0)
        order = rng.permutation(len(combos))

        def http_png(i):
            pos, m, f = combos[order[i]]
            gid, num = ids[pos]
            r = session.get(f"{api}/embeddings/{gid}/{num}/attention.png",
                            params={"method": m, "frame": f, "size": 384})
            r.raise_for_status()

        def local_png(i):
            pos, m, f = combos[order[-1 - i]]
            render.attention_png(cs.attention(pos, m, f), "plasma", 0.7, 384)

        rows.append(("attention PNG 384 x 384", median_ms(http_png, args.repeats),
                     median_ms(local_png, args.repeats),
                     "CubeSet.attention + render in-process"))

        # 3. similarity top-10
        unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

        def http_similar(i):
            gid, num = ids[i % n]
            r = session.get(f"{api}/embeddings/{gid}/{num}/similar", params={"k": 10})
            r.raise_for_status()
            assert len(r.json()["results"]) == min(10, n - 1)

        def numpy_similar(i):
            q = i % n
            scores = unit @ unit[q]
            scores[q] = -np.inf
            top = np.argpartition(-scores, 10)[:10]
            top[np.argsort(-scores[top])]

        rows.append((f"similarity top-10 over {n} pooled vectors",
                     median_ms(http_similar, args.repeats),
                     median_ms(numpy_similar, args.repeats), "numpy brute force in-process"))

        # 4. throughput, 8 clients vs 1: every window uses its own colormap, so no PNG
        # comes from the cache
        def mix(cmap: str) -> list[str]:
            out = []
            for pos, m, f in (combos[j] for j in order):
                gid, num = ids[pos]
                e = f"/deepearth/embeddings/{gid}/{num}"
                out += [f"{e}/attention.png?method={m}&frame={f}&colormap={cmap}&size=256",
                        f"{e}/similar?k=10", f"{e}/pooled", f"{e}/stats"]
            return out

        cmaps = iter(["viridis", "magma", "inferno", "cividis", "plasma", "twilight"])
        one, eight = [], []
        for _ in range(3):
            one.append(throughput(base, mix(next(cmaps)), 1, args.seconds))
            eight.append(throughput(base, mix(next(cmaps)), 8, args.seconds))
        health = session.get(f"{api}/health").json()

    r1, r8 = statistics.median(one), statistics.median(eight)
    load = os.getloadavg()[0]
    lines = [
        f"{n} embeddings, {len(cs.species_table())} species, "
        f"{cs.observations.sizes['obs']} observations (synthetic); xcube serve on loopback, "
        f"{os.cpu_count()} cores shared by server and clients; medians of {args.repeats} "
        f"requests (throughput: 3 windows of {args.seconds:g} s); load average at the end "
        f"{load:.1f} (other work on the machine makes every number noisier).",
        "",
        "| measurement | over HTTP (ms) | baseline (ms) | HTTP / baseline | baseline |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, http_ms, base_ms, what in rows:
        lines.append(f"| {name} | {http_ms:.2f} | {base_ms:.2f} | {http_ms / base_ms:.1f} | "
                     f"{what} |")
    lines += [
        "",
        "| clients | requests/s (mixed: PNG, similarity, pooled, stats) | vs 1 client |",
        "| --- | --- | --- |",
        f"| 1 | {r1:.1f} | 1.00 |",
        f"| 8 | {r8:.1f} | {r8 / r1:.2f} |",
        "",
        f"Server cache after the run: {health['cache']['items']} items, "
        f"{health['cache']['bytes'] / 2**20:.0f} MiB of "
        f"{health['cache']['capacity_bytes'] / 2**20:.0f} MiB, hit ratio "
        f"{health['cache']['hit_ratio']:.2f}.",
    ]
    table = "\n".join(lines)
    print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "server.md").write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
