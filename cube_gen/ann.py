"""Approximate nearest neighbours over unit vectors (FAISS HNSW), with filters and exact re-ranking.

Generic helpers for any vector set (pooled vision vectors here; patch vectors may reuse
them): :class:`VectorIndex` builds a FAISS ``PCA64 -> HNSW32,Flat (L2)`` graph over unit
rows (for unit vectors L2 order is cosine order; the PCA, trained on a 50,000-row sample,
keeps the graph's vectors small and its distances cheap), returns candidate rows for a
query, honours a boolean mask of allowed rows (``IDSelectorBitmap``: the walk passes
through disallowed nodes but returns only allowed ones; the beam is widened for a
selective mask; from the second query under a mask allowing at most
:data:`SCAN_FRACTION` of the rows, an exact scan of the allowed rows' PCA vectors,
:meth:`VectorIndex.scan`, replaces the walk) and serialises to bytes. :func:`search` re-scores ``k * rerank``
candidates exactly on the full unit vectors (:func:`cube_gen.analysis.top_k_cosine`), so
scores are always exact cosines; below :data:`EXACT_BELOW` rows, when a filter leaves at
most :data:`EXACT_SUBSET` rows, or when the graph finds fewer allowed rows than asked, the
search is exact.

Why HNSW and not IVF (index format 1): on synthetic pooled-like vectors (benchmarks/
bench_ann.py) ``PCA -> IVF-Flat`` recall@10 was bound by the lists probed (200k rows:
nprobe 32 0.49, nprobe 96 0.76) while PCA dimensions and re-rank size barely mattered, and
exact search over the PCA-64 projections with an exact re-rank of 100 gave 0.997: the
projections were good, the coarse quantiser was not. A graph over the same projections
reaches that neighbourhood in a few thousand distance computations: at 800k rows, one
thread, efSearch 512 and 200 candidates, on a quiet machine, recall@10 0.964 at p50 7.1 ms
(FAISS flat: 466 ms), 0.973 at 15.6 ms with a filter allowing 10 % of the rows (flat over
those rows: 48 ms; a beam of 768 instead of 1024: 0.950 at 12.3 ms); efSearch 256 gave only
0.907 (benchmarks/RESULTS.md). Costs: 411 MiB at 800k rows
(n x (4 x 64 + 8 x 32) bytes plus upper levels, the same serialised) and a build of
15-28 min on one core at load 3-6 (the graph; the recipe uses every core).

Why FAISS (not usearch or hnswlib, which would also do): the exact baseline
(``faiss.knn``) and the patch index (issue 17, IVF-PQ) are in the same library, its HNSW
takes an ID selector (filtered search without post-filtering or a Python callback per
node), indexes serialise to one byte string (stored in Zarr like any array), and wheels
exist for Python 3.11 on PyPI and conda-forge.

The recipe stage ``similarity`` (:func:`build_stage`) writes ``similarity.zarr``: the
serialised index (uint8 array ``index``, attributes ``kind: hnsw``, ``index_format: 2``)
when the cube set has at least :data:`EXACT_BELOW` embeddings, else only attributes
saying search is exact. A format-1 (IVF) index raises :class:`OutdatedIndex` on read;
:func:`open_similarity` then builds the graph in memory from the pooled vectors.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import CubeError

EXACT_BELOW = 50_000       # rows: below this, exact search (a matrix-vector product)
EXACT_SUBSET = 20_000      # a filter leaving at most this many rows is searched exactly
SIMILARITY_PATH = "similarity.zarr"
INDEX_KIND = "hnsw"
INDEX_FORMAT = 2          # 1: PCA -> IVF-Flat (recall-limited, no longer read); 2: HNSW
EF_SEARCH = 512           # HNSW beam width per query (at least the candidates asked for)
EF_FILTER_MAX = 1024      # the widest beam a selective filter gets
SCAN_FRACTION = 0.25      # a filter allowing at most this share of rows: scan their PCA codes
SUBSET_CACHE_BYTES = 256 << 20  # the allowed rows' codes of recent filters, per index
_CHUNK_BYTES = 64 << 20


class OutdatedIndex(CubeError):
    """A ``similarity.zarr`` written in an older index format (rebuilt in memory on open)."""


def _faiss():
    import faiss

    return faiss


def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32 C-contiguous."""
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return np.ascontiguousarray(v / np.where(n > 0, n, 1), dtype=np.float32)


