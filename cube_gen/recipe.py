"""Recipes: YAML data that says what to build from which source, where, and how.

``load_recipe(path)`` validates every key against :data:`RECIPE_SCHEMA` and fills in
defaults; each error names the key's path in the file and what is allowed.
See ``recipes/README.md`` for every key.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import yaml

from .errors import RecipeError

_COMPRESSORS = ("zstd", "lz4", "blosclz", "gzip", "none")

# Schema: key -> (type or tuple of types, default, check or None, help). Nested dicts
# are sub-schemas. A default of REQUIRED makes the key mandatory.
REQUIRED = object()


def _compressor_check(value):
    if value is None:
        return None
    if not isinstance(value, dict):
        return "expected a mapping like {name: zstd, level: 3} or null"
    unknown = set(value) - {"name", "level", "shuffle"}
    if unknown:
        return f"unknown key(s) {sorted(unknown)}; allowed: name, level, shuffle"
    if value.get("name") not in _COMPRESSORS:
        return f"name must be one of {', '.join(_COMPRESSORS)}"
    level = value.get("level", 3)
    if not isinstance(level, int) or not 0 <= level <= 22:
        return "level must be an integer in [0, 22]"
    if value.get("shuffle", "shuffle") not in ("shuffle", "bitshuffle", "noshuffle"):
        return "shuffle must be shuffle, bitshuffle or noshuffle"
    return None


def _positive_int(v):
    return None if isinstance(v, int) and not isinstance(v, bool) and v > 0 else \
        "expected a positive integer"


def _zarr_format(v):
    return None if v in (2, 3) else "expected 2 or 3"


def _bbox(v):
    if v is None:
        return None
    if (not isinstance(v, list) or len(v) != 4
            or not all(isinstance(x, int | float) for x in v)):
        return "expected [west, south, east, north] in degrees or null"
    w, s, e, n = v
    if not (-180 <= w < e <= 180 and -90 <= s < n <= 90):
        return "expected west < east within [-180, 180] and south < north within [-90, 90]"
    return None


def _period(v):
    import pandas as pd

    try:
        pd.tseries.frequencies.to_offset(v)
    except (ValueError, TypeError):
        return "expected a pandas period alias such as 1YS, QS or MS"
    return None


def _resolution(v):
    return None if isinstance(v, int | float) and 0.0001 <= v <= 1 else \
        "expected a cell size in degrees in [0.0001, 1]"


def _dtype(v):
    return None if v in ("float16", "float32") else "expected float16 or float32"


def _scheduler(v):
    if v is None or v in ("local", "synchronous", "threads") or (
            isinstance(v, str) and "://" in v):
        return None
    return "expected local, synchronous, threads or a scheduler address like tcp://host:8786"


def _grid_switches() -> list[str]:
    from .grid_variables import switches

    return switches()


def _grid_vars(v):
    from .grid_variables import switches

    if not isinstance(v, list) or not v:
        return "expected a non-empty list"
    allowed = switches()
    bad = [x for x in v if x not in allowed]
    return f"unknown variable(s) {bad}; allowed: {sorted(allowed)}" if bad else None


_ENCODING = {
    "compressor": ((dict, type(None)), {"name": "zstd", "level": 3}, _compressor_check,
                   "compressor of every variable"),
    "zarr_format": (int, 3, _zarr_format, "Zarr format"),
}

RECIPE_SCHEMA: dict[str, Any] = {
    "version": (int, 1, lambda v: None if v == 1 else "expected 1", "recipe format version"),
    "source": {
        "path": (str, REQUIRED, None, "source dataset folder or URL"),
        "storage_options": (dict, {}, None, "fsspec storage options"),
    },
    "target": {
        "path": (str, REQUIRED, None, "cube set folder or s3:// URL"),
        "storage_options": (dict, {}, None, "fsspec storage options"),
    },
    "cubes": {
        "observations": {
            **_ENCODING,
            "chunk_size": (int, 4096, _positive_int, "observations per chunk"),
        },
        "species": {**_ENCODING},
        "vision": {
            **_ENCODING,
            "compressor": ((dict, type(None)), None, _compressor_check,
                           "compressor of the features (null: raw, fastest reads)"),
            "dtype": (str, "float16", _dtype, "dtype of the stored features"),
            "shards": (int, None, lambda v: None if v is None else _positive_int(v),
                       "images per Zarr v3 shard of the features (null: no sharding)"),
            "pooled_chunk": (int, 4096, _positive_int, "images per chunk of pooled vectors"),
            "umap_rgb": (bool, True, None, "precompute per-image UMAP-RGB images"),
            "batch_size": (int, 8, _positive_int, "embeddings per task (memory bound)"),
        },
        "patches": {  # patch index (cube_gen/patch_index.py), added by H7
            "enabled": (bool, False, None, "build the patch index (patches.zarr)"),
            "kind": (str, "auto", lambda v: None if v in ("auto", "flat", "ivfpq")
                     else "expected auto, flat or ivfpq", "index kind"),
            "dims": (int, 256, _positive_int, "PCA dimensions of the IVF-PQ index"),
            "pq_bytes": (int, 32, _positive_int, "bytes per product-quantised patch"),
            "nlist": (int, None, lambda v: None if v is None else _positive_int(v),
                      "inverted lists (null: about 4 sqrt(patches))"),
            "nprobe": (int, 128, _positive_int, "lists searched per query (default)"),
            "rerank": (int, 400, _positive_int, "candidates re-ranked exactly (default)"),
            "train_patches": (int, 200_000, _positive_int, "training sample (patches)"),
            "exact_below": (int, 20_000, _positive_int, "flat index below this many patches"),
            "memory_budget_mb": (int, 2048, _positive_int, "the index must fit (MiB)"),
            "threads": (int, 1, _positive_int, "FAISS threads while building"),
        },
        "grid": {
            **_ENCODING,
            "zarr_format": (int, 2, _zarr_format, "Zarr format of the pyramid levels"),
            "resolution": ((int, float), 0.03, _resolution,
                           "finest cell size in degrees of the per-period and month-of-year "
                           "pyramids"),
            "all_years_resolution": ((int, float, type(None)), None,
                                     lambda v: None if v is None else _resolution(v),
                                     "finest cell size of the all-years and species pyramids "
                                     "(null: resolution / 2)"),
            "num_levels": (int, 6, lambda v: None if isinstance(v, int) and 1 <= v <= 12
                           else "expected an integer in [1, 12]", "levels of each pyramid"),
            "min_observations": (int, 5, _positive_int,
                                 "observations a cell needs for richness and diversity"),
            "period": (str, "1YS", _period, "time step (pandas alias)"),
            "bbox": ((list, type(None)), None, _bbox, "[west, south, east, north] or null"),
            "tile_size": (int, 256, _positive_int, "tile size of the pyramid"),
            "top_species": (int, 5, lambda v: None if isinstance(v, int) and 0 <= v <= 50
                            else "expected an integer in [0, 50]", "species count layers"),
            "variables": (list, _grid_switches(), _grid_vars, "grid variables"),
        },
    },
    "metadata": {
        "title": (str, "DeepEarth cube set", None, "ACDD title"),
        "summary": (str, "", None, "ACDD summary"),
        "license": (str, "CC-BY-4.0", None, "data license"),
        "creator_name": (str, "", None, "ACDD creator_name"),
        "creator_url": (str, "", None, "ACDD creator_url"),
        "institution": (str, "", None, "CF institution"),
        "references": (str, "", None, "CF references"),
        "keywords": (str, "", None, "ACDD keywords"),
    },
    "compute": {
        "scheduler": ((str, type(None)), "local", _scheduler,
                      "local (LocalCluster), synchronous, threads or a distributed address"),
        "n_workers": (int, 2, _positive_int, "workers of the local cluster"),
        "threads_per_worker": (int, 1, _positive_int, "threads per local worker"),
        "memory_limit": (str, "4GB", None, "memory limit per local worker"),
    },
}


@dataclass
class Recipe:
    """A validated recipe: ``data`` is the full mapping with defaults filled in."""

    data: dict
    file: str | None = None

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    @property
    def source(self) -> dict:
        return self.data["source"]

    @property
    def target(self) -> dict:
        return self.data["target"]

    @property
    def cubes(self) -> dict:
        return self.data["cubes"]

    def fingerprint(self) -> str:
        """Hash of what determines the cube contents: source, encodings, metadata.

        Compute settings, storage options and the target's location are left out, so a
        cube set copied elsewhere is still recognised as built by the same recipe.
        """
        relevant = {k: copy.deepcopy(v) for k, v in self.data.items()
                    if k not in ("compute", "target")}
        relevant["source"] = {"path": relevant["source"]["path"]}
        # scheduling granularity does not change the data
        relevant["cubes"]["vision"].pop("batch_size", None)
        blob = json.dumps(relevant, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _validate(data: Any, schema: dict, path: str, file: str | None) -> dict:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"expected a mapping, got {type(data).__name__}", file=file,
                          path=path or "(top level)")
    unknown = [k for k in data if k not in schema]
    if unknown:
        raise RecipeError(f"unknown key {unknown[0]!r}; allowed: {', '.join(schema)}", file=file,
                          path=f"{path}.{unknown[0]}" if path else unknown[0])
    out = {}
    for key, spec in schema.items():
        kpath = f"{path}.{key}" if path else key
        if isinstance(spec, dict):
            out[key] = _validate(data.get(key), spec, kpath, file)
            continue
        types, default, check, _help = spec
        if key not in data:
            if default is REQUIRED:
                raise RecipeError("missing required key", file=file, path=kpath)
            out[key] = copy.deepcopy(default)
            continue
        value = data[key]
        types_t = types if isinstance(types, tuple) else (types,)
        if isinstance(value, bool) and bool not in types_t:
            ok = False
        else:
            ok = isinstance(value, types_t) or (value is None and default is None)
        if not ok:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types_t)
            raise RecipeError(f"expected {names}, got {value!r}", file=file, path=kpath)
        if check is not None:
            problem = check(value)
            if problem:
                raise RecipeError(f"{problem}, got {value!r}", file=file, path=kpath)
        out[key] = value
    return out


def _set_path(data: dict, dotted: str, value: str) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise RecipeError("cannot override inside a non-mapping", path=dotted)
    node[keys[-1]] = yaml.safe_load(value)


def parse_recipe(data: Any, file: str | None = None,
                 overrides: dict[str, str] | None = None) -> Recipe:
    """Validate a recipe mapping; relative paths resolve against the recipe file's folder."""
    data = copy.deepcopy(data) if data is not None else {}
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a YAML mapping", file=file)
    for dotted, value in (overrides or {}).items():
        _set_path(data, dotted, value)
    valid = _validate(data, RECIPE_SCHEMA, "", file)
    base = os.path.dirname(os.path.abspath(file)) if file else os.getcwd()
    for section in ("source", "target"):
        p = valid[section]["path"]
        if "://" not in p and not os.path.isabs(p):
            valid[section]["path"] = os.path.normpath(os.path.join(base, p))
    return Recipe(valid, file)


def load_recipe(path: str, overrides: dict[str, str] | None = None) -> Recipe:
    """Read and validate a recipe YAML file."""
    if not os.path.exists(path):
        raise RecipeError("recipe file not found", file=path)
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise RecipeError(f"not valid YAML{where}: {getattr(exc, 'problem', exc)}",
                              file=path) from exc
    return parse_recipe(data, path, overrides)
