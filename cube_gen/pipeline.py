"""Run a recipe: read -> index -> derive -> encode -> write, on Dask, as stages.

A :class:`Stage` writes its cubes into the target's staging area; one runner
(:func:`run_recipe`) owns staging, done markers (a resumed run skips finished stages)
and publishing: every build becomes a new immutable version of the cube set
(:mod:`cube_gen.release`), made current by one atomic write of ``cubeset.json``.
Built-in stages: vision (Dask tasks that stream embeddings), species, observations,
grid; other modules add theirs with :func:`register_stage`. Re-running a recipe over
an unchanged source changes nothing; embeddings whose content digest the current
release holds are reused (:mod:`cube_gen.incremental`).

Stage reuse (one mechanism, in the runner): a stage declares ``inputs``, named content
digests of exactly what it reads (source files, recipe sections, the image table, the
pooled vectors), to which the runner adds its code format (stage version, schema and
package version, outputs). The release manifest records every stage's key
(``stage_inputs``). When the previous release holds the same key, the stage's outputs are
taken from it (hard links on disk, server-side copies on S3) instead of being built; when
only inputs named by the stage's :class:`Refresh` differ (the embeddings), the outputs are
taken without the arrays derived from those inputs, and the refresh rewrites just these.
Any other difference, or a previous release without keys, builds the stage in full.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
import zarr
from tqdm.auto import tqdm

from . import __version__
from . import derive as D
from . import schema as S
from . import source_layout as L
from .compute import BuildCompute
from .encode import dataset_from_spec, encoding_for, open_staged_template, write_dataset
from .errors import CubeError
from .incremental import (
    content_digest,
    files_digest,
    recipe_digest,
    reuse_mode,
    reuse_vision,
    reused_images,
    row_digests,
    source_digest,
    source_files,
    take_for_refresh,
    vision_config_key,
)
from .index import chunk_extents, order_images, order_observations, species_table
from .reader import SourceDataset
from .recipe import Recipe
from .release import Resolved, publish, resolve
from .store import Target, zarr_store
from .vision_stage import finished_parts, load_parts, plan_tasks, run_task

warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")


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


# -- stages and the runner -----------------------------------------------------------------
@dataclass
class BuildContext:
    """What a stage sees: the recipe, the target, the source tables, earlier results.

    A stage writes only below :meth:`staging_url` / :meth:`staging_path` of its outputs.
    """

    recipe: Recipe
    target: Target
    fingerprint: str
    progress: bool
    tables: dict[str, Any]  # obs, images, species, bbox, source_files, row_digests
    results: dict[str, Any] = field(default_factory=dict)
    previous: Resolved | None = None  # the current release before this build
    compute: BuildCompute | None = None  # the build's Dask client (one cluster per build)

    def staging_url(self, *parts: str) -> str:
        return self.target.staging_url(*parts)

    def staging_path(self, *parts: str) -> str:
        return self.target.staging(*parts)


@dataclass(frozen=True)
class Refresh:
    """How a stage brings the previous release's outputs up to date when only some of its
    inputs changed.

    ``inputs``: the names of the stage's inputs that may differ; ``arrays(recipe)``:
    ``{output path: array paths inside it}`` computed from those inputs, whose chunks are
    not taken from the previous release; ``run(ctx)`` writes exactly these arrays into the
    staged outputs (:func:`cube_gen.encode.rewrite_arrays`). Every other array of the
    outputs must depend only on the unchanged inputs.
    """

    inputs: tuple[str, ...]
    arrays: Callable[[Recipe], dict[str, tuple[str, ...]]]
    run: Callable[[BuildContext], Any]


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline, registered with :func:`register_stage`.

    ``outputs``: cube paths it writes (or a function of the recipe giving them);
    ``build(ctx)`` writes them into staging and returns a result kept in
    ``ctx.results[name]``; ``reload(ctx)`` gives that result again when the stage is
    skipped because its staged outputs are complete (a resumed run); ``needs``: stages
    whose results it reads; ``enabled(recipe)``: whether the recipe asks for it.

    Reuse (see the module docstring): ``inputs(ctx)`` gives named content digests of
    everything the stage reads (None: always built); ``version``: its output format, to
    be raised whenever the code writes something different from the same inputs;
    ``refresh``: a partial rebuild (:class:`Refresh`). A reused stage's result is None,
    so a stage that others ``need`` declares no inputs.
    """

    name: str
    outputs: tuple[str, ...] | Callable[[Recipe], tuple[str, ...]]
    build: Callable[[BuildContext], Any]
    needs: tuple[str, ...] = ()
    reload: Callable[[BuildContext], Any] | None = None
    enabled: Callable[[Recipe], bool] | None = None
    inputs: Callable[[BuildContext], dict[str, str]] | None = None
    version: int = 1
    refresh: Refresh | None = None

    def output_paths(self, recipe: Recipe) -> tuple[str, ...]:
        out = self.outputs(recipe) if callable(self.outputs) else self.outputs
        return tuple(out)

    def key(self, ctx: BuildContext) -> dict[str, str] | None:
        """The stage's input key: its ``inputs`` plus its code format; None: no reuse."""
        if self.inputs is None:
            return None
        fmt = content_digest(self.name, self.version, S.SCHEMA_VERSION, __version__,
                             list(self.output_paths(ctx.recipe)))
        return {**self.inputs(ctx), "format": fmt}


