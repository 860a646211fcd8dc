"""Training throughput from the cubes (local, S3 via moto) vs the source parquet; demo scores.

    python -m benchmarks.bench_train --cubes data/cubes-demo --source data/source-demo

Throughput: samples per second of whole training epochs (read + forward + backward +
step) of a linear probe over the same embeddings, for pooled vectors (1408) and patch
features of one frame (576 x 1408, attention-pooled), median over ``--repeats`` epochs after
one warm-up epoch, ratios to the parquet baseline measured side by side in the same run.
The parquet baseline reads the same samples with the project's streaming reader
(:class:`cube_gen.reader.SourceDataset`, the rows of a batch grouped per file) and pools
or slices them as the cube stores them. Scores: the probe (linear, MLP) and the alignment
model trained on the published split (train 2010-2024, test 2025), with chance levels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cube_gen import source_layout as L
from cube_gen.access import CubeSet
from cube_gen.reader import SourceDataset
from cube_gen.torch_data import CubeDataset, make_loader
from cube_gen.train import SpeciesModel, train


class ParquetSamples(torch.utils.data.Dataset):
    """The same samples read straight from the source parquet: the row groups holding a
    batch's rows, decoded zero-copy from the Arrow buffers (``to_numpy`` of a float16 list
    column is orders of magnitude slower), pooled or sliced as the cube stores them."""

    def __init__(self, source: str, gbif_ids: np.ndarray, image_numbers: np.ndarray,
                 labels: np.ndarray, mode: str):
        import pyarrow.parquet as pq

        src = SourceDataset(source)
        index = src.read_vision_index().set_index(["gbif_id", "image_number"])
        rows = index.loc[list(zip(gbif_ids.tolist(), image_numbers.tolist(), strict=True))]
        self.file_idx = rows.file_idx.to_numpy()
        self.row_idx = rows.row_idx.to_numpy()
        self.files = {int(f): pq.ParquetFile(src.path(L.embedding_file_name(int(f))))
                      for f in np.unique(self.file_idx)}
        self.starts = {f: np.cumsum([0] + [pf.metadata.row_group(g).num_rows
                                           for g in range(pf.num_row_groups)])
                       for f, pf in self.files.items()}
        self.labels = labels
        self.mode = mode

    def __len__(self) -> int:
        return len(self.labels)

    def _read(self, f: int, row: int) -> np.ndarray:
        starts = self.starts[f]
        g = int(np.searchsorted(starts, row, side="right") - 1)
        col = self.files[f].read_row_group(g, columns=["embedding"]).column(0)
        lst = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        i = row - int(starts[g])
        lo, hi = int(lst.offsets[i].as_py()), int(lst.offsets[i + 1].as_py())
        values = lst.values
        dtype = np.dtype(values.type.to_pandas_dtype())
        buf = values.buffers()[1]
        flat = np.frombuffer(buf, dtype=dtype, count=hi - lo,
                             offset=(values.offset + lo) * dtype.itemsize)
        return flat.reshape(L.VISION_SHAPE)

    def __getitems__(self, ks: list[int]) -> dict[str, torch.Tensor]:
        out = []
        for k in ks:
            x = self._read(int(self.file_idx[k]), int(self.row_idx[k]))
            out.append(x.mean(axis=(0, 1, 2), dtype=np.float32) if self.mode == "pooled"
                       else x[0].astype(np.float32))
        return {"features": torch.from_numpy(np.stack(out)),
                "species": torch.from_numpy(self.labels[np.asarray(ks)])}


def epoch(loader, model, opt, patch: bool) -> int:
    n = 0
    for batch in loader:
        x = batch["features"]
        if patch:
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        loss = nn.functional.cross_entropy(model(x.float()), batch["species"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += len(x)
    return n


def throughput(make, n_species: int, patch: bool, repeats: int, warmup: int = 1) -> float:
    """Median samples/s over ``repeats`` epochs (after ``warmup`` epochs)."""
    torch.manual_seed(0)
    model = SpeciesModel(1408, n_species, "linear", patch=patch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rates = []
    for r in range(repeats + warmup):
        loader = make()
        t0 = time.perf_counter()
        n = epoch(loader, model, opt, patch)
        if r >= warmup:
            rates.append(n / (time.perf_counter() - t0))
    return float(np.median(rates))


def parquet_loader(ds: ParquetSamples, batch: int):
    order = np.random.default_rng(0).permutation(len(ds))
    for b in range(0, len(order), batch):
        yield ds.__getitems__(order[b:b + batch].tolist())


def upload(cubes: str, s3) -> str:
    import s3fs

    fs = s3fs.S3FileSystem(**s3.storage_options)
    fs.put(str(cubes).rstrip("/") + "/", "deepearth/bench-train/", recursive=True)
    return "s3://deepearth/bench-train"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cubes", default="data/cubes-demo")
    ap.add_argument("--source", default="data/source-demo")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=40, help="epochs of the scored runs")
    ap.add_argument("--parquet-samples", type=int, default=16,
                    help="samples of the (slow) parquet baseline per epoch, no warm-up epoch")
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # a small model on a shared machine: threads only contend

    cs = CubeSet.open(args.cubes)
    t = cs.image_table()
    n_species = len(cs.species_table())
    labels = t.species_index.to_numpy(np.int64)
    print(f"{len(t)} embeddings, {n_species} species; batch {args.batch}, "
          f"median of {args.repeats} epochs", flush=True)
    results: dict[str, dict[str, float]] = {}
    for mode, patch in (("pooled", False), ("patch", True)):
        feat = "pooled" if mode == "pooled" else "frame"
        row: dict[str, float] = {}
        sub = np.random.default_rng(1).permutation(len(t))[:args.parquet_samples]
        pq = ParquetSamples(args.source, t.gbif_id.to_numpy()[sub],
                            t.image_number.to_numpy()[sub], labels[sub], mode)
        row["parquet"] = throughput(lambda pq=pq: parquet_loader(pq, args.batch), n_species,
                                    patch, args.repeats, warmup=0)
        ds = CubeDataset(cs, features=feat, language=False)
        gen = torch.Generator().manual_seed(0)
        row["cube_local"] = throughput(
            lambda ds=ds, gen=gen: make_loader(ds, args.batch, threads=2, shuffle=True,
                                               generator=gen),
            n_species, patch, args.repeats)
        results[mode] = row
        print(mode, {k: round(v, 1) for k, v in row.items()}, flush=True)
    if not args.no_s3:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from s3_server import moto_s3

        with moto_s3() as s3:
            s3.create_bucket("deepearth")
            t0 = time.perf_counter()
            url = upload(args.cubes, s3)
            print(f"uploaded to moto in {time.perf_counter() - t0:.0f} s", flush=True)
            cs3 = CubeSet.open(url, s3.storage_options)
            for mode, patch in (("pooled", False), ("patch", True)):
                ds = CubeDataset(cs3, features="pooled" if mode == "pooled" else "frame",
                                 language=False)
                gen = torch.Generator().manual_seed(0)
                results[mode]["cube_s3"] = throughput(
                    lambda ds=ds, gen=gen: make_loader(ds, args.batch, threads=4, shuffle=True,
                                                       generator=gen),
                    n_species, patch, args.repeats)
                print(mode, "s3", round(results[mode]["cube_s3"], 1), flush=True)
    print("\n| features | parquet (samples/s) | cube, local | cube, S3 (moto) | local / parquet "
          "| S3 / parquet |\n| --- | --- | --- | --- | --- | --- |")
    for mode, row in results.items():
        s3v = row.get("cube_s3")
        base = row["parquet"]
        s3_rate = "-" if s3v is None else f"{s3v:.1f}"
        s3_ratio = "-" if s3v is None else f"{s3v / base:.1f}x"
        print(f"| {mode} | {base:.1f} | {row['cube_local']:.1f} | {s3_rate} | "
              f"{row['cube_local'] / base:.1f}x | {s3_ratio} |")

    # scores on the published split
    scores = {}
    splits = {"random": {"method": "random", "test_fraction": 0.25, "seed": 0}}
    if int((t.split == 1).sum()):
        splits["temporal"] = {"method": "temporal"}
    runs = [(f"{sname}/{name}", split, task, kind) for sname, split in splits.items()
            for name, task, kind in (("probe-linear", "probe", "linear"),
                                     ("probe-mlp", "probe", "mlp"),
                                     ("alignment", "alignment", "mlp"))]
    with tempfile.TemporaryDirectory() as tmp:
        for name, split, task, kind in runs:
            r = train({"cubes": args.cubes, "task": task, "model": {"kind": kind, "hidden": 256},
                       "split": split, "train": {"epochs": args.epochs, "batch_size": 16,
                                                 "lr": 3e-3, "torch_threads": 1},
                       "tracking": {"dir": tmp, "mlflow": False, "tensorboard": False},
                       "predictions": {"write": False}}, progress=False)
            scores[name] = {k: r.metrics[k] for k in r.metrics
                            if k.startswith(("test_top", "chance"))}
            scores[name]["train"] = len(r.split.train)
            scores[name]["test"] = len(r.split.test)
    print("\n| split/run | train | test | top-1 | top-5 | chance top-1 (uniform / majority) "
          "| chance top-5 (uniform / majority) |\n| --- | --- | --- | --- | --- | --- | --- |")
    for name, s in scores.items():
        print(f"| {name} | {s['train']} | {s['test']} | {s.get('test_top1', float('nan')):.3f} | "
              f"{s.get('test_top5', float('nan')):.3f} | {s['chance_top1_uniform']:.3f} / "
              f"{s.get('chance_top1_majority', float('nan')):.3f} | "
              f"{s['chance_top5_uniform']:.3f} / {s.get('chance_top5_majority', float('nan')):.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"throughput": results, "scores": scores,
                                               "splits": splits}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    sys.exit(main())
