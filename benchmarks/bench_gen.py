"""Recipe throughput: converting vision embeddings vs copying the same files with ``cp``.

Same run, same source: for each repetition the source embedding files are copied with
``cp -r`` and converted by the recipe engine (vision cube only, timed from the Dask
stage); reported are MB/s of source bytes, the ratio to ``cp``, bytes on disk per
embedding against the earlier dashboard's raw float32 records, and peak memory of the
whole process tree (client + Dask workers).

    python -m benchmarks.bench_gen [--embeddings 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path

import psutil

from cube_gen import source_layout as L
from cube_gen.pipeline import STAGE_SECONDS, run_recipe
from cube_gen.recipe import parse_recipe
from cube_gen.synth import Preset, write_synthetic

OUT = Path(__file__).resolve().parent / "out"
RAW_F32_RECORD = L.EMBEDDING_LENGTH * 4  # 25,952,256 bytes, the earlier dashboard's record


class PeakRSS:
    """Samples the summed RSS of this process and its children every 50 ms."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--embeddings", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)

    work = OUT / "gen"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    n = args.embeddings
    preset = Preset(n_observations=2000, n_species=40, n_with_images=1800,
                    n_vision_observations=n - n // 8, n_embeddings=n, embeddings_per_file=16,
                    n_test=150, embedding_dtype="float32")  # list<float> as published
    source = work / "source"
    write_synthetic(str(source), preset, seed=1, progress=False)
    emb_dir = source / L.EMBEDDINGS_DIR
    src_bytes = _du(emb_dir)

    rows = []
    for variant, umap_rgb in (("features + summaries", False), ("all products (with UMAP-RGB)", True)):
        cp_times, gen_times, vis_times, peaks, disk = [], [], [], [], 0
        for r in range(args.repeats if not umap_rgb else 1):
            _drop_caches()
            t = time.perf_counter()
            subprocess.run(["cp", "-r", str(emb_dir), str(work / f"copy{r}")], check=True)
            subprocess.run(["sync"], check=True)
            cp_times.append(time.perf_counter() - t)
            shutil.rmtree(work / f"copy{r}")
            target = work / f"cubes{r}"
            shutil.rmtree(target, ignore_errors=True)
            recipe = parse_recipe({
                "source": {"path": str(source)}, "target": {"path": str(target)},
                "cubes": {"vision": {"umap_rgb": umap_rgb, "batch_size": 4}},
                "compute": {"scheduler": "local", "n_workers": args.workers,
                            "threads_per_worker": 1, "memory_limit": "4GB"},
            })
            _drop_caches()
            with PeakRSS() as mem:
                t = time.perf_counter()
                run_recipe(recipe, progress=False)
                gen_times.append(time.perf_counter() - t)
                vis_times.append(STAGE_SECONDS["vision"])
            subprocess.run(["sync"], check=True)
            peaks.append(mem.peak)
            disk = _du(target / "vision.zarr" / "features")
            shutil.rmtree(target)
        cp_s, gen_s = statistics.median(cp_times), statistics.median(gen_times)
        vis_s = statistics.median(vis_times)
        rows.append((variant, len(gen_times), src_bytes / cp_s / 1e6, src_bytes / vis_s / 1e6,
                     cp_s / vis_s, src_bytes / gen_s / 1e6, disk / n, disk / n / RAW_F32_RECORD,
                     statistics.median(peaks) / 2**30))

    lines = [
        f"Source: {n} synthetic embeddings in {len(list(emb_dir.iterdir()))} parquet files "
        f"(list<float32>, zstd), {src_bytes / 1e6:.0f} MB; {args.workers} Dask workers on "
        f"{os.cpu_count()} cores; page cache dropped before each step: {_drop_caches()}.",
        "",
        "| variant | runs | cp MB/s | vision stage MB/s | vision / cp | whole recipe MB/s "
        "| bytes on disk per embedding | vs raw float32 | peak RSS (GiB, all processes) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v, runs, cp_mbs, vis_mbs, ratio, gen_mbs, per_emb, vs32, peak in rows:
        lines.append(f"| {v} | {runs} | {cp_mbs:.0f} | {vis_mbs:.1f} | {ratio:.3f} | "
                     f"{gen_mbs:.1f} | {per_emb:,.0f} | {vs32:.3f} | {peak:.2f} |")
    table = "\n".join(lines)
    print(table)
    (OUT / "gen.md").write_text(table + "\n")
    shutil.rmtree(work)
    return table


if __name__ == "__main__":
    main()
