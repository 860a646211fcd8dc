"""Releases: incremental vs full rebuild, publish time on S3 (moto), verify throughput.

* **Incremental rebuild.** A synthetic source whose last embedding file (10% of the
  embeddings) is left out of a "base" copy: the base is built, then rebuilt over the
  full source (new embeddings computed, the others reused from the base release by hard
  link) and compared with a full build of the full source into an empty target, in the
  same run. Stage times come from ``cube_gen.pipeline.STAGE_SECONDS``. Goal: <= 20%.
* **Publish on S3.** The built cube set is uploaded into the staging area of a moto S3
  server (loopback, ``tests/s3_server.py``) and published (server-side copies into
  ``versions/<id>/``, checksums from ETags, ``release.json``, one PUT of
  ``cubeset.json``); the baseline is a bare ``fs.put`` of the same folders, in the same
  repeat (orders alternate).
* **Verify.** ``cube_gen.release.verify`` (what ``deepearth verify`` runs: MD5 of every
  object, 8 threads) in MB/s against plain MD5 of the same files (a ``hashlib`` loop and
  ``md5sum``) on disk, and on moto against GET + MD5 and GET only.

    python -m benchmarks.bench_release [--embeddings 40] [--repeats 3]
        [--parts rebuild,publish,verify] [--demo] [--no-s3]

``--demo`` publishes and verifies the demo cube set (synthetic ``demo`` preset built with
``recipes/demo.yaml``, about 3.4 GB and 8,000 objects; built once under
``benchmarks/out/release/``).
"""

from __future__ import annotations

import argparse
import json
import os
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
    full, base = OUT / f"source-full-{n}", OUT / f"source-base-{n}"
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


def _load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def bench(n: int, repeats: int) -> str:
    """Base build, incremental rebuild over the full source, full build into an empty
    target: the last two side by side in every repeat; medians of the wall times and of
    each stage's seconds."""
    OUT.mkdir(parents=True, exist_ok=True)
    full_src, base_src = sources(n)
    n_new = n - len(pq.read_table(base_src / L.VISION_INDEX_FILE))
    load_start = _load()
    inc, fulls, st_incs, st_fulls = [], [], [], []
    builds: dict = {}
    for r in range(repeats):
        work = OUT / f"run{r}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        build(base_src, work / "cubes")                        # the previous release
        t_inc, st_inc = build(full_src, work / "cubes")        # +10% embeddings
        t_full, st_full = build(full_src, work / "fresh")      # from scratch
        builds = resolve(Target(str(work / "cubes"))).manifest.get("stage_builds", {})
        print(f"rebuild repeat {r}: incremental {t_inc:.1f} s, full {t_full:.1f} s "
              f"({t_inc / t_full:.0%}), load {_load()}", flush=True)
        inc.append(t_inc)
        fulls.append(t_full)
        st_incs.append(st_inc)
        st_fulls.append(st_full)
        if r:  # keep run0 (publish and verify use its full build)
            shutil.rmtree(work, ignore_errors=True)
    med = statistics.median
    t_i, t_f = med(inc), med(fulls)
    rows = [("rebuild after +10% embeddings (incremental)", f"{t_i:.1f} s",
             f"{t_i / t_f:.0%} of the full build"),
            ("full build of the same source into an empty target", f"{t_f:.1f} s", "100%")]
    out = [f"Incremental rebuild ({n} embeddings, {n_new} of them new; medians of {repeats} "
           f"repeats; goal <= 20%; load average (1/5/15 min) {load_start} at the start, "
           f"{_load()} at the end, {os.cpu_count()} cores)", "",
           md_table(["build", "time", "ratio"], rows), "",
           "Stages of the rebuild: " + ", ".join(f"{k} {v}" for k, v in builds.items()), ""]
    names = [k for k in st_fulls[-1] if k != "read"] + ["read"]
    out += ["Stage seconds (medians; incremental / full):", "",
            md_table(["stage", "incremental s", "full s"],
                     [(k, f"{med(st.get(k, 0) for st in st_incs):.2f}",
                       f"{med(st.get(k, 0) for st in st_fulls):.2f}") for k in names]), ""]
    return "\n".join(out)


