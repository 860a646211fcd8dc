"""The ``deepearth`` command line.

Core commands live here (``synth``, ``gen``, ``serve``, ``info``); others come from the
modules in :data:`COMMAND_MODULES`, each with ``add_commands(sub)`` adding subparsers
whose ``func(args) -> int`` runs them. Every command accepts ``--storage-options`` (a JSON
object of fsspec options; :func:`storage_options` parses it). Errors print one line:
exit 2 for usage, 1 for data or storage problems; ``DEEPEARTH_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any

from .errors import DeepEarthError, UsageError

# modules adding subcommands: add yours here (a module with add_commands(sub))
COMMAND_MODULES = ("cube_gen.release_cli", "cube_gen.ml_cli", "cube_gen.simulate_cli")


def storage_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--storage-options`` JSON object of a command line ({} when not given)."""
    text = getattr(args, "storage_options", None)
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--storage-options is not valid JSON ({exc.msg} at character "
                         f"{exc.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise UsageError(f"--storage-options must be a JSON object, got {text!r}")
    return value


def _cmd_synth(args: argparse.Namespace) -> int:
    from .synth import PRESETS, write_synthetic

    if storage_options(args) or "://" in args.out:
        raise UsageError("synth writes a local folder; copy it to object storage afterwards")
    if args.preset == "full" and not args.yes:
        p = PRESETS["full"]
        raise UsageError(f"preset 'full' writes {p.n_embeddings} embeddings (about 100 GB); "
                         "add --yes to confirm")
    path = write_synthetic(args.out, args.preset, seed=args.seed, overwrite=args.overwrite,
                           progress=not args.quiet)
    print(f"wrote synthetic dataset ({args.preset}, seed {args.seed}) to {path}")
    return 0


def _cmd_gen(args: argparse.Namespace) -> int:
    from .pipeline import run_recipe
    from .recipe import load_recipe

    overrides = {}
    for kv in args.set or []:
        if "=" not in kv:
            raise UsageError(f"--set expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        overrides[k] = v
    recipe = load_recipe(args.recipe, overrides=overrides)
    opts = storage_options(args)
    if opts:  # the target's options; also the source's when the recipe gives none
        recipe.target["storage_options"] = opts
        if not recipe.source.get("storage_options"):
            recipe.source["storage_options"] = opts
    result = run_recipe(recipe, progress=not args.quiet)
    print(f"cube set ready at {result}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from server.launch import serve

    storage_options(args)  # validated here: one line on bad JSON
    return serve(args.cubeset, port=args.port, address=args.address,
                 config_out=args.config_out, storage_options_json=args.storage_options,
                 dry_run=args.dry_run)


def _cmd_info(args: argparse.Namespace) -> int:
    from .access import CubeSet

    cs = CubeSet.open(args.cubeset, storage_options(args), version=args.cube_version)
    print(cs.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepearth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version="deepearth-cube 0.1.0")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic dataset in the published layout")
    p.add_argument("--preset", choices=["tiny", "demo", "full"], default="tiny")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.add_argument("--yes", action="store_true", help="confirm the 100 GB 'full' preset")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("gen", help="build a cube set from a recipe (publishes a new version)")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set target.path=/tmp/cubes")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_gen)

    p = sub.add_parser("serve", help="write an xcube server config for a cube set and serve it")
    p.add_argument("cubeset", help="cube set path or s3:// URL")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--address", default="127.0.0.1")
    p.add_argument("--config-out", help="where to write the config (default: a temp file)")
    p.add_argument("--dry-run", action="store_true", help="write and print the config only")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("info", help="describe a cube set (its current version, or --cube-version)")
    p.add_argument("cubeset", help="cube set path or s3:// URL")
    p.add_argument("--cube-version", help="a version id (see deepearth versions)")
    p.set_defaults(func=_cmd_info)

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    for p in sub.choices.values():  # every command accepts --storage-options
        if "--storage-options" not in p._option_string_actions:
            p.add_argument("--storage-options", metavar="JSON",
                           help='fsspec storage options, e.g. \'{"anon": true}\'')
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"deepearth {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the user, never a traceback
        if os.environ.get("DEEPEARTH_DEBUG"):
            raise
        print(f"deepearth {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    """The error as one line; foreign errors (botocore, OSError, ...) with their type."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, DeepEarthError | FileNotFoundError | FileExistsError):
        return text
    from .store import is_unavailable

    if is_unavailable(exc):
        return f"storage unavailable: {type(exc).__name__}: {text}"
    return f"{type(exc).__name__}: {text}"


if __name__ == "__main__":
    sys.exit(main())
