"""A recipe pointed at a real ``distributed`` cluster: ``dask scheduler`` and ``dask worker``
processes on loopback, building the tiny cube set equal to the in-process build."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import tiny_recipe_data
from cubecompare import assert_cubesets_equal

from cube_gen.pipeline import run_recipe
from cube_gen.recipe import parse_recipe
from server.launch import free_port

DASK = shutil.which("dask", path=os.path.dirname(sys.executable)) or shutil.which("dask")


def _start(args: list[str], log: Path) -> subprocess.Popen:
    # own process group: a worker's nanny and its child die with it
    return subprocess.Popen([DASK, *args], stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=str(Path(__file__).resolve().parents[1]))


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture()
def cluster(tmp_path):
    """``tcp://127.0.0.1:PORT`` of a scheduler with two single-threaded workers."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [_start(["scheduler", "--host", "127.0.0.1", "--port", str(port),
                     "--no-dashboard"], tmp_path / "scheduler.log")]
    try:
        for i in range(2):
            procs.append(_start(["worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                                 "--no-dashboard", "--memory-limit", "2GB",
                                 "--name", f"w{i}"], tmp_path / f"worker{i}.log"))
        deadline = time.monotonic() + 120
        while True:
            try:
                with Client(address, timeout=5) as client:
                    if len(client.scheduler_info()["workers"]) == 2:
                        break
            except OSError:
                pass
            dead = [p for p in procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f.read_text()[-2000:] for f in tmp_path.glob("*.log"))
                pytest.fail(f"dask cluster did not start on {address}:\n{logs}")
            time.sleep(0.5)
        yield address
    finally:
        pids = [p.pid for p in procs]
        for p in reversed(procs):
            _stop(p)
        # no orphans: nothing of the cluster's process groups survives
        # (a worker reparented to a PID 1 that does not reap stays a zombie: it holds no
        # port nor memory, so only live processes count; they get 10 s to exit)
        deadline = time.monotonic() + 10
        while True:
            left = [p for p in psutil.process_iter(["pid", "status"]) if _group(p) in pids
                    and p.info["status"] != psutil.STATUS_ZOMBIE]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert not left, f"orphaned cluster processes: {left}"


def _group(p: psutil.Process) -> int | None:
    try:
        return os.getpgid(p.pid)
    except (ProcessLookupError, PermissionError):
        return None


def test_recipe_on_a_real_scheduler_equals_the_in_process_build(cluster, tiny_source, tiny_cubes,
                                                                 tmp_path):
    data = tiny_recipe_data(tiny_source, tmp_path / "cubes")
    data["compute"] = {"scheduler": cluster}
    run_recipe(parse_recipe(data), progress=False)
    assert_cubesets_equal(str(tiny_cubes), str(tmp_path / "cubes"))
