"""Releases: versions, atomic switches under readers, SIGKILL during publish, verify, gc,
damaged chunks, a frozen store (local disk and moto S3, real processes)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_cubes, current_dir
from release_helpers import publish_marked

from cube_gen import schema as S
from cube_gen.access import CubeSet
from cube_gen.errors import ChunkMissing, CubeError, StorageUnavailable, VersionNotFound
from cube_gen.release import gc, list_versions, verify
from cube_gen.store import Target

HERE = Path(__file__).parent


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cube_gen.cli", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture
def local(tiny_cubes, tmp_path) -> Path:
    """A private copy of the tiny cube set."""
    return copy_cubes(tiny_cubes, tmp_path / "cubes")


@pytest.fixture(scope="module")
def s3_set(s3, tiny_cubes):
    """A cube set on moto S3 (observations, species, vision: no grids, to stay quick)."""
    s3.create_bucket("deepearth-rel")
    url = "s3://deepearth-rel/set"
    target = Target(url, s3.storage_options)
    publish_marked(target, str(current_dir(tiny_cubes)), 0)
    return url


# -- versions ------------------------------------------------------------------------------
def test_publish_pins_and_lists_versions(local):
    target = Target(str(local))
    first = CubeSet.open(str(local))
    v1 = publish_marked(target, str(current_dir(local)), 1)
    v2 = publish_marked(target, str(current_dir(local)), 2)
    now = CubeSet.open(str(local))
    assert now.version == v2 and now.manifest["k"] == 2
    assert (now.features(0) == 2).all()
    # a reader that opened earlier keeps its version; a pinned one reads its own
    assert first.version not in (v1, v2)
    assert not (first.features(0) == 2).all()
    pinned = CubeSet.open(str(local), version=v1)
    assert (pinned.features(0) == 1).all()
    np.testing.assert_array_equal(pinned.features(3), now.features(3))
    # plain zarr readers open a version by URL
    import xarray as xr
    ds = xr.open_zarr(f"{local}/versions/{v1}/vision.zarr", consolidated=True)
    assert (ds.features[0].values == 1).all()
    with pytest.raises(VersionNotFound, match="no version 'nope'"):
        CubeSet.open(str(local), version="nope")
    ids = [v["id"] for v in list_versions(target)]
    assert ids[-2:] == [v1, v2] and [v["current"] for v in list_versions(target)][-1]
    out = _cli("versions", str(local))
    assert out.returncode == 0 and f"* {v2}" in out.stdout and v1 in out.stdout, out.stderr
    # the on-disk links follow the current version
    assert os.path.realpath(local / "vision.zarr") == str(local / "versions" / v2 / "vision.zarr")


def test_gc_keeps_the_newest_and_the_current(local):
    target = Target(str(local))
    base = str(current_dir(local))
    ids = [CubeSet.open(str(local)).version] + [publish_marked(target, base, k) for k in (1, 2)]
    (local / "versions" / "20000101T000000000Z-dead00").mkdir()  # an unfinished publish
    out = _cli("gc", str(local), "--keep", "2", "--quiet")
    assert out.returncode == 0, out.stderr
    left = sorted(p.name for p in (local / "versions").iterdir())
    assert left == sorted(ids[1:])
    assert CubeSet.open(str(local)).version == ids[2]
    with pytest.raises(VersionNotFound):
        CubeSet.open(str(local), version=ids[0])
    assert (CubeSet.open(str(local), version=ids[1]).features(0) == 1).all()
    assert _cli("gc", str(local), "--keep", "0").returncode == 2


# -- re-publishing under readers, SIGKILL during publish ----------------------------------------
def _readers(url: str, options: dict, stop: threading.Event, seen: list, errors: list,
             want3: np.ndarray) -> list[threading.Thread]:
    def loop():
        while not stop.is_set():
            try:
                cs = CubeSet.open(url, options)
                k = cs.manifest["k"]
                f0 = cs.features(0)
                assert (f0 == k).all(), f"version {cs.version}: features[0] mixed ({k})"
                np.testing.assert_array_equal(cs.features(3), want3)
                assert np.isfinite(cs.pooled()).all()
                seen.append(cs.version)
            except (CubeError, StorageUnavailable) as exc:  # a clean error is acceptable
                errors.append(exc)
            except AssertionError as exc:
                errors.append(exc)
                stop.set()
    return [threading.Thread(target=loop, daemon=True) for _ in range(3)]


@pytest.mark.parametrize("where", ["disk", "s3"])
def test_republish_under_concurrent_readers(where, local, s3, s3_set, tiny_cubes):
    url, options = (str(local), {}) if where == "disk" else (s3_set, s3.storage_options)
    target = Target(url, options)
    if where == "disk":
        publish_marked(target, str(current_dir(tiny_cubes)), 0)
    want3 = CubeSet.open(str(tiny_cubes)).features(3)
    stop, seen, errors = threading.Event(), [], []
    threads = _readers(url, options, stop, seen, errors, want3)
    for t in threads:
        t.start()
    published = []
    try:
        for k in range(1, 4):
            published.append(publish_marked(target, str(current_dir(tiny_cubes)), k))
    finally:
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(60)
    assert not [e for e in errors if isinstance(e, AssertionError)], errors
    assert not errors, errors  # versions stay until gc: readers never fail
    assert len(set(seen)) >= 2 and set(seen) <= {*published, *[v["id"] for v in
                                                               list_versions(target)]}


@pytest.mark.parametrize("where", ["disk", "s3"])
def test_sigkill_during_publish_keeps_the_previous_version(where, local, s3, s3_set, tiny_cubes):
    url, options = (str(local), {}) if where == "disk" else (s3_set, s3.storage_options)
    target = Target(url, options)
    if where == "disk":
        publish_marked(target, str(current_dir(tiny_cubes)), 0)
    rng = random.Random(7)
    for trial in range(2):
        proc = subprocess.Popen([sys.executable, str(HERE / "release_helpers.py"), url,
                                 str(current_dir(tiny_cubes)), "20", json.dumps(options)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=str(HERE))
        time.sleep(rng.uniform(1.0, 4.0 if where == "s3" else 2.0))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        cs = CubeSet.open(url, options)  # the current version is complete and intact
        assert (cs.features(0) == cs.manifest["k"]).all(), trial
        version, problems, _ = verify(target, progress=False)
        assert version == cs.version and not problems, problems
    # leftovers of the killed publishes are unreferenced and collected
    gc(target, keep=1)
    assert [v["id"] for v in list_versions(target)] == [CubeSet.open(url, options).version]


# -- verify --------------------------------------------------------------------------------------
def test_verify_finds_a_flipped_byte_and_a_missing_object(local):
    ok = _cli("verify", str(local), "--quiet")
    assert ok.returncode == 0 and "all objects intact" in ok.stdout, ok.stderr
    vdir = current_dir(local)
    chunk = vdir / "vision.zarr" / "features" / "c" / "4" / "0" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[12345] ^= 0x01
    chunk.write_bytes(bytes(data))
    gone = vdir / "species.zarr" / "language_embedding" / "c" / "0" / "0"
    gone.unlink()
    out = _cli("verify", str(local), "--quiet", "--workers", "4")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "BAD vision.zarr/features/c/4/0/0/0/0: checksum" in out.stdout
    assert "BAD species.zarr/language_embedding/c/0/0: missing" in out.stdout
    assert "2 bad object(s)" in out.stdout and "Traceback" not in out.stderr


def test_verify_on_s3_finds_a_changed_object(s3, s3_set):
    import s3fs

    target = Target(s3_set, s3.storage_options)
    version, problems, nbytes = verify(target, progress=False)
    assert not problems and nbytes > 0
    fs = s3fs.S3FileSystem(**s3.storage_options)
    key = f"deepearth-rel/set/versions/{version}/vision.zarr/features/c/5/0/0/0/0"
    blob = bytearray(fs.cat_file(key))
    blob[-1] ^= 0xFF
    fs.pipe_file(key, bytes(blob))
    try:
        _, problems, _ = verify(target, progress=False)
        assert [(p.path, p.kind) for p in problems] == [
            ("vision.zarr/features/c/5/0/0/0/0", "checksum")]
    finally:
        blob[-1] ^= 0xFF
        fs.pipe_file(key, bytes(blob))


# -- damaged data and storage faults -----------------------------------------------------------
def test_deleted_chunk_on_s3_is_an_error_and_a_restored_one_reads_again(s3, s3_set):
    import s3fs

    cs = CubeSet.open(s3_set, s3.storage_options)
    want = cs.features(2)
    fs = s3fs.S3FileSystem(**s3.storage_options)
    key = f"deepearth-rel/set/versions/{cs.version}/vision.zarr/features/c/2/0/0/0/0"
    blob = fs.cat_file(key)
    fs.rm(key)
    try:
        with pytest.raises(ChunkMissing, match="chunk vision.zarr/features/c/2/0/0/0/0 is missing"):
            cs.features(2)
        with pytest.raises(ChunkMissing):
            cs.features_batch([1, 2])
    finally:
        fs.pipe_file(key, blob)
    np.testing.assert_array_equal(cs.features(2), want)


def test_frozen_store_fails_within_the_timeout(tiny_cubes):
    from s3_server import moto_s3

    with moto_s3() as server:
        server.create_bucket("frozen")
        target = Target("s3://frozen/set", server.storage_options)
        publish_marked(target, str(current_dir(tiny_cubes)), 0, parts=(S.CUBE_PATHS[S.VISION],))
        cs = CubeSet.open("s3://frozen/set", server.storage_options)
        cs.features(0)
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(StorageUnavailable, match="unavailable"):
                cs.features(1)
            assert time.monotonic() - t0 < 15
            out = _cli("info", "s3://frozen/set", "--storage-options",
                       json.dumps(server.storage_options))
            assert out.returncode == 1 and "unavailable" in out.stderr, out.stderr
            assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