STAGES: list[Stage] = []


def register_stage(stage: Stage, after: str | None = None, before: str | None = None) -> Stage:
    """Add (or replace, by name) a stage; ``after``/``before`` place it (default: last)."""
    names = [s.name for s in STAGES]
    if stage.name in names:
        STAGES[names.index(stage.name)] = stage
        return stage
    if after is not None and after in names:
        STAGES.insert(names.index(after) + 1, stage)
    elif before is not None and before in names:
        STAGES.insert(names.index(before), stage)
    else:
        STAGES.append(stage)
    return stage


RUN_MARKER = "run.json"


def _marker(target: Target, output: str) -> str:
    return target.staging(f"{output}.done")


def _stage_done(target: Target, stage: Stage, outputs: tuple[str, ...], run: dict
                ) -> str | None:
    """How the stage's complete staged outputs were made ("built" or "refreshed"), or None
    when they are not complete."""
    how = None
    for out in outputs:
        marker = target.read_json(_marker(target, out)) or {}
        if {k: marker.get(k) for k in (*run, "stage")} != {**run, "stage": stage.name} \
                or not target.fs.exists(target.staging(out)):
            return None
        how = marker.get("how", "built")
    return how or "built"


def _current(target: Target) -> Resolved | None:
    try:
        res = resolve(target)
    except CubeError:
        return None
    return res if res.version is not None else None


def read_tables(source: SourceDataset, stage: _Stage, check_files: bool = True
                ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, tuple[float, ...]]:
    """The read stage: the validated source as ordered tables ``(obs, images, species,
    bbox)`` (``check_files``: see :meth:`SourceDataset.read_vision_index`)."""
    obs_raw = source.read_observations()
    vindex = source.read_vision_index(obs_raw, check_files=check_files)
    language = source.read_species_language()
    stage.done(f"({len(obs_raw)} observations, {len(vindex)} embeddings)")
    species = species_table(obs_raw, language)
    bbox = (float(obs_raw.longitude.min()), float(obs_raw.latitude.min()),
            float(obs_raw.longitude.max()), float(obs_raw.latitude.max()))
    obs = order_observations(obs_raw, species, bbox)
    return obs, order_images(vindex, obs), species, bbox


