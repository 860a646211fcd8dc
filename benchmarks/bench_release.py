"""Releases: incremental vs full rebuild, publish time on S3 (moto), verify throughput.

* **Incremental rebuild.** A synthetic source whose last embedding file (10% of the
  embeddings) is left out of a "base" copy: the base is built, then rebuilt over the
  full source (new embeddings computed, the others reused from the base release by hard
  link) and compared with a full build of the full source into an empty target, in the
  same run. Stage times come from ``cube_gen.pipeline.STAGE_SECONDS``. Goal: <= 20%.
* **Publish on S3.** The built cube set is uploaded into the staging area of a moto S3
  server (loopback, ``tests/s3_server.py``) and published (server-side copies into
  ``versions/<id>/``, checksums from ETags, ``release.json``, one PUT of
  ``cubeset.json``); the baseline is the plain upload of the same files.
* **Verify.** ``cube_gen.release.verify`` (MD5 of every object, 8 threads) on disk and on
  moto, against reading the same objects without hashing.

    python -m benchmarks.bench_release [--embeddings 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cube_gen import source_layout as L
from cube_gen.pipeline import STAGE_SECONDS, run_recipe
from cube_gen.recipe import parse_recipe
from cube_gen.release import publish, resolve, verify
from cube_gen.store import Target
from cube_gen.synth import Preset, write_synthetic

from .common import md_table

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "out" / "release"
sys.path.insert(0, str(REPO / "tests"))


def _recipe(source: Path, target: Path | str, storage_options=None) -> dict:
    return {"source": {"path": str(source)},
            "target": {"path": str(target), "storage_options": storage_options or {}},
            "cubes": {"grid": {"resolution": 0.01}},
            "metadata": {"title": "DeepEarth release benchmark"},
            "compute": {"scheduler": "synchronous"}}


def sources(n: int) -> tuple[Path, Path]:
    """(full source, base source without the last embedding file)."""
    full, base = OUT / "source-full", OUT / "source-base"
    if not full.exists():
        per_file = max(n // 10, 1)
        write_synthetic(str(full), Preset(
            n_observations=2000, n_species=30, n_with_images=1800,
            n_vision_observations=n - n // 8, n_embeddings=n, embeddings_per_file=per_file,
            n_test=150, embedding_dtype="float16"), seed=7, progress=False)
    if not base.exists():
        shutil.copytree(full, base, copy_function=_link)
        index = pq.read_table(full / L.VISION_INDEX_FILE).to_pandas()
        last = int(index.file_idx.max())
        keep = index[index.file_idx != last]
        (base / L.VISION_INDEX_FILE).unlink()
        pq.write_table(pa.Table.from_pandas(keep, preserve_index=False),
                       base / L.VISION_INDEX_FILE)
        (base / L.embedding_file_name(last)).unlink()
    return full, base


def _link(src: str, dst: str) -> None:
    import os

    os.link(src, dst)


def build(source: Path, target: Path) -> tuple[float, dict[str, float]]:
    t0 = time.perf_counter()
    run_recipe(parse_recipe(_recipe(source, target)), progress=False)
    return time.perf_counter() - t0, dict(STAGE_SECONDS)


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def bench(n: int, repeats: int) -> str:
    OUT.mkdir(parents=True, exist_ok=True)
    full_src, base_src = sources(n)
    rows, stage_rows = [], []
    inc, fulls = [], []
    for r in range(repeats):
        work = OUT / f"run{r}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        build(base_src, work / "cubes")                        # the previous release
        t_inc, st_inc = build(full_src, work / "cubes")        # +10% embeddings
        t_full, st_full = build(full_src, work / "fresh")      # from scratch
        inc.append(t_inc)
        fulls.append(t_full)
        stage_rows.append((r, st_inc, st_full))
    t_i, t_f = statistics.median(inc), statistics.median(fulls)
    rows.append(("rebuild after +10% embeddings (incremental)", f"{t_i:.1f} s",
                 f"{t_i / t_f:.0%} of full"))
    rows.append(("full build of the same source", f"{t_f:.1f} s", "1.00"))
    out = [f"Incremental rebuild ({n} embeddings, +{n - int(n * 0.9)} new; medians of "
           f"{repeats}; goal <= 20%)", "",
           md_table(["build", "time", "ratio"], rows), ""]
    _, st_inc, st_full = stage_rows[-1]
    names = [k for k in st_full if k != "read"] + ["read"]
    out += ["Stage seconds of the last repeat (incremental / full):", "",
            md_table(["stage", "incremental s", "full s"],
                     [(k, f"{st_inc.get(k, 0):.2f}", f"{st_full.get(k, 0):.2f}")
                      for k in names]), ""]

    # -- publish and verify on moto S3, verify on disk ---------------------------------
    from s3_server import moto_s3

    cubes = OUT / "run0" / "fresh"
    vdir = Path(Target(str(cubes)).path(*resolve(Target(str(cubes))).prefix))
    parts = sorted(p.name for p in vdir.iterdir() if p.is_dir())
    files = _files(vdir)
    nbytes = sum(p.stat().st_size for p in files if p.name != "release.json")
    with moto_s3() as server:
        server.create_bucket("bench")
        uploads, publishes, s3_verify, s3_read = [], [], [], []
        for r in range(repeats):
            url = f"s3://bench/set{r}"
            target = Target(url, server.storage_options)
            t0 = time.perf_counter()
            for part in parts:
                target.fs.put(str(vdir / part), target.staging(part), recursive=True)
            uploads.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            publish(target, parts, {"recipe": "bench"})
            publishes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _, problems, got = verify(target, progress=False)
            s3_verify.append(got / (time.perf_counter() - t0) / 1e6)
            assert not problems
            keys = [k for k in target.fs.find(target.path("versions"))]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                total = sum(pool.map(lambda k, fs=target.fs: len(fs.cat_file(k)), keys))
            s3_read.append(total / (time.perf_counter() - t0) / 1e6)
    local_verify, local_read = [], []
    target = Target(str(cubes))
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, problems, got = verify(target, progress=False)
        local_verify.append(got / (time.perf_counter() - t0) / 1e6)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            total = sum(pool.map(lambda p: len(p.read_bytes()), files))
        local_read.append(total / (time.perf_counter() - t0) / 1e6)
    med = statistics.median
    out += [f"Publish and verify ({len(files)} objects, {nbytes / 1e6:.0f} MB; medians of "
            f"{repeats})", "",
            md_table(["what", "figure", "baseline", "ratio"], [
                ("publish on moto S3 (server-side copy, ETag checksums, switch)",
                 f"{med(publishes):.1f} s", f"upload of the same files {med(uploads):.1f} s",
                 f"{med(publishes) / med(uploads):.2f}"),
                ("verify on moto S3 (MD5, 8 threads)", f"{med(s3_verify):.0f} MB/s",
                 f"read without hashing {med(s3_read):.0f} MB/s",
                 f"{med(s3_verify) / med(s3_read):.2f}"),
                ("verify on disk (MD5, 8 threads, warm page cache)",
                 f"{med(local_verify):.0f} MB/s",
                 f"read without hashing {med(local_read):.0f} MB/s",
                 f"{med(local_verify) / med(local_read):.2f}"),
            ]), ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--embeddings", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    text = bench(args.embeddings, args.repeats)
    print(text)
    (OUT / "release.md").write_text(text)
    (OUT / "release.json").write_text(json.dumps({"embeddings": args.embeddings}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
