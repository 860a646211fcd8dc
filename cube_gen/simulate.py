"""``deepearth simulate``: a cube set at N times the published counts, for scale measurements.

The simulated set has the layout and goes through the code paths of a real one, at sizes
no real dataset here has (``--scale 10``: 336,650 observations, 79,490 embeddings;
``--scale 100``: 3,366,500 and 794,900):

1. the synthetic source's own plan (:func:`cube_gen.synth.plan_dataset`) draws the
   species, observations, images and embeddings at the scaled counts (232 species);
2. a *source* folder is written in the published layout: ``observations.parquet`` (rows
   grouped by species so that the identical 7168-d language vectors of one species
   compress to almost nothing: 3.4M rows would otherwise be about 97 GB, as the published
   file is about 28 KB a row), ``vision_index.parquet`` and ``dataset_info.json``
   (``simulated: true``); ``vision_embeddings/`` is absent;
3. the source is read by the recipe's reader, and the recipe's own stages build the
   cubes: species, observations, grid (all pyramids) and the similarity index, from the
   published recipe (``recipes/central_florida_native_plants.yaml``, patch index off);
4. ``vision.zarr`` is written from the recipe's template (:func:`cube_gen.pipeline.
   vision_template`) with every per-image product present: pooled vectors, their 3-D UMAP
   (:func:`cube_gen.pipeline.finish_vision`, over all images), statistics and UMAP-RGB;
   but full ``features`` tensors and ``attention`` maps exist only for ``--materialise K``
   images (default 32), whose tensors are real synthetic embeddings
   (:func:`cube_gen.synth.synth_embedding`) with every product derived from them by the
   recipe's code (:func:`cube_gen.embedding_math.embedding_products`);
5. the version is published (:func:`cube_gen.release.publish`) with a manifest entry
   ``simulated``: scale, seed and the positions of the materialised images. Every reader
   (:meth:`CubeSet.features <cube_gen.access.CubeSet.features>`, ``features_batch``,
   ``attention``, the torch datasets, the server) answers any other image with
   :class:`~cube_gen.errors.NotMaterialised` (HTTP 404), never zeros.

Why attention is sampled too: the attention summaries are (8 methods x 9 frame views x
24 x 24) float32 = 166 KB per image, 132 GB at 100x (66 GB in float16), more than this
project's disks hold; they are derived from the full tensors, so they exist exactly where
those do. The products of the other images are drawn to look like the materialised ones:
pooled vectors from the same model as the synthetic embeddings (species signature on an
object region of random size, per-image background), statistics from the materialised
images' mean and spread, UMAP-RGB images copied from materialised ones.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
import zarr

from . import __version__
from . import embedding_math as em
from . import schema as S
from . import source_layout as L
from .encode import write_dataset
from .errors import UsageError
from .pca import _pca_scores
from .pipeline import (
    STAGE_SECONDS,
    STAGES,
    BuildContext,
    _register_builtin_stages,
    _Stage,
    finish_vision,
    read_tables,
    vision_template,
)
from .reader import SourceDataset
from .recipe import Recipe, parse_recipe
from .release import publish
from .store import Target, zarr_store
from .synth import PRESETS, Plan, Preset, observation_table, plan_dataset, synth_embedding

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "central_florida_native_plants.yaml"
ROW_GROUP = 8192  # observations.parquet rows per row group
SKIPPED_STAGES = ("photos", "patches")  # need real embedding files or photos


def scaled_preset(scale: float) -> Preset:
    """The published counts (synth preset ``full``) times ``scale``; species stay 232
    (fewer only when there are too few observations for them)."""
    if not scale > 0:
        raise UsageError(f"--scale must be positive, got {scale}")
    full = PRESETS["full"]

    def n(v: int) -> int:
        return max(1, int(round(v * scale)))

    n_obs = max(n(full.n_observations), 40)
    n_emb = n(full.n_embeddings)
    n_vis = min(n(full.n_vision_observations), n_emb)
    return Preset(n_obs, min(full.n_species, max(4, n_obs // 8)),
                  min(n(full.n_with_images), n_obs), n_vis, n_emb, full.embeddings_per_file,
                  min(n(full.n_test), n_obs // 4), embedding_dtype="float16")


# -- the source ----------------------------------------------------------------------------
def write_source(root: str, plan: Plan, preset: Preset, scale: float, seed: int) -> None:
    """A source folder in the published layout, without ``vision_embeddings/``."""
    os.makedirs(root, exist_ok=True)
    order = np.argsort(plan.obs.sp.to_numpy(), kind="stable")  # species-major: see module doc
    schema = L.OBSERVATIONS_SCHEMA
    plain = [f.name for f in schema if f.name != "language_embedding"]
    with pq.ParquetWriter(f"{root}/{L.OBSERVATIONS_FILE}", schema, compression="zstd",
                          use_dictionary=plain, data_page_size=32 << 20) as writer:
        for s in range(0, len(order), ROW_GROUP):
            writer.write_table(observation_table(plan, order[s:s + ROW_GROUP]))
    gbif = plan.obs.gbif_id.to_numpy()
    per_file = preset.embeddings_per_file
    index = pd.DataFrame({
        "gbif_id": gbif[[o for o, _ in plan.emb_rows]].astype(np.int64),
        "file_idx": np.asarray(plan.file_of, np.int64),
        "row_idx": np.arange(len(plan.emb_rows), dtype=np.int64) % per_file,
    })
    pq.write_table(pa.Table.from_pandas(index, schema=L.VISION_INDEX_SCHEMA, preserve_index=False),
                   f"{root}/{L.VISION_INDEX_FILE}")
    with open(f"{root}/{L.DATASET_INFO_FILE}", "w") as fh:
        json.dump({"name": "central_florida_native_plants (simulated)", "version": "0.2.0",
                   "synthetic": True, "simulated": True, "scale": scale, "seed": seed,
                   "num_observations": len(plan.obs), "num_species": int(preset.n_species),
                   "num_embeddings": len(plan.emb_rows), "bbox": L.BBOX,
                   "note": "vision_embeddings/ is absent: full tensors exist only in the "
                           "simulated cube set, for its materialised images"}, fh, indent=2)


# -- the vision cube -----------------------------------------------------------------------
def _pick(n: int, k: int, seed: int) -> np.ndarray:
    """``k`` image positions spread over ``[0, n)`` (deterministic)."""
    k = min(max(int(k), 0), n)
    return np.sort(np.random.default_rng([seed, 7]).choice(n, size=k, replace=False)).astype(
        np.int64)


def _embedding_seed(plan: Plan, seed: int, gbif_id: int, image_number: int) -> tuple[int, int]:
    """The synthetic source's seed of embedding (gbif_id, image number), and its species."""
    row = int(np.flatnonzero(plan.obs.gbif_id.to_numpy() == gbif_id)[0])
    emb_seed = int(np.random.SeedSequence([seed, row, int(image_number)]).generate_state(1)[0])
    return emb_seed, int(plan.obs.sp.iat[row])


