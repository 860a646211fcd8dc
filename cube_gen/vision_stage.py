"""Vision step, run as Dask tasks: stream embeddings, derive per-image products, write.

A task takes a handful of rows of one source file. It streams them one at a time,
writes each image's ``features`` and ``attention`` chunks straight into the staged
``vision.zarr``, and stores its small results (pooled vectors, statistics, UMAP-RGB)
as one ``.npz`` part. A part exists only when its task finished, so a re-run skips
finished tasks and redoes the rest with identical results.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import embedding_math as em
from .schema import IMAGE_STATS


@dataclass(frozen=True)
class VisionTask:
    """Images to build: their source (file_idx, row_idx) and positions along ``image``."""

    files: tuple[int, ...]
    rows: tuple[int, ...]
    images: tuple[int, ...]
    gbif_ids: tuple[int, ...]
    shard: bool = False  # write all images at once (one Zarr shard)

    @property
    def name(self) -> str:
        return f"part-{min(self.images):09d}"


def plan_tasks(images, batch_size: int, shard_size: int | None = None) -> list[VisionTask]:
    """Group the ordered image table (with file_idx/row_idx) into tasks.

    Without sharding a task is up to ``batch_size`` rows of one source file (each image
    is its own chunk, written as it is read). With sharding a task is one shard of
    ``shard_size`` consecutive images, so no two tasks write the same shard.
    """
    def make(group, shard=False):
        group = group.sort_values(["file_idx", "row_idx"])
        return VisionTask(tuple(int(v) for v in group.file_idx), tuple(int(v) for v in group.row_idx),
                          tuple(int(v) for v in group.index), tuple(int(v) for v in group.gbif_id),
                          shard)

    if shard_size:
        return [make(images.iloc[s:s + shard_size], shard=True)
                for s in range(0, len(images), shard_size)]
    tasks = []
    for _, group in images.groupby("file_idx", sort=True):
        group = group.sort_values("row_idx")
        for s in range(0, len(group), batch_size):
            tasks.append(make(group.iloc[s:s + batch_size]))
    return tasks


def run_task(task: VisionTask, source_url: str, source_options: dict[str, Any],
             vision_url: str, target_options: dict[str, Any], parts_path: str,
             dtype: str, with_umap_rgb: bool) -> str:
    """Process one task (runs on a Dask worker); returns the part's path."""
    import fsspec
    import zarr

    from .chunkio import raw_layout
    from .errors import SourceError
    from .reader import SourceDataset
    from .source_layout import embedding_file_name
    from .store import Target, zarr_store

    source = SourceDataset(source_url, source_options)
    group = zarr.open_group(zarr_store(vision_url, target_options), mode="r+")
    features = group["features"]
    attention = group["attention"]
    # raw float16 chunks on a local disk are written as their bytes (zarr's encode path
    # costs ~60 ms of CPU per 13 MB embedding); anything else goes through zarr
    target = Target(vision_url, target_options)
    raw = None if task.shard else raw_layout(features, target, target.path("features"))
    raw = raw if raw is not None and raw.per_file == 1 else None
    n = len(task.rows)
    pooled = np.zeros((n, features.shape[-1]), np.float32)
    stats = np.zeros((n, len(IMAGE_STATS)), np.float32)
    rgb = np.zeros((n, features.shape[2], features.shape[3], 3), np.uint8)
    att = np.zeros((n, *attention.shape[1:]), np.float32) if task.shard else None
    buf_feats = np.zeros((n, *features.shape[1:]), features.dtype) if task.shard else None
    images = np.asarray(task.images, np.int64)
    slot = {(f, r): k for k, (f, r) in enumerate(zip(task.files, task.rows, strict=True))}
    done = set()
    for file_idx in sorted(set(task.files)):
        wanted = {r for f, r in slot if f == file_idx}
        for row, gid, feats in source.iter_file_embeddings(file_idx, wanted, dtype):
            k = slot[(file_idx, row)]
            if gid != task.gbif_ids[k]:
                raise SourceError(f"holds gbif_id {gid}, the vision index says {task.gbif_ids[k]}",
                                  file=source.display(embedding_file_name(file_idx)), row=row,
                                  column="gbif_id")
            products = em.embedding_products(feats, with_umap_rgb)
            if task.shard:
                buf_feats[k] = feats
                att[k] = products.attention
            else:
                if raw is not None:
                    raw.write(task.images[k], feats)
                else:
                    features[task.images[k]] = feats
                attention[task.images[k]] = products.attention
            pooled[k] = products.pooled
            stats[k] = products.stats_vector
            if with_umap_rgb:
                rgb[k] = products.umap_rgb
            done.add((file_idx, row))
    missing = sorted(set(slot) - done)
    if missing:
        f, r = missing[0]
        raise SourceError("row listed in the vision index is missing",
                          file=source.display(embedding_file_name(f)), row=r)
    if task.shard:
        lo, hi = int(images.min()), int(images.max()) + 1
        order = np.argsort(images)
        features[lo:hi] = buf_feats[order]
        attention[lo:hi] = att[order]
    buf = io.BytesIO()
    np.savez(buf, images=images, pooled=pooled, stats=stats, umap_rgb=rgb)
    fs, root = fsspec.core.url_to_fs(parts_path, **target_options)
    path = f"{root}/{task.name}.npz"
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        os.makedirs(root, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, buf.getvalue())
    return path


def load_parts(parts_path: str, target_options: dict[str, Any], n_images: int, n_features: int,
               patch: int) -> dict[str, np.ndarray]:
    """Gather every part into full arrays along ``image``."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(parts_path, **target_options)
    pooled = np.zeros((n_images, n_features), np.float32)
    stats = np.zeros((n_images, len(IMAGE_STATS)), np.float32)
    rgb = np.zeros((n_images, patch, patch, 3), np.uint8)
    seen = np.zeros(n_images, bool)
    for name in sorted(fs.glob(f"{root}/part-*.npz")):
        with fs.open(name, "rb") as f:
            part = np.load(io.BytesIO(f.read()))
            idx = part["images"]
            pooled[idx] = part["pooled"]
            stats[idx] = part["stats"]
            rgb[idx] = part["umap_rgb"]
            seen[idx] = True
    if not seen.all():
        raise RuntimeError(f"{int((~seen).sum())} images have no finished part")
    return {"pooled": pooled, "stats": stats, "umap_rgb": rgb}


def finished_parts(parts_path: str, target_options: dict[str, Any]) -> set[str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(parts_path, **target_options)
    if not fs.exists(root):
        return set()
    return {p.rsplit("/", 1)[-1][:-4] for p in fs.glob(f"{root}/part-*.npz")}


def warm_worker() -> None:
    """Import what :func:`run_task` imports (run on every worker when the build's cluster
    starts, while the read stage runs, so the first task does not pay for it)."""
    import fsspec  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import zarr  # noqa: F401

    from . import chunkio, reader, store  # noqa: F401
