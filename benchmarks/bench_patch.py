"""Patch index benchmark: build time per embedding, bytes per patch, query p50, recall@10,
IVF-PQ (+ exact re-ranking) side by side with FAISS flat on the same vectors.

    nice python -m benchmarks.bench_patch [--images 124] [--nlist 1024] [--queries 30]

Vectors: :func:`cube_gen.patch_index.simulate_patch_vectors` (unit 1408-d frame-mean patch
vectors shaped like the synthetic source's: species signatures on object regions), at a
fraction of the published scale that fits this machine (the default 124 images are 1/64 of
7,949; flat float32 at 1x would be 26 GB). Built and searched side by side in one run:

* ``flat``: ``faiss.IndexFlatIP`` of the 1408-d unit vectors (exact; the baseline);
* ``ivfpq``: the recipe's index (``PCAR256,IVF{nlist},PQ32``), candidates only;
* ``ivfpq+rerank``: the same, best ``rerank`` candidates re-ranked exactly (vectors from
  memory here; in the cube set they are read from the stored features).

Scale simulation: the IVF lists are filled with copies of the built codes (new ids) up to
the published 4.58M patches (1x) and 10x; a 100x query scans as many codes as the 10x index
with 10x nprobe, which is how the 100x row is measured (the 100x index itself, 18 GB of
codes, does not fit this machine's memory). Single-threaded FAISS, as the server runs it.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from cube_gen import patch_index as P

from .common import median_ms

PUBLISHED_IMAGES = 7949


def _replicate(index, factor: int) -> None:
    """Fill every inverted list with ``factor`` copies of its codes (new, distinct ids)."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    inv = ivf.invlists
    n0 = ivf.ntotal
    cs = inv.code_size
    for lst in range(ivf.nlist):
        n = inv.list_size(lst)
        if n == 0:
            continue
        codes = faiss.rev_swig_ptr(inv.get_codes(lst), n * cs).copy()
        ids = faiss.rev_swig_ptr(inv.get_ids(lst), n).copy()
        for r in range(1, factor):
            new_ids = ids + r * n0
            inv.add_entries(lst, n, faiss.swig_ptr(new_ids), faiss.swig_ptr(codes))
    ivf.ntotal = n0 * factor
    index.ntotal = n0 * factor