def simulated_pooled(plan: Plan, species_rows: np.ndarray, seed: int,
                     block: int = 16384) -> np.ndarray:
    """(n, 1408) float32 pooled vectors as the synthetic embeddings pool: the species
    signature on an object region covering a random share of the image, plus a per-image
    background vector and small patch noise."""
    n = len(species_rows)
    out = np.empty((n, L.N_FEATURES), np.float32)
    rng = np.random.default_rng([seed, 11])
    for s in range(0, n, block):
        sl = slice(s, min(s + block, n))
        m = len(species_rows[sl])
        share = rng.uniform(0.12, 0.45, (m, 1)).astype(np.float32)
        background = rng.standard_normal((m, L.N_FEATURES), np.float32) * np.float32(0.35)
        noise = rng.standard_normal((m, L.N_FEATURES), np.float32) * np.float32(0.3 / 24)
        out[sl] = (share * 1.6 * plan.signatures[species_rows[sl]] + (1 - share) * background
                   + noise)
    return out


PROJECTIONS = ("auto", "recipe", "approximate", "pca")


def vision_projection(pooled: np.ndarray, how: str = "auto") -> tuple[np.ndarray, str] | None:
    """The whole-set vision projection: ``auto`` / ``recipe`` (None: the recipe's own,
    :func:`cube_gen.derive.vision_projection` in :func:`cube_gen.pipeline.finish_vision`,
    whose neighbours are exact up to :data:`cube_gen.projection.EXACT_KNN_MAX` images
    and approximate above), ``approximate`` (approximate neighbours at any size) or
    ``pca`` (the first three principal components)."""
    if how not in PROJECTIONS:
        raise UsageError(f"--projection must be one of {', '.join(PROJECTIONS)}, got {how!r}")
    if how == "pca":
        return _pca_scores(pooled, 3)[:, :3], "pca"
    if how == "approximate":
        from .derive import vision_projection as recipe_projection

        return recipe_projection(pooled, exact_max=0)
    return None


