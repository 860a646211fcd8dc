"""Patch search: "where else, in which photos, does a part that looks like this occur?"

An index over the frame-mean patch vectors of every embedding (576 per image: 24 x 24
patches, each the mean of its 8 frames, L2-normalised, so that similarity is cosine).

Library: FAISS (``faiss-cpu``). At the published scale (7,949 embeddings, 4.58M patches
of 1408 dims, 26 GB as float32) the index is ``PCAR{dims},IVF{nlist},PQ{pq_bytes}``:
a PCA to ``dims`` followed by a random rotation (which spreads variance evenly over the
PQ sub-vectors), an inverted file of ``nlist`` k-means cells and product-quantised
residuals of ``pq_bytes`` bytes. Each patch costs ``pq_bytes + 8`` bytes (code and id),
e.g. 40 B at the defaults: 183 MB of codes for the published set, about 350 MB in memory
with the coarse centroids and FAISS's precomputed tables, against a stated budget of
``memory_budget_mb`` (2 GB by default; the build refuses a configuration over it).
Search is by L2 distance on the unit vectors (the ranking of cosine; L2 is also
unaffected by the PCA's centring), then the best ``rerank`` candidates are re-ranked
exactly on the stored features (cosine of their frame means). Small sets (below
``exact_below`` patches) get a flat index of the full vectors: search is exact.

Patch ids: ``image * 576 + patch_y * 24 + patch_x`` (images in ``vision.zarr`` order).

On disk the index is ``patches.zarr`` in the cube set: a Zarr group whose ``index``
array holds the serialized FAISS index as bytes, with the build parameters and
statistics as attributes.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import schema as S
from . import source_layout as L
from .errors import CubeError

PATCHES_PATH = S.CUBE_PATHS[S.PATCHES]
PATCHES_PER_IMAGE = L.N_PATCH * L.N_PATCH
INDEX_FORMAT = 1
_CHUNK_BYTES = 64 << 20  # bytes per chunk of the stored index blob


def _faiss():
    import faiss

    return faiss


# -- vectors -------------------------------------------------------------------------------
def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (float32) scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def patch_vectors(feats: np.ndarray) -> np.ndarray:
    """(576, feature) unit vectors: the frame mean of each patch of one embedding.

    ``feats``: (frame, patch_y, patch_x, feature), any float dtype.
    """
    f = np.asarray(feats)
    mean = f.astype(np.float32, copy=False).mean(axis=0)
    return unit_rows(mean.reshape(-1, f.shape[-1]))


def patch_id(image: int | np.ndarray, patch_y: int | np.ndarray,
             patch_x: int | np.ndarray) -> np.ndarray:
    """Patch ids of (image, patch_y, patch_x)."""
    return (np.asarray(image, np.int64) * PATCHES_PER_IMAGE
            + np.asarray(patch_y, np.int64) * L.N_PATCH + np.asarray(patch_x, np.int64))


def split_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, patch_y, patch_x) of patch ids."""
    ids = np.asarray(ids, np.int64)
    image, patch = np.divmod(ids, PATCHES_PER_IMAGE)
    py, px = np.divmod(patch, L.N_PATCH)
    return image, py, px


