"""Publishing test releases quickly: copy the current cubes into staging, mark them, publish.

Used by tests/test_release.py in-process and by the subprocesses it kills.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable

import numpy as np
import zarr

from cube_gen import schema as S
from cube_gen.release import publish, read_root, resolve
from cube_gen.store import Target, zarr_store

SMALL = (S.CUBE_PATHS[S.OBSERVATIONS], S.CUBE_PATHS[S.SPECIES], S.CUBE_PATHS[S.VISION])


def publish_marked(target: Target, source_dir: str, k: int, parts=SMALL,
                   edit: Callable[[Target], None] | None = None) -> str:
    """Publish a copy of the cubes in the local folder ``source_dir`` as a new version whose
    ``features[0]`` is all ``k`` (and whose release manifest says ``k``); ``edit(target)``
    changes more of the staged cubes before the publish."""
    for part in parts:
        dst = target.staging(part)
        target.remove(dst)
        if target.is_local:
            shutil.copytree(f"{source_dir}/{part}", dst)
        else:
            target.fs.put(f"{source_dir}/{part}", dst, recursive=True)
    group = zarr.open_group(zarr_store(target.staging_url(S.CUBE_PATHS[S.VISION]),
                                       target.storage_options), mode="r+")
    feats = group["features"]
    feats[0] = np.full(feats.shape[1:], k, dtype=feats.dtype)
    if edit is not None:
        edit(target)
    root = read_root(target) or {}
    summary = {key: root[key] for key in ("recipe", "counts", "bbox", "cubes") if key in root}
    vid = publish(target, parts, {**summary, "k": int(k)})
    target.remove(target.staging())
    return vid


def current_dir_of(target: Target) -> str:
    return target.path(*resolve(target).prefix)


if __name__ == "__main__":  # python release_helpers.py URL SOURCE_DIR N [storage_options json]
    import json

    url, source, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    opts = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    t = Target(url, opts)
    for k in range(1, n + 1):
        publish_marked(t, source, 100 + k)
        print(k, flush=True)