def build_vision(ctx: BuildContext, plan: Plan, materialise: int, seed: int,
                 projection: str = "auto") -> np.ndarray:
    """The simulated vision stage (the recipe's template; see the module docstring)."""
    stage = _Stage("vision", ctx.progress)
    cfg = ctx.recipe.cubes["vision"]
    images = ctx.tables["images"]
    n = len(images)
    url = ctx.staging_url(S.CUBE_PATHS[S.VISION])
    ctx.target.remove(ctx.staging_path(S.CUBE_PATHS[S.VISION]))
    ds, enc = vision_template(ctx.recipe, images)
    write_dataset(ds, url, ctx.target.storage_options, enc, cfg["zarr_format"], compute=False)
    group = zarr.open_group(zarr_store(url, ctx.target.storage_options), mode="r+")

    # species row of the plan of each image (the plan's species order is not the cube's)
    plan_sp = pd.Series(np.arange(len(plan.species)), index=plan.species.taxon_id.to_numpy())
    cube_to_plan = plan_sp.loc[ctx.tables["species"].taxon_id.to_numpy()].to_numpy()
    species_rows = cube_to_plan[images.species_index.to_numpy()]
    pooled = simulated_pooled(plan, species_rows, seed)
    stats = np.zeros((n, len(S.IMAGE_STATS)), np.float32)
    rgb = np.zeros((n, L.N_PATCH, L.N_PATCH, 3), np.uint8)

    chosen = _pick(n, materialise, seed)
    gid, num = images.gbif_id.to_numpy(), images.image_number.to_numpy()
    for pos in chosen:
        emb_seed, sp = _embedding_seed(plan, seed, int(gid[pos]), int(num[pos]))
        feats = synth_embedding(emb_seed, plan.signatures[sp])
        products = em.embedding_products(feats, bool(cfg["umap_rgb"]))
        group["features"][int(pos)] = feats.astype(cfg["dtype"])
        group["attention"][int(pos)] = products.attention
        pooled[pos] = products.pooled
        stats[pos] = products.stats_vector
        if products.umap_rgb is not None:
            rgb[pos] = products.umap_rgb
    rest = np.setdiff1d(np.arange(n), chosen)
    rng = np.random.default_rng([seed, 13])
    if len(chosen):
        mean, sd = stats[chosen].mean(axis=0), stats[chosen].std(axis=0)
        stats[rest] = (mean + sd * rng.standard_normal((len(rest), len(mean)))).astype(np.float32)
        rgb[rest] = rgb[chosen[rng.integers(len(chosen), size=len(rest))]]
    group.attrs.update({"deepearth_simulated": True,
                        "deepearth_materialised_images": int(len(chosen))})
    note = (f"simulated cube set: materialised only for the {len(chosen)} images listed in "
            "the manifest (cubeset.json: simulated.materialised); other chunks are absent")
    for name in ("features", "attention"):
        group[name].attrs["simulated"] = note
    finish_vision(group, pooled, stats, rgb, cfg, vision_projection(pooled, projection))
    stage.done(f"({n} embeddings, {len(chosen)} materialised)")
    ctx.results["materialised"] = chosen
    return pooled


