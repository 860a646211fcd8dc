"""Incremental rebuilds: content digests of the source, and reuse of unchanged embeddings.

Every source file gets a content digest (MD5 of its bytes), cached in the release
manifest with the file's size and stamp (modification time on disks, ETag on object
stores), so an unchanged file is not read again. Each embedding row's digest combines
its file's digest with its row and ids. A rebuild takes every embedding whose digest the
previous release also holds from that release (``features`` and ``attention`` chunks by
hard link on disks or server-side copy on S3; pooled vectors, statistics and UMAP-RGB
rows copied) and computes only the others.

The other stages are reused as a whole (:func:`cube_gen.pipeline.run_recipe`): each
declares an input key, content digests (:func:`content_digest`) of exactly what it
reads; a stage whose key the previous release records unchanged is taken from it.
"""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import zarr

from . import schema as S
from . import source_layout as L
from .integrity import md5_file
from .release import ZARR_METADATA, Resolved, link_file, take_tree
from .store import Target, zarr_store


def _stamp(info: dict) -> str:
    for k in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(k) is not None:
            return f"{k}:{info[k]}".replace('"', "")
    return ""


def source_files(source, previous: dict[str, list] | None = None,
                 workers: int = 4) -> dict[str, list]:
    """``{relative path: [size, stamp, md5]}`` of every file of a source dataset.

    ``previous`` (the table of the last release) spares reading files whose size and
    stamp are unchanged.
    """
    previous = previous or {}
    found = source.fs.find(source.root, detail=True)
    rows = []
    for path, info in found.items():
        if info.get("type") == "directory":
            continue
        rel = path[len(source.root):].lstrip("/")
        rows.append((rel, path, int(info.get("size") or 0), _stamp(info)))

    def one(row):
        rel, path, size, stamp = row
        old = previous.get(rel)
        if old and int(old[0]) == size and old[1] == stamp and stamp:
            return rel, [size, stamp, old[2]]
        return rel, [size, stamp, md5_file(source.fs, path)[1]]

    with ThreadPoolExecutor(workers) as pool:
        return dict(sorted(pool.map(one, rows)))


def source_digest(files: dict[str, list]) -> str:
    """One digest of the whole source (file names and contents)."""
    h = hashlib.sha256()
    for rel, (_, _, md5) in sorted(files.items()):
        h.update(f"{rel}\0{md5}\n".encode())
    return h.hexdigest()[:16]


def row_digests(images: pd.DataFrame, files: dict[str, list], dtype: str) -> list[str]:
    """Content digest of each embedding row (its file's digest, row, ids, stored dtype)."""
    out = []
    for f, r, g, n in zip(images.file_idx, images.row_idx, images.gbif_id, images.image_number,
                          strict=True):
        md5 = files.get(L.embedding_file_name(int(f)), [0, "", ""])[2]
        out.append(hashlib.sha256(f"{md5}:{int(r)}:{int(g)}:{int(n)}:{dtype}".encode())
                   .hexdigest()[:16])
    return out


