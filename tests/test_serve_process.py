"""``deepearth serve`` as an operator runs it: a signal to its pid ends ``xcube serve`` and
nothing is left listening or running (issue 12)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from server.launch import free_port

START_TIMEOUT = 300.0


def _session_members(sid: int) -> list[int]:
    """Pids of the live processes of session ``sid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


def _default_signals() -> None:
    for s in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_DFL)


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=lambda s: s.name)
def test_signal_to_deepearth_serve_leaves_nothing_listening(tiny_cubes, tmp_path, sig):
    port = free_port()
    log_path = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "cube_gen.cli", "serve", str(tiny_cubes), "--port", str(port),
           "--config-out", str(tmp_path / "config.yml")]
    with open(log_path, "wb") as log:
        # the operator's shell: default dispositions (a suite run under nohup ignores
        # SIGHUP, and an ignored signal stays ignored across exec)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_default_signals)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/deepearth/health",
                                timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.25)
        os.kill(proc.pid, sig)  # `kill <pid>` of the command the operator started
        proc.wait(timeout=30)
        assert not _listening(port), f"port {port} still listening after {sig.name}"
        left = [pid for pid in _session_members(proc.pid) if pid != proc.pid]
        assert not left, f"processes left after {sig.name}: {left}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
