"""Embedding retrieval: the cube against the earlier formats, measured in one run.

Builds (once, under ``--work``) a synthetic source in the published layout with float32
embedding lists, the cube set from it (``run_recipe``; raw float16 features, no
UMAP-RGB), the earlier dashboard's raw float32 file + SQLite offsets and the float16
memmap floor (see ``benchmarks/formats.py``), then measures:

1. one full embedding by (gbif_id, image number): warm page cache, and cold (the data
   files evicted before every read; index structures stay in memory for every store);
2. a batch of 100 random embeddings (per-item cost);
3. DataLoader throughput (samples/s) of ``cube_gen.torch_data.CubeDataset``: pooled
   vectors and full tensors, num_workers 0 and 2.

Medians over repeated runs. Prints a markdown report and writes it to
``benchmarks/out/formats.md``.

    .venv/bin/python benchmarks/bench_formats.py            # ~128 embeddings, a few minutes
    .venv/bin/python benchmarks/bench_formats.py --quick    # fewer repetitions
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import (  # noqa: E402
    drop_all_caches,
    evict,
    fmt_ms,
    fmt_ratio,
    md_table,
    median_ms,
    resident_fraction,
    timed,
    warm,
)
from formats import Float16Memmap, ParquetSource, RawFloat32Sqlite  # noqa: E402

from cube_gen.access import CubeSet  # noqa: E402
from cube_gen.synth import Preset, write_synthetic  # noqa: E402

MB = 1 << 20


def preset(n_embeddings: int) -> Preset:
    """A small dataset: 2,000 observations, ``n_embeddings`` float32 embeddings (as published)."""
    n_obs_vision = max(1, n_embeddings * 7 // 8)
    return Preset(n_observations=2000, n_species=40, n_with_images=1800,
                  n_vision_observations=n_obs_vision, n_embeddings=n_embeddings,
                  embeddings_per_file=50, n_test=150, embedding_dtype="float32")


# -- building ------------------------------------------------------------------------------------
def build(work: Path, n_embeddings: int) -> dict[str, Path]:
    from cube_gen.pipeline import run_recipe
    from cube_gen.recipe import parse_recipe

    paths = {"source": work / "source", "cubes": work / "cubes", "dashboard": work / "dashboard",
             "floor": work / "floor_f16.bin"}
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not paths["source"].exists():
        print(f"writing the synthetic source ({n_embeddings} float32 embeddings) ...", flush=True)
        write_synthetic(str(paths["source"]), preset(n_embeddings), seed=0, progress=True)
    run_recipe(parse_recipe({
        "version": 1,
        "source": {"path": str(paths["source"])},
        "target": {"path": str(paths["cubes"])},
        "cubes": {"vision": {"umap_rgb": False}, "grid": {"resolution": 0.01, "tile_size": 128}},
        "metadata": {"title": "DeepEarth format benchmark"},
        "compute": {"scheduler": "synchronous"},
    }), progress=True)
    if not (paths["dashboard"] / "offsets.sqlite").exists():
        print("writing the float32 file + SQLite offsets ...", flush=True)
        RawFloat32Sqlite.build(str(paths["source"]), str(paths["dashboard"]))
    if not paths["floor"].exists():
        print("writing the float16 floor file ...", flush=True)
        Float16Memmap.build(str(paths["source"]), str(paths["floor"]))
    print(f"inputs ready in {time.perf_counter() - t0:.0f} s", flush=True)
    return paths


class Ours:
    """The cube through the public API: ``CubeSet.features`` / ``features_batch``."""

    name = "DeepEarth cube: CubeSet.features"

    def __init__(self, url: str):
        self.cs = CubeSet.open(url)
        self.dtype = np.dtype(self.cs.features_array().dtype)

    def get(self, key):
        return self.cs.features(self.cs.image_position(*key))

    batch_into = True

    def get_batch(self, keys, out=None):
        pos = self.cs.image_positions([k[0] for k in keys], [k[1] for k in keys])
        return self.cs.features_batch(pos, out=out)

    def data_files(self):
        n = self.cs.features_array().shape[0]
        return sorted({self.cs.raw_chunk_path(i) for i in range(n)} - {None})

    def unmap(self):
        layout = self.cs.raw_layout()
        if layout is not None:
            layout.maps.clear()


class ZarrPython(Ours):
    """The same cube read with zarr-python (``zarr.open_array(...)[i]``): the generic path."""

    name = "same cube via zarr-python array[i]"
    batch_into = False

    def __init__(self, url: str):
        super().__init__(url)
        import zarr

        self.arr = zarr.open_array(f"{url}/vision.zarr", path="features", mode="r")

    def get(self, key):
        return self.arr[self.cs.image_position(*key)]

    def get_batch(self, keys):
        pos = self.cs.image_positions([k[0] for k in keys], [k[1] for k in keys])
        return self.arr.oindex[pos]

    def unmap(self):
        pass


class XarrayDask(Ours):
    """The same cube through ``xarray.open_zarr`` (dask): what a notebook user writes."""

    name = "same cube via xarray.open_zarr .isel(image=i).values"
    batch_into = False

    def __init__(self, url: str):
        super().__init__(url)
        import xarray as xr

        self.ds = xr.open_zarr(f"{url}/vision.zarr")

    def get(self, key):
        return self.ds.features.isel(image=self.cs.image_position(*key)).values

    def get_batch(self, keys):
        pos = self.cs.image_positions([k[0] for k in keys], [k[1] for k in keys])
        return self.ds.features.isel(image=pos).values

    def unmap(self):
        pass


# -- measurements --------------------------------------------------------------------------------
def evict_all(stores) -> None:
    for s in stores:
        s.unmap()
    gc.collect()
    evict([f for s in stores for f in s.data_files()])


def single_reads(stores, keys, reps: int, cold_reps: int, rng, check_files) -> dict:
    """Medians of one read: warm (steady state) and cold."""
    sample = [keys[i] for i in rng.choice(len(keys), size=max(reps, cold_reps), replace=True)]
    warm(check_files)
    # steady state: two passes establish every store's maps, then interleaved reads
    for s in stores:
        for _ in range(2):
            for key in sample[:reps]:
                s.get(key)
    warm_t = {s.name: [] for s in stores}
    for key in sample[:reps]:
        for s in stores:  # interleaved: drift hits every store alike
            warm_t[s.name].append(timed(lambda s=s, key=key: s.get(key)))
    cold_t = {s.name: [] for s in stores}
    residency = []
    for key in sample[:cold_reps]:
        for s in stores:
            evict_all(stores)
            residency.append(resident_fraction(check_files))
            cold_t[s.name].append(timed(lambda s=s, key=key: s.get(key)))
    res = [r for r in residency if r is not None]
    return {"warm": {k: median_ms(v) for k, v in warm_t.items()},
            "cold": {k: median_ms(v) for k, v in cold_t.items()} if cold_reps else {},
            "residency": max(res) if res else None}


def batch_reads(stores, keys, n: int, reps: int, cold_reps: int, rng) -> dict:
    """Per-embedding cost of a batch: into a new array, into a reused one, and cold.

    Rounds are interleaved across stores, after a throwaway round (the first large
    allocations of a process are the slowest).
    """
    size = min(n, len(keys))
    batches = [[keys[i] for i in rng.choice(len(keys), size=size, replace=False)]
               for _ in range(max(reps, cold_reps) + 1)]
    times = {m: {s.name: [] for s in stores} for m in ("warm", "into", "cold")}
    for r, b in enumerate(batches[:reps + 1]):
        for s in stores:
            dt = timed(lambda s=s, b=b: s.get_batch(b))
            gc.collect()
            if r:  # round 0 is the throwaway
                times["warm"][s.name].append(dt)
    for s in stores:
        if getattr(s, "batch_into", False):
            buf = np.empty((size, 8, 24, 24, 1408), s.dtype)
            s.get_batch(batches[0], out=buf)  # touch the buffer's pages once
            for b in batches[1:reps + 1]:
                times["into"][s.name].append(timed(lambda s=s, b=b, buf=buf: s.get_batch(b, out=buf)))
            del buf
            gc.collect()
    for b in batches[1:cold_reps + 1]:
        for s in stores:
            evict_all(stores)
            times["cold"][s.name].append(timed(lambda s=s, b=b: s.get_batch(b)))
            gc.collect()
    return {m: {k: median_ms(v) / size for k, v in d.items() if v} for m, d in times.items()}


def loader_rates(url: str, floor: Float16Memmap, min_seconds: float, quick: bool) -> list:
    import torch
    from torch.utils.data import DataLoader, Dataset

    from cube_gen.torch_data import CubeDataset, make_loader

    class FloorDataset(Dataset):
        """Reference: features only, straight from the float16 memmap."""

        def __init__(self, floor):
            self.floor, self.keys = floor, floor.keys()

        def __len__(self):
            return len(self.keys)

        def __getitem__(self, i):
            return {"features": torch.from_numpy(self.floor.get(self.keys[i]))}

    def ours(workers, threads=0):
        def make(ds, bs, g):
            return make_loader(ds, batch_size=bs, num_workers=workers, threads=threads,
                               shuffle=True, generator=g,
                               **({"persistent_workers": True} if workers else {}))
        label = (f"make_loader, {threads} threads" if threads else
                 f"make_loader (collate), num_workers={workers}")
        return label, make

    def plain(workers):
        def make(ds, bs, g):
            return DataLoader(ds, batch_size=bs, shuffle=True, generator=g, num_workers=workers,
                              persistent_workers=workers > 0)
        return f"DataLoader (default_collate), num_workers={workers}", make

    standard = [ours(0), ours(2), ours(0, threads=2)]
    configs = [
        ("CubeDataset pooled, float32 (1408)", lambda: CubeDataset(url, features="pooled"), 32,
         standard),
        ("CubeDataset full, float16 (8x24x24x1408)",
         lambda: CubeDataset(url, features="full", dtype="float16"), 8,
         [*standard, plain(0), plain(2)]),
        ("CubeDataset full, float32 (8x24x24x1408)",
         lambda: CubeDataset(url, features="full", dtype="float32"), 8, standard),
        ("CubeDataset frame 0, float16 (24x24x1408)",
         lambda: CubeDataset(url, features="frame", frame=0, dtype="float16"), 8, standard),
        ("reference: float16 memmap Dataset, features only", lambda: FloorDataset(floor), 8,
         [plain(0), plain(2)]),
    ]
    rows = []
    for label, make_ds, bs, loaders in configs:
        for loader_label, make in loaders:
            loader = make(make_ds(), bs, torch.Generator().manual_seed(0))
            nbytes = 0
            for batch in loader:  # warm-up epoch (workers start, maps populate)
                nbytes = max(nbytes, batch["features"][0].numel() * batch["features"].element_size())
            rates = []
            for _ in range(2 if quick else 3):
                n, t0 = 0, time.perf_counter()
                while True:
                    for batch in loader:
                        n += len(batch["features"])
                    if time.perf_counter() - t0 >= min_seconds:
                        break
                rates.append(n / (time.perf_counter() - t0))
            rate = float(np.median(rates))
            rows.append((label, loader_label, bs, f"{rate:,.0f}", f"{rate * nbytes / MB:,.0f}"))
            print(" ", rows[-1], flush=True)
            del loader
            gc.collect()
    return rows


# -- report --------------------------------------------------------------------------------------
def report(args, paths, stores, single, batch, loaders, eviction, n_keys) -> str:
    floor = Float16Memmap.name
    parquet = ParquetSource.name
    ours = Ours.name
    lines = ["# Embedding retrieval: DeepEarth cube vs the earlier formats", ""]
    cube_bytes = sum(os.path.getsize(f) for f in stores[0].data_files())
    lines.append(f"Machine: {os.cpu_count()} cores, "
                 f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, "
                 f"Linux {platform.release()}, Python {platform.python_version()}, "
                 f"numpy {np.__version__}. Data: {n_keys} embeddings of (8, 24, 24, 1408) "
                 f"({cube_bytes / 2**30:.2f} GiB as float16), synthetic source with float32 "
                 f"embedding lists (as published), {args.work}.")
    lines.append("")
    lines.append(f"Cold reads: {eviction}")
    lines.append("")
    lines.append("## One full embedding by (gbif_id, image number)")
    lines.append("")
    lines.append(f"Medians of {args.reps} reads per store. warm: page cache warm, steady "
                 "state (every store's memory maps established by two earlier passes; reads "
                 "interleaved across stores). "
                 f"cold: {args.cold_reps} reads, the data files evicted before each. "
                 "x floor: time / floor time (target for the cube: <= 1.5x warm); "
                 "parquet / store: parquet time / store time (target >= 50x).")
    lines.append("")
    rows = []
    for s in stores:
        w = single["warm"][s.name]
        c = single["cold"].get(s.name)
        wf, cf = single["warm"][floor], single["cold"].get(floor)
        wp, cp = single["warm"][parquet], single["cold"].get(parquet)
        rows.append((s.name, str(s.dtype), fmt_ms(w), fmt_ratio(w / wf), fmt_ratio(wp / w),
                     fmt_ms(c), fmt_ratio(c / cf) if c and cf else "n/a",
                     fmt_ratio(cp / c) if c and cp else "n/a"))
    lines.append(md_table(["store", "dtype", "warm ms", "x floor", "parquet / store",
                           "cold ms", "x floor", "parquet / store"], rows))
    lines.append("")
    lines.append(f"## Batch of {min(100, n_keys)} random embeddings (ms per embedding)")
    lines.append("")
    lines.append("warm: into a new (100, 8, 24, 24, 1408) array, as the APIs return it (on "
                 "this VM first-touching that 1.3 GB, 2.6 GB for float32, costs more than "
                 "reading it); into out: into a reused array (`features_batch(..., out=)`), "
                 "the read cost alone; cold: into a new array, data files evicted first.")
    lines.append("")
    rows = []
    for s in stores:
        w = batch["warm"][s.name]
        i = batch["into"].get(s.name)
        c = batch["cold"].get(s.name)
        rows.append((s.name, fmt_ms(w), fmt_ratio(w / batch["warm"][floor]),
                     fmt_ratio(batch["warm"][parquet] / w), fmt_ms(i),
                     fmt_ratio(i / batch["into"][floor]) if i else "n/a",
                     fmt_ratio(batch["into"][parquet] / i) if i else "n/a", fmt_ms(c),
                     fmt_ratio(c / batch["cold"][floor]) if c else "n/a",
                     fmt_ratio(batch["cold"][parquet] / c) if c else "n/a"))
    lines.append(md_table(["store", "warm ms/emb", "x floor", "parquet / store",
                           "into out ms/emb", "x floor", "parquet / store", "cold ms/emb",
                           "x floor", "parquet / store"], rows))
    lines.append("")
    if loaders:
        lines.append("## DataLoader throughput (warm page cache, shuffled, persistent workers)")
        lines.append("")
        lines.append(md_table(["dataset", "loader", "batch", "samples/s", "MiB/s of features"],
                              loaders))
        lines.append("")
    w_ratio = single["warm"][ours] / single["warm"][floor]
    p_ratio = single["warm"][parquet] / single["warm"][ours]
    lines.append("## Targets")
    lines.append("")
    lines.append(f"- single embedding, warm: {w_ratio:.2f}x the float16 memmap floor "
                 f"(target <= 1.5x): {'met' if w_ratio <= 1.5 else 'MISSED'}")
    lines.append(f"- single embedding, warm: {p_ratio:.0f}x faster than the parquet source "
                 f"(target >= 50x): {'met' if p_ratio >= 50 else 'MISSED'}")
    if single["cold"]:
        cw = single["cold"][ours] / single["cold"][floor]
        cp = single["cold"][parquet] / single["cold"][ours]
        lines.append(f"- single embedding, cold: {cw:.2f}x the floor, {cp:.0f}x faster than "
                     "parquet")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(ROOT / "data" / "bench-formats"),
                    help="where the source, cube and baseline files are built (kept)")
    ap.add_argument("--embeddings", type=int, default=128)
    ap.add_argument("--reps", type=int, default=25, help="warm single reads per store")
    ap.add_argument("--cold-reps", type=int, default=7, help="cold single reads per store (0: skip)")
    ap.add_argument("--batch-reps", type=int, default=3)
    ap.add_argument("--drop-caches", action="store_true",
                    help="also write /proc/sys/vm/drop_caches before cold reads (root; global)")
    ap.add_argument("--no-loader", action="store_true", help="skip the DataLoader part")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "formats.md"))
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.cold_reps, args.batch_reps = 9, 3, 2

    paths = build(Path(args.work), args.embeddings)
    url = str(paths["cubes"])
    floor = Float16Memmap.open(str(paths["source"]), str(paths["floor"]))
    stores = [Ours(url), floor, RawFloat32Sqlite(str(paths["dashboard"])),
              ParquetSource(str(paths["source"])), ZarrPython(url), XarrayDask(url)]
    keys = floor.keys()
    all_files = [f for s in stores[:4] for f in s.data_files()]

    # can this machine make reads cold?
    warm(all_files)
    before = resident_fraction(all_files)
    evict_all(stores)
    after = resident_fraction(all_files)
    dropped = drop_all_caches() if args.drop_caches else False
    if after is not None:
        eviction = (f"posix_fadvise(POSIX_FADV_DONTNEED) on every data file (maps dropped "
                    f"first) before each read; fincore residency {before:.0%} -> {after:.0%}"
                    + ("; plus /proc/sys/vm/drop_caches" if dropped else "") + ".")
    else:
        eviction = ("posix_fadvise(POSIX_FADV_DONTNEED) on every data file before each read "
                    "(residency not verifiable: no fincore).")
    if after is not None and after > 0.05 and not dropped:
        args.cold_reps = 0
        eviction += " Eviction did not work here: cold reads skipped."
    print(eviction, flush=True)

    rng = np.random.default_rng(42)
    print("single reads ...", flush=True)
    single = single_reads(stores, keys, args.reps, args.cold_reps, rng, all_files)
    if single.get("residency") is not None and args.cold_reps:
        eviction += f" Largest residency measured just before a cold read: {single['residency']:.1%}."
    print("batch reads ...", flush=True)
    batch = batch_reads(stores, keys, 100, args.batch_reps, min(args.cold_reps, 2), rng)
    loaders = []
    if not args.no_loader:
        print("DataLoader ...", flush=True)
        warm(all_files)
        loaders = loader_rates(url, floor, 1.0 if args.quick else 2.0, args.quick)
    text = report(args, paths, stores, single, batch, loaders, eviction, len(keys))
    print()
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
