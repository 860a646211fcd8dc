"""Vision stage vs bare conversion, side by side in one run on the same files.

The bare conversion is the floor: read each parquet float32 embedding list and write it
as float16 to a file, with the recipe's default parallelism (``n_workers`` processes).
The recipe's vision stage writes the float16 features plus every per-image product
(pooled vector, statistics, the 8 x 9 attention summaries, UMAP-RGB). Both run on
``--small`` and ``--large`` embeddings; the slope is the marginal cost of one embedding,
the intercept the fixed overhead. The projection of the full published build (7,949
embeddings) is fixed + 7,949 x marginal of the vision stage + the other stages as measured.

    python -m benchmarks.bench_gen [--small 16] [--large 48] [--repeats 1] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from cube_gen import source_layout as L
from cube_gen.pipeline import STAGE_SECONDS, run_recipe
from cube_gen.recipe import parse_recipe
from cube_gen.synth import Preset, write_synthetic

OUT = Path(__file__).resolve().parent / "out"
PUBLISHED_EMBEDDINGS = 7_949


def _convert_file(args: tuple[str, str]) -> int:
    """Bare conversion of one source file: float32 list -> float16 bytes, one file per row."""
    import pyarrow.parquet as pq

    src, out_dir = args
    n = 0
    pf = pq.ParquetFile(src)
    for batch in pf.iter_batches(batch_size=1, columns=["embedding"]):
        values = batch.column(0).values.to_numpy(zero_copy_only=False)
        with open(f"{out_dir}/{Path(src).stem}-{n}.f16", "wb") as f:
            f.write(values.astype(np.float16).tobytes())
        n += 1
    return n


def bare_conversion(files: list[Path], out_dir: Path, workers: int) -> tuple[float, float]:
    """(wall, CPU) seconds to convert ``files`` with ``workers`` processes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    c = _cpu()
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_warm, range(workers)))
        t = time.perf_counter()
        list(pool.map(_convert_file, [(str(f), str(out_dir)) for f in files]))
        seconds = time.perf_counter() - t
    cpu = _cpu() - c  # includes the pool's start-up (a fixed cost, not in the slope)
    shutil.rmtree(out_dir)
    return seconds, cpu


def _warm(_: int) -> None:
    import pyarrow.parquet  # noqa: F401


