"""The ``deepearth simulate`` command (:mod:`cube_gen.simulate`; imported lazily)."""

from __future__ import annotations

from .errors import UsageError


def _cmd_simulate(args) -> int:
    from .cli import storage_options
    from .simulate import simulate

    if storage_options(args) or "://" in args.out:
        raise UsageError("simulate writes a local folder; copy it to object storage afterwards")
    result = simulate(args.out, args.scale, args.materialise, args.seed, args.source,
                      progress=not args.quiet, overwrite=args.overwrite,
                      projection=args.projection)
    c = result["counts"]
    took = ", ".join(f"{k} {v:.1f} s" for k, v in result["seconds"].items())
    print(f"simulated cube set (scale {args.scale}: {c['observations']} observations, "
          f"{c['images']} embeddings, {len(result['simulated']['materialised'])} materialised) "
          f"at {result['url']}; source at {result['simulated']['source']}; {took}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("simulate", help="a cube set at N x the published counts (scale tests); "
                       "full tensors for a sample only")
    p.add_argument("--scale", type=float, required=True,
                   help="times the published counts (33,665 observations, 7,949 embeddings)")
    p.add_argument("--out", required=True, help="cube set folder")
    p.add_argument("--materialise", type=int, default=32, metavar="K",
                   help="images with full feature tensors and attention maps (default 32)")
    p.add_argument("--source", help="simulated source folder (default: OUT-source)")
    p.add_argument("--projection", default="auto",
                   choices=("auto", "recipe", "approximate", "pca"),
                   help="whole-set vision UMAP: auto or recipe: the recipe's (exact neighbours "
                        "up to 50,000 images, approximate above), approximate (at any size), "
                        "or PCA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace existing folders")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_simulate)
