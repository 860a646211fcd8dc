"""Approximate nearest neighbours over unit vectors (FAISS), with filters and exact re-ranking.

Generic helpers for any vector set (pooled vision vectors here; patch vectors may reuse
them): :class:`VectorIndex` builds a FAISS ``PCA -> IVF-Flat (L2)`` index over unit rows
(for unit vectors L2 order is cosine order), returns candidate rows for a query, honours
a boolean mask of allowed rows (``IDSelectorBitmap``, more lists probed for a selective
mask) and serialises to bytes. Candidates are re-scored exactly by the caller
(:func:`cube_gen.analysis.top_k_cosine`), so scores are always exact cosines; below
:data:`EXACT_BELOW` rows, or when a filter leaves at most :data:`EXACT_SUBSET` rows, the
search is exact.

Why FAISS: the reference exact baseline (``IndexFlatIP`` / ``faiss.knn``) is in the same
library, IVF with an ID selector gives filtered search without post-filtering, indexes
serialise to one byte string (stored in Zarr like any array), wheels exist for Python
3.11 on PyPI and conda-forge, and the patch index (issue 17) uses it too.

The recipe stage ``similarity`` (:func:`build_stage`) writes ``similarity.zarr``: the
serialised index (uint8 array ``index``) when the cube set has at least
:data:`EXACT_BELOW` embeddings, else only attributes saying search is exact.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import CubeError

EXACT_BELOW = 50_000       # rows: below this, exact search (a matrix-vector product)
EXACT_SUBSET = 20_000      # a filter leaving at most this many rows is searched exactly
SIMILARITY_PATH = "similarity.zarr"
INDEX_FORMAT = 1
_CHUNK_BYTES = 64 << 20


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
    """A FAISS ``PCA -> IVF-Flat`` index of unit rows; :meth:`candidates` for a query."""

    index: Any
    n: int
    dims: int
    nlist: int
    nprobe: int = 32
    attrs: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def build(cls, vectors: np.ndarray, dims: int = 128, nlist: int | None = None,
              nprobe: int = 32, train_size: int = 50_000, seed: int = 0,
              batch: int = 65_536) -> VectorIndex:
        """Train on a random sample of ``train_size`` rows and add every row, in batches."""
        faiss = _faiss()
        n, d = vectors.shape
        dims = int(min(dims, d))
        nlist = int(min(nlist or min(4096, max(16, round(2 * math.sqrt(n)))), n))
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, max(train_size, 30 * nlist)), replace=False))
        t0 = time.perf_counter()
        pca = faiss.PCAMatrix(d, dims, 0, False)
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(dims), dims, nlist, faiss.METRIC_L2)
        ivf.cp.seed = seed
        index = faiss.IndexPreTransform(pca, ivf)
        index.train(unit(vectors[sample]))
        t1 = time.perf_counter()
        for lo in range(0, n, batch):
            index.add(unit(vectors[lo:lo + batch]))
        attrs = {"library": "faiss", "factory": f"PCA{dims},IVF{nlist},Flat", "metric": "L2 of unit vectors",
                 "n": int(n), "features": int(d), "dims": dims, "nlist": nlist, "nprobe": nprobe,
                 "train_rows": int(len(sample)), "train_seconds": round(t1 - t0, 2),
                 "add_seconds": round(time.perf_counter() - t1, 2),
                 "index_format": INDEX_FORMAT}
        return cls(index, int(n), dims, nlist, nprobe, attrs)

    def candidates(self, query: np.ndarray, n: int, allowed: np.ndarray | None = None,
                   nprobe: int | None = None) -> np.ndarray:
        """Up to ``n`` row numbers near ``query`` (approximate order), all within ``allowed``.

        A mask allowing a fraction f of the rows probes about nprobe / f lists (at most
        8 x nprobe), so that about as many allowed rows are scanned as without a filter.
        """
        faiss = _faiss()
        q = unit(np.asarray(query, np.float32).reshape(1, -1))
        nprobe = int(nprobe or self.nprobe)
        bits = selector = None
        if allowed is not None:
            allowed = np.asarray(allowed, bool)
            if len(allowed) != self.n:
                raise ValueError(f"allowed: a mask of {len(allowed)} rows, expected {self.n}")
            frac = float(allowed.mean()) if self.n else 0.0
            if frac == 0.0:
                return np.zeros(0, np.int64)
            if frac < 1.0:
                bits = np.packbits(allowed, bitorder="little")
                selector = faiss.IDSelectorBitmap(self.n, faiss.swig_ptr(bits))
                nprobe = int(min(self.nlist, 8 * nprobe, math.ceil(nprobe / frac)))
        params = faiss.SearchParametersPreTransform()
        params.index_params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe) \
            if selector is not None else faiss.SearchParametersIVF(nprobe=nprobe)
        with self._lock:  # the parameters hold raw pointers into ``bits``
            _, ids = self.index.search(q, int(min(n, self.n)), params=params)
        del bits
        ids = ids[0]
        return ids[ids >= 0].astype(np.int64)

    def to_bytes(self) -> np.ndarray:
        return _faiss().serialize_index(self.index)

    @classmethod
    def from_bytes(cls, blob: np.ndarray, attrs: dict[str, Any]) -> VectorIndex:
        index = _faiss().deserialize_index(np.ascontiguousarray(blob, dtype=np.uint8))
        return cls(index, int(attrs["n"]), int(attrs["dims"]), int(attrs["nlist"]),
                   int(attrs.get("nprobe", 32)), dict(attrs))


def search(unit_rows: np.ndarray, query: np.ndarray, k: int, index: VectorIndex | None = None,
           allowed: np.ndarray | None = None, exclude: np.ndarray | None = None,
           rerank: int = 10, top_k=None) -> tuple[np.ndarray, np.ndarray]:
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
    attrs = {**attrs, "kind": "ivf" if index is not None else "exact",
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
    if attrs.get("kind") != "ivf":
        return None
    if attrs.get("index_format") != INDEX_FORMAT:
        raise CubeError(f"{url}: similarity index format {attrs.get('index_format')!r}, "
                        f"expected {INDEX_FORMAT}")
    blob = np.asarray(group["index"][:], np.uint8)
    if blob.nbytes != attrs.get("index_bytes"):
        raise CubeError(f"{url}/index: {blob.nbytes} bytes, expected {attrs.get('index_bytes')}")
    return VectorIndex.from_bytes(blob, attrs)


def build_stage(ctx) -> dict[str, Any]:
    """The ``similarity`` stage: an IVF index of the pooled vectors above :data:`EXACT_BELOW`."""
    pooled = ctx.results["vision"]
    n = len(pooled)
    index = VectorIndex.build(pooled) if n >= EXACT_BELOW else None
    attrs = {"title": f"{ctx.recipe['metadata']['title']}: similarity index of pooled vectors",
             "deepearth_recipe": ctx.fingerprint, "n": int(n)}
    write_similarity(ctx.staging_url(SIMILARITY_PATH), ctx.target.storage_options, index, attrs)
    if ctx.progress:
        from tqdm.auto import tqdm

        tqdm.write(f"[similarity] {'IVF index' if index is not None else 'exact search'} "
                   f"for {n} embeddings")
    return attrs


def register_similarity_stage() -> None:
    """Register the ``similarity`` stage after ``vision``."""
    from .pipeline import Stage, register_stage

    register_stage(Stage("similarity", (SIMILARITY_PATH,), build_stage, needs=("vision",)),
                   after="vision")


def open_similarity(cs) -> VectorIndex | None:
    """The cube set's pooled-vector index (None: exact search), loaded once per cube set."""
    def make():
        return read_similarity(cs.cube_url(SIMILARITY_PATH), cs.storage_options)

    return cs.memo(("ann", "similarity"), make)