# -- publish and verify ------------------------------------------------------------------
def demo_cubes() -> Path:
    """The demo cube set (``synth --preset demo`` + ``recipes/demo.yaml``), built once."""
    from cube_gen.recipe import load_recipe

    source, cubes = OUT / "demo-source", OUT / "demo-cubes"
    if not source.exists():
        write_synthetic(str(source), "demo", seed=0, progress=False)
    if not (cubes / "cubeset.json").exists():
        run_recipe(load_recipe(str(REPO / "recipes" / "demo.yaml"),
                               overrides={"source.path": str(source),
                                          "target.path": str(cubes)}), progress=False)
    return cubes


def _version_dir(cubes: Path) -> Path:
    return Path(Target(str(cubes)).path(*resolve(Target(str(cubes))).prefix))


def _size(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files)


def bench_publish(cubes: Path, repeats: int) -> str:
    """Upload + publish of a built version on moto S3 vs a bare ``fs.put`` of the same
    folders, side by side in each repeat (the two orders alternate; a fresh moto server per
    repeat). Each repeat's times are printed as it ends."""
    from s3_server import moto_s3

    vdir = _version_dir(cubes)
    parts = sorted(p.name for p in vdir.iterdir() if p.is_dir())
    files = [f for part in parts for f in _files(vdir / part)]
    bare, staged, published = [], [], []
    for r in range(repeats):
        with moto_s3() as server:
            server.create_bucket("bench")
            target = Target("s3://bench/set", server.storage_options)
            fs = target.fs

            def put_bare(fs=fs):
                t0 = time.perf_counter()
                for part in parts:
                    fs.put(str(vdir / part), f"bench/bare/{part}", recursive=True)
                bare.append(time.perf_counter() - t0)

            def put_publish(target=target, fs=fs):
                t0 = time.perf_counter()
                for part in parts:
                    fs.put(str(vdir / part), target.staging(part), recursive=True)
                t1 = time.perf_counter()
                publish(target, parts, {"recipe": "bench"})
                staged.append(t1 - t0)
                published.append(time.perf_counter() - t1)

            for step in (put_bare, put_publish) if r % 2 == 0 else (put_publish, put_bare):
                step()
        print(f"publish repeat {r}: bare put {bare[-1]:.1f} s, upload to staging "
              f"{staged[-1]:.1f} s, publish {published[-1]:.1f} s", flush=True)
    med = statistics.median
    b, u, p = med(bare), med(staged), med(published)
    rows = [
        ("bare `fs.put` of the version's folders (baseline)", f"{b:.1f} s", "1.00"),
        ("publish: upload to staging + publish", f"{u + p:.1f} s", f"{(u + p) / b:.2f}"),
        ("  of which the upload to staging", f"{u:.1f} s", f"{u / b:.2f}"),
        ("  of which `publish` (server-side copies, ETag checksums, release.json, switch)",
         f"{p:.1f} s", f"{p / b:.2f}"),
    ]
    return "\n".join([
        f"Publish on moto S3 ({cubes.name}: {len(files)} objects, {_size(files) / 1e6:.0f} MB; "
        f"medians of {repeats})", "", md_table(["what", "time", "ratio to bare put"], rows), ""])


def _md5_loop(paths: list[Path]) -> int:
    """Plain MD5 of each file, one thread, 1 MiB blocks; returns the bytes read."""
    import hashlib

    n = 0
    buf = bytearray(1 << 20)
    for path in paths:
        h = hashlib.md5(usedforsecurity=False)
        with open(path, "rb", buffering=0) as f:
            while k := f.readinto(buf):
                h.update(memoryview(buf)[:k])
                n += k
    return n


def _md5sum(paths: list[Path]) -> int:
    """``md5sum`` of the files (coreutils, batches of 500 names); returns the bytes read."""
    import subprocess

    for i in range(0, len(paths), 500):
        subprocess.run(["md5sum", *map(str, paths[i:i + 500])], check=True,
                       stdout=subprocess.DEVNULL)
    return _size(paths)


def _rate(fn) -> float:
    t0 = time.perf_counter()
    nbytes = fn()
    return nbytes / (time.perf_counter() - t0) / 1e6