def run_recipe(recipe: Recipe, progress: bool = True) -> str:
    """Build (or finish building) the cube set of ``recipe``; returns the target URL.

    Every build is published as a new immutable version (:mod:`cube_gen.release`);
    re-running a recipe over an unchanged source changes nothing; embeddings whose
    content digest the current release holds are reused, not recomputed.
    """
    _register_builtin_stages()
    target = Target(recipe.target["path"], recipe.target["storage_options"])
    fingerprint = recipe.fingerprint()
    STAGE_SECONDS.clear()
    stage = _Stage("read", progress)
    source = SourceDataset(recipe.source["path"], recipe.source["storage_options"])
    previous = _current(target)
    # The Dask cluster starts (and its workers import the task modules) on a thread while
    # the source is hashed and read: at once for a first build, which always builds.
    with BuildCompute(recipe["compute"]) as compute:
        if previous is None:
            compute.start()
        files = source_files(source, (previous.manifest.get("source_files")
                                      if previous is not None else None))
        digest = source_digest(files)
        if previous is not None and previous.manifest.get("recipe") == fingerprint and \
                previous.manifest.get("source_digest") == digest:
            if target.fs.exists(target.staging()):  # left by a run killed after its switch
                target.remove(target.staging())
            if progress:
                tqdm.write(f"cube set at {target.url} is up to date "
                           f"(version {previous.version})")
            return target.url
        compute.start()
        return _build(recipe, target, fingerprint, progress, stage, source, previous, files,
                      digest, compute)


def _build(recipe: Recipe, target: Target, fingerprint: str, progress: bool, stage: _Stage,
           source: SourceDataset, previous: Resolved | None, files: dict, digest: str,
           compute: BuildCompute) -> str:
    # read and validate the whole source before touching the target
    obs, images, species, bbox = read_tables(source, stage)
    digests = row_digests(images, files, recipe.cubes["vision"]["dtype"])
    ctx = BuildContext(recipe, target, fingerprint, progress, {
        "obs": obs, "images": images, "species": species, "bbox": bbox,
        "source_files": files, "row_digests": digests}, previous=previous, compute=compute)

    # Staging belongs to one (recipe, source): anything else found there is stale.
    run = {"recipe": fingerprint, "source": digest}
    if target.read_json(target.staging(RUN_MARKER)) != run:
        target.remove(target.staging())
        target.write_json(target.staging(RUN_MARKER), run)

    # Build every stage whose staged outputs are not complete. Nothing outside staging
    # changes until all are, so a source error found late leaves the target untouched.
    # Stages whose input key the previous release holds are taken from it (module doc).
    staged: list[str] = []
    reuse: dict[str, str] = {}
    keys: dict[str, dict[str, str]] = {}
    made: dict[str, str] = {}
    plan = [s for s in STAGES if s.enabled is None or s.enabled(recipe)]
    needed = {n for s in plan for n in s.needs}
    for st in plan:
        outputs = st.output_paths(recipe)
        key = st.key(ctx)
        if key is not None:
            keys[st.name] = key
        done = _stage_done(target, st, outputs, run)
        mode = None if done else reuse_mode(st, key, previous, recipe)
        if done:
            made[st.name] = done
            if st.name in needed and st.reload is not None:
                ctx.results[st.name] = st.reload(ctx)
        elif mode == "reused":
            t0 = time.perf_counter()
            reuse.update({out: target.path(*previous.prefix, out) for out in outputs})
            ctx.results[st.name] = None
            made[st.name] = mode
            STAGE_SECONDS[st.name] = time.perf_counter() - t0  # the links come at publish
            continue
        else:
            for out in outputs:
                target.remove(_marker(target, out))
            if mode == "refreshed":
                t0 = time.perf_counter()
                take_for_refresh(ctx, st)
                ctx.results[st.name] = st.refresh.run(ctx)
                STAGE_SECONDS[st.name] = time.perf_counter() - t0
            else:
                ctx.results[st.name] = st.build(ctx)
            made[st.name] = mode or "built"
            for out in outputs:
                target.write_json(_marker(target, out),
                                  {**run, "stage": st.name, "how": made[st.name]})
        staged.extend(outputs)
    if progress and any(v != "built" for v in made.values()):
        tqdm.write("[stages] " + ", ".join(f"{k}: {v}" for k, v in made.items()))

    # Publish: a new version; one atomic write of cubeset.json makes it current.
    t_pub = _Stage("publish", progress)
    vision_cfg = recipe.cubes["vision"]
    vid = publish(target, staged, {
        "recipe": fingerprint,
        "schema_version": S.SCHEMA_VERSION,
        "generator": f"deepearth-cube {__version__}",
        "cubes": {c: p for c, p in S.CUBE_PATHS.items() if p in staged or p in reuse},
        "counts": {"observations": len(obs), "species": len(species), "images": len(images)},
        "bbox": bbox,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "parent": previous.version if previous is not None else None,
        "stages": [s.name for s in plan],
        "source_version": (source.read_json(L.DATASET_INFO_FILE) or {}).get("version"),
        "source_digest": digest,
        "source_files": files,
        "vision_config": vision_config_key(vision_cfg),
        "rows": {"vision": digests},
        "stage_inputs": keys,
        "stage_builds": made,
    }, reuse=reuse, previous=previous)
    target.remove(target.staging())
    t_pub.done(f"(version {vid})")
    return target.url