@dataclass(frozen=True)
class Window:
    """A rectangle of patches, half-open: rows ``y0:y1``, columns ``x0:x1``."""

    y0: int
    x0: int
    y1: int
    x1: int

    @staticmethod
    def patch(py: int, px: int) -> Window:
        return Window(py, px, py + 1, px + 1)

    def check(self, grid: int = L.N_PATCH) -> None:
        """Raise ValueError naming ``patch_y`` / ``patch_x`` when outside the patch grid."""
        for name, lo, hi in (("patch_y", self.y0, self.y1), ("patch_x", self.x0, self.x1)):
            if not (0 <= lo < hi <= grid):
                raise ValueError(f"{name}: expected a patch range within [0, {grid}) "
                                 f"(non-empty), got {lo}:{hi}")

    @property
    def size(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    def around(self, py: int, px: int, grid: int = L.N_PATCH) -> Window:
        """A window of this size holding (py, px) as its top-left corner, shifted inside the grid."""
        h, w = self.size
        y0 = min(max(py, 0), grid - h)
        x0 = min(max(px, 0), grid - w)
        return Window(y0, x0, y0 + h, x0 + w)

    def as_dict(self) -> dict[str, list[int]]:
        """First and last row and column, inclusive: ``{"patch_y": [4, 7], "patch_x": [..]}``."""
        return {"patch_y": [self.y0, self.y1 - 1], "patch_x": [self.x0, self.x1 - 1]}


def parse_range(name: str, text: str, grid: int = L.N_PATCH) -> tuple[int, int]:
    """``"7"`` -> (7, 8); ``"4-7"`` (first-last, inclusive) -> (4, 8) half-open.

    ValueError naming ``name`` when it is not a patch or range within the grid.
    """
    allowed = (f"an integer in [0, {grid - 1}] or a range first-last with "
               f"0 <= first <= last <= {grid - 1}")
    parts = str(text).split("-")
    if len(parts) > 2 or not all(p.isascii() and p.isdigit() and len(p) <= 4 for p in parts):
        raise ValueError(f"{name}: expected {allowed}, got {str(text)[:50]!r}")
    lo = int(parts[0])
    hi = int(parts[-1]) + 1
    if not (0 <= lo < hi <= grid):
        raise ValueError(f"{name}: expected {allowed}, got {str(text)[:50]!r}")
    return lo, hi


def parse_window(py: str, px: str) -> Window:
    """The window of path segments ``py`` and ``px`` (a patch ``7`` or a range ``4-7``)."""
    y0, y1 = parse_range("py", py)
    x0, x1 = parse_range("px", px)
    return Window(y0, x0, y1, x1)


def has_patch_index(cs) -> bool:
    """Whether the cube set lists a patch index in its manifest."""
    cubes = (getattr(cs, "manifest", None) or {}).get("cubes") or {}
    return "patches" in cubes or PATCHES_PATH in cubes.values()


# -- configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexSpec:
    """How to build the index (the recipe's ``cubes.patches`` section)."""

    kind: str = "auto"  # auto | flat | ivfpq
    dims: int = 256  # PCA output dimensions (ivfpq)
    pq_bytes: int = 32  # bytes per PQ code (ivfpq; dims / pq_bytes = 8 dims per byte)
    nlist: int | None = None  # inverted lists (None: about 4 sqrt(n), at most n / 39)
    nprobe: int = 128  # lists searched per query (default; queries may override)
    rerank: int = 400  # candidates re-ranked exactly on the stored features (default)
    train_patches: int = 200_000  # training sample (patches)
    exact_below: int = 20_000  # below this many patches: a flat (exact) index
    memory_budget_mb: int = 2048  # the index must fit this many MiB
    seed: int = 0
    batch_images: int = 8  # images read and added at a time
    threads: int = 1  # FAISS threads while building and searching

    @classmethod
    def from_recipe(cls, cfg: dict[str, Any]) -> IndexSpec:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in cfg.items() if k in known})


@dataclass(frozen=True)
class Plan:
    """Resolved parameters for ``n_patches`` vectors of ``n_features`` dims."""

    kind: str
    n_patches: int
    n_features: int
    dims: int
    pq_bytes: int
    nlist: int
    estimated_bytes: int

    @property
    def factory(self) -> str:
        if self.kind == "flat":
            return "Flat"
        return f"PCAR{self.dims},IVF{self.nlist},PQ{self.pq_bytes}"