def bench_verify(cubes: Path, repeats: int, s3: bool = True) -> str:
    """``release.verify`` (what ``deepearth verify`` runs) in MB/s vs plain MD5 of the same
    files: a ``hashlib`` loop and ``md5sum`` on disk (warm page cache), and on moto S3 the
    same objects read and hashed (8 threads) or only read."""
    target = Target(str(cubes))
    vdir = _version_dir(cubes)
    rel = resolve(target)
    paths = [vdir / name for name in sorted(rel.files or {})]
    _md5_loop(paths)  # warm the page cache
    ver, loop, md5sum = [], [], []
    for _ in range(repeats):
        ver.append(_rate(lambda: verify(target, progress=False)[2]))
        loop.append(_rate(lambda: _md5_loop(paths)))
        md5sum.append(_rate(lambda: _md5sum(paths)))
    med = statistics.median
    v = med(ver)
    rows = [
        ("`verify` on disk (MD5 of every object, 8 threads, warm page cache)",
         f"{v:.0f} MB/s", "1.00"),
        ("plain MD5, `hashlib` in one loop (1 thread)", f"{med(loop):.0f} MB/s",
         f"{v / med(loop):.2f}"),
        ("plain MD5, `md5sum` (coreutils, 1 process)", f"{med(md5sum):.0f} MB/s",
         f"{v / med(md5sum):.2f}"),
    ]
    if s3:
        rows += _verify_s3(vdir, [p.relative_to(vdir).as_posix() for p in paths], repeats)
    return "\n".join([
        f"Verify ({cubes.name}: {len(paths)} objects, {_size(paths) / 1e6:.0f} MB; medians of "
        f"{repeats}; {os.cpu_count()} cores)", "",
        md_table(["what", "throughput", "verify / this"], rows), ""])


def _verify_s3(vdir: Path, names: list[str], repeats: int) -> list[tuple[str, str, str]]:
    import hashlib

    from s3_server import moto_s3

    parts = sorted(p.name for p in vdir.iterdir() if p.is_dir())
    med = statistics.median
    with moto_s3() as server:
        server.create_bucket("bench")
        target = Target("s3://bench/set", server.storage_options)
        for part in parts:
            target.fs.put(str(vdir / part), target.staging(part), recursive=True)
        vid = publish(target, parts, {"recipe": "bench"})
        keys = [target.path("versions", vid, n) for n in names]
        fs = target.fs

        def read(hashed: bool) -> int:
            def one(key):
                data = fs.cat_file(key)
                if hashed:
                    hashlib.md5(data, usedforsecurity=False).hexdigest()
                return len(data)
            with ThreadPoolExecutor(8) as pool:
                return sum(pool.map(one, keys))

        ver, hashed, plain = [], [], []
        for _ in range(repeats):
            ver.append(_rate(lambda: verify(target, progress=False)[2]))
            hashed.append(_rate(lambda: read(True)))
            plain.append(_rate(lambda: read(False)))
    v = med(ver)
    return [("`verify` on moto S3 (8 threads)", f"{v:.0f} MB/s", "1.00"),
            ("GET + `hashlib` MD5 of the same objects (8 threads)", f"{med(hashed):.0f} MB/s",
             f"{v / med(hashed):.2f}"),
            ("GET only (8 threads)", f"{med(plain):.0f} MB/s", f"{v / med(plain):.2f}")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--embeddings", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", default="rebuild,publish,verify",
                    help="comma-separated: rebuild, publish, verify")
    ap.add_argument("--demo", action="store_true",
                    help="publish and verify the demo cube set (built once under "
                         "benchmarks/out/release/) instead of the rebuild's")
    ap.add_argument("--no-s3", action="store_true", help="verify on disk only")
    args = ap.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    OUT.mkdir(parents=True, exist_ok=True)
    texts = []
    if "rebuild" in parts:
        texts.append(bench(args.embeddings, args.repeats))
    cubes = demo_cubes() if args.demo else OUT / "run0" / "fresh"
    if parts & {"publish", "verify"} and not (cubes / "cubeset.json").exists():
        build(sources(args.embeddings)[0], cubes)
    if "publish" in parts:
        texts.append(bench_publish(cubes, args.repeats))
    if "verify" in parts:
        texts.append(bench_verify(cubes, args.repeats, s3=not args.no_s3))
    text = "\n".join(texts)
    print(text)
    name = "release-demo" if args.demo else "release"
    (OUT / f"{name}.md").write_text(text)
    (OUT / f"{name}.json").write_text(json.dumps({"embeddings": args.embeddings,
                                                  "parts": sorted(parts), "demo": args.demo}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
