"""The ``deepearth`` command line: ``synth``, ``gen``, ``serve``, ``info``."""

from __future__ import annotations

import argparse
import sys

from .errors import DeepEarthError


def _cmd_synth(args: argparse.Namespace) -> int:
    from .synth import PRESETS, write_synthetic

    if args.preset == "full" and not args.yes:
        p = PRESETS["full"]
        print(f"preset 'full' writes {p.n_embeddings} embeddings (about 100 GB); "
              "add --yes to confirm", file=sys.stderr)
        return 2
    path = write_synthetic(args.out, args.preset, seed=args.seed, overwrite=args.overwrite,
                           progress=not args.quiet)
    print(f"wrote synthetic dataset ({args.preset}, seed {args.seed}) to {path}")
    return 0


def _cmd_gen(args: argparse.Namespace) -> int:
    from .pipeline import run_recipe
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, overrides=dict(kv.split("=", 1) for kv in args.set or []))
    result = run_recipe(recipe, progress=not args.quiet)
    print(f"cube set ready at {result}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from server.launch import serve

    return serve(args.cubeset, port=args.port, address=args.address,
                 config_out=args.config_out, storage_options_json=args.storage_options,
                 dry_run=args.dry_run)


def _cmd_info(args: argparse.Namespace) -> int:
    from .access import CubeSet

    cs = CubeSet.open(args.cubeset)
    print(cs.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepearth", description=__doc__)
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

    p = sub.add_parser("gen", help="build a cube set from a recipe")
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
    p.add_argument("--storage-options", help="JSON object of fsspec storage options")
    p.add_argument("--dry-run", action="store_true", help="write and print the config only")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("info", help="describe a cube set")
    p.add_argument("cubeset")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DeepEarthError, FileExistsError, FileNotFoundError) as exc:
        print(f"deepearth {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
