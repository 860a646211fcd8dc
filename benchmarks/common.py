"""Helpers shared by the benchmarks: timing, page-cache control, markdown tables."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (its result is dropped after the clock stops)."""
    t0 = time.perf_counter()
    result = fn()
    dt = time.perf_counter() - t0
    del result
    return dt


def median_ms(seconds: Sequence[float]) -> float:
    return float(np.median(np.asarray(seconds, dtype=float))) * 1e3


# -- page cache ------------------------------------------------------------------------------
def evict(paths: Iterable[str]) -> None:
    """Ask the kernel to drop the files' clean pages (posix_fadvise POSIX_FADV_DONTNEED).

    Pages still mapped by a process stay: unmap first.
    """
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_all_caches() -> bool:
    """Drop the whole page cache (root only; disturbs every other process). True if it worked."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def resident_fraction(paths: Sequence[str]) -> float | None:
    """Share of the files' bytes in the page cache (util-linux ``fincore``), None if unknown."""
    exe = shutil.which("fincore")
    if exe is None or not paths:
        return None
    try:
        out = subprocess.run([exe, "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE",
                              *paths], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    res = size = 0
    for line in out.split("\n"):
        parts = line.split()
        if len(parts) == 2:
            res += int(parts[0])
            size += int(parts[1])
    return res / size if size else None


def warm(paths: Iterable[str], block: int = 16 << 20) -> None:
    """Read the files once so that their pages are in the page cache."""
    buf = bytearray(block)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# -- output ----------------------------------------------------------------------------------
def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


def fmt_ms(ms: float | None) -> str:
    if ms is None or not np.isfinite(ms):
        return "n/a"
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def fmt_ratio(x: float | None) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:.2f}x" if x < 10 else f"{x:.0f}x"
