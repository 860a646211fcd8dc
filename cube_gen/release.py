"""Cube set releases: immutable versions under one target, switched by one atomic write.

Layout of a target (local folder or object-store prefix)::

    cubeset.json                      root manifest: {"current": "<id>", ...summary}
    versions/<id>/release.json        release manifest: recipe, source, counts, bytes,
                                      created, and every object with its size and MD5
    versions/<id>/observations.zarr   plain Zarr cubes, never changed once published
    versions/<id>/species.zarr
    versions/<id>/vision.zarr
    versions/<id>/grid.levels/
    current -> versions/<id>          on local disks only: a link to the current version,
    <cube> -> current/<cube>          and fixed links to its cubes

A build stages its cubes under ``.staging/``, copies (S3: server-side copy; disk: rename)
them to ``versions/<id>/``, writes ``release.json`` there and then switches
``cubeset.json`` (one PUT on S3, ``os.replace`` on disk), the source of truth for every
reader; on disk the ``current`` link follows (one ``os.replace`` of a new link). A reader resolves the current
version once and reads only below it, so a switch never mixes versions. Cube sets written
before releases existed (cubes at the top, no ``current``) still open, unversioned.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from . import schema as S
from .errors import CubeError, VersionNotFound
from .integrity import md5_file
from .store import Target

VERSIONS = "versions"
RELEASE = "release.json"
FORMAT = "deepearth-cubeset/2"


def version_prefix(version: str | None) -> tuple[str, ...]:
    """Path parts of a version's root below the target (empty: unversioned layout)."""
    return () if version is None else (VERSIONS, version)


def new_version_id(now: dt.datetime | None = None) -> str:
    """A sortable, unique version id: ``20261201T213000123Z-1a2b3c`` (UTC, milliseconds).

    Milliseconds keep two publishes within one second in order (the name sorts by time).
    """
    now = now or dt.datetime.now(dt.UTC)
    return f"{now.strftime('%Y%m%dT%H%M%S')}{now.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


def read_root(target: Target) -> dict | None:
    """The root manifest, or None when the target holds no complete cube set."""
    return target.read_json(target.path(S.MANIFEST))


def read_release(target: Target, version: str) -> dict:
    """The release manifest of ``version`` (raises :class:`VersionNotFound`)."""
    rel = target.read_json(target.path(VERSIONS, version, RELEASE))
    if rel is None:
        known = [r["id"] for r in list_versions(target)]
        raise VersionNotFound(f"{target.url} has no version {version!r} (versions: "
                              f"{', '.join(known) or 'none'})")
    return rel


@dataclass(frozen=True)
class Resolved:
    """What a reader opens: the version (None: unversioned), its root and manifest."""

    version: str | None
    prefix: tuple[str, ...]
    manifest: dict
    files: dict[str, list] | None  # object -> [size, md5] (None: no inventory)


def resolve(target: Target, version: str | None = None) -> Resolved:
    """Resolve the current version of ``target`` (or pin ``version``), reading once."""
    root = read_root(target)
    if version is None:
        if root is None:
            raise CubeError(f"{target.url} is not a complete cube set ({S.MANIFEST} is missing)")
        if "current" not in root:  # written before releases existed
            return Resolved(None, (), root, None)
        version = str(root["current"])
    rel = read_release(target, version)
    return Resolved(version, version_prefix(version), rel, rel.get("files"))


def list_versions(target: Target) -> list[dict]:
    """Summaries of every complete version (oldest first), ``current`` marked."""
    root = read_root(target) or {}
    base = target.path(VERSIONS)
    try:
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in target.fs.ls(base, detail=False))
    except FileNotFoundError:
        names = []
    out = []
    for name in names:
        rel = target.read_json(target.path(VERSIONS, name, RELEASE))
        if rel is None:  # a publish that did not finish
            continue
        out.append({k: rel.get(k) for k in ("id", "recipe", "source_version", "counts",
                                              "bytes", "created", "parent")}
                   | {"current": rel.get("id") == root.get("current")})
    return out