def _reload_pooled(ctx: BuildContext) -> np.ndarray:
    url = ctx.staging_url(S.CUBE_PATHS[S.VISION])
    return xr.open_zarr(url, storage_options=ctx.target.storage_options or None,
                        consolidated=True)["pooled"].values


def _register_builtin_stages() -> None:
    """The built-in stages, in order (other modules register theirs on import)."""
    if any(s.name == "vision" for s in STAGES):
        return
    register_stage(Stage("vision", (S.CUBE_PATHS[S.VISION],), lambda c: build_vision(
        c.recipe, c.target, c.tables["images"], c.tables["species"], c.progress, ctx=c),
        reload=_reload_pooled), before=STAGES[0].name if STAGES else None)
    from .grid import refresh_vision_layers, vision_arrays

    species_path, obs_path = S.CUBE_PATHS[S.SPECIES], S.CUBE_PATHS[S.OBSERVATIONS]
    register_stage(Stage("species", (species_path,), lambda c: build_species(
        c.recipe, c.target, c.tables["species"], c.tables["images"], c.progress),
        inputs=lambda c: _table_inputs(c, "cubes.species"),
        refresh=Refresh(("images",), lambda r: {species_path: SPECIES_FROM_IMAGES},
                        lambda c: _rewrite(c, species_path, _species_from_images(
                            c.tables["species"], c.tables["images"])))),
        after="vision")
    register_stage(Stage("observations", (obs_path,),
                         lambda c: build_observations(c.recipe, c.target, c.tables["obs"],
                                                      c.tables["images"], c.progress),
                         inputs=lambda c: _table_inputs(c, "cubes.observations"),
                         refresh=Refresh(("images",),
                                         lambda r: {obs_path: OBSERVATIONS_FROM_IMAGES},
                                         lambda c: _rewrite(c, obs_path, _observations_from_images(
                                             c.tables["obs"], c.tables["images"])))),
                   after="species")
    register_stage(Stage("grid", _grid_outputs, lambda c: build_grid(
        c.recipe, c.target, c.tables["obs"], c.tables["images"], c.results["vision"],
        c.tables["species"], c.progress), needs=("vision",), inputs=_grid_inputs,
        refresh=Refresh(("vision",), lambda r: vision_arrays(r.cubes["grid"]),
                        lambda c: refresh_vision_layers(
                            c.recipe.cubes["grid"], c.tables["obs"], c.tables["images"],
                            c.results["vision"], c.target))), after="observations")
    from .ann import register_similarity_stage  # pooled-vector index above a size (H3)

    register_similarity_stage()
    from .patch_index import register_patch_stage  # optional: cubes.patches.enabled (H7)

    register_patch_stage()
    from .photos import register as register_photos_stage  # synthetic sources only (H6)

    register_photos_stage()


def _table_inputs(ctx: BuildContext, section: str) -> dict[str, str]:
    """Inputs of the species and observations stages: the observations file (their
    tables and the species table come from it alone), their recipe section and the
    metadata (attributes), and the image table (the few variables counting embeddings,
    which a refresh rewrites)."""
    return {"observations": files_digest(ctx.tables["source_files"], L.OBSERVATIONS_FILE),
            "recipe": recipe_digest(ctx.recipe, section, "metadata"),
            "images": _images_digest(ctx)}