def _p50(fn, queries) -> float:
    times = []
    for q in queries:
        t = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t)
    return median_ms(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=124)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--rerank", type=int, default=400)
    ap.add_argument("--rerank-more", type=int, default=1000, help="a second re-rank depth")
    ap.add_argument("--nprobe", type=int, default=128)
    ap.add_argument("--max-factor", type=int, default=10 * PUBLISHED_IMAGES)
    args = ap.parse_args(argv)
    import faiss

    faiss.omp_set_num_threads(1)
    n_img = args.images
    t = time.perf_counter()
    vec, _ = P.simulate_patch_vectors(n_img, n_species=64, seed=7)
    t_sim = time.perf_counter() - t
    n = len(vec)
    print(f"{n_img} images, {n} patches x {vec.shape[1]} simulated in {t_sim:.1f} s", flush=True)
    rng = np.random.default_rng(1)
    queries = rng.choice(n, args.queries, replace=False)

    # flat baseline
    t = time.perf_counter()
    flat = faiss.IndexFlatIP(vec.shape[1])
    flat.add(vec)
    t_flat = time.perf_counter() - t
    flat_bytes = faiss.serialize_index(flat).nbytes

    # the recipe's index
    spec = P.IndexSpec(kind="ivfpq", nlist=args.nlist, nprobe=args.nprobe, rerank=args.rerank,
                       train_patches=min(n, 39 * args.nlist))
    index, info = P.build_index(lambda i: vec[i * 576:(i + 1) * 576].reshape(1, 24, 24, -1),
                                n_img, spec)
    st = info["stats"]
    ivf_bytes = faiss.serialize_index(index).nbytes
    pi = P.PatchIndex.from_index(index, info["plan"], spec, lambda ids: vec[ids])
    raw = P.PatchIndex.from_index(index, info["plan"], spec, None)

    exact = {int(q): set(flat.search(vec[q:q + 1], 10)[1][0].tolist()) for q in queries}
    rec_raw = np.mean([len(exact[int(q)] & {m.patch for m in raw.search(vec[q], 10)}) / 10
                       for q in queries])
    rec_rr = np.mean([len(exact[int(q)] & {m.patch for m in pi.search(vec[q], 10)}) / 10
                      for q in queries])
    p_flat = _p50(lambda q: flat.search(vec[q:q + 1], 10), queries)
    p_raw = _p50(lambda q: raw.search(vec[q], 10), queries)
    p_rr = _p50(lambda q: pi.search(vec[q], 10), queries)
    more = args.rerank_more
    rec_more = np.mean([len(exact[int(q)] & {m.patch for m in pi.search(vec[q], 10, rerank=more)})
                        / 10 for q in queries])
    p_more = _p50(lambda q: pi.search(vec[q], 10, rerank=more), queries)

    rows = [
        "| index | patches | build s | build ms / embedding | bytes / patch | query p50 ms "
        "(k=10) | recall@10 vs flat |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| flat (IndexFlatIP, 1408-d float32) | {n:,} | {t_flat:.1f} | "
        f"{1e3 * t_flat / n_img:.1f} | {flat_bytes / n:.0f} | {p_flat:.1f} | 1.000 |",
        f"| {info['plan'].factory} | {n:,} | {st['train_seconds'] + st['add_seconds']:.1f} "
        f"(train {st['train_seconds']:.1f}) | {1e3 * st['add_seconds'] / n_img:.1f} "
        f"(+ train) | {ivf_bytes / n:.1f} | {p_raw:.2f} | {rec_raw:.3f} |",
        f"| {info['plan'].factory} + exact re-rank of {args.rerank} | {n:,} | | | | "
        f"{p_rr:.2f} | {rec_rr:.3f} |",
        f"| {info['plan'].factory} + exact re-rank of {more} | {n:,} | | | | "
        f"{p_more:.2f} | {rec_more:.3f} |",
    ]
    # scale simulation
    scale_rows = ["| scale | patches | nprobe | codes scanned / query | IVF-PQ query p50 ms "
                  "(candidates) | flat query p50 ms (measured x N / n, linear) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
    step1 = max(1, round(PUBLISHED_IMAGES / n_img))
    for label, mult, probe_mult in (("1x", step1, 1), ("10x", 10, 1),
                                    ("100x (10x lists, 10x nprobe)", 1, 10)):
        if index.ntotal * mult > args.max_factor * 576:
            break
        if mult > 1:
            _replicate(index, mult)
        nprobe = min(args.nprobe * probe_mult, args.nlist)
        total = index.ntotal * probe_mult
        p = _p50(lambda q, nprobe=nprobe: raw.candidates(vec[q], args.rerank, nprobe=nprobe),
                 queries)
        scanned = int(nprobe * index.ntotal / args.nlist)
        scale_rows.append(f"| {label} | {total:,} | {nprobe} | {scanned:,} | {p:.2f} | "
                          f"{p_flat * total / n:.0f} |")
        print(scale_rows[-1], flush=True)
    at_1x = P.plan_index(P.IndexSpec(), PUBLISHED_IMAGES * 576)
    out = "\n".join([
        f"Simulated patches: {n_img} images x 576 = {n:,} unit 1408-d vectors ({t_sim:.0f} s to "
        f"simulate); {os.cpu_count()} cores, FAISS single-threaded, load average "
        f"{os.getloadavg()[0]:.1f}.", "", *rows, "",
        f"Published set with the recipe defaults: {at_1x.factory}, planned "
        f"{at_1x.estimated_bytes / 2**20:.0f} MiB for {at_1x.n_patches:,} patches "
        f"({at_1x.estimated_bytes / at_1x.n_patches:.1f} B / patch in memory, 40 B of codes "
        f"and ids; budget 2048 MiB); flat "
        f"float32 would be {at_1x.n_patches * 1408 * 4 / 2**30:.1f} GiB.", "", *scale_rows])
    print(out)
    os.makedirs("benchmarks/out", exist_ok=True)
    with open("benchmarks/out/patch.md", "w") as f:
        f.write(out + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