def inventory(target: Target, base: str, parts: Iterable[str], workers: int = 8,
              progress: bool = False, linked_from: Resolved | None = None
              ) -> dict[str, list]:
    """``{relative path: [size, md5]}`` of every object below ``base/<part>``.

    On S3 a single-part object's ETag is its MD5 (no download); others are read. On disk,
    a file that is a hard link of the same path in the release ``linked_from`` (the same
    inode: taken unchanged) keeps that release's entry instead of being read again.
    """
    files: list[tuple[str, dict]] = []
    for part in parts:
        root = f"{base}/{part}"
        if not target.fs.exists(root):
            continue
        found = target.fs.find(root, detail=True)
        files.extend((p, info) for p, info in found.items() if info.get("type") != "directory")
    out: dict[str, list] = {}
    todo = []
    known = (linked_from.files or {}) if linked_from is not None and target.is_local else {}
    old_base = target.path(*linked_from.prefix) if known else ""
    for path, info in files:
        rel = path[len(base):].lstrip("/")
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
        if not target.is_local and len(etag) == 32 and "-" not in etag:
            out[rel] = [int(info.get("size") or 0), etag]
        elif rel in known and _same_file(path, f"{old_base}/{rel}"):
            out[rel] = list(known[rel])
        else:
            todo.append((rel, path))

    def one(item):
        rel, path = item
        return rel, list(md5_file(target.fs, path))

    with ThreadPoolExecutor(max(1, workers)) as pool, tqdm(
            total=len(todo), desc="checksums", unit="obj", disable=not progress) as bar:
        for rel, v in pool.map(one, todo):
            out[rel] = v
            bar.update()
    return dict(sorted(out.items()))


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def publish(target: Target, staged: Iterable[str], summary: dict[str, Any],
            reuse: dict[str, str] | None = None, progress: bool = False,
            previous: Resolved | None = None) -> str:
    """Publish the staged paths (``vision.zarr``, ...) as a new version; returns its id.

    ``reuse`` maps a path to a path of the previous version to take unchanged instead
    (hard links on disk, server-side copies on S3). ``previous``: the release that
    staged or reused files were hard-linked from (their checksums are taken from its
    manifest, not read again). Order: data, ``release.json``, then the one atomic write
    of ``cubeset.json``.
    """
    vid = new_version_id()
    staged = list(staged)
    reuse = dict(reuse or {})
    vroot = target.path(VERSIONS, vid)
    target.fs.mkdirs(vroot, exist_ok=True)
    for part, src in reuse.items():
        _link_tree(target, src, f"{vroot}/{part}")
    for part in staged:
        src, dst = target.staging(part), f"{vroot}/{part}"
        if target.is_local:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.rename(src, dst)
        else:
            _copy_tree(target, src, dst)
    files = inventory(target, vroot, [*staged, *reuse], progress=progress,
                      linked_from=previous)
    release = {
        "format": FORMAT, "id": vid, **summary,
        "bytes": int(sum(v[0] for v in files.values())),
        "objects": len(files),
        "files": files,
    }
    target.write_json(f"{vroot}/{RELEASE}", release)
    switch(target, vid, {k: v for k, v in release.items() if k != "files"})
    return vid


def switch(target: Target, version: str, summary: dict[str, Any]) -> None:
    """Make ``version`` current: one atomic write of the root manifest, then the links."""
    target.write_json(target.path(S.MANIFEST), {**summary, "format": FORMAT,
                                                  "current": version})
    if target.is_local:
        _update_links(target, version)


CURRENT_LINK = "current"


def _update_links(target: Target, version: str) -> None:
    """On disk: ``<target>/current -> versions/<id>`` (switched by one ``os.replace`` of a
    new link) and fixed links ``<target>/<cube> -> current/<cube>``, so that plain path
    readers also see one version at a time. ``cubeset.json`` stays the source of truth:
    it is written first, the link follows."""
    current = target.path(CURRENT_LINK)
    tmp = f"{current}.tmp-{os.getpid()}"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(os.path.join(VERSIONS, version), tmp)
    os.replace(tmp, current)
    for cube in S.CUBE_PATHS.values():
        link = target.path(cube)
        want = os.path.join(CURRENT_LINK, cube)
        if os.path.islink(link) and os.readlink(link) == want:
            continue
        if not os.path.exists(os.path.join(target.root, VERSIONS, version, cube)):
            continue
        if os.path.exists(link) and not os.path.islink(link):  # a cube of the old layout
            target.fs.rm(link, recursive=True)
        tmp = f"{link}.tmp-{os.getpid()}"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(want, tmp)
        os.replace(tmp, link)


# Zarr and xcube metadata documents: copied, never linked, when a tree is taken to be
# changed (a rewrite of a linked file could reach the published original)
ZARR_METADATA = frozenset({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata",
                           ".zlevels"})


def _copy_tree(target: Target, src: str, dst: str, workers: int = 16,
               leave_out: Callable[[str], bool] | None = None) -> None:
    """Server-side copy of every object below ``src`` to ``dst`` (object stores), but
    those whose path relative to ``src`` ``leave_out`` names."""
    files = [f for f, i in target.fs.find(src, detail=True).items() if i.get("type") != "directory"]
    pairs = [(f, dst + f[len(src):]) for f in files
             if leave_out is None or not leave_out(f[len(src):].lstrip("/"))]
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda p: target.fs.copy(p[0], p[1]), pairs))


