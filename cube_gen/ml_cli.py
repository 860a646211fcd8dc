"""``deepearth train``, ``deepearth predictions`` and ``deepearth stac`` (registered by cli.py)."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import DeepEarthError


def _overrides(items: list[str] | None) -> dict[str, str]:
    out = {}
    for kv in items or []:
        if "=" not in kv:
            raise DeepEarthError(f"--set expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        out[k] = v
    return out


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig.load(args.config, _overrides(args.set))
    try:
        result = train(cfg, progress=not args.quiet)
    except ValueError as exc:  # a bad split parameter etc.: name it, no traceback
        raise DeepEarthError(str(exc)) from exc
    shown = {k: round(v, 4) for k, v in result.metrics.items()}
    print(f"run {result.run_id} ({cfg['task']}, {cfg['model']['kind']}, {cfg['features']}) on "
          f"{result.cube_version['url']} version {result.cube_version['version'] or '-'}")
    print(json.dumps(shown, indent=1))
    if result.tracking_uri:
        print(f"MLflow: {result.tracking_uri}")
    if result.tensorboard_dir:
        print(f"TensorBoard: tensorboard --logdir {result.tensorboard_dir}")
    if result.predictions:
        print(f"predictions: {result.predictions}")
    return 0


def _cmd_predictions(args: argparse.Namespace) -> int:
    from .predictions import Predictions

    store = (Predictions(args.root, _json(args.storage_options)) if args.root
             else Predictions.of(args.cubeset, _json(args.storage_options)))
    if args.compare:
        print(json.dumps(store.compare(*args.compare, role=args.role), indent=1))
        return 0
    for r in store.runs():
        m = r["metrics"]
        top1 = m.get("test_top1")
        print(f"{r['run_id']}  {r['created']}  {r['task']:<9} {r['model']:<6} {r['features']:<6} "
              f"test_top1={'-' if top1 is None else f'{top1:.3f}'}  {r['run_name']}")
    return 0


def _cmd_stac(args: argparse.Namespace) -> int:
    from .stac import write_stac

    path = write_stac(args.cubeset, args.out, storage_options=_json(args.storage_options),
                      validate=not args.no_validate)
    print(f"STAC catalogue written to {path}")
    return 0


def _json(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DeepEarthError(f"--storage-options is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise DeepEarthError("--storage-options must be a JSON object")
    return value


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the ML and catalogue subcommands to the ``deepearth`` parser."""
    p = sub.add_parser("train", help="train a species probe or an alignment model (YAML config)")
    p.add_argument("config", help="training config YAML (see examples/train_probe.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=3")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("predictions", help="list the prediction runs of a cube set, or compare two")
    p.add_argument("cubeset", help="cube set path or s3:// URL")
    p.add_argument("--root", help="predictions folder (default: CUBESET/predictions)")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"))
    p.add_argument("--role", default="test", choices=["train", "test", "excluded"])
    p.add_argument("--storage-options", help="JSON object of fsspec storage options")
    p.set_defaults(func=_cmd_predictions)

    p = sub.add_parser("stac", help="write a STAC catalogue of a cube set")
    p.add_argument("cubeset", help="cube set path or s3:// URL")
    p.add_argument("--out", help="output folder (default: CUBESET/stac)")
    p.add_argument("--storage-options", help="JSON object of fsspec storage options")
    p.add_argument("--no-validate", action="store_true", help="skip JSON-schema validation")
    p.set_defaults(func=_cmd_stac)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the deepearth command")