@dataclass
class VectorIndex:
    """A FAISS ``PCA -> HNSW-Flat`` graph of unit rows; :meth:`candidates` for a query."""

    index: Any
    n: int
    dims: int
    ef_search: int = EF_SEARCH
    attrs: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _subsets: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _views: dict = field(default_factory=dict, repr=False)
    _seen: OrderedDict = field(default_factory=OrderedDict, repr=False)

    @classmethod
    def build(cls, vectors: np.ndarray, dims: int = 64, m: int = 32,
              ef_construction: int = 80, ef_search: int = EF_SEARCH, train_size: int = 50_000,
              seed: int = 0, batch: int = 65_536) -> VectorIndex:
        """PCA trained on a random sample of ``train_size`` rows; every row added, in batches."""
        faiss = _faiss()
        n, d = vectors.shape
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, train_size), replace=False))
        dims = int(min(dims, d, len(sample)))  # PCA outputs at most as many as it saw
        t0 = time.perf_counter()
        pca = faiss.PCAMatrix(d, dims, 0, False)
        hnsw = faiss.IndexHNSWFlat(dims, int(m), faiss.METRIC_L2)
        hnsw.hnsw.efConstruction = int(ef_construction)
        hnsw.hnsw.efSearch = int(ef_search)
        index = faiss.IndexPreTransform(pca, hnsw)
        index.train(unit(vectors[sample]))
        t1 = time.perf_counter()
        for lo in range(0, n, batch):
            index.add(unit(vectors[lo:lo + batch]))
        attrs = {"library": "faiss", "factory": f"PCA{dims},HNSW{m},Flat",
                 "metric": "L2 of PCA-projected unit vectors", "n": int(n), "features": int(d),
                 "dims": dims, "hnsw_m": int(m), "ef_construction": int(ef_construction),
                 "ef_search": int(ef_search), "train_rows": int(len(sample)),
                 "train_seconds": round(t1 - t0, 2),
                 "add_seconds": round(time.perf_counter() - t1, 2),
                 "index_format": INDEX_FORMAT}
        return cls(index, int(n), dims, int(ef_search), attrs)

    def candidates(self, query: np.ndarray, n: int, allowed: np.ndarray | None = None,
                   ef_search: int | None = None) -> np.ndarray:
        """Up to ``n`` row numbers near ``query`` (approximate order), all within ``allowed``.

        The graph is walked with a beam of ``max(ef_search, n)`` nodes; a mask allowing a
        fraction f of the rows (``IDSelectorBitmap``: disallowed rows are walked through but
        never returned) widens the beam to ``ef_search / sqrt(f)`` (at most
        :data:`EF_FILTER_MAX`).
        """
        faiss = _faiss()
        q = unit(np.asarray(query, np.float32).reshape(1, -1))
        n = int(min(n, self.n))
        ef = int(ef_search or self.ef_search)
        bits = selector = None
        if allowed is not None:
            allowed = np.asarray(allowed, bool)
            if len(allowed) != self.n:
                raise ValueError(f"allowed: a mask of {len(allowed)} rows, expected {self.n}")
            frac = float(allowed.mean()) if self.n else 0.0
            if frac == 0.0:
                return np.zeros(0, np.int64)
            if frac <= SCAN_FRACTION and self._codes() is not None:
                key = self._key(allowed)
                if self._repeated(key):
                    return self.scan(q, n, allowed, key)
            if frac < 1.0:
                bits = np.packbits(allowed, bitorder="little")
                selector = faiss.IDSelectorBitmap(self.n, faiss.swig_ptr(bits))
                ef = int(min(max(EF_FILTER_MAX, ef), math.ceil(ef / math.sqrt(frac))))
        params = faiss.SearchParametersPreTransform()
        params.index_params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(ef, n)) \
            if selector is not None else faiss.SearchParametersHNSW(efSearch=max(ef, n))
        with self._lock:  # the parameters hold raw pointers into ``bits``
            _, ids = self.index.search(q, n, params=params)
        del bits
        ids = ids[0]
        return ids[ids >= 0].astype(np.int64)

    def _codes(self) -> tuple[Any, np.ndarray] | None:
        """(the PCA transform, the graph's (n, dims) float32 vectors: a view, no copy), or
        None for an index of another layout."""
        faiss = _faiss()
        if "codes" not in self._views:
            found = None
            try:
                pre = faiss.downcast_index(self.index)
                pca = faiss.downcast_VectorTransform(pre.chain.at(0))
                storage = faiss.downcast_index(faiss.downcast_index(pre.index).storage)
                if storage.ntotal == self.n and storage.d == self.dims:
                    found = (pca, faiss.rev_swig_ptr(storage.get_xb(), self.n * self.dims)
                             .reshape(self.n, self.dims))
            except (AttributeError, RuntimeError, TypeError):
                found = None
            self._views["codes"] = found
        return self._views["codes"]

    @staticmethod
    def _key(allowed: np.ndarray) -> bytes:
        return hashlib.blake2b(np.packbits(allowed).tobytes(), digest_size=16).digest()

    def _repeated(self, key: bytes) -> bool:
        """Whether the filter of this :meth:`_key` was seen before (its rows cached, or
        asked once already).

        The first query under a filter walks the graph (gathering the allowed rows costs
        more than one walk); from the second on, the filter's rows are scanned."""
        with self._lock:
            if key in self._subsets or key in self._seen:
                return True
            self._seen[key] = None
            while len(self._seen) > 256:
                self._seen.popitem(last=False)
        return False

    def scan(self, query: np.ndarray, n: int, allowed: np.ndarray, key: bytes | None = None
             ) -> np.ndarray:
        """Up to ``n`` allowed rows nearest to the unit ``query`` by an exact scan of the
        allowed rows' PCA vectors (L2, as the graph ranks them).

        Under a selective filter the graph walks mostly disallowed nodes; the scan reads
        only allowed rows. Their vectors are gathered once per distinct filter and kept
        (:data:`SUBSET_CACHE_BYTES` per index, least recently used dropped), so the
        queries that follow under the same filter (the viewer's loop) scan contiguous
        memory: at 800,000 rows and a 10 % filter 5.8 ms p50 against 15.6 ms for the walk
        (benchmarks/RESULTS.md); the gather itself costs more than one walk, so
        :meth:`candidates` scans only a filter it has seen before.
        """
        pca, codes = self._codes()
        key = key or self._key(allowed)
        with self._lock:
            sub = self._subsets.get(key)
            if sub is not None:
                self._subsets.move_to_end(key)
        if sub is None:
            rows = np.flatnonzero(allowed)
            vecs = np.ascontiguousarray(codes[rows])
            sub = (rows, vecs, np.einsum("ij,ij->i", vecs, vecs))
            with self._lock:
                self._subsets[key] = sub
                while (sum(v[1].nbytes for v in self._subsets.values()) > SUBSET_CACHE_BYTES
                       and len(self._subsets) > 1):
                    self._subsets.popitem(last=False)
        rows, vecs, sq = sub
        qp = pca.apply(np.ascontiguousarray(query, np.float32).reshape(1, -1))[0]
        d = sq - 2 * (vecs @ qp)
        n = min(n, len(rows))
        top = np.argpartition(d, n - 1)[:n] if n < len(rows) else np.arange(len(rows))
        return rows[top[np.argsort(d[top], kind="stable")]].astype(np.int64)

    def to_bytes(self) -> np.ndarray:
        return _faiss().serialize_index(self.index)

    @classmethod
    def from_bytes(cls, blob: np.ndarray, attrs: dict[str, Any]) -> VectorIndex:
        index = _faiss().deserialize_index(np.ascontiguousarray(blob, dtype=np.uint8))
        return cls(index, int(attrs["n"]), int(attrs["dims"]),
                   int(attrs.get("ef_search", EF_SEARCH)), dict(attrs))


