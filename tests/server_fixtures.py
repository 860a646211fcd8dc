"""Run a real ``xcube serve`` subprocess for tests and benchmarks.

``running_server(config_path)`` starts ``xcube serve -c config_path`` on a free loopback
port, waits until ``/deepearth/health`` answers, yields the base URL and stops the
process (its whole process group) afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from server.launch import make_config, write_config, xcube_command


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _log_tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@contextlib.contextmanager
def running_server(config_path: str | Path, port: int, log_path: str | Path,
                   ready_path: str = "/deepearth/health", timeout: float = 120.0,
                   env: dict[str, str] | None = None) -> Iterator[str]:
    """Start ``xcube serve -c config_path --port port``; yield ``http://127.0.0.1:port``."""
    log_path = Path(log_path)
    url = f"http://127.0.0.1:{port}"
    cmd = [*xcube_command(), "serve", "-c", str(config_path), "--port", str(port),
           "--address", "127.0.0.1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"xcube serve exited with {proc.returncode}:\n"
                                   f"{_log_tail(log_path)}")
            try:
                r = requests.get(url + ready_path, timeout=5)
                if r.status_code < 500 or ready_path != "/deepearth/health":
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"xcube serve not ready after {timeout} s:\n"
                                   f"{_log_tail(log_path)}")
            time.sleep(0.25)
        yield url
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@contextlib.contextmanager
def serve_cubeset(cubeset: str | Path, workdir: str | Path, plugin: dict | None = None,
                  timeout: float = 120.0) -> Iterator[str]:
    """Write the ``deepearth serve`` config for a cube set and run plain ``xcube serve`` on it."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = make_config(str(cubeset), port=port, address="127.0.0.1", plugin=plugin)
    path = write_config(config, workdir / "config.yml")
    with running_server(path, port, workdir / "xcube-serve.log", timeout=timeout) as url:
        yield url