def plan_index(spec: IndexSpec, n_patches: int, n_features: int = L.N_FEATURES) -> Plan:
    """Choose the index for ``n_patches`` vectors and check it fits the memory budget."""
    kind = spec.kind
    if kind not in ("auto", "flat", "ivfpq"):
        raise ValueError(f"kind: expected auto, flat or ivfpq, got {kind!r}")
    if kind == "auto":
        kind = "flat" if n_patches < spec.exact_below else "ivfpq"
    if kind == "flat":
        est = n_patches * n_features * 4
        plan = Plan("flat", n_patches, n_features, n_features, 0, 0, est)
    else:
        dims = min(spec.dims, n_features)
        if dims % spec.pq_bytes:
            raise ValueError(f"pq_bytes: must divide dims ({dims}), got {spec.pq_bytes}")
        if n_patches < 256 * 39:
            raise ValueError(f"kind: ivfpq needs at least {256 * 39} patches to train its "
                             f"codebooks, the cube set has {n_patches}; use flat")
        nlist = spec.nlist or int(2 ** round(math.log2(max(4 * math.sqrt(n_patches), 1))))
        nlist = max(1, min(nlist, n_patches // 39, spec.train_patches // 39))
        est = (n_patches * (spec.pq_bytes + 8)           # codes and ids
               + nlist * dims * 4                         # coarse centroids
               + n_features * dims * 4 + n_features * 4   # PCA matrix and mean
               + 256 * dims * 4                           # PQ codebooks
               + nlist * spec.pq_bytes * 256 * 4          # precomputed residual tables
               + nlist * 64)                              # list headers
        plan = Plan("ivfpq", n_patches, n_features, dims, spec.pq_bytes, nlist, est)
    budget = spec.memory_budget_mb << 20
    if plan.estimated_bytes > budget:
        raise ValueError(
            f"memory_budget_mb: a {plan.factory} index of {n_patches} patches needs about "
            f"{plan.estimated_bytes / 2**20:.0f} MiB, more than the budget of "
            f"{spec.memory_budget_mb} MiB (lower dims or pq_bytes, or use kind ivfpq)")
    return plan


# -- building --------------------------------------------------------------------------------
def train_images(n_images: int, spec: IndexSpec) -> tuple[np.ndarray, int]:
    """Images sampled for training (evenly spread, deterministic) and patches taken from each."""
    per_image = PATCHES_PER_IMAGE
    n_train = min(n_images, max(1, -(-spec.train_patches // per_image)))
    if n_train < n_images:
        images = np.unique(np.linspace(0, n_images - 1, n_train).round().astype(np.int64))
    else:
        images = np.arange(n_images, dtype=np.int64)
        per_image = min(PATCHES_PER_IMAGE, max(1, -(-spec.train_patches // n_images)))
    return images, per_image


def _prefetched(read: Callable[[int], np.ndarray], images: Sequence[int], batch: int):
    """Yield ``(image, features)`` in order, reading the next batch on a thread meanwhile."""
    images = [int(i) for i in images]
    groups = [images[k:k + batch] for k in range(0, len(images), batch)]
    if not groups:
        return
    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(lambda g: [read(i) for i in g], groups[0])
        for k, group in enumerate(groups):
            feats = nxt.result()
            if k + 1 < len(groups):
                nxt = pool.submit(lambda g: [read(i) for i in g], groups[k + 1])
            yield from zip(group, feats, strict=True)


def _check_features(i: int, feats: np.ndarray, n_features: int) -> None:
    if feats.shape[1:3] != (L.N_PATCH, L.N_PATCH) or feats.shape[-1] != n_features:
        raise CubeError(f"image {i}: features of shape {feats.shape}, expected "
                        f"(frame, {L.N_PATCH}, {L.N_PATCH}, {n_features})")


def build_index(read: Callable[[int], np.ndarray], n_images: int, spec: IndexSpec,
                n_features: int = L.N_FEATURES, progress: bool = False,
                reuse_sample: bool = True) -> tuple[Any, dict]:
    """Build the FAISS index of every image's patch vectors.

    ``read(i)`` returns image ``i``'s (frame, patch_y, patch_x, feature) features. Two
    passes: a training sample (evenly spread images), then every image in order (a
    streaming pass: memory holds one batch of images, the training sample and the index).
    When the training sample is every patch of every image (at most ``train_patches``),
    the second pass adds the sample's rows instead of reading the images again
    (``reuse_sample``; the same vectors, added in the same order and batches: the same
    index, byte for byte).
    Returns the index and build statistics.
    """
    faiss = _faiss()
    from tqdm.auto import tqdm

    n_patches = n_images * PATCHES_PER_IMAGE
    plan = plan_index(spec, n_patches, n_features)
    faiss.omp_set_num_threads(max(1, spec.threads))
    t0 = time.perf_counter()
    rng = np.random.default_rng(spec.seed)
    if plan.kind == "flat":
        index = faiss.IndexFlatL2(n_features)
        t_train = 0.0
        every = False
    else:
        images, per_image = train_images(n_images, spec)
        every = reuse_sample and per_image == PATCHES_PER_IMAGE and len(images) == n_images
        sample = np.empty((len(images) * per_image, n_features), np.float32)
        bar = tqdm(total=len(images), desc="patch index: training sample", unit="emb",
                   disable=not progress)
        for k, (i, feats) in enumerate(_prefetched(read, images, spec.batch_images)):
            if every:
                _check_features(i, feats, n_features)
            vec = patch_vectors(feats)
            take = rng.choice(PATCHES_PER_IMAGE, per_image, replace=False) \
                if per_image < PATCHES_PER_IMAGE else slice(None)
            sample[k * per_image:(k + 1) * per_image] = vec[take]
            bar.update(1)
        bar.close()
        pca = faiss.PCAMatrix(n_features, plan.dims, 0, True)
        pca.train(sample[rng.permutation(len(sample))[:max(4 * plan.dims, 50_000)]])
        reduced = pca.apply(sample)
        if not every:
            del sample
        ivf = faiss.IndexIVFPQ(faiss.IndexFlatL2(plan.dims), plan.dims, plan.nlist,
                               plan.pq_bytes, 8)
        ivf.cp.seed = spec.seed
        ivf.pq.cp.seed = spec.seed
        ivf.train(reduced)
        del reduced
        index = faiss.IndexPreTransform(pca, ivf)
        t_train = time.perf_counter() - t0
    t1 = time.perf_counter()
    bar = tqdm(total=n_images, desc="patch index", unit="emb", disable=not progress)
    if every:  # the sample is every image's vectors, in order
        for i in range(n_images):
            index.add(sample[i * PATCHES_PER_IMAGE:(i + 1) * PATCHES_PER_IMAGE])
            bar.update(1)
        del sample
    else:
        for i, feats in _prefetched(read, range(n_images), spec.batch_images):
            _check_features(i, feats, n_features)
            if index.ntotal != i * PATCHES_PER_IMAGE:  # ids are positions: add in order
                raise RuntimeError(f"patch index out of step at image {i}")
            index.add(patch_vectors(feats))
            bar.update(1)
    bar.close()
    t_add = time.perf_counter() - t1
    stats = {"train_seconds": round(t_train, 3), "add_seconds": round(t_add, 3),
             "seconds_per_image": round((time.perf_counter() - t0) / max(n_images, 1), 5)}
    return index, {"plan": plan, "stats": stats}


def index_attrs(plan: Plan, spec: IndexSpec, stats: dict, nbytes: int) -> dict[str, Any]:
    """Attributes stored with the index (what it is, how it was built, what it costs)."""
    return {
        "deepearth_cube": "patches",
        "patch_index_format": INDEX_FORMAT,
        "library": "faiss",
        "kind": plan.kind,
        "factory": plan.factory,
        "metric": "L2 of unit frame-mean patch vectors (cosine ranking); exact cosine re-ranking",
        "n_images": plan.n_patches // PATCHES_PER_IMAGE,
        "n_patches": plan.n_patches,
        "n_features": plan.n_features,
        "dims": plan.dims,
        "pq_bytes": plan.pq_bytes,
        "nlist": plan.nlist,
        "nprobe": spec.nprobe,
        "rerank": spec.rerank,
        "patch_grid": [L.N_PATCH, L.N_PATCH],
        "patch_id": "image * 576 + patch_y * 24 + patch_x",
        "index_bytes": int(nbytes),
        "bytes_per_patch": round(nbytes / max(plan.n_patches, 1), 3),
        "memory_budget_mb": spec.memory_budget_mb,
        "build": stats,
    }


def write_index(url: str, storage_options: dict[str, Any] | None, index: Any,
                attrs: dict[str, Any]) -> int:
    """Write ``patches.zarr`` at ``url``: the serialized index as a uint8 array; returns its bytes."""
    import zarr

    from .store import zarr_store

    blob = _faiss().serialize_index(index)
    attrs = {**attrs, "index_bytes": int(blob.nbytes)}
    attrs["bytes_per_patch"] = round(blob.nbytes / max(attrs.get("n_patches", 1), 1), 3)
    group = zarr.open_group(zarr_store(url, storage_options), mode="w", zarr_format=3)
    arr = group.create_array("index", shape=blob.shape, dtype="uint8",
                             chunks=(min(_CHUNK_BYTES, max(len(blob), 1)),), compressors=None,
                             dimension_names=["byte"])
    arr[:] = blob
    arr.attrs.update({"long_name": "serialized FAISS index (faiss.deserialize_index)",
                      "units": "1"})
    group.attrs.update(attrs)
    zarr.consolidate_metadata(group.store)
    return int(blob.nbytes)


def read_index(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, dict]:
    """The FAISS index and attributes of a ``patches.zarr``."""
    import zarr

    from .store import zarr_store

    try:
        group = zarr.open_group(zarr_store(url, storage_options, read_only=True), mode="r")
        arr = group["index"]
    except (FileNotFoundError, KeyError) as exc:
        raise CubeError(f"{url}: no patch index (build it with the recipe key "
                        f"cubes.patches.enabled: true)") from exc
    attrs = dict(group.attrs)
    if attrs.get("patch_index_format") != INDEX_FORMAT:
        raise CubeError(f"{url}: patch index format {attrs.get('patch_index_format')!r}, "
                        f"expected {INDEX_FORMAT}")
    blob = np.ascontiguousarray(arr[:], dtype=np.uint8)
    if blob.nbytes != attrs.get("index_bytes"):
        raise CubeError(f"{url}/index: {blob.nbytes} bytes, expected {attrs.get('index_bytes')}")
    return _faiss().deserialize_index(blob), attrs


# -- the pipeline stage -----------------------------------------------------------------------
def build_stage(ctx) -> dict[str, Any]:
    """The ``patches`` stage: index the staged vision cube into a staged ``patches.zarr``.

    ``ctx`` is the pipeline's :class:`~cube_gen.pipeline.BuildContext`; the features are
    read back through zarr from the staged ``vision.zarr`` (one image at a time).
    """
    import zarr

    from .store import zarr_store

    spec = IndexSpec.from_recipe(ctx.recipe.cubes["patches"])
    options = ctx.target.storage_options
    store = zarr_store(ctx.staging_url(S.CUBE_PATHS[S.VISION]), options, read_only=True)
    features = zarr.open_array(store, path="features", mode="r")
    n_images = int(features.shape[0])
    t0 = time.perf_counter()
    index, info = build_index(lambda i: features[int(i)], n_images, spec,
                              int(features.shape[-1]), progress=ctx.progress)
    attrs = index_attrs(info["plan"], spec, info["stats"], 0)
    attrs.update({"title": f"{ctx.recipe['metadata']['title']}: patches",
                  "Conventions": "CF-1.10, ACDD-1.3", "deepearth_recipe": ctx.fingerprint,
                  "deepearth_schema_version": S.SCHEMA_VERSION})
    nbytes = write_index(ctx.staging_url(PATCHES_PATH), options, index, attrs)
    if ctx.progress:
        from tqdm.auto import tqdm

        tqdm.write(f"[patches] done in {time.perf_counter() - t0:.1f} s ({info['plan'].factory}, "
                   f"{n_images * PATCHES_PER_IMAGE} patches, {nbytes / 2**20:.1f} MiB)")
    return {**attrs, "index_bytes": nbytes}


def register_patch_stage() -> None:
    """Register the ``patches`` stage after ``vision`` (enabled by ``cubes.patches.enabled``)."""
    from .pipeline import Stage, register_stage

    register_stage(Stage("patches", (PATCHES_PATH,), build_stage,
                         enabled=lambda r: bool(r.cubes["patches"]["enabled"]),
                         inputs=stage_inputs, version=INDEX_FORMAT), after="vision")


def stage_inputs(ctx) -> dict[str, str]:
    """What the ``patches`` stage reads: the features (each embedding's content digest and
    the vision section that stores them), ``cubes.patches`` and the title."""
    from .incremental import content_digest, recipe_digest, vision_config_key

    return {"vision": content_digest(ctx.tables["row_digests"],
                                     vision_config_key(ctx.recipe.cubes["vision"])),
            "recipe": recipe_digest(ctx.recipe, "cubes.patches", "metadata.title")}


# -- searching -------------------------------------------------------------------------------
@dataclass
class Match:
    """One patch found: its id and exact cosine score (approximate if not re-ranked)."""

    patch: int
    score: float

    @property
    def image(self) -> int:
        return self.patch // PATCHES_PER_IMAGE

    @property
    def patch_y(self) -> int:
        return (self.patch % PATCHES_PER_IMAGE) // L.N_PATCH

    @property
    def patch_x(self) -> int:
        return self.patch % L.N_PATCH


ExactVectors = Callable[[np.ndarray], np.ndarray]  # patch ids -> (n, feature) unit vectors


@dataclass
class PatchIndex:
    """A loaded patch index with its attributes.

    ``exact(ids)`` returns the exact unit vectors of patch ids (from the stored features)
    for re-ranking; without it results carry the index's approximate scores.
    """

    index: Any
    attrs: dict[str, Any]
    exact: ExactVectors | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def n_images(self) -> int:
        return int(self.attrs["n_images"])

    @property
    def n_patches(self) -> int:
        return int(self.index.ntotal)

    @property
    def nlist(self) -> int:
        return int(self.attrs.get("nlist") or 0)

    @classmethod
    def from_index(cls, index: Any, plan: Plan, spec: IndexSpec,
                   exact: ExactVectors | None = None) -> PatchIndex:
        return cls(index, index_attrs(plan, spec, {}, 0), exact)

    def _params(self, nprobe: int, selector: Any):
        faiss = _faiss()
        if self.attrs["kind"] == "flat":
            return None if selector is None else faiss.SearchParameters(sel=selector)
        params = faiss.SearchParametersPreTransform()
        params.index_params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe) \
            if selector is not None else faiss.SearchParametersIVF(nprobe=nprobe)
        return params

    def candidates(self, vector: np.ndarray, n: int, allowed: np.ndarray | None = None,
                   nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` nearest patch ids by the index, and their approximate cosine scores.

        ``allowed``: boolean mask over images (None: all). A selective mask searches
        proportionally more lists, so that about as many allowed patches are scanned.
        """
        faiss = _faiss()
        vector = unit_rows(np.asarray(vector, np.float32).reshape(1, -1))
        nprobe = int(nprobe or self.attrs.get("nprobe") or 1)
        selector = keep = None
        if allowed is not None:
            allowed = np.asarray(allowed, bool)
            if len(allowed) != self.n_images:
                raise ValueError(f"allowed: mask of {len(allowed)} images, expected "
                                 f"{self.n_images}")
            frac = float(allowed.mean()) if len(allowed) else 0.0
            if frac == 0.0:
                return np.zeros(0, np.int64), np.zeros(0, np.float32)
            if frac < 1.0:
                keep = np.packbits(np.repeat(allowed, PATCHES_PER_IMAGE), bitorder="little")
                selector = faiss.IDSelectorBitmap(self.n_patches, faiss.swig_ptr(keep))
                nprobe = int(min(max(self.nlist, 1), math.ceil(nprobe / frac)))
        params = self._params(nprobe, selector)
        with self._lock:  # search params hold raw pointers; one search at a time is enough
            dist, ids = self.index.search(vector, int(n), params=params)
        del keep
        ok = ids[0] >= 0
        # unit vectors: |a - b|^2 = 2 - 2 cos
        return ids[0][ok].astype(np.int64), (1.0 - dist[0][ok] / 2.0).astype(np.float32)

    def search(self, vector: np.ndarray, k: int = 10, allowed: np.ndarray | None = None,
               rerank: int | None = None, nprobe: int | None = None) -> list[Match]:
        """The k most similar patches to ``vector`` (exactly re-ranked when possible)."""
        rerank = int(rerank if rerank is not None else self.attrs.get("rerank") or k)
        n = max(int(k), rerank) if self.exact is not None else int(k)
        ids, scores = self.candidates(vector, n, allowed, nprobe)
        if self.exact is not None and len(ids):
            exact = self.exact(ids)
            scores = exact @ unit_rows(np.asarray(vector, np.float32).reshape(-1))
            order = np.lexsort((ids, -scores))
            ids, scores = ids[order], scores[order]
        return [Match(int(i), float(s)) for i, s in zip(ids[:k], scores[:k], strict=True)]


def brute_force(vectors: np.ndarray, query: np.ndarray, k: int,
                allowed_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k ids and cosine scores of unit ``vectors`` (rows are patch ids)."""
    q = unit_rows(np.asarray(query, np.float32).reshape(-1))
    ids = np.arange(len(vectors)) if allowed_ids is None else np.asarray(allowed_ids, np.int64)
    scores = vectors[ids] @ q
    k = min(k, len(ids))
    top = np.argpartition(-scores, k - 1)[:k] if k < len(ids) else np.arange(len(ids))
    order = top[np.lexsort((ids[top], -scores[top]))]
    return ids[order], scores[order]


# -- the cube set side -----------------------------------------------------------------------
def cube_reader(cs) -> Callable[[int], np.ndarray]:
    """``read(i)`` of image ``i``'s stored features through a :class:`CubeSet`."""
    return lambda i: cs.features(int(i))


def _raw_patch_reader(cs) -> Callable[[int, np.ndarray, np.ndarray], np.ndarray] | None:
    """Reads the 8 frames of single patches straight from raw, unsharded local chunk files.

    A memory map of the chunk file, of which only the patches' pages are touched (8 x 2.8 kB
    for a float16 patch) instead of reading the whole 13 MB image; None where the cube's layout does not allow it (compressed,
    sharded or remote cubes: whole images are read instead).
    """
    layout = cs.raw_layout() if hasattr(cs, "raw_layout") else None
    if layout is None or getattr(layout, "per_file", None) != 1:
        return None
    n_frames, gy, gx, nf = layout.shape

    def read(image: int, py: np.ndarray, px: np.ndarray) -> np.ndarray:
        path = layout.file_of(int(image))[0]
        size = os.path.getsize(path)
        if size != layout.item_nbytes:
            raise CubeError(f"{path}: chunk file of {size} bytes, expected {layout.item_nbytes}")
        m = np.memmap(path, layout.dtype, "r", shape=(n_frames, gy, gx, nf))
        try:  # fancy indexing touches only the patches' pages
            return np.ascontiguousarray(np.moveaxis(m[:, py, px, :], 0, 1))
        finally:
            del m

    return read


def cube_exact_vectors(cs) -> ExactVectors:
    """Exact unit patch vectors of patch ids, from the cube set's stored features.

    Raw local cubes: only the patches' bytes are read; otherwise each distinct image is
    read once (grouped) and the frame mean of its patches taken.
    """
    raw = _raw_patch_reader(cs)

    def exact(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        image, py, px = split_ids(ids)
        out = np.empty((len(ids), L.N_FEATURES), np.float32)
        for img in np.unique(image):
            rows = np.flatnonzero(image == img)
            if raw is not None:
                out[rows] = raw(int(img), py[rows], px[rows]).mean(axis=1, dtype=np.float32)
            else:
                feats = cs.features(int(img))
                out[rows] = feats[:, py[rows], px[rows], :].astype(np.float32).mean(axis=0)
        return unit_rows(out)

    return exact


def patches_url(cs) -> str:
    """URL of the cube set's ``patches.zarr`` (in the opened version)."""
    if hasattr(cs, "cube_url"):
        return cs.cube_url(PATCHES_PATH)
    return cs.target.url_of(PATCHES_PATH)


def open_patch_index(cs) -> PatchIndex:
    """The cube set's patch index, re-ranking on its stored features."""
    if not has_patch_index(cs):
        raise CubeError(f"{cs.url} has no patch index (build it with the recipe key "
                        f"cubes.patches.enabled: true)")
    index, attrs = read_index(patches_url(cs), cs.storage_options)
    n_images = int(cs.vision.sizes["image"])
    if int(attrs.get("n_images", -1)) != n_images or index.ntotal != n_images * PATCHES_PER_IMAGE:
        raise CubeError(f"{patches_url(cs)}: indexes {attrs.get('n_images')} images "
                        f"({index.ntotal} patches), vision.zarr has {n_images}")
    threads = int(os.environ.get("DEEPEARTH_FAISS_THREADS", "1"))
    _faiss().omp_set_num_threads(max(threads, 1))
    return PatchIndex(index, attrs, cube_exact_vectors(cs))


def window_vector(cs, image: int, window: Window) -> np.ndarray:
    """The query vector of a patch window: the mean of its unit patch vectors, unit length."""
    window.check()
    feats = cs.features(int(image))
    vec = patch_vectors(feats[:, window.y0:window.y1, window.x0:window.x1, :])
    return unit_rows(vec.mean(axis=0))


def similar_patches(cs, pindex: PatchIndex, image: int, window: Window, k: int = 10,
                    query=None, include_self: bool = False, group: bool = False,
                    per_image: int = 3, rerank: int | None = None,
                    nprobe: int | None = None) -> dict[str, Any]:
    """The k patches most similar to a patch (or the mean of a patch window) of ``image``.

    ``query`` (a :class:`cube_gen.access.Query`) restricts the images searched;
    ``include_self`` keeps the query's own image among the results (by default other
    images only: "where else"). ``group``: k images instead of k patches, each with its
    best ``per_image`` patches among the candidates. Scores are exact cosines of the
    frame-mean patch vectors (re-ranked on the stored features).
    """
    from .analysis import image_records

    window.check()
    n_images = pindex.n_images
    allowed = np.ones(n_images, bool)
    if query is not None:
        allowed[:] = False
        allowed[cs.select_images(query)] = True
    if not include_self:
        allowed[int(image)] = False
    vector = window_vector(cs, image, window)
    want = k * per_image if group else k
    rerank = max(int(rerank if rerank is not None else pindex.attrs.get("rerank") or want),
                 want)
    all_allowed = bool(allowed.all())
    matches = pindex.search(vector, want if not group else rerank,
                            None if all_allowed else allowed, rerank=rerank, nprobe=nprobe)
    result = {"image": int(image), "window": window.as_dict(), "k": k,
              "metric": "cosine of the frame-mean patch vectors (exact, re-ranked)",
              "index": {key: pindex.attrs.get(key) for key in
                        ("kind", "factory", "n_patches", "nprobe", "rerank")},
              "candidates_allowed_images": int(allowed.sum())}
    h, w = window.size
    if not group:
        recs = image_records(cs, np.asarray([m.image for m in matches[:k]], np.int64))
        result["results"] = [
            {"rank": r, "score": round(m.score, 6), **rec,
             "patch_y": m.patch_y, "patch_x": m.patch_x,
             "window": window.around(m.patch_y, m.patch_x).as_dict() if (h, w) != (1, 1)
             else None}
            for r, (m, rec) in enumerate(zip(matches[:k], recs, strict=True), start=1)]
        return result
    groups: dict[int, list[Match]] = {}
    for m in matches:
        groups.setdefault(m.image, []).append(m)
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0].score)[:k]
    recs = image_records(cs, np.asarray([img for img, _ in ranked], np.int64))
    result["results"] = [
        {"rank": r, "score": round(ms[0].score, 6), **rec,
         "patches": [{"patch_y": m.patch_y, "patch_x": m.patch_x, "score": round(m.score, 6)}
                     for m in ms[:per_image]]}
        for r, ((_, ms), rec) in enumerate(zip(ranked, recs, strict=True), start=1)]
    return result


# -- simulation (tests and benchmarks) ---------------------------------------------------------
def simulate_patch_vectors(n_images: int, n_species: int = 32, n_features: int = L.N_FEATURES,
                           seed: int = 0, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Unit frame-mean patch vectors shaped like the synthetic source's: (n_images * 576, F).

    As in :func:`cube_gen.synth.synth_embedding`: each image is a species signature (genus
    direction + species detail) on a soft object region, a per-image background elsewhere,
    and per-patch noise; the frame mean averages the small frame-to-frame noise away.
    Returns the vectors and each image's species.
    """
    rng = np.random.default_rng(seed)
    n_genera = max(1, n_species // 3)
    genus = rng.normal(0, 1, (n_genera, n_features)).astype(np.float32)
    sig = (0.7 * genus[np.arange(n_species) % n_genera]
           + 0.7 * rng.normal(0, 1, (n_species, n_features))).astype(np.float32)
    species = rng.integers(0, n_species, n_images)
    y, x = np.mgrid[0:L.N_PATCH, 0:L.N_PATCH]
    out = np.empty((n_images * PATCHES_PER_IMAGE, n_features), dtype)
    for i in range(n_images):
        cy, cx = rng.uniform(7, 17, 2)
        ry, rx = rng.uniform(4, 9, 2)
        a = rng.uniform(0, np.pi)
        u = ((x - cx) * np.cos(a) + (y - cy) * np.sin(a)) / rx
        v = (-(x - cx) * np.sin(a) + (y - cy) * np.cos(a)) / ry
        mask = np.clip(1.2 - (u * u + v * v), 0, 1).reshape(-1, 1).astype(np.float32)
        background = rng.normal(0, 0.35, n_features).astype(np.float32)
        noise = rng.normal(0, 0.3, (PATCHES_PER_IMAGE, n_features)).astype(np.float32)
        vec = mask * (1.6 * sig[species[i]]) + (1 - mask) * background + noise
        out[i * PATCHES_PER_IMAGE:(i + 1) * PATCHES_PER_IMAGE] = unit_rows(vec)
    return out, species