def search(unit_rows: np.ndarray, query: np.ndarray, k: int, index: VectorIndex | None = None,
           allowed: np.ndarray | None = None, exclude: np.ndarray | None = None,
           rerank: int = 20, top_k=None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine rows of ``unit_rows`` for ``query``: ``(rows, exact scores)``, best first.

    Exact (``top_k``, e.g. :func:`cube_gen.analysis.top_k_cosine`, over all rows or the
    allowed ones) without an index or when ``allowed`` leaves at most :data:`EXACT_SUBSET`
    rows; otherwise the index gives ``k * rerank`` candidates, re-scored exactly.
    """
    if top_k is None:
        from .analysis import top_k_cosine as top_k
    cand_rows = None if allowed is None else np.flatnonzero(allowed)
    n_ex = 0 if exclude is None else len(exclude)
    if index is None or (cand_rows is not None and len(cand_rows) <= EXACT_SUBSET):
        return top_k(unit_rows, query, k, cand_rows, exclude)
    cand = index.candidates(query, k * rerank + n_ex, allowed)
    rows, scores = top_k(unit_rows, query, k, np.sort(cand), exclude)
    want = min(k, (len(unit_rows) if cand_rows is None else len(cand_rows)) - n_ex)
    if len(rows) < want:  # the index found too few allowed rows: be exact
        return top_k(unit_rows, query, k, cand_rows, exclude)
    return rows, scores


# -- storage and the recipe stage ----------------------------------------------------------
def write_similarity(url: str, storage_options: dict[str, Any] | None,
                     index: VectorIndex | None, attrs: dict[str, Any]) -> None:
    """Write ``similarity.zarr``: attributes, and the serialised index when there is one."""
    import zarr

    from .store import zarr_store

    group = zarr.open_group(zarr_store(url, storage_options), mode="w", zarr_format=3)
    attrs = {**attrs, "kind": INDEX_KIND if index is not None else "exact",
             "exact_below": EXACT_BELOW, "index_format": INDEX_FORMAT}
    if index is not None:
        blob = index.to_bytes()
        arr = group.create_array("index", shape=blob.shape, dtype="uint8",
                                 chunks=(min(_CHUNK_BYTES, max(len(blob), 1)),),
                                 compressors=None, dimension_names=["byte"])
        arr[:] = blob
        arr.attrs.update({"long_name": "serialized FAISS index (faiss.deserialize_index)",
                          "units": "1"})
        attrs.update(index.attrs)
        attrs["index_bytes"] = int(blob.nbytes)
    group.attrs.update(attrs)
    zarr.consolidate_metadata(group.store)


def read_similarity(url: str, storage_options: dict[str, Any] | None = None
                    ) -> VectorIndex | None:
    """The index of a ``similarity.zarr`` (None: exact search); CubeError when damaged."""
    import zarr

    from .store import zarr_store

    try:
        group = zarr.open_group(zarr_store(url, storage_options, read_only=True), mode="r")
    except (FileNotFoundError, KeyError):
        return None
    attrs = dict(group.attrs)
    if attrs.get("kind") not in (INDEX_KIND, "ivf"):  # "ivf": format 1
        return None
    if attrs.get("index_format") != INDEX_FORMAT:
        raise OutdatedIndex(
            f"{url}: similarity index format {attrs.get('index_format')!r} "
            f"({attrs.get('factory', attrs.get('kind'))}), this version reads format "
            f"{INDEX_FORMAT} (PCA -> HNSW), which the next build of the cube set writes")
    blob = np.asarray(group["index"][:], np.uint8)
    if blob.nbytes != attrs.get("index_bytes"):
        raise CubeError(f"{url}/index: {blob.nbytes} bytes, expected {attrs.get('index_bytes')}")
    return VectorIndex.from_bytes(blob, attrs)


def build_stage(ctx) -> dict[str, Any]:
    """The ``similarity`` stage: an HNSW index of the pooled vectors above :data:`EXACT_BELOW`."""
    pooled = ctx.results["vision"]
    n = len(pooled)
    index = VectorIndex.build(pooled) if n >= EXACT_BELOW else None
    attrs = {"title": f"{ctx.recipe['metadata']['title']}: similarity index of pooled vectors",
             "deepearth_recipe": ctx.fingerprint, "n": int(n)}
    write_similarity(ctx.staging_url(SIMILARITY_PATH), ctx.target.storage_options, index, attrs)
    if ctx.progress:
        from tqdm.auto import tqdm

        tqdm.write(f"[similarity] {'HNSW index' if index is not None else 'exact search'} "
                   f"for {n} embeddings")
    return attrs


def register_similarity_stage() -> None:
    """Register the ``similarity`` stage after ``vision``."""
    from .pipeline import Stage, register_stage

    register_stage(Stage("similarity", (SIMILARITY_PATH,), build_stage, needs=("vision",),
                         inputs=stage_inputs, version=INDEX_FORMAT), after="vision")


def stage_inputs(ctx) -> dict[str, str]:
    """What the ``similarity`` stage reads: the pooled vectors, the title (attributes) and
    the size rule (exact search below :data:`EXACT_BELOW`)."""
    from .incremental import content_digest, recipe_digest

    return {"vision": content_digest(ctx.results["vision"]),
            "recipe": recipe_digest(ctx.recipe, "metadata.title"),
            "code": content_digest(EXACT_BELOW, INDEX_KIND)}


def open_similarity(cs) -> VectorIndex | None:
    """The cube set's pooled-vector index (None: exact search), loaded once per cube set.

    An index in an older format (:class:`OutdatedIndex`) is rebuilt in memory from the
    pooled vectors, with a warning: searches stay correct, and a rebuild of the cube set
    stores the current format.
    """
    def make():
        try:
            return read_similarity(cs.cube_url(SIMILARITY_PATH), cs.storage_options)
        except OutdatedIndex as exc:
            warnings.warn(f"{exc}; building one in memory", RuntimeWarning, stacklevel=2)
            return VectorIndex.build(cs.pooled())

    return cs.memo(("ann", "similarity"), make)