def _images_digest(ctx: BuildContext) -> str:
    digests = ctx.tables.setdefault("input_digests", {})
    if "images" not in digests:
        digests["images"] = content_digest(ctx.tables["images"])
    return digests["images"]


def _grid_inputs(ctx: BuildContext) -> dict[str, str]:
    """Inputs of the grid stage: the observations file, ``cubes.grid`` and the metadata,
    the grid-variable registry (names, attributes, colour rules), and, as ``vision``, the
    image table and the pooled vectors (the embedding composite): all the
    :func:`cube_gen.grid.vision_layers` read."""
    from . import grid_variables as G

    cfg = ctx.recipe.cubes["grid"]
    pooled = ctx.results["vision"] if "embedding_rgb" in cfg["variables"] else None
    return {"observations": files_digest(ctx.tables["source_files"], L.OBSERVATIONS_FILE),
            "recipe": recipe_digest(ctx.recipe, "cubes.grid", "metadata"),
            "registry": content_digest(repr(G.GRID_VARIABLES), repr(G.SPECIES_FAMILY)),
            "vision": content_digest(_images_digest(ctx), pooled)}


def _rewrite(ctx: BuildContext, path: str, values: dict[str, np.ndarray]) -> list[str]:
    """A refresh: write ``values`` into the staged cube ``path`` (taken from the previous
    release without these arrays' chunks)."""
    from .encode import rewrite_arrays

    rewrite_arrays(ctx.staging_url(path), ctx.target.storage_options, values)
    return [f"{path}/{k}" for k in values]


def _grid_outputs(recipe: Recipe) -> tuple[str, ...]:
    from .grid import enabled_datasets

    return tuple(S.CUBE_PATHS[d.cube] for d in enabled_datasets(recipe.cubes["grid"]))


# -- vision --------------------------------------------------------------------------------
def vision_template(recipe: Recipe, images: pd.DataFrame) -> tuple[xr.Dataset, dict]:
    """The lazy ``vision.zarr`` dataset of the ordered image table and its encoding
    (written with ``compute=False``; the vision stage fills it)."""
    cfg = recipe.cubes["vision"]
    n = len(images)
    shard = cfg["shards"]
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
    return ds, enc


def finish_vision(group: zarr.Group, pooled: np.ndarray, stats: np.ndarray,
                  umap_rgb: np.ndarray, cfg: dict,
                  projection: tuple[np.ndarray, str] | None = None) -> None:
    """Write the per-image products gathered from every image (pooled vectors, their 3-D
    projection, statistics, UMAP-RGB) into the staged ``vision.zarr`` and mark it complete.
    ``projection``: ``(coords, method)`` computed elsewhere (default: the recipe's
    :func:`cube_gen.derive.vision_projection`)."""
    coords3, method = projection or D.vision_projection(pooled)
    group["pooled"][:] = pooled
    group["umap"][:] = coords3
    group["umap_rgb"][:] = umap_rgb
    for i, k in enumerate(S.IMAGE_STATS):
        group[f"stat_{k}"][:] = stats[:, i]
    group["umap"].attrs["projection_method"] = method
    group["umap_rgb"].attrs["computed"] = bool(cfg["umap_rgb"])
    group.attrs["deepearth_status"] = "complete"
    zarr.consolidate_metadata(group.store)