def _cpu() -> float:
    """CPU seconds of this process and its finished children (pool / Dask workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _source(work: Path, n: int) -> Path:
    if (work / f"source-{n}" / L.VISION_INDEX_FILE).exists():  # complete (written atomically)
        return work / f"source-{n}"
    preset = Preset(n_observations=2000, n_species=40, n_with_images=1800,
                    n_vision_observations=n - n // 8, n_embeddings=n, embeddings_per_file=8,
                    n_test=150, embedding_dtype="float32")  # list<float> as published
    return Path(write_synthetic(str(work / f"source-{n}"), preset, seed=1, progress=False))


def vision_stage(source: Path, target: Path, workers: int, umap_rgb: bool) -> dict[str, float]:
    shutil.rmtree(target, ignore_errors=True)
    recipe = parse_recipe({
        "source": {"path": str(source)}, "target": {"path": str(target)},
        "cubes": {"vision": {"umap_rgb": umap_rgb}},
        "compute": {"scheduler": "local", "n_workers": workers, "threads_per_worker": 1,
                    "memory_limit": "4GB"},
    })
    t, c = time.perf_counter(), _cpu()
    run_recipe(recipe, progress=False)
    total, cpu = time.perf_counter() - t, _cpu() - c
    stages = dict(STAGE_SECONDS)
    shutil.rmtree(target)
    return {"total": total, "cpu": cpu, **stages}


def per_embedding_products(source: Path, n: int = 4) -> dict[str, float]:
    """CPU ms of each product on one core (the profile), from the first ``n`` embeddings."""
    from threadpoolctl import threadpool_limits

    from cube_gen import embedding_math as em
    from cube_gen.reader import SourceDataset

    ds = SourceDataset(str(source))
    feats = [f for _, _, f in ds.iter_file_embeddings(0, None, "float16")][:n]
    out: dict[str, list[float]] = {}

    def timed(name, fn, *fn_args):
        t = time.process_time()
        fn(*fn_args)
        out.setdefault(name, []).append((time.process_time() - t) * 1000)

    with threadpool_limits(limits=1, user_api="blas"):
        for f in feats:
            prep = em._prepare(f)
            timed("float32 copy + frame mean", em._prepare, f)
            red = em._reductions(prep)[0]
            timed("l2norm, variance, entropy, statistics", em._reductions, prep)
            timed("PCA 1-5 of 9 views", em._summaries, prep, red)
            timed("UMAP-RGB", em._umap_rgb, prep.mean, 24, 24)
            timed("all products", em.embedding_products, f)
    return {k: statistics.median(v) for k, v in out.items()}


def scaling(sources: dict[int, Path], work: Path, small: int, large: int, repeats: int) -> str:
    """Marginal vision-stage time per embedding on a LocalCluster of 1 and of 2 workers
    (one thread each), interleaved in each repeat; speed-up = marginal(1) / marginal(2)."""
    res: dict[int, dict[int, list[float]]] = {1: {}, 2: {}}
    for r in range(repeats):
        for w in (1, 2) if r % 2 == 0 else (2, 1):
            for n, src in sources.items():
                res[w].setdefault(n, []).append(vision_stage(src, work / "cubes", w, True)["vision"])
    marg = {w: (statistics.median(res[w][large]) - statistics.median(res[w][small]))
            / (large - small) for w in (1, 2)}
    lines = [f"Dask scaling: vision stage, all products, {small} and {large} embeddings, "
             f"medians of {repeats}; load average {os.getloadavg()[0]:.1f} at the end.", "",
             "| workers | vision stage s (small / large) | marginal ms / embedding | speed-up |",
             "| --- | --- | --- | --- |"]
    for w in (1, 2):
        lines.append(f"| {w} | {statistics.median(res[w][small]):.1f} / "
                     f"{statistics.median(res[w][large]):.1f} | {marg[w] * 1000:.0f} | "
                     f"{marg[1] / marg[w]:.2f} |")
    table = "\n".join(lines)
    print(table)
    (OUT / "gen-scaling.md").write_text(table + "\n")
    return table


def umap_agreement(source: Path, n: int = 3) -> list[tuple[float, float]]:
    """Spearman correlation of patch colour distances: ours vs umap-learn, and umap-learn
    vs itself with another seed (how far two runs of the reference already differ)."""
    from scipy.spatial.distance import pdist
    from scipy.stats import spearmanr

    from cube_gen import embedding_math as em
    from cube_gen.reader import SourceDataset

    ds = SourceDataset(str(source))
    rows = []
    for _, _, f in list(ds.iter_file_embeddings(0, None, "float16"))[:n]:
        ref = em.umap_rgb_reference(f).reshape(-1, 3).astype(float)
        ref7 = em.umap_rgb_reference(f, seed=7).reshape(-1, 3).astype(float)
        ours = em.umap_rgb(f).reshape(-1, 3).astype(float)
        rows.append((spearmanr(pdist(ours), pdist(ref)).statistic,
                     spearmanr(pdist(ref7), pdist(ref)).statistic))
    return rows


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--small", type=int, default=16)
    ap.add_argument("--large", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2, help="the recipe default: 2")
    ap.add_argument("--scaling", action="store_true",
                    help="only the Dask scaling: vision stage (all products) on 1 and 2 workers")
    ap.add_argument("--umap-agreement", action="store_true",
                    help="also compare UMAP-RGB with umap-learn (slow: numba compiles)")
    args = ap.parse_args(argv)

    work = OUT / "gen"
    work.mkdir(parents=True, exist_ok=True)
    sources = {n: _source(work, n) for n in (args.small, args.large)}
    if args.scaling:
        return scaling(sources, work, args.small, args.large, args.repeats)
    res: dict[str, dict[int, list[dict]]] = {"bare": {}, "all": {}, "lazy": {}}
    for _ in range(args.repeats):
        for n, src in sources.items():
            files = sorted((src / L.EMBEDDINGS_DIR).glob("*.parquet"))
            wall, cpu = bare_conversion(files, work / "bare", args.workers)
            res["bare"].setdefault(n, []).append({"vision": wall, "cpu": cpu})
            res["all"].setdefault(n, []).append(vision_stage(src, work / "cubes", args.workers, True))
            res["lazy"].setdefault(n, []).append(vision_stage(src, work / "cubes", args.workers, False))

    def med(kind, n, key="vision"):
        return statistics.median(r[key] for r in res[kind][n])

    def fit(kind, key="vision"):
        lo, hi = med(kind, args.small, key), med(kind, args.large, key)
        marginal = (hi - lo) / (args.large - args.small)
        return marginal, lo - marginal * args.small

    bare_m, bare_f = fit("bare")
    bare_c, _ = fit("bare", "cpu")
    lines = [
        f"Source: synthetic float32 lists (as published), {args.small} and {args.large} "
        f"embeddings, 8 per file; {args.workers} workers (bare: processes; recipe: LocalCluster, "
        f"the recipe default) on {os.cpu_count()} cores (shared); medians of {args.repeats} run(s).",
        "",
        "| variant | marginal wall ms / embedding | vs bare | marginal CPU ms / embedding "
        f"| vs bare | fixed overhead (s) | projected {PUBLISHED_EMBEDDINGS:,} (min) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| bare conversion (read float32 list, write float16 file) | {bare_m * 1000:.0f} | 1.00 "
        f"| {bare_c * 1000:.0f} | 1.00 "
        f"| {bare_f:.1f} | {(bare_f + PUBLISHED_EMBEDDINGS * bare_m) / 60:.1f} |",
    ]
    for kind, label in (("all", "vision stage, all products (UMAP-RGB precomputed)"),
                        ("lazy", "vision stage, UMAP-RGB on first request (umap_rgb: false)")):
        m, f = fit(kind)
        mc, _ = fit(kind, "cpu")  # whole recipe CPU: the other stages cancel in the slope
        other = statistics.median(r["total"] - r["vision"] for r in res[kind][args.large])
        lines.append(f"| {label} | {m * 1000:.0f} | {m / bare_m:.2f} | {mc * 1000:.0f} | "
                     f"{mc / bare_c:.2f} | {f:.1f} | "
                     f"{(f + PUBLISHED_EMBEDDINGS * m + other) / 60:.1f} |")
    lines += ["", "Projected = fixed + 7,949 x marginal + the other stages of the run (read, "
              "species, observations, grid: "
              f"{statistics.median(r['total'] - r['vision'] for r in res['all'][args.large]):.1f} s"
              ", independent of the embedding count).", ""]
    prof = per_embedding_products(sources[args.small])
    lines += ["| product (one core, CPU ms per embedding) | ms |", "| --- | --- |"]
    lines += [f"| {k} | {v:.0f} |" for k, v in prof.items()]
    if args.umap_agreement:
        agree = umap_agreement(sources[args.small])
        lines += ["", "UMAP-RGB agreement (Spearman of patch colour distances, per embedding): "
                  + ", ".join(f"ours vs umap-learn {a:.3f} (umap-learn seed 7 vs 42: {b:.3f})"
                              for a, b in agree)]
    table = "\n".join(lines)
    print(table)
    (OUT / "gen.md").write_text(table + "\n")
    shutil.rmtree(work / "cubes", ignore_errors=True)
    return table


if __name__ == "__main__":
    main()
