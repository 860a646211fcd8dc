"""Schemathesis against the plugin's own /openapi.json: no 5xx, no traceback, bounded time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def fuzz_server(served) -> str:
    """The shared served cube set (tests/conftest.py)."""
    return served.url


def test_schemathesis_finds_no_server_error_and_no_traceback(fuzz_server, tmp_path):
    exe = Path(sys.executable).with_name("schemathesis")
    cmd = [str(exe), "run", f"{fuzz_server}/openapi.json",
           "--url", fuzz_server,
           "--include-path-regex", "^/deepearth/",
           "--checks", "not_a_server_error,no_traceback",
           "--max-examples", "15", "--seed", "1", "--workers", "1",
           "--request-timeout", "30", "--max-failures", "20", "--no-color"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_hooks",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env,
                         cwd=tmp_path)
    report = out.stdout + out.stderr
    (tmp_path / "schemathesis.txt").write_text(report)
    assert out.returncode == 0, report[-6000:]
    assert "No issues found" in report or "passed" in report, report[-3000:]
