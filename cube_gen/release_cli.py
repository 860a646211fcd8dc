"""``deepearth versions``, ``deepearth verify`` and ``deepearth gc`` (registered by cli.py)."""

from __future__ import annotations

import argparse
import sys
import time


def _target(args: argparse.Namespace):
    from .cli import storage_options
    from .store import Target

    return Target(args.target, storage_options(args))


def _cmd_versions(args: argparse.Namespace) -> int:
    from .errors import CubeError
    from .release import list_versions

    target = _target(args)
    versions = list_versions(target)
    if not versions:
        raise CubeError(f"{target.url} has no published versions")
    print(f"{'':1} {'version':<24} {'recipe':<16} {'source':<8} {'obs':>7} {'species':>7} "
          f"{'images':>7} {'MB':>9}  created")
    for v in versions:
        c = v.get("counts") or {}
        print(f"{'*' if v['current'] else ' '} {v['id']:<24} {v.get('recipe') or '-':<16} "
              f"{v.get('source_version') or '-':<8} {c.get('observations', '-'):>7} "
              f"{c.get('species', '-'):>7} {c.get('images', '-'):>7} "
              f"{(v.get('bytes') or 0) / 1e6:>9.1f}  {v.get('created')}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .release import verify

    target = _target(args)
    t0 = time.perf_counter()

    def report(problem) -> None:
        print(f"BAD {problem}", flush=True)

    version, problems, nbytes = verify(target, args.cube_version, workers=args.workers,
                                       progress=not args.quiet, on_problem=report)
    seconds = time.perf_counter() - t0
    print(f"version {version}: {nbytes / 1e6:.1f} MB checked in {seconds:.1f} s "
          f"({nbytes / 1e6 / max(seconds, 1e-9):.0f} MB/s); "
          + (f"{len(problems)} bad object(s)" if problems else "all objects intact"))
    return 1 if problems else 0


def _cmd_gc(args: argparse.Namespace) -> int:
    from .errors import UsageError
    from .release import gc

    if args.keep < 1:
        raise UsageError("--keep must be at least 1")
    removed = gc(_target(args), args.keep, progress=not args.quiet)
    print(f"removed {len(removed)} version(s)" + (f": {', '.join(removed)}" if removed else ""))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the release commands to the ``deepearth`` parser."""
    p = sub.add_parser("versions", help="list the versions of a cube set (* = current)")
    p.add_argument("target", help="cube set path or s3:// URL")
    p.set_defaults(func=_cmd_versions)

    p = sub.add_parser("verify", help="check every object of a version against its checksums")
    p.add_argument("target", help="cube set path or s3:// URL")
    p.add_argument("--cube-version", "--version", dest="cube_version",
                   help="version id (default: the current one)")
    p.add_argument("--workers", type=int, default=8, help="parallel reads (default 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("gc", help="remove old versions, keeping the newest N and the current")
    p.add_argument("target", help="cube set path or s3:// URL")
    p.add_argument("--keep", type=int, required=True, help="versions to keep (>= 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_gc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the deepearth command")
