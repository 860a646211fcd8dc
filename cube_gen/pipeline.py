"""Run a recipe: read -> index -> derive -> encode -> write, on Dask.

Stages, each resumable and each publishing its cube when complete:
vision (Dask tasks that stream embeddings), species, observations, grid; the manifest
``cubeset.json`` is written last. A cube already published by the same recipe is
left as it is, so re-running a finished recipe changes nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import time
import warnings

import numpy as np
import pandas as pd
import xarray as xr
import zarr
from tqdm.auto import tqdm

from . import __version__
from . import derive as D
from . import schema as S
from . import source_layout as L
from .encode import dataset_from_spec, encoding_for, open_staged_template, write_dataset
from .index import chunk_extents, order_images, order_observations, species_table
from .reader import SourceDataset
from .recipe import Recipe
from .store import Target, zarr_store
from .vision_stage import finished_parts, load_parts, plan_tasks, run_task

warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")


# -- Dask ----------------------------------------------------------------------------------
@contextlib.contextmanager
def dask_client(compute: dict):
    """A distributed client for the recipe's ``compute`` section, or None for in-process."""
    scheduler = compute.get("scheduler") or "local"
    if scheduler in ("synchronous", "threads"):
        yield None
        return
    from distributed import Client, LocalCluster

    if scheduler == "local":
        with LocalCluster(n_workers=compute["n_workers"],
                          threads_per_worker=compute["threads_per_worker"],
                          memory_limit=compute["memory_limit"], processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            yield client
    else:
        with Client(scheduler) as client:
            yield client


# -- helpers -------------------------------------------------------------------------------
def _cube_attrs(recipe: Recipe, cube: str, extra: dict | None = None) -> dict:
    meta = recipe["metadata"]
    attrs = {
        "Conventions": "CF-1.10, ACDD-1.3",
        "title": f"{meta['title']}: {cube}",
        "summary": meta["summary"],
        "license": meta["license"],
        "creator_name": meta["creator_name"],
        "creator_url": meta["creator_url"],
        "institution": meta["institution"],
        "references": meta["references"],
        "keywords": meta["keywords"],
        "source": recipe.source["path"],
        "history": f"deepearth-cube {__version__} gen",
        "date_created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "deepearth_cube": cube,
        "deepearth_schema_version": S.SCHEMA_VERSION,
        "deepearth_recipe": recipe.fingerprint(),
    }
    attrs.update(extra or {})
    return {k: v for k, v in attrs.items() if v != ""}


def _done_marker(target: Target, cube: str) -> str:
    return target.staging(f"{S.CUBE_PATHS[cube]}.done")


def _mark_staged(target: Target, cube: str, fingerprint: str) -> None:
    """Record that the staged cube is complete (written after its last byte)."""
    target.write_json(_done_marker(target, cube), {"recipe": fingerprint})


def _state(target: Target, cube: str, fingerprint: str) -> str:
    """``published`` (final path, this recipe), ``staged`` (complete in staging) or ``todo``."""
    if _published(target, cube, fingerprint):
        return "published"
    marker = target.read_json(_done_marker(target, cube))
    if marker and marker.get("recipe") == fingerprint and target.fs.exists(
            target.staging(S.CUBE_PATHS[cube])):
        return "staged"
    return "todo"


def _published(target: Target, cube: str, fingerprint: str) -> bool:
    path = target.path(S.CUBE_PATHS[cube])
    if cube == S.GRID:
        meta = target.read_json(f"{path}/0.zarr/zarr.json") or target.read_json(
            f"{path}/0.zarr/.zattrs")
        attrs = (meta or {}).get("attributes", meta or {})
    else:
        meta = target.read_json(f"{path}/zarr.json")
        attrs = (meta or {}).get("attributes", {})
    return attrs.get("deepearth_recipe") == fingerprint


def _labels(names) -> np.ndarray:
    """String labels as variable-length strings (Zarr v3 has no fixed-width string spec)."""
    return np.asarray(list(names), dtype=object)


STAGE_SECONDS: dict[str, float] = {}  # wall time of each stage of the last run (benchmarks)


class _Stage:
    def __init__(self, name: str, progress: bool):
        self.name = name
        self.progress = progress
        self.t0 = time.perf_counter()

    def done(self, note: str = "") -> None:
        seconds = time.perf_counter() - self.t0
        STAGE_SECONDS[self.name] = seconds
        if self.progress:
            tqdm.write(f"[{self.name}] done in {seconds:.1f} s {note}")


# -- the run -------------------------------------------------------------------------------
def run_recipe(recipe: Recipe, progress: bool = True) -> str:
    """Build (or finish building) the cube set of ``recipe``; returns the target URL."""
    target = Target(recipe.target["path"], recipe.target["storage_options"])
    fingerprint = recipe.fingerprint()
    manifest = target.read_json(target.path(S.MANIFEST))
    if manifest and manifest.get("recipe") == fingerprint and all(
            _published(target, c, fingerprint) for c in S.CUBES):
        if progress:
            tqdm.write(f"cube set at {target.url} is up to date")
        return target.url

    # read and validate the whole source before touching the target
    STAGE_SECONDS.clear()
    stage = _Stage("read", progress)
    source = SourceDataset(recipe.source["path"], recipe.source["storage_options"])
    obs_raw = source.read_observations()
    vindex = source.read_vision_index(obs_raw)
    language = source.read_species_language()
    stage.done(f"({len(obs_raw)} observations, {len(vindex)} embeddings)")

    species = species_table(obs_raw, language)
    bbox = (float(obs_raw.longitude.min()), float(obs_raw.latitude.min()),
            float(obs_raw.longitude.max()), float(obs_raw.latitude.max()))
    obs = order_observations(obs_raw, species, bbox)
    images = order_images(vindex, obs)

    # Build every cube that is neither published nor staged by this recipe. Nothing at
    # the final paths changes until all cubes are staged, so a source error found while
    # streaming embeddings leaves a previously published cube set untouched.
    state = {c: _state(target, c, fingerprint) for c in S.CUBES}
    if state[S.VISION] == "todo":
        pooled = build_vision(recipe, target, images, species, progress)
    else:  # staged or published by an earlier run: read the pooled vectors back
        vision_url = target.url_of(S.CUBE_PATHS[S.VISION]) if state[S.VISION] == "published" \
            else target.staging_url(S.CUBE_PATHS[S.VISION])
        pooled = xr.open_zarr(vision_url, storage_options=target.storage_options or None,
                              consolidated=True)["pooled"].values
    if state[S.SPECIES] == "todo":
        build_species(recipe, target, species, images, progress)
    if state[S.OBSERVATIONS] == "todo":
        build_observations(recipe, target, obs, images, progress)
    if state[S.GRID] == "todo":
        build_grid(recipe, target, obs, images, pooled, species, progress)

    # Publish: the manifest goes first (the set is incomplete from here on) and comes back
    # last; each cube moves into place whole.
    target.remove(target.path(S.MANIFEST))
    for cube in S.CUBES:
        if _state(target, cube, fingerprint) == "staged":
            name = S.CUBE_PATHS[cube]
            target.publish(target.staging(name), target.path(name))
            target.remove(_done_marker(target, cube))
    target.write_json(target.path(S.MANIFEST), {
        "recipe": fingerprint,
        "schema_version": S.SCHEMA_VERSION,
        "generator": f"deepearth-cube {__version__}",
        "cubes": S.CUBE_PATHS,
        "counts": {"observations": len(obs), "species": len(species), "images": len(images)},
        "bbox": bbox,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    })
    target.remove(target.staging())
    return target.url


# -- vision --------------------------------------------------------------------------------
def build_vision(recipe: Recipe, target: Target, images: pd.DataFrame, species: pd.DataFrame,
                 progress: bool) -> np.ndarray:
    stage = _Stage("vision", progress)
    cfg = recipe.cubes["vision"]
    fingerprint = recipe.fingerprint()
    name = S.CUBE_PATHS[S.VISION]
    staged_url = target.staging_url(name)
    parts_url = target.staging_url("vision.parts")
    n = len(images)
    shard = cfg["shards"]

    # (re)create the staged template unless it belongs to this recipe
    template = open_staged_template(staged_url, target.storage_options)
    if template is None or template.attrs.get("deepearth_recipe") != fingerprint:
        target.remove(_done_marker(target, S.VISION))
        target.remove(target.staging(name))
        target.remove(target.staging("vision.parts"))
        coords = {
            "gbif_id": images.gbif_id.to_numpy(np.int64),
            "image_number": images.image_number.to_numpy(np.int16),
            "time": images.time.to_numpy("datetime64[ns]"),
            "lat": images.lat.to_numpy(np.float64),
            "lon": images.lon.to_numpy(np.float64),
        }
        data = {
            "obs_index": images.obs_index.to_numpy(np.int64),
            "species_index": images.species_index.to_numpy(np.int32),
            "split": images.split.to_numpy(np.int8),
        }
        lazy = ("features", "attention", "pooled", "umap", "umap_rgb",
                *[f"stat_{k}" for k in S.IMAGE_STATS])
        sizes = {"image": n, "frame": L.N_FRAMES, "patch_y": L.N_PATCH, "patch_x": L.N_PATCH,
                 "feature": L.N_FEATURES, "attention_method": len(S.ATTENTION_METHODS),
                 "attention_frame": len(S.ATTENTION_FRAMES), "umap_axis": 3, "rgb": 3}
        dtypes = {"features": cfg["dtype"]}
        ds = dataset_from_spec(S.VISION_VARS, coords, data, lazy, sizes, dtypes)
        ds = ds.assign_coords(attention_method=_labels(S.ATTENTION_METHODS),
                              attention_frame=_labels(S.ATTENTION_FRAMES),
                              umap_axis=_labels(S.UMAP_AXES), rgb=_labels(S.RGB))
        ds.attrs.update(_cube_attrs(recipe, S.VISION, {
            "deepearth_status": "building",
            "features_dtype": cfg["dtype"],
        }))
        chunks = {"features": (shard or 1, L.N_FRAMES, L.N_PATCH, L.N_PATCH, L.N_FEATURES),
                  "attention": (1, len(S.ATTENTION_METHODS), len(S.ATTENTION_FRAMES),
                                L.N_PATCH, L.N_PATCH) if not shard else
                  (shard, len(S.ATTENTION_METHODS), len(S.ATTENTION_FRAMES), L.N_PATCH, L.N_PATCH),
                  "pooled": (min(cfg["pooled_chunk"], max(n, 1)), L.N_FEATURES)}
        enc = encoding_for(ds, S.VISION_VARS, cfg, chunks, n_rows={"image": n})
        if shard:
            enc["features"]["shards"] = (shard, L.N_FRAMES, L.N_PATCH, L.N_PATCH, L.N_FEATURES)
            enc["features"]["chunks"] = (1, L.N_FRAMES, L.N_PATCH, L.N_PATCH, L.N_FEATURES)
        write_dataset(ds, staged_url, target.storage_options, enc, cfg["zarr_format"],
                      compute=False)

    # Dask tasks: stream the embeddings into the staged cube
    tasks = plan_tasks(images, cfg["batch_size"], shard)
    done = finished_parts(parts_url, target.storage_options)
    todo = [t for t in tasks if t.name not in done]
    args = (recipe.source["path"], recipe.source["storage_options"], staged_url,
            target.storage_options, parts_url, cfg["dtype"], cfg["umap_rgb"])
    bar = tqdm(total=len(images), initial=n - sum(len(t.images) for t in todo),
               desc="vision embeddings", unit="emb", disable=not progress)
    with dask_client(recipe["compute"]) as client:
        if client is None:
            for t in todo:
                run_task(t, *args)
                bar.update(len(t.images))
        else:
            from distributed import as_completed

            futures = {client.submit(run_task, t, *args, key=f"vision-{t.name}-{fingerprint}",
                                     pure=False): t for t in todo}
            try:
                for fut in as_completed(futures):
                    fut.result()  # re-raises a task's error here, naming its file and row
                    bar.update(len(futures[fut].images))
            except BaseException:
                client.cancel(list(futures))
                raise
    bar.close()

    parts = load_parts(parts_url, target.storage_options, n, L.N_FEATURES, L.N_PATCH)
    pooled = parts["pooled"]
    coords3, method = D.vision_projection(pooled)
    group = zarr.open_group(zarr_store(staged_url, target.storage_options), mode="r+")
    group["pooled"][:] = pooled
    group["umap"][:] = coords3
    group["umap_rgb"][:] = parts["umap_rgb"]
    for i, k in enumerate(S.IMAGE_STATS):
        group[f"stat_{k}"][:] = parts["stats"][:, i]
    group["umap"].attrs["projection_method"] = method
    group["umap_rgb"].attrs["computed"] = bool(cfg["umap_rgb"])
    group.attrs["deepearth_status"] = "complete"
    zarr.consolidate_metadata(group.store)
    _mark_staged(target, S.VISION, fingerprint)
    target.remove(target.staging("vision.parts"))
    stage.done(f"({n} embeddings)")
    return pooled


# -- species -------------------------------------------------------------------------------
def build_species(recipe: Recipe, target: Target, species: pd.DataFrame, images: pd.DataFrame,
                  progress: bool) -> None:
    stage = _Stage("species", progress)
    cfg = recipe.cubes["species"]
    language = np.stack(species.language_embedding.to_numpy()).astype(np.float32)
    coords3, cluster, colors, cluster_colors, method = D.species_projection(language)
    vision_count = np.bincount(images.species_index.to_numpy(), minlength=len(species))
    data = {
        "taxon_id": species.taxon_id.to_numpy(object),
        "taxon_name": species.taxon_name.to_numpy(object),
        "genus": species.genus.to_numpy(object),
        "observation_count": species.observation_count.to_numpy(np.int32),
        "vision_count": vision_count.astype(np.int32),
        "language_embedding": language,
        "umap": coords3,
        "cluster": cluster,
        "color": np.asarray(colors, object),
        "cluster_color": np.asarray(cluster_colors, object),
    }
    ds = dataset_from_spec(S.SPECIES_VARS, {}, data, (), {})
    ds = ds.assign_coords(species=np.arange(len(species), dtype=np.int32),
                          umap_axis=_labels(S.UMAP_AXES))
    ds = ds.set_coords(["taxon_id", "taxon_name"])
    ds["umap"].attrs["projection_method"] = method
    ds.attrs.update(_cube_attrs(recipe, S.SPECIES, {"n_clusters": int(cluster.max()) + 1}))
    _write_staged(recipe, target, S.SPECIES, ds, encoding_for(ds, S.SPECIES_VARS, cfg, {}), cfg)
    stage.done(f"({len(species)} species, {int(cluster.max()) + 1} clusters, {method})")


# -- observations --------------------------------------------------------------------------
def build_observations(recipe: Recipe, target: Target, obs: pd.DataFrame, images: pd.DataFrame,
                       progress: bool) -> None:
    stage = _Stage("observations", progress)
    cfg = recipe.cubes["observations"]
    n = len(obs)
    max_images = max(int(obs.num_images.max()) if n else 0, 1)
    urls = np.full((n, max_images), "", dtype=object)
    for i, lst in enumerate(obs.image_urls):
        if lst is not None and len(lst):
            urls[i, : len(lst)] = list(lst)
    num_emb = np.bincount(images.obs_index.to_numpy(), minlength=n).astype(np.int16)
    gid = obs.gbif_id.to_numpy(np.int64)
    order = np.argsort(gid, kind="stable")
    ext = chunk_extents(obs, cfg["chunk_size"])
    coords = {"gbif_id": gid, "time": obs.time.to_numpy("datetime64[ns]"),
              "lat": obs.latitude.to_numpy(np.float64), "lon": obs.longitude.to_numpy(np.float64)}
    data = {
        "species_index": obs.species_index.to_numpy(np.int32),
        "taxon_id": obs.taxon_id.to_numpy(object),
        "split": obs.split_code.to_numpy(np.int8),
        "has_vision": obs.has_vision.to_numpy(bool),
        "num_images": obs.num_images.to_numpy(np.int16),
        "num_embeddings": num_emb,
        "time_precision": obs.time_precision.to_numpy(np.int8),
        "image_urls": urls,
        "gbif_id_sorted": gid[order],
        "gbif_id_order": order.astype(np.int64),
        **{f"chunk_{k}": v for k, v in ext.items()},
    }
    ds = dataset_from_spec(S.OBSERVATION_VARS, coords, data, (), {})
    ds.attrs.update(_cube_attrs(recipe, S.OBSERVATIONS, {
        "obs_chunk_size": cfg["chunk_size"],
        "ordering": "year, then Hilbert curve position of (lat, lon)",
        "geospatial_lat_min": float(ext["lat_min"].min()) if n else None,
        "geospatial_lat_max": float(ext["lat_max"].max()) if n else None,
        "geospatial_lon_min": float(ext["lon_min"].min()) if n else None,
        "geospatial_lon_max": float(ext["lon_max"].max()) if n else None,
    }))
    chunks = {v: (cfg["chunk_size"],) + ((max_images,) if v == "image_urls" else ())
              for v in ds.data_vars if "obs" in ds[v].dims}
    for c in ("gbif_id", "time", "lat", "lon"):
        chunks[c] = (cfg["chunk_size"],)
    chunks["gbif_id_sorted"] = chunks["gbif_id_order"] = (max(cfg["chunk_size"] * 4, 1),)
    enc = encoding_for(ds, S.OBSERVATION_VARS, cfg, chunks, n_rows={"obs": n})
    _write_staged(recipe, target, S.OBSERVATIONS, ds, enc, cfg)
    stage.done(f"({n} observations)")


def _write_staged(recipe: Recipe, target: Target, cube: str, ds: xr.Dataset, enc: dict,
                  cfg: dict) -> None:
    name = S.CUBE_PATHS[cube]
    target.remove(_done_marker(target, cube))
    target.remove(target.staging(name))
    write_dataset(ds, target.staging_url(name), target.storage_options, enc, cfg["zarr_format"])
    _mark_staged(target, cube, recipe.fingerprint())


# -- grid ----------------------------------------------------------------------------------
def grid_levels(ny: int, nx: int, tile: int) -> int:
    return 1 + max(0, math.ceil(math.log2(max(ny, nx) / tile))) if max(ny, nx) > tile else 1


def build_grid(recipe: Recipe, target: Target, obs: pd.DataFrame, images: pd.DataFrame,
               pooled: np.ndarray, species: pd.DataFrame, progress: bool) -> None:
    stage = _Stage("grid", progress)
    cfg = recipe.cubes["grid"]
    res = float(cfg["resolution"])
    tile = cfg["tile_size"]
    if cfg["bbox"]:
        bbox = tuple(cfg["bbox"])
    else:
        bbox = (float(obs.longitude.min()), float(obs.latitude.min()),
                float(obs.longitude.max()), float(obs.latitude.max()))
    lat0, lon0, _ = D.grid_axes(bbox, res)
    num_levels = grid_levels(len(lat0), len(lon0), tile)
    # pad level 0 so that every level halves exactly
    m = 1 << (num_levels - 1)
    w, n_edge = lon0[0] - res / 2, lat0[0] + res / 2
    nx = -(-len(lon0) // m) * m
    ny = -(-len(lat0) // m) * m
    bins = D.time_bins(obs.time.to_numpy(), cfg["period"])
    variables = cfg["variables"]
    rgb = D.rgb_components(pooled) if "embedding_rgb" in variables else None
    counts_all = obs.groupby("species_index").size().sort_values(ascending=False, kind="stable")
    top = list(counts_all.index[: cfg["top_species"]])
    name = S.CUBE_PATHS[S.GRID]
    staged = target.staging(name)
    target.remove(_done_marker(target, S.GRID))
    target.remove(staged)
    target.fs.mkdirs(staged, exist_ok=True)
    target.write_json(f"{staged}/.zlevels", {
        "version": "1.0", "num_levels": num_levels, "tile_size": [tile, tile],
        "agg_methods": {"observation_count": "sum", "vision_count": "sum"},
    })
    for level in range(num_levels):
        r = res * (1 << level)
        lx, ly = nx >> level, ny >> level
        lon = np.round(w + (np.arange(lx) + 0.5) * r, 10)
        lat = np.round(n_edge - (np.arange(ly) + 0.5) * r, 10)
        agg = D.grid_aggregates(obs.latitude.to_numpy(), obs.longitude.to_numpy(),
                                obs.time.to_numpy(), obs.species_index.to_numpy(), bins, lat, lon, r)
        ok, cell = agg.pop("_cell")
        size = len(bins) * ly * lx
        shape = (len(bins), ly, lx)
        layers = {k: agg[k] for k in ("observation_count", "species_richness", "shannon_diversity")
                  if k in variables}
        vis = D.grid_aggregates(images.lat.to_numpy(), images.lon.to_numpy(), images.time.to_numpy(),
                                images.species_index.to_numpy(), bins, lat, lon, r)
        vok, vcell = vis.pop("_cell")
        if "vision_count" in variables:
            layers["vision_count"] = vis["observation_count"]
        if rgb is not None:
            for i, c in enumerate(S.RGB):
                layers[f"embedding_{c}"] = D.grid_mean(vok, vcell, rgb[:, i], size).reshape(shape)
        sp = obs.species_index.to_numpy()
        for s_idx in top:
            sel = sp[ok] == s_idx
            layers[S.TOP_SPECIES_PREFIX + S.species_slug(species.taxon_name.iat[s_idx])] = \
                np.bincount(cell[sel], minlength=size).astype(np.float32).reshape(shape)
        ds = xr.Dataset(
            {k: (("time", "lat", "lon"), v) for k, v in layers.items()},
            coords={"time": bins.values, "lat": lat, "lon": lon},
        )
        for k in ds.data_vars:
            spec = S.GRID_VARS.get(k)
            if spec is not None:
                ds[k].attrs.update(spec.attrs)
            else:
                s_name = k[len(S.TOP_SPECIES_PREFIX):]
                full = next(t for t in species.taxon_name if S.species_slug(t) == s_name)
                ds[k].attrs.update({"long_name": f"observations of {full}", "units": "1",
                                    "taxon_name": full, "color_value_max": 10.0})
        ds["lat"].attrs.update(S.LAT_ATTRS)
        ds["lon"].attrs.update(S.LON_ATTRS)
        ds["time"].attrs.update({"long_name": "start of period", "standard_name": "time"})
        ds = _with_bounds(ds, r, bins, cfg["period"])
        ds.attrs.update(_cube_attrs(recipe, S.GRID, {
            "level": level, "num_levels": num_levels, "spatial_res": r, "time_period": cfg["period"],
            "geospatial_lon_min": float(w), "geospatial_lon_max": float(w + nx * res),
            "geospatial_lat_min": float(n_edge - ny * res), "geospatial_lat_max": float(n_edge),
            "top_species": [species.taxon_name.iat[s] for s in top],
        }))
        chunks = {k: (1, min(tile, ly), min(tile, lx)) for k in ds.data_vars if k in layers}
        enc = encoding_for(ds, {}, cfg, chunks)
        write_dataset(ds, target.staging_url(name, f"{level}.zarr"), target.storage_options, enc,
                      cfg["zarr_format"])
    _mark_staged(target, S.GRID, recipe.fingerprint())
    stage.done(f"({num_levels} levels, {len(bins)} time steps, {nx} x {ny} cells at level 0)")


def _with_bounds(ds: xr.Dataset, res: float, bins: pd.DatetimeIndex, period: str) -> xr.Dataset:
    lat, lon = ds.lat.values, ds.lon.values
    ends = (bins + pd.tseries.frequencies.to_offset(period)).values
    ds = ds.assign_coords(
        lat_bnds=(("lat", "bnds"), np.stack([lat + res / 2, lat - res / 2], axis=1)),
        lon_bnds=(("lon", "bnds"), np.stack([lon - res / 2, lon + res / 2], axis=1)),
        time_bnds=(("time", "bnds"), np.stack([bins.values, ends], axis=1)),
    )
    ds["lat"].attrs["bounds"] = "lat_bnds"
    ds["lon"].attrs["bounds"] = "lon_bnds"
    ds["time"].attrs["bounds"] = "time_bnds"
    return ds