# -- the build -----------------------------------------------------------------------------
def simulation_recipe(source: str, out: str, recipe_path: str | os.PathLike = RECIPE) -> Recipe:
    """The published recipe with this source and target, without the patch index."""
    with open(recipe_path) as fh:
        data = yaml.safe_load(fh)
    data["source"] = {"path": str(source), "storage_options": {}}
    data["target"] = {"path": str(out), "storage_options": {}}
    data.setdefault("cubes", {}).setdefault("patches", {})["enabled"] = False
    data["compute"] = {"scheduler": "synchronous"}
    data["metadata"]["title"] = f"{data['metadata']['title']} (simulated)"
    return parse_recipe(data, str(recipe_path))


def simulate(out: str, scale: float, materialise: int = 32, seed: int = 0,
             source: str | None = None, progress: bool = True,
             overwrite: bool = False, projection: str = "auto") -> dict[str, Any]:
    """Write a simulated source and cube set; returns the manifest summary and the stage
    timings (seconds) under ``seconds``."""
    out = os.path.abspath(out)
    source = os.path.abspath(source or f"{out}-source")
    for path in (out, source):
        if os.path.exists(path) and os.listdir(path) and not overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    import shutil

    for path in (out, source):
        shutil.rmtree(path, ignore_errors=True)
    preset = scaled_preset(scale)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    plan = plan_dataset(preset, seed)
    seconds["plan"] = time.perf_counter() - t
    t = time.perf_counter()
    write_source(source, plan, preset, scale, seed)
    seconds["source"] = time.perf_counter() - t
    plan.urls = plan.file_lists = plan.emb_rows = plan.file_of = []  # written; free them

    recipe = simulation_recipe(source, out)
    _register_builtin_stages()
    STAGE_SECONDS.clear()
    target = Target(recipe.target["path"], recipe.target["storage_options"])
    obs, images, species, bbox = read_tables(SourceDataset(source), _Stage("read", progress),
                                             check_files=False)
    ctx = BuildContext(recipe, target, recipe.fingerprint(), progress,
                       {"obs": obs, "images": images, "species": species, "bbox": bbox})
    staged: list[str] = []
    plan_stages = [s for s in STAGES if s.name not in SKIPPED_STAGES
                   and (s.enabled is None or s.enabled(recipe))]
    for st in plan_stages:
        t = time.perf_counter()
        if st.name == "vision":
            ctx.results["vision"] = build_vision(ctx, plan, materialise, seed, projection)
        else:
            ctx.results[st.name] = st.build(ctx)
        STAGE_SECONDS[st.name] = time.perf_counter() - t
        staged.extend(st.output_paths(recipe))
    pub = _Stage("publish", progress)
    materialised = [int(i) for i in ctx.results["materialised"]]
    summary = {
        "recipe": ctx.fingerprint,
        "schema_version": S.SCHEMA_VERSION,
        "generator": f"deepearth-cube {__version__} simulate",
        "title": recipe["metadata"]["title"],
        "cubes": {c: p for c, p in S.CUBE_PATHS.items() if p in staged},
        "counts": {"observations": len(obs), "species": len(species), "images": len(images)},
        "bbox": bbox,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "parent": None,
        "stages": [s.name for s in plan_stages],
        "source_version": "0.2.0 (simulated)",
        "simulated": {
            "scale": scale, "seed": seed, "source": source, "projection": projection,
            "materialised": materialised,
            "note": "full features and attention maps exist only for the image positions "
                    "in 'materialised'; every reader answers the others with 'features not "
                    "materialised in this simulated cube' (HTTP 404)",
        },
    }
    vid = publish(target, staged, summary)
    target.remove(target.staging())
    pub.done(f"(version {vid})")
    seconds.update(STAGE_SECONDS)
    return {**summary, "version": vid, "url": target.url, "seconds": seconds}
