"""Similarity at scale: cube_gen.ann (FAISS PCA -> HNSW + exact re-rank) vs FAISS flat.

Side by side in one run on the same unit vectors (``--n`` rows of 1408-d vectors drawn like
pooled vision vectors: 232 species centres in 60 genera, per-image variation along 48
latent factors, small isotropic noise): recall@10
against exact search and per-query latency (p50 / p99, one thread, in-process), without a
filter and with a filter allowing 10 % of the rows (a species / time / bbox selection).
The flat baseline scans every row (``faiss.knn``, inner product), or with the filter only
the allowed rows (gathered once, outside the timing: the cheapest a flat scan can be).
Build time is with one FAISS thread (the recipe uses every core); memory is the serialised
index (its in-memory size) and the process's peak RSS (vectors included).

    python -m benchmarks.bench_ann [--n 800000] [--queries 200] [--ef-search 256,512]
        [--rerank 10,20]
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from cube_gen import ann
from cube_gen.analysis import top_k_cosine

OUT = Path(__file__).resolve().parent / "out"


def vectors(n: int, d: int = 1408, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    genera = rng.normal(0, 1, (60, d)).astype(np.float32)
    species = (genera[rng.integers(0, 60, 232)] + rng.normal(0, 0.7, (232, d))).astype(np.float32)
    # per-image variation of low intrinsic dimension (pose, light, background: 48 factors)
    factors = rng.normal(0, 1, (48, d)).astype(np.float32) / np.sqrt(48)
    out = np.empty((n, d), np.float32)
    for lo in range(0, n, 50_000):
        hi = min(lo + 50_000, n)
        out[lo:hi] = species[rng.integers(0, 232, hi - lo)]
        out[lo:hi] += rng.standard_normal((hi - lo, 48), np.float32) @ (4.0 * factors)
        out[lo:hi] += 0.25 * rng.standard_normal((hi - lo, d), np.float32)
        out[lo:hi] /= np.linalg.norm(out[lo:hi], axis=1, keepdims=True)  # unit, in place
    return out


def _pct(values, q):
    return float(np.percentile(np.asarray(values) * 1000, q))


def main(argv: list[str] | None = None) -> str:
    import faiss

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=800_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--ef-search", default=str(ann.EF_SEARCH),
                    help="HNSW beam widths to compare, comma-separated (one index)")
    ap.add_argument("--rerank", default="20",
                    help="candidates per result re-ranked exactly, comma-separated")
    ap.add_argument("--ef-filter-max", default=str(ann.EF_FILTER_MAX),
                    help="widest beam under a filter, comma-separated (filtered rows only)")
    args = ap.parse_args(argv)
    filter_max = [int(v) for v in args.ef_filter_max.split(",")]
    settings = [(int(ef), int(rr)) for ef in args.ef_search.split(",")
                for rr in args.rerank.split(",")]
    load0 = os.getloadavg()
    t = time.perf_counter()
    x = vectors(args.n)
    t_gen = time.perf_counter() - t
    t = time.perf_counter()
    index = ann.VectorIndex.build(x)  # every core, as in the recipe
    t_build = time.perf_counter() - t
    faiss.omp_set_num_threads(1)  # queries: one thread each, as in the server
    threadpool_limits(limits=1, user_api="blas")  # the server's BLAS setting too
    rng = np.random.default_rng(1)
    queries = rng.choice(args.n, args.queries, replace=False)
    allowed = rng.random(args.n) < 0.10
    rows = []
    wide = rng.random(args.n) < 0.40  # above ann.SCAN_FRACTION: the graph with a selector
    for label, mask in (("no filter", None), ("filter: 10 % of rows (scan)", allowed),
                        ("filter: 40 % of rows (graph)", wide)):
        sub = None if mask is None else np.flatnonzero(mask)
        x_sub = x if mask is None else x[sub]  # the allowed rows (what a selector scans)
        flat_t, truths = [], []
        for q in queries:
            t = time.perf_counter()
            _, ids = faiss.knn(x[q:q + 1], x_sub, 11, faiss.METRIC_INNER_PRODUCT)
            flat_t.append(time.perf_counter() - t)
            ids = ids[0] if sub is None else sub[ids[0]]
            truths.append(set([i for i in ids.tolist() if i != q][:10]))
        del x_sub
        for (ef, rerank), widest in [(s, w) for s in settings
                                     for w in (filter_max if mask is not None else [None])]:
            index.ef_search = ef
            if widest is not None:
                ann.EF_FILTER_MAX = widest
            ours_t, recalls = [], []
            for q, truth in zip(queries, truths, strict=True):
                t = time.perf_counter()
                got, _ = ann.search(x, x[q], 10, index, mask, np.array([q]), rerank=rerank,
                                    top_k=top_k_cosine)
                ours_t.append(time.perf_counter() - t)
                recalls.append(len(set(got.tolist()) & truth) / 10)
            name = label if widest is None else f"{label}, widest beam {widest}"
            rows.append((name, ef, 10 * rerank, float(np.mean(recalls)), _pct(ours_t, 50),
                         _pct(ours_t, 99), _pct(flat_t, 50), _pct(flat_t, 99)))
    # a new filter for every query: what the first query under a filter costs (the
    # allowed rows' PCA vectors gathered; later queries under that filter reuse them)
    fresh_t, fresh_flat, fresh_rec = [], [], []
    for q in queries[:50]:
        mask = rng.random(args.n) < 0.10
        sub = np.flatnonzero(mask)
        t = time.perf_counter()
        _, ids = faiss.knn(x[q:q + 1], x[sub], 11, faiss.METRIC_INNER_PRODUCT)
        fresh_flat.append(time.perf_counter() - t)  # includes the gather, as ours does
        truth = set([i for i in sub[ids[0]].tolist() if i != q][:10])
        index.ef_search = ann.EF_SEARCH
        t = time.perf_counter()
        got, _ = ann.search(x, x[q], 10, index, mask, np.array([q]), top_k=top_k_cosine)
        fresh_t.append(time.perf_counter() - t)
        fresh_rec.append(len(set(got.tolist()) & truth) / 10)
    rows.append(("filter: 10 % of rows, a new filter every query (50 queries)", ann.EF_SEARCH,
                 200, float(np.mean(fresh_rec)), _pct(fresh_t, 50), _pct(fresh_t, 99),
                 _pct(fresh_flat, 50), _pct(fresh_flat, 99)))
    a = index.attrs
    lines = [
        f"{args.n:,} vectors x 1408 (float32, unit), {args.queries} queries, one thread "
        f"(the build: {os.cpu_count()} cores), load average before "
        f"{' / '.join(f'{v:.1f}' for v in load0)}, after "
        f"{' / '.join(f'{v:.1f}' for v in os.getloadavg())}; "
        f"index {a['factory']} (efConstruction {a['ef_construction']}; efSearch per row, "
        f"widened under the filter), candidates re-ranked exactly; generated in "
        f"{t_gen:.0f} s, index built in {t_build:.0f} s (PCA train {a['train_seconds']} s, "
        f"graph {a['add_seconds']} s), {index.to_bytes().nbytes / 2**20:.0f} MiB serialised; "
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB "
        f"(vectors {x.nbytes / 2**30:.1f} GiB).",
        "",
        "| query | efSearch | candidates | recall@10 vs exact | ours p50 ms | ours p99 ms "
        "| FAISS flat p50 ms | FAISS flat p99 ms | p50 ratio flat / ours |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, ef, cand, rec, o50, o99, f50, f99 in rows:
        lines.append(f"| {label} | {ef} | {cand} | {rec:.3f} | {o50:.1f} | {o99:.1f} "
                     f"| {f50:.1f} | {f99:.1f} | {f50 / o50:.1f} |")
    table = "\n".join(lines)
    print(table)
    OUT.mkdir(exist_ok=True)
    (OUT / f"ann-{args.n}.md").write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
