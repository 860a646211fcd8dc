"""A STAC catalogue of a cube set (pystac): one collection per cube, predictions as items.

``deepearth stac CUBESET [--out DIR]`` writes it (default ``CUBESET/stac/catalog.json``,
local or object store); the server builds the same catalogue at ``/deepearth/stac``.

Each collection carries its spatial and temporal extent, the datacube extension's
``cube:dimensions`` / ``cube:variables`` (every variable with dims, unit, description,
dtype), a Zarr asset and provenance under ``deepearth:*``: the source dataset and its
version, the recipe fingerprint, the cube set version, the float16 quantisation of the
vision features and which variables are derived (pooled vectors, UMAPs, attention
summaries, grid aggregates, predictions), with ``derived_from`` links between cubes.

Validation (:func:`validate_catalog`) runs offline: pystac ships the core STAC 1.1 JSON
schemas (catalog, collection, item) and checks every object against them. The datacube
extension's schema is not shipped by any package here, so extension fields are checked
structurally by reading them back through pystac's ``DatacubeExtension`` instead.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pystac
import xarray as xr
from pystac.extensions.datacube import DatacubeExtension

from . import schema as S
from .errors import CubeError

DATACUBE = "https://stac-extensions.github.io/datacube/v2.2.0/schema.json"
ZARR_MEDIA_TYPE = "application/vnd+zarr"
SOURCE_NAME = "DeepEarth Central Florida Native Plants"
SOURCE_VERSION = "0.2.0"
DESCRIPTIONS = {
    S.OBSERVATIONS: "One row per plant observation (gbif_id, time, position, species, split, "
                    "photo URLs), ordered by year and Hilbert curve position.",
    S.SPECIES: "The species: names, taxon ids, counts, the 7168-d DeepSeek-V3 language "
               "embedding, its 3-D UMAP, HDBSCAN clusters and display colours.",
    S.VISION: "One entry per vision embedding (gbif_id, image_number): V-JEPA 2 patch features "
              "(8 x 24 x 24 x 1408, float16), pooled vectors, UMAP, attention summaries.",
    S.GRID: "Gridded yearly aggregates (xcube multi-resolution pyramid): observation counts, "
            "species richness, Shannon diversity, vision counts, embedding RGB composite.",
}
DERIVED = {
    S.VISION: {"pooled": "mean of features over frames and patches",
               "umap": "3-D UMAP of the pooled vectors (cosine)",
               "attention": "per-patch reductions of the features (l2norm, variance, entropy, "
                            "pca1-5)",
               "umap_rgb": "3-D UMAP of the frame-mean patches as RGB",
               **{f"stat_{k}": v for k, v in S.IMAGE_STATS.items()}},
    S.SPECIES: {"umap": "3-D UMAP of the standardised language embeddings",
                "cluster": "HDBSCAN clusters of the language embeddings",
                "color": "colour from the UMAP position", "cluster_color": "cluster colour"},
}
DERIVED_FROM = {**{g: (S.OBSERVATIONS, S.VISION) for g in S.GRID_CUBES},
                S.VISION: (S.OBSERVATIONS,), S.OBSERVATIONS: (S.SPECIES,)}


class FsspecStacIO(pystac.StacIO):
    """pystac reads and writes through fsspec (local paths, s3://, ...)."""

    def __init__(self, storage_options: dict[str, Any] | None = None):
        super().__init__()
        self.storage_options = dict(storage_options or {})

    def read_text(self, source: Any, *args: Any, **kwargs: Any) -> str:
        with fsspec.open(str(source), "r", **self.storage_options) as f:
            return f.read()

    def write_text(self, dest: Any, txt: str, *args: Any, **kwargs: Any) -> None:
        href = str(dest)
        fs, path = fsspec.core.url_to_fs(href, **self.storage_options)
        parent = path.rsplit("/", 1)[0]
        if parent:
            fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(path, txt.encode())


def _iso(t: Any) -> str:
    return pd.Timestamp(t).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc(t: Any) -> dt.datetime:
    return pd.Timestamp(t).tz_localize("UTC").to_pydatetime() if pd.Timestamp(t).tz is None \
        else pd.Timestamp(t).to_pydatetime()


def _cube_url(cs: Any, cube: str) -> str:
    if hasattr(cs, "cube_url"):
        return cs.cube_url(cube)
    return f"{cs.url}/{S.CUBE_PATHS[cube]}"


def _open(cs: Any, cube: str) -> xr.Dataset | None:
    """The cube (level 0 of a pyramid), or None when this cube set has none of it."""
    url = _cube_url(cs, cube)
    if S.CUBE_PATHS[cube].endswith(".levels"):
        url = f"{url}/0.zarr"
    listed = cube in ((cs.manifest or {}).get("cubes") or {})
    try:
        return xr.open_zarr(url, consolidated=True, storage_options=cs.storage_options or None)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        if listed:
            raise CubeError(f"{url}: cube {cube} is listed in the manifest but cannot be "
                            f"opened ({exc})") from exc
        return None


def _dimensions(ds: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for dim, size in ds.sizes.items():
        if dim in ("lat", "lon") and dim in ds.coords and ds[dim].ndim == 1:
            v = ds[dim].values
            out[dim] = {"type": "spatial", "axis": "y" if dim == "lat" else "x",
                        "extent": [float(v.min()), float(v.max())], "reference_system": 4326}
            if len(v) > 1:
                out[dim]["step"] = float(abs(v[1] - v[0]))
        elif dim == "time" and "time" in ds.coords and ds["time"].dims == ("time",):
            v = ds["time"].values
            out[dim] = {"type": "temporal", "extent": [_iso(v.min()), _iso(v.max())]}
        elif dim in ds.coords and ds[dim].dtype.kind in "OUS" and size <= 64:
            out[dim] = {"type": "label", "values": [str(v) for v in ds[dim].values]}
        else:
            out[dim] = {"type": "index", "extent": [0, int(size) - 1], "step": 1,
                        "description": f"{int(size)} entries"}
    return out


def _variables(ds: Any, derived: dict[str, str]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, var in {**ds.coords, **ds.data_vars}.items():
        if name in ds.dims and name in ("lat", "lon", "time"):
            continue
        entry: dict[str, Any] = {
            "dimensions": list(var.dims),
            "type": "auxiliary" if name in ds.coords else "data",
            "description": str(var.attrs.get("long_name", name)),
            "deepearth:dtype": str(var.dtype),
        }
        unit = var.attrs.get("units")
        if unit:
            entry["unit"] = str(unit)
        if name in derived:
            entry["deepearth:derived"] = derived[name]
        out[str(name)] = entry
    return out


def _time_extent(ds: Any, fallback: list) -> list:
    if "time" in ds.variables:
        t = ds["time"].values
        t = t[~np.isnat(t)] if np.issubdtype(t.dtype, np.datetime64) else t
        if len(t):
            return [_utc(t.min()), _utc(t.max())]
    return fallback


def _source_info(cs: Any, attrs: dict) -> dict[str, Any]:
    """Source dataset name and version, from its dataset_info.json where reachable."""
    info: dict[str, Any] = {"dataset": SOURCE_NAME, "version": SOURCE_VERSION,
                            "layout": f"published layout v{SOURCE_VERSION}"}
    src = attrs.get("source")
    if src:
        info["path"] = str(src)
        try:
            with fsspec.open(f"{str(src).rstrip('/')}/dataset_info.json", "r",
                             **(cs.storage_options if "://" in str(src) else {})) as f:
                meta = json.load(f)
            info["version"] = str(meta.get("version", SOURCE_VERSION))
            info["synthetic"] = bool(meta.get("synthetic", False))
            if meta.get("name"):
                info["dataset"] = str(meta["name"])
        except (OSError, ValueError):  # the source is not reachable from here: layout version
            pass
    return info


def build_catalog(cubes: Any, storage_options: dict[str, Any] | None = None) -> pystac.Catalog:
    """The catalogue of a cube set (a URL or an opened :class:`~cube_gen.access.CubeSet`)."""
    from .access import CubeSet
    from .predictions import Predictions

    cs = cubes if isinstance(cubes, CubeSet) else CubeSet.open(str(cubes), storage_options)
    m = cs.manifest or {}
    bbox = m.get("bbox")
    if not bbox:
        raise CubeError(f"{cs.url}: the manifest has no bbox")
    obs = cs.observations
    t_all = _time_extent(obs, [None, None])
    version = getattr(cs, "version", None) or m.get("current")
    catalog = pystac.Catalog(
        id="deepearth-cube", title=f"DeepEarth Cube: {cs.url}",
        description="Analysis-ready Zarr cubes of the DeepEarth multimodal biodiversity data "
                    "(observations, V-JEPA 2 vision features, DeepSeek-V3 species embeddings).",
        extra_fields={"deepearth:cube_version": version, "deepearth:recipe": m.get("recipe"),
                      "deepearth:created": m.get("created")})
    collections: dict[str, pystac.Collection] = {}
    for cube in S.CUBES:
        ds = _open(cs, cube)
        if ds is None:
            continue
        attrs = dict(ds.attrs)
        extra: dict[str, Any] = {
            "deepearth:source": _source_info(cs, attrs),
            "deepearth:recipe": m.get("recipe") or attrs.get("deepearth_recipe"),
            "deepearth:cube_version": version,
            "deepearth:schema_version": attrs.get("deepearth_schema_version",
                                                  S.SCHEMA_VERSION),
            "deepearth:derived": sorted(DERIVED.get(cube, {})) or
                                 (sorted(ds.data_vars) if cube in S.GRID_CUBES else []),
        }
        if cube == S.VISION:
            arr = cs.zarr_array(S.VISION, "features") if hasattr(cs, "zarr_array") \
                else cs.features_array()
            extra["deepearth:quantisation"] = {
                "features": {"dtype": str(arr.dtype), "source_dtype": "float32 (published "
                             "parquet lists)", "native_precision": "float16 (the extractor's "
                             "output; float32 adds no information)",
                             "max_relative_error": float(np.finfo(np.float16).eps / 2)},
                "pooled": {"dtype": str(ds.pooled.dtype),
                           "computed_from": "float16 features, accumulated in float32"}}
        if cube in S.GRID_CUBES:
            extra["deepearth:grid"] = {k: attrs[k] for k in ("spatial_res", "time_period",
                                                             "num_levels") if k in attrs}
        coll = pystac.Collection(
            id=cube, title=str(attrs.get("title", cube)),
            description=DESCRIPTIONS.get(cube) or str(attrs.get("summary") or attrs.get(
                "title") or cube),
            license=str(attrs.get("license", "other")),
            extent=pystac.Extent(pystac.SpatialExtent([list(map(float, bbox))]),
                                 pystac.TemporalExtent([_time_extent(ds, t_all)])),
            keywords=["biodiversity", "embeddings", "zarr", "datacube"], extra_fields=extra,
            providers=[pystac.Provider("DeepEarth Cube", roles=[
                pystac.ProviderRole.PROCESSOR, pystac.ProviderRole.HOST])])
        dc = DatacubeExtension.ext(coll, add_if_missing=True)
        dc.apply(dimensions={k: pystac.extensions.datacube.Dimension.from_dict(v)
                             for k, v in _dimensions(ds).items()},
                 variables={k: pystac.extensions.datacube.Variable(v)
                            for k, v in _variables(ds, DERIVED.get(cube, {})).items()})
        coll.add_asset("zarr", pystac.Asset(
            _cube_url(cs, cube), title=f"{S.CUBE_PATHS[cube]} (Zarr v3, consolidated)",
            media_type=ZARR_MEDIA_TYPE, roles=["data"],
            extra_fields={"xarray:open_kwargs": {"consolidated": True, "engine": "zarr"}}))
        collections[cube] = coll
        catalog.add_child(coll)
    # predictions: one item per run
    store = Predictions.of(cs.url, cs.storage_options or None)
    runs = store.runs()
    if runs:
        pc = pystac.Collection(
            id="predictions", title="Model predictions",
            description="Per-embedding species predictions of training runs (deepearth train).",
            license="other", extent=pystac.Extent(
                pystac.SpatialExtent([list(map(float, bbox))]),
                pystac.TemporalExtent([[_utc(min(r["created"] for r in runs)),
                                        _utc(max(r["created"] for r in runs))]])),
            extra_fields={"deepearth:derived": ["predicted_species", "score", "correct"]})
        pc.add_link(pystac.Link("derived_from", collections[S.VISION]))
        for r in runs:
            w, s, e, n = map(float, bbox)
            item = pystac.Item(
                id=r["run_id"], bbox=[w, s, e, n], datetime=_utc(r["created"]),
                geometry={"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n],
                                                              [w, s]]]},
                properties={"title": r["run_name"], "deepearth:task": r["task"],
                            "deepearth:model": r["model"], "deepearth:features": r["features"],
                            "deepearth:metrics": r["metrics"],
                            "deepearth:cube_version": (r.get("cube") or {}).get("version"),
                            "deepearth:cube_recipe": (r.get("cube") or {}).get("recipe")})
            item.add_asset("zarr", pystac.Asset(store.target.url_of(r["path"]),
                                                media_type=ZARR_MEDIA_TYPE, roles=["data"]))
            pc.add_item(item)
        catalog.add_child(pc)
    for cube, parents in DERIVED_FROM.items():
        for p in parents:
            if cube in collections and p in collections:
                collections[cube].add_link(pystac.Link("derived_from", collections[p]))
    return catalog


def validate_catalog(catalog: pystac.Catalog) -> int:
    """Validate every object offline (after ``normalize_hrefs``); returns how many.

    Core STAC schemas: pystac's bundled copies (no network). Datacube fields: read back
    through ``DatacubeExtension`` (no schema is available offline for the extension).
    """
    from pystac.validation import validate_dict

    n = 0
    for obj in [catalog, *catalog.get_all_collections(), *catalog.get_items(recursive=True)]:
        d = obj.to_dict(include_self_link=False, transform_hrefs=False)
        validate_dict(d, extensions=[])  # core only: the bundled schemas
        if isinstance(obj, pystac.Collection) and DATACUBE in obj.stac_extensions:
            dc = DatacubeExtension.ext(obj)
            for name, dim in (dc.dimensions or {}).items():
                if not dim.dim_type:
                    raise pystac.STACValidationError(f"{obj.id}: dimension {name} has no type")
            for name, var in (dc.variables or {}).items():
                dims = set(var.dimensions)
                if not dims <= set(dc.dimensions or {}):
                    raise pystac.STACValidationError(
                        f"{obj.id}: variable {name} uses dimensions {sorted(dims)} not in "
                        f"cube:dimensions")
        n += 1
    return n


def write_stac(cubes: Any, out: str | None = None, storage_options: dict[str, Any] | None = None,
               validate: bool = True) -> str:
    """Write the catalogue (self-contained, relative links) and return catalog.json's URL."""
    from .access import CubeSet

    cs = cubes if isinstance(cubes, CubeSet) else CubeSet.open(str(cubes), storage_options)
    catalog = build_catalog(cs)
    out = (out or f"{cs.url}/stac").rstrip("/")
    io = FsspecStacIO(cs.storage_options if "://" in out else None)
    catalog.normalize_hrefs(out)
    if validate:
        validate_catalog(catalog)
    catalog.save(pystac.CatalogType.SELF_CONTAINED, stac_io=io)
    return f"{out}/catalog.json"


def catalog_dicts(cubes: Any, base_url: str) -> dict[str, dict[str, Any]]:
    """Every object of the catalogue as JSON, keyed by its path below ``base_url``.

    Links point below ``base_url`` (absolute), as an HTTP server serves them:
    ``catalog.json``, ``<collection>/collection.json``, ``predictions/<run>/<run>.json``.
    """
    catalog = build_catalog(cubes)
    base = base_url.rstrip("/")
    catalog.normalize_hrefs(base)
    catalog.catalog_type = pystac.CatalogType.ABSOLUTE_PUBLISHED
    out = {}
    for obj in [catalog, *catalog.get_all_collections(), *catalog.get_items(recursive=True)]:
        href = obj.get_self_href()
        out[href[len(base) + 1:]] = obj.to_dict(include_self_link=True, transform_hrefs=False)
    return out