def _feed(h: Any, value: Any) -> None:
    """Feed one value into a hash, unambiguously (type, shape and length prefixed)."""
    if isinstance(value, pd.DataFrame):
        h.update(f"frame{len(value)}:{list(map(str, value.columns))}".encode())
        for col in value.columns:
            _feed(h, value[col].to_numpy())
    elif isinstance(value, np.ndarray) and value.dtype != object:
        h.update(f"array{value.dtype.str}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, np.ndarray | list | tuple):
        h.update(f"seq{len(value)}[".encode())
        for v in (value.ravel() if isinstance(value, np.ndarray) else value):
            _feed(h, v)
        h.update(b"]")
    elif isinstance(value, dict):
        h.update(f"map{len(value)}{{".encode())
        for k in sorted(value, key=str):
            _feed(h, str(k))
            _feed(h, value[k])
        h.update(b"}")
    elif value is None or isinstance(value, str | int | float | bool | np.generic):
        h.update(f"{type(value).__name__}:{value!r}\x1f".encode())
    else:
        raise TypeError(f"cannot digest a {type(value).__name__} (a stage input key takes "
                        "tables, arrays, lists, mappings and plain values)")


def content_digest(*parts: Any) -> str:
    """Digest of tables, arrays, lists, mappings and plain values (one stage input)."""
    h = hashlib.sha256()
    for part in parts:
        _feed(h, part)
    return h.hexdigest()[:16]


def files_digest(files: dict[str, list], *names: str) -> str:
    """Digest of the contents of the named source files (from :func:`source_files`);
    a missing file counts as such."""
    return content_digest({n: (files[n][2] if n in files else None) for n in names})


def recipe_digest(recipe: Any, *sections: str) -> str:
    """Digest of recipe sections named by dotted paths (``cubes.grid``, ``metadata``)."""
    parts = {}
    for dotted in sections:
        node: Any = recipe.data
        for k in dotted.split("."):
            node = node[k]
        parts[dotted] = node
    return content_digest(parts)


def reuse_mode(stage: Any, key: dict[str, str] | None, previous: Resolved | None,
               recipe: Any) -> str | None:
    """``"reused"`` when the previous release holds the stage's outputs built from the same
    key, ``"refreshed"`` when only inputs its :class:`~cube_gen.pipeline.Refresh` recomputes
    differ, else
    None (build it)."""
    if key is None or previous is None or previous.version is None:
        return None
    old = (previous.manifest.get("stage_inputs") or {}).get(stage.name)
    files = previous.files or {}
    if not old or not all(any(f.startswith(f"{out}/") or f == out for f in files)
                          for out in stage.output_paths(recipe)):
        return None
    changed = {k for k in key.keys() | old.keys() if key.get(k) != old.get(k)}
    if not changed:
        return "reused"
    if stage.refresh is not None and changed <= set(stage.refresh.inputs):
        return "refreshed"
    return None


def take_for_refresh(ctx: Any, stage: Any) -> None:
    """Take the stage's outputs from the previous release into staging, without the
    chunks of the arrays its refresh rewrites (their metadata is kept, copied)."""
    arrays = stage.refresh.arrays(ctx.recipe)
    for out in stage.output_paths(ctx.recipe):
        skip = tuple(f"{a}/" for a in arrays.get(out, ()))

        def leave_out(rel: str, skip=skip) -> bool:
            return rel.startswith(skip) and rel.rsplit("/", 1)[-1] not in ZARR_METADATA

        ctx.target.remove(ctx.target.staging(out))
        take_tree(ctx.target, ctx.target.path(*ctx.previous.prefix, out),
                  ctx.target.staging(out), leave_out)


def vision_config_key(cfg: dict) -> str:
    """What must match for vision chunks to be reusable: the vision section of the recipe."""
    relevant = {k: v for k, v in cfg.items() if k != "batch_size"}
    return hashlib.sha256(repr(sorted(relevant.items())).encode()).hexdigest()[:16]


def reuse_vision(previous: Resolved | None, target: Target, staged_url: str, parts_url: str,
                 digests: list[str], cfg: dict) -> np.ndarray:
    """Take unchanged embeddings from the previous release into the staged vision cube.

    Links (or copies) their ``features`` and ``attention`` chunks and writes their pooled
    vectors, statistics and UMAP-RGB rows as one finished part; returns the mask of
    reused image positions (all False when nothing can be reused).
    """
    n = len(digests)
    reused = np.zeros(n, bool)
    if previous is None or previous.version is None or cfg.get("shards"):
        return reused
    if not target.fs.exists(target.staging(S.CUBE_PATHS[S.VISION])):
        return reused
    old = previous.manifest
    old_digests = (old.get("rows") or {}).get("vision")
    if not old_digests or old.get("vision_config") != vision_config_key(cfg):
        return reused
    where = {d: i for i, d in enumerate(old_digests)}
    pairs = [(i, where[d]) for i, d in enumerate(digests) if d in where]
    if not pairs:
        return reused
    new_pos = np.array([p[0] for p in pairs], np.int64)
    old_pos = np.array([p[1] for p in pairs], np.int64)
    vpath = S.CUBE_PATHS[S.VISION]
    old_root = target.path(*previous.prefix, vpath)
    new_group = zarr.open_group(zarr_store(staged_url, target.storage_options), mode="r+")
    old_group = zarr.open_group(zarr_store(target.url_of(*previous.prefix, vpath),
                                           target.storage_options, read_only=True), mode="r")
    files = previous.files or {}
    copies = []
    for name in ("features", "attention"):
        arr = new_group[name]
        enc = arr.metadata.chunk_key_encoding if arr.metadata.zarr_format == 3 else None
        rest = (0,) * (arr.ndim - 1)

        def key(p: int, arr=arr, enc=enc, rest=rest) -> str:
            if enc is not None:
                return enc.encode_chunk_key((int(p), *rest))
            sep = arr.metadata.dimension_separator or "."
            return sep.join(str(v) for v in (int(p), *rest))

        for a, b in zip(old_pos, new_pos, strict=True):
            src_rel = f"{vpath}/{name}/{key(a)}"
            if src_rel in files:
                copies.append((f"{old_root}/{name}/{key(a)}",
                               f"{target.staging(vpath)}/{name}/{key(b)}"))
    if target.is_local:
        import os

        def put(pair):
            os.makedirs(os.path.dirname(pair[1]), exist_ok=True)
            link_file(*pair)
    else:
        def put(pair):
            target.fs.copy(pair[0], pair[1])
    with ThreadPoolExecutor(16 if not target.is_local else 4) as pool:
        list(pool.map(put, copies))
    order = np.argsort(old_pos)
    o_sorted = old_pos[order]
    pooled = old_group["pooled"].get_orthogonal_selection((o_sorted, slice(None)))
    stats = np.stack([old_group[f"stat_{k}"].get_orthogonal_selection((o_sorted,))
                      for k in S.IMAGE_STATS], axis=1)
    rgb = old_group["umap_rgb"].get_orthogonal_selection(
        (o_sorted, slice(None), slice(None), slice(None)))
    buf = io.BytesIO()
    np.savez(buf, images=new_pos[order], pooled=pooled, stats=stats, umap_rgb=rgb)
    fs_path = f"{parts_url}/part-reused.npz"
    _write_bytes(target, fs_path, buf.getvalue())
    reused[new_pos] = True
    return reused


def reused_images(parts_url: str, target: Target, n: int) -> np.ndarray | None:
    """Mask of the images a resumed build already took from the previous release
    (None when the reuse step has not run yet)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(f"{parts_url}/part-reused.npz",
                                     **(target.storage_options or {}))
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        images = np.load(io.BytesIO(f.read()))["images"]
    mask = np.zeros(n, bool)
    mask[images] = True
    return mask


def _write_bytes(target: Target, url: str, data: bytes) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(target.storage_options or {}))
    if target.is_local:
        import os

        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


__all__: list[Any] = ["content_digest", "files_digest", "recipe_digest", "reuse_mode",
                      "reuse_vision", "reused_images", "row_digests", "source_digest",
                      "source_files", "take_for_refresh", "vision_config_key"]
