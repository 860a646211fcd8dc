"""Run every benchmark in turn (``make bench``); each writes benchmarks/out/<name>.md.

    python -m benchmarks.run_all [--only gen,formats,server,load,s3,patch]

Copy the printed tables into benchmarks/RESULTS.md when they are to be recorded.
"""

from __future__ import annotations

import argparse
import importlib
import time

BENCHMARKS = ("gen", "formats", "server", "load", "s3", "patch")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default=",".join(BENCHMARKS),
                    help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    for name in names:
        t = time.perf_counter()
        print(f"==> benchmarks.bench_{name}", flush=True)
        importlib.import_module(f"benchmarks.bench_{name}").main([])
        print(f"<== bench_{name} took {time.perf_counter() - t:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
