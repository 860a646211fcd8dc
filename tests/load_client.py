"""A bounded HTTP load generator for ``xcube serve`` with the DeepEarth plugin.

Run as a second process (the server's GIL and the client's stay apart)::

    python tests/load_client.py --base http://127.0.0.1:8080 --plan plan.json \\
        --connections 16 --seconds 5 [--timeout 30] [--out result.json]

``plan.json`` is a list of ``{"kind": ..., "path": ...}`` requests (see :func:`build_plan`).
Every connection is one keep-alive HTTP/1.1 socket (asyncio, standard library only) that
walks the plan from its own offset for ``--seconds``; requests started before the end
finish (or time out after ``--timeout`` s, counted as errors). Any answer other than
200, a timeout or a dropped connection is an error. The result (JSON on stdout or in
``--out``): requests, errors and error samples, throughput, p50/p99/max latency in ms,
bytes received, and the same per request kind.

Imported by the tests and ``benchmarks/bench_load.py``: :func:`build_plan` asks a
running server for real ids, :func:`run_load` starts this file as a subprocess and samples
the server's resident memory (psutil) while it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

MAX_ERROR_SAMPLES = 10


# -- the client (standard library only) ----------------------------------------------------
class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    def close(self) -> None:
        self.writer.close()


async def _open(host: str, port: int) -> _Conn:
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    return _Conn(reader, writer)


async def _get(conn: _Conn, host: str, path: str) -> tuple[int, int, bytes, bool]:
    """One GET on a keep-alive connection: (status, body bytes, body head, keep-alive)."""
    conn.writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept-Encoding: identity\r\n"
                      "Connection: keep-alive\r\n\r\n".encode("latin-1"))
    await conn.writer.drain()
    head = await conn.reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    keep = headers.get("connection", "").lower() != "close"
    first = b""
    if "content-length" in headers:
        n = int(headers["content-length"])
        body = await conn.reader.readexactly(n)
        first = body[:300]
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        n = 0
        while True:
            size = int((await conn.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await conn.reader.readexactly(size + 2)
            if not first:
                first = chunk[:300]
            n += size
            if size == 0:
                break
    else:  # body until the server closes
        body = await conn.reader.read()
        n, first, keep = len(body), body[:300], False
    return status, n, first, keep


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def _summary(records: list[tuple[str, float, bool, int]], elapsed: float) -> dict[str, Any]:
    lat = sorted(r[1] for r in records)
    return {
        "requests": len(records),
        "errors": sum(1 for r in records if not r[2]),
        "rps": round(len(records) / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": None if not lat else round(_percentile(lat, 50) * 1e3, 1),
        "p99_ms": None if not lat else round(_percentile(lat, 99) * 1e3, 1),
        "max_ms": None if not lat else round(lat[-1] * 1e3, 1),
        "bytes": sum(r[3] for r in records),
    }


async def run_client(base: str, plan: list[dict], connections: int, seconds: float,
                     timeout: float) -> dict[str, Any]:
    """Run the load; returns the summary (see the module docstring)."""
    url = urllib.parse.urlsplit(base)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    host_header = f"{host}:{port}"
    records: list[tuple[str, float, bool, int]] = []
    samples: list[dict[str, Any]] = []
    start = time.monotonic()
    deadline = start + seconds
    stride = max(1, len(plan) // max(connections, 1))

    async def worker(i: int) -> None:
        k = (i * stride) % len(plan)
        conn: _Conn | None = None
        while time.monotonic() < deadline:
            item = plan[k % len(plan)]
            k += 1
            t0 = time.perf_counter()
            ok, nbytes, problem = False, 0, None
            try:
                if conn is None:
                    conn = await asyncio.wait_for(_open(host, port), timeout)
                status, nbytes, first, keep = await asyncio.wait_for(
                    _get(conn, host_header, item["path"]), timeout)
                ok = status == 200
                if not ok:
                    problem = {"status": status, "body": first.decode("utf-8", "replace")}
                if not keep:
                    conn.close()
                    conn = None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError, IndexError) as exc:  # TimeoutError is an OSError
                problem = {"status": "timeout" if isinstance(exc, TimeoutError)
                           else type(exc).__name__,
                           "body": f"no answer within {timeout} s"
                           if isinstance(exc, TimeoutError) else str(exc)[:300]}
                if conn is not None:  # the connection's state is unknown: start afresh
                    conn.close()
                    conn = None
            records.append((item["kind"], time.perf_counter() - t0, ok, nbytes))
            if problem is not None and len(samples) < MAX_ERROR_SAMPLES:
                samples.append({"kind": item["kind"], "path": item["path"][:300], **problem})
        if conn is not None:
            conn.close()

    await asyncio.gather(*(worker(i) for i in range(connections)))
    elapsed = time.monotonic() - start
    out = {"connections": connections, "seconds": round(elapsed, 2), **_summary(records, elapsed),
           "error_samples": samples, "by_kind": {}}
    for kind in sorted({r[0] for r in records}):
        out["by_kind"][kind] = _summary([r for r in records if r[0] == kind], elapsed)
    return out


# -- helpers for the tests and the benchmark ---------------------------------------------
def _json(url: str, timeout: float = 60) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def _mercator_tiles(bbox: tuple[float, float, float, float], z: int) -> list[tuple[int, int]]:
    """(row, col) of the WebMercator tiles of zoom ``z`` that cover ``bbox``."""
    def col(lon: float) -> int:
        return min(2**z - 1, max(0, int((lon + 180) / 360 * 2**z)))

    def row(lat: float) -> int:
        r = math.radians(lat)
        y = (1 - math.log(math.tan(r) + 1 / math.cos(r)) / math.pi) / 2
        return min(2**z - 1, max(0, int(y * 2**z)))

    w, s, e, n = bbox
    return [(y, x) for y in range(row(n), row(s) + 1) for x in range(col(w), col(e) + 1)]


def build_plan(base: str, zooms: tuple[int, ...] = (4, 5, 6, 7),
               tile_variables: tuple[str, ...] = ("observation_count", "species_richness",
                                                  "rgb")) -> list[dict[str, str]]:
    """A request mix over the served cube set, roughly one fifth of each family:

    * ``tile``: xcube ``/tiles/grid/<var>/<z>/<y>/<x>`` over the grid's extent;
    * ``wmts``: the same tiles through the DeepEarth WMTS (KVP and REST);
    * ``features`` (full float16 tensors, 13 MB) and ``features_slice`` (frame mean of a
      patch window), ``/deepearth/embeddings/{gbif_id}/{n}/features``;
    * ``attention``: attention PNGs (sizes, colour maps, methods varied);
    * ``similar``: k-nearest embeddings and species.
    """
    meta = _json(f"{base}/datasets/grid")
    bbox = tuple(meta["bbox"])
    embeddings = _json(f"{base}/deepearth/embeddings?limit=1000")["embeddings"]
    species = _json(f"{base}/deepearth/species")["species"]
    ids = [(e["gbif_id"], e["image_number"]) for e in embeddings]
    tiles, wmts = [], []
    for z in zooms:
        for y, x in _mercator_tiles(bbox, z):
            for var in tile_variables:
                tiles.append({"kind": "tile", "path": f"/tiles/grid/{var}/{z}/{y}/{x}"})
                layer = f"grid.{var}"
                if (y + x) % 2:
                    wmts.append({"kind": "wmts", "path": (
                        f"/deepearth/wmts/1.0.0/{layer}/default/default/WorldWebMercatorQuad/"
                        f"{z}/{y}/{x}.png")})
                else:
                    wmts.append({"kind": "wmts", "path": (
                        "/deepearth/wmts/kvp?SERVICE=WMTS&REQUEST=GetTile&VERSION=1.0.0"
                        f"&LAYER={layer}&STYLE=default&FORMAT=image/png"
                        f"&TILEMATRIXSET=WorldWebMercatorQuad&TILEMATRIX={z}&TILEROW={y}"
                        f"&TILECOL={x}")})
    features, attention, similar = [], [], []
    for i, (g, n) in enumerate(ids):
        e = f"/deepearth/embeddings/{g}/{n}"
        features.append({"kind": "features", "path": f"{e}/features"})
        features.append({"kind": "features_slice",
                         "path": f"{e}/features?frame=mean&patch_y={i % 12}:{i % 12 + 12}"})
        for size, cmap, method in ((128, "plasma", "l2norm"), (256, "viridis", "l2norm"),
                                   (384, "magma", "variance"), (192, "plasma", "entropy")):
            attention.append({"kind": "attention", "path": (
                f"{e}/attention.png?size={size}&colormap={cmap}&method={method}")})
        similar.append({"kind": "similar", "path": f"{e}/similar?k=5"})
    for s in species:
        similar.append({"kind": "similar", "path": f"/deepearth/species/{s['slug']}/similar?k=5"})
    families = [f for f in (tiles, wmts, features, attention, similar) if f]
    # interleave the families so that every stretch of the plan mixes all of them
    plan = []
    longest = max(len(f) for f in families)
    for i in range(longest):
        for f in families:
            plan.append(f[i % len(f)])
    return plan


def find_server_process(port: int):
    """The ``xcube serve`` process listening on ``port`` (a psutil.Process) or None."""
    import psutil

    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = proc.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "serve" in cmd and "--port" in cmd and str(port) in cmd:
            return proc
    return None


def rss_bytes(proc) -> int:
    """Resident memory of a process and its children, in bytes."""
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class RssSampler:
    """Samples a process's resident memory in a thread; ``peak`` is the largest sample."""

    def __init__(self, proc, interval: float = 0.05):
        self.proc, self.interval = proc, interval
        self.peak = rss_bytes(proc)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.peak = max(self.peak, rss_bytes(self.proc))
            except Exception:  # noqa: BLE001 - the process ended; the test reports that
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def run_load(base: str, plan: list[dict], connections: int, seconds: float,
             workdir: str | os.PathLike, timeout: float = 30.0, server=None) -> dict[str, Any]:
    """Run this file as a subprocess against ``base``; sample ``server``'s RSS meanwhile.

    Returns the client's summary plus ``peak_rss`` (bytes; None without ``server``).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    plan_path = workdir / "plan.json"
    plan_path.write_text(json.dumps(plan))
    out_path = workdir / f"load-{connections}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--base", base, "--plan",
           str(plan_path), "--connections", str(connections), "--seconds", str(seconds),
           "--timeout", str(timeout), "--out", str(out_path)]
    sampler = RssSampler(server) if server is not None else None
    if sampler:
        sampler.__enter__()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=seconds + timeout + 60)
    finally:
        if sampler:
            sampler.__exit__()
    if proc.returncode != 0:
        raise RuntimeError(f"load client failed ({proc.returncode}): {proc.stderr[-3000:]}")
    result = json.loads(out_path.read_text())
    result["peak_rss"] = sampler.peak if sampler else None
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="server URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--plan", required=True, help="JSON list of {kind, path}")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    ap.add_argument("--out", help="write the JSON result here (default: stdout)")
    args = ap.parse_args(argv)
    plan = json.loads(Path(args.plan).read_text())
    if not plan:
        ap.error("the plan is empty")
    result = asyncio.run(run_client(args.base.rstrip("/"), plan, args.connections,
                                    args.seconds, args.timeout))
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