def build_vision(recipe: Recipe, target: Target, images: pd.DataFrame, species: pd.DataFrame,
                 progress: bool, ctx: BuildContext | None = None) -> np.ndarray:
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
        target.remove(target.staging(name))
        target.remove(target.staging("vision.parts"))
        ds, enc = vision_template(recipe, images)
        write_dataset(ds, staged_url, target.storage_options, enc, cfg["zarr_format"],
                      compute=False)

    # embeddings unchanged since the current release are taken from it, not recomputed
    reused = np.zeros(n, bool)
    if ctx is not None:
        reused = reused_images(parts_url, target, n)
        if reused is None:
            reused = reuse_vision(ctx.previous, target, staged_url, parts_url,
                                  ctx.tables["row_digests"], cfg)

    # Dask tasks: stream the embeddings into the staged cube
    tasks = plan_tasks(images[~reused], cfg["batch_size"], shard)
    done = finished_parts(parts_url, target.storage_options)
    todo = [t for t in tasks if t.name not in done]
    args = (recipe.source["path"], recipe.source["storage_options"], staged_url,
            target.storage_options, parts_url, cfg["dtype"], cfg["umap_rgb"])
    bar = tqdm(total=len(images), initial=n - sum(len(t.images) for t in todo),
               desc="vision embeddings", unit="emb", disable=not progress)
    own = None if ctx is not None and ctx.compute is not None else \
        BuildCompute(recipe["compute"])
    compute = own or ctx.compute
    with own or contextlib.nullcontext():
        client = compute.client() if todo else None
        if client is None:
            for t in todo:
                run_task(t, *args)
                bar.update(len(t.images))
        else:
            from distributed import as_completed

            futures = {client.submit(run_task, t, *args, key=f"vision-{t.name}-{fingerprint}",
                                     pure=False): t for t in todo}
            try:
                for fut in as_completed(futures, loop=client.loop):
                    fut.result()  # re-raises a task's error here, naming its file and row
                    bar.update(len(futures[fut].images))
            except BaseException:
                client.cancel(list(futures))
                raise
    bar.close()

    parts = load_parts(parts_url, target.storage_options, n, L.N_FEATURES, L.N_PATCH)
    pooled = parts["pooled"]
    group = zarr.open_group(zarr_store(staged_url, target.storage_options), mode="r+")
    finish_vision(group, pooled, parts["stats"], parts["umap_rgb"], cfg)
    target.remove(target.staging("vision.parts"))
    stage.done(f"({n} embeddings)")
    return pooled


# -- species -------------------------------------------------------------------------------
SPECIES_FROM_IMAGES = ("vision_count",)  # computed from the image table (see Refresh)


def _species_from_images(species: pd.DataFrame, images: pd.DataFrame) -> dict[str, np.ndarray]:
    """The species variables computed from the image table: :data:`SPECIES_FROM_IMAGES`."""
    count = np.bincount(images.species_index.to_numpy(), minlength=len(species))
    return {"vision_count": count.astype(np.int32)}


def build_species(recipe: Recipe, target: Target, species: pd.DataFrame, images: pd.DataFrame,
                  progress: bool) -> None:
    stage = _Stage("species", progress)
    cfg = recipe.cubes["species"]
    language = np.stack(species.language_embedding.to_numpy()).astype(np.float32)
    coords3, cluster, colors, cluster_colors, method = D.species_projection(language)
    data = {
        "taxon_id": species.taxon_id.to_numpy(object),
        "taxon_name": species.taxon_name.to_numpy(object),
        "genus": species.genus.to_numpy(object),
        "observation_count": species.observation_count.to_numpy(np.int32),
        **_species_from_images(species, images),
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
OBSERVATIONS_FROM_IMAGES = ("num_embeddings",)  # computed from the image table


def _observations_from_images(obs: pd.DataFrame, images: pd.DataFrame
                              ) -> dict[str, np.ndarray]:
    """The observation variables computed from the image table:
    :data:`OBSERVATIONS_FROM_IMAGES`."""
    count = np.bincount(images.obs_index.to_numpy(), minlength=len(obs))
    return {"num_embeddings": count.astype(np.int16)}


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
        **_observations_from_images(obs, images),
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
    target.remove(target.staging(name))
    write_dataset(ds, target.staging_url(name), target.storage_options, enc, cfg["zarr_format"])


# -- grid ----------------------------------------------------------------------------------
def build_grid(recipe: Recipe, target: Target, obs: pd.DataFrame, images: pd.DataFrame,
               pooled: np.ndarray, species: pd.DataFrame, progress: bool) -> None:
    """The grid pyramids (:func:`cube_gen.grid.build_grids`), staged with done markers."""
    from .grid import build_grids

    stage = _Stage("grid", progress)
    notes: list[str] = []
    build_grids(recipe.cubes["grid"], obs, images, pooled, species,
                _cube_attrs(recipe, S.GRID), target, notes.append)
    stage.done("(" + "; ".join(notes) + ")")