def _link_tree(target: Target, src: str, dst: str,
               leave_out: Callable[[str], bool] | None = None,
               copy_metadata: bool = False) -> None:
    """Take a published tree: hard links on disk, server-side copies on S3.

    ``leave_out``: paths relative to ``src`` not to take; ``copy_metadata``: copy the Zarr
    metadata documents on disk instead of linking them (the tree is to be rewritten).
    """
    if not target.is_local:
        _copy_tree(target, src, dst, leave_out=leave_out)
        return
    for dirpath, _, names in os.walk(src):
        rel_dir = os.path.relpath(dirpath, src)
        out = os.path.join(dst, rel_dir)
        os.makedirs(out, exist_ok=True)
        for name in names:
            if leave_out is not None and leave_out(name if rel_dir == "." else
                                                   f"{rel_dir}/{name}"):
                continue
            take = shutil.copyfile if copy_metadata and name in ZARR_METADATA else link_file
            take(os.path.join(dirpath, name), os.path.join(out, name))


def take_tree(target: Target, src: str, dst: str,
              leave_out: Callable[[str], bool] | None = None) -> None:
    """Take the published tree ``src`` into ``dst`` (in staging) to be partly rewritten:
    data objects linked (disk) or copied server-side (S3) but those ``leave_out`` names,
    Zarr metadata documents copied."""
    _link_tree(target, src, dst, leave_out=leave_out, copy_metadata=True)


def link_file(src: str, dst: str) -> None:
    """Hard link (copy where links are not possible) a published file."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def gc(target: Target, keep: int, progress: bool = False) -> list[str]:
    """Remove all but the ``keep`` newest complete versions (never the current one),
    and unfinished publishes; returns the removed ids."""
    if keep < 1:
        raise ValueError("--keep must be at least 1")
    root = read_root(target) or {}
    current = root.get("current")
    versions = [v["id"] for v in list_versions(target)]
    keep_ids = set(versions[-keep:]) | {current}
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1]
                 for p in target.fs.ls(target.path(VERSIONS), detail=False)]
    except FileNotFoundError:
        names = []
    removed = []
    for name in tqdm(sorted(names), desc="gc", disable=not progress):
        if name in keep_ids:
            continue
        target.fs.rm(target.path(VERSIONS, name), recursive=True)
        removed.append(name)
    return removed


@dataclass(frozen=True)
class Problem:
    """One bad object found by :func:`verify`."""

    path: str  # inside the version, e.g. vision.zarr/features/c/3/0/0/0/0
    kind: str  # missing | size | checksum | unreadable
    detail: str

    def __str__(self) -> str:
        return f"{self.path}: {self.kind} ({self.detail})"


def verify(target: Target, version: str | None = None, workers: int = 8,
           progress: bool = True, on_problem: Callable[[Problem], None] | None = None
           ) -> tuple[str, list[Problem], int]:
    """Check presence, size and MD5 of every object of a version, in parallel.

    Returns ``(version, problems, bytes read)``.
    """
    res_root = read_root(target)
    if version is None:
        if res_root is None or "current" not in res_root:
            raise CubeError(f"{target.url} has no current release to verify "
                            f"({S.MANIFEST} is missing or names no version)")
        version = str(res_root["current"])
    rel = read_release(target, version)
    files = rel.get("files") or {}
    base = target.path(VERSIONS, version)

    def one(item) -> tuple[Problem | None, int]:
        name, (size, md5) = item
        path = f"{base}/{name}"
        try:
            got_size, got = md5_file(target.fs, path)
        except FileNotFoundError:
            return Problem(name, "missing", "listed in the release manifest, absent"), 0
        except OSError as exc:
            return Problem(name, "unreadable", f"{type(exc).__name__}: {exc}"), 0
        if got_size != size:
            return Problem(name, "size", f"{got_size} bytes, expected {size}"), got_size
        if got != md5:
            return Problem(name, "checksum", f"md5 {got}, expected {md5}"), got_size
        return None, got_size

    problems: list[Problem] = []
    nbytes = 0
    with ThreadPoolExecutor(max(1, workers)) as pool, tqdm(
            total=int(rel.get("bytes") or 0), desc=f"verify {version}", unit="B",
            unit_scale=True, disable=not progress) as bar:
        for problem, n in pool.map(one, sorted(files.items())):
            nbytes += n
            bar.update(n)
            if problem is not None:
                problems.append(problem)
                if on_problem is not None:
                    on_problem(problem)
    return version, problems, nbytes
