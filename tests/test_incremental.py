"""Incremental rebuilds: stage input keys, reuse and refresh of whole stages (issue 12).

A rebuild after embeddings were added must take the observation-only cubes and layers from
the previous release (hard links) and still equal a full build; any change of what a stage
reads (source file, recipe section, image table, pooled vectors, code format) must make it
recompute.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import copy_cubes, current_dir, tiny_recipe_data
from cubecompare import assert_cubesets_equal, open_cube

from cube_gen import grid_variables as G
from cube_gen import schema as S
from cube_gen import source_layout as L
from cube_gen.incremental import row_digests, source_files
from cube_gen.pipeline import (
    STAGES,
    BuildContext,
    _register_builtin_stages,
    _Stage,
    read_tables,
    reuse_mode,
    run_recipe,
)
from cube_gen.reader import SourceDataset
from cube_gen.recipe import parse_recipe
from cube_gen.release import ZARR_METADATA, Resolved, verify
from cube_gen.store import Target


def without_last_embedding_file(source: Path, out: Path) -> Path:
    """A copy of ``source`` (hard links) lacking its last embedding file and its index rows."""
    shutil.copytree(source, out, copy_function=os.link)
    index = pq.read_table(source / L.VISION_INDEX_FILE).to_pandas()
    last = int(index.file_idx.max())
    (out / L.VISION_INDEX_FILE).unlink()
    pq.write_table(pa.Table.from_pandas(index[index.file_idx != last], preserve_index=False),
                   out / L.VISION_INDEX_FILE)
    (out / L.embedding_file_name(last)).unlink()
    return out


def _release(cubes: Path) -> dict:
    return json.loads((current_dir(cubes) / "release.json").read_text())


def _inode(cubes: Path, rel: str) -> int:
    return (current_dir(cubes) / rel).stat().st_ino


def _chunks(cubes: Path, array: str) -> list[str]:
    """The data objects (not the metadata documents) below ``array`` of the current version."""
    root = current_dir(cubes)
    return sorted(str(p.relative_to(root)) for p in (root / array).rglob("*")
                  if p.is_file() and p.name not in ZARR_METADATA)


@pytest.fixture(scope="module")
def rebuilt(tiny_source, tmp_path_factory):
    """(cube set rebuilt over the full tiny source on top of a release of its base without
    the last embedding file, that base release's folder)."""
    tmp = tmp_path_factory.mktemp("incremental")
    base_source = without_last_embedding_file(tiny_source, tmp / "base-source")
    target = tmp / "cubes"
    run_recipe(parse_recipe(tiny_recipe_data(base_source, target)), progress=False)
    base_dir = current_dir(target)
    run_recipe(parse_recipe(tiny_recipe_data(tiny_source, target)), progress=False)
    return target, base_dir


def test_added_embeddings_refresh_only_what_counts_them_and_equal_a_full_build(
        rebuilt, tiny_cubes):
    target, base_dir = rebuilt
    rel = _release(target)
    builds = rel["stage_builds"]
    assert builds["vision"] == "built"  # its unchanged embeddings linked row by row
    assert builds["species"] == builds["observations"] == builds["grid"] == "refreshed"
    assert set(rel["stage_inputs"]) >= {"species", "observations", "grid", "similarity"}
    # values, coordinates and attributes equal a full build of the same source
    assert_cubesets_equal(str(tiny_cubes), str(target))
    for level in range(3):
        a = open_cube(str(tiny_cubes), S.GRID_ALL_YEARS, level)
        b = open_cube(str(target), S.GRID_ALL_YEARS, level)
        for name in ("vision_count", "embedding_r", "species_richness"):
            np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
            assert a[name].attrs == b[name].attrs
    # observation-only data are the base release's files (hard links); what counts the
    # embeddings is written anew
    base = target / "versions" / base_dir.name
    for array in ("species.zarr/language_embedding", "observations.zarr/lat",
                  "grid.levels/0.zarr/observation_count", "grid_species.levels/1.zarr"):
        chunks = _chunks(target, array)
        assert chunks, array
        for rel_path in chunks:
            assert _inode(target, rel_path) == (base / rel_path).stat().st_ino, rel_path
    for array in ("species.zarr/vision_count", "observations.zarr/num_embeddings",
                  "grid.levels/0.zarr/vision_count", "grid_all_years.levels/0.zarr/embedding_g"):
        for rel_path in _chunks(target, array):
            if (base / rel_path).exists():
                assert _inode(target, rel_path) != (base / rel_path).stat().st_ino, rel_path
    # the base release is unchanged, and both releases verify (checksums taken over from
    # the base for linked files are right)
    assert open_cube(str(target), S.SPECIES).vision_count.values.sum() == 6
    for vid in (base_dir.name, current_dir(target).name):
        _, problems, _ = verify(Target(str(target)), vid, progress=False)
        assert problems == []


def test_added_embeddings_on_s3_equal_a_full_build(s3, tiny_source, tiny_cubes, tmp_path):
    """The same rebuild on S3: server-side copies instead of links, refreshed arrays
    written into the copies."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3.storage_options)
    base = without_last_embedding_file(tiny_source, tmp_path / "base-source")
    fs.put(str(base), "deepearth/inc/base-source", recursive=True)
    fs.put(str(tiny_source), "deepearth/inc/full-source", recursive=True)
    url = "s3://deepearth/inc/cubes"
    for source in ("base-source", "full-source"):
        data = tiny_recipe_data(f"s3://deepearth/inc/{source}", url)
        data["source"]["storage_options"] = data["target"]["storage_options"] = \
            s3.storage_options
        run_recipe(parse_recipe(data), progress=False)
    current = json.loads(fs.cat_file(f"deepearth/inc/cubes/{S.MANIFEST}"))["current"]
    rel = json.loads(fs.cat_file(f"deepearth/inc/cubes/versions/{current}/release.json"))
    assert rel["stage_builds"]["grid"] == rel["stage_builds"]["species"] == "refreshed"
    assert not fs.exists("deepearth/inc/cubes/.staging")
    assert_cubesets_equal(str(tiny_cubes), url, b_options=s3.storage_options)
    _, problems, _ = verify(Target(url, s3.storage_options), progress=False)
    assert problems == []


def test_unchanged_stages_are_taken_whole_and_changed_observations_rebuild(
        tiny_source, tiny_cubes, tmp_path):
    # a grid setting: only the grid is built, the other stages are taken whole
    target = copy_cubes(tiny_cubes, tmp_path / "cubes")
    before = current_dir(target)
    data = tiny_recipe_data(tiny_source, target)
    data["cubes"]["grid"]["min_observations"] = 4  # only the grid reads it
    run_recipe(parse_recipe(data), progress=False)
    builds = _release(target)["stage_builds"]
    assert builds["grid"] == "built"
    assert builds["species"] == builds["observations"] == builds["similarity"] == "reused"
    for rel_path in ("species.zarr/zarr.json", *_chunks(target, "observations.zarr")):
        assert _inode(target, rel_path) == (before / rel_path).stat().st_ino, rel_path
    grid = open_cube(str(target), S.GRID)
    assert grid.species_richness.attrs["min_observations"] == 4

    # a changed observation (position): everything reading observations.parquet rebuilt
    src = tmp_path / "source"
    shutil.copytree(tiny_source, src, copy_function=os.link)
    table = pq.read_table(src / L.OBSERVATIONS_FILE)
    lat = table.column("latitude").to_numpy().copy()
    row = int(np.argsort(lat)[len(lat) // 2])
    lat[row] += 0.005
    table = table.set_column(table.schema.get_field_index("latitude"), "latitude",
                             pa.array(lat))
    (src / L.OBSERVATIONS_FILE).unlink()
    pq.write_table(table, src / L.OBSERVATIONS_FILE)
    data = tiny_recipe_data(src, target)
    data["cubes"]["grid"]["min_observations"] = 4
    run_recipe(parse_recipe(data), progress=False)
    builds = _release(target)["stage_builds"]
    assert builds["species"] == builds["observations"] == builds["grid"] == "built"
    assert builds["similarity"] == "reused"  # it reads the pooled vectors only
    obs = open_cube(str(target), S.OBSERVATIONS)
    gid = int(table.column("gbif_id")[row].as_py())
    got = float(obs.lat.values[obs.gbif_id.values == gid][0])
    assert got == pytest.approx(lat[row])


# -- keys: every input a stage reads is in its key ----------------------------------------
@pytest.fixture(scope="module")
def key_ctx(tiny_source, tmp_path_factory):
    """A build context over the tiny source (no build), pooled vectors made up."""
    _register_builtin_stages()
    recipe = parse_recipe(tiny_recipe_data(tiny_source, tmp_path_factory.mktemp("k") / "c"))
    return _context(recipe, tiny_source)


def _context(recipe, source_dir: Path, images_edit=None, pooled=None) -> BuildContext:
    source = SourceDataset(str(source_dir))
    files = source_files(source)
    obs, images, species, bbox = read_tables(source, _Stage("read", False))
    if images_edit is not None:
        images = images_edit(images)
    if pooled is None:
        pooled = np.random.default_rng(0).normal(size=(len(images), L.N_FEATURES)
                                                 ).astype(np.float32)
    return BuildContext(recipe, Target(recipe.target["path"]), recipe.fingerprint(), False,
                        {"obs": obs, "images": images, "species": species, "bbox": bbox,
                         "source_files": files,
                         "row_digests": row_digests(images, files, "float16")},
                        results={"vision": pooled})


def _stage(name: str):
    return next(s for s in STAGES if s.name == name)


def _previous_of(ctx: BuildContext, names=("species", "observations", "grid")) -> Resolved:
    """A release recording the keys ``ctx`` gives, holding every stage's outputs."""
    keys = {n: _stage(n).key(ctx) for n in names}
    files = {f"{out}/zarr.json": [1, "x"] for n in names
             for out in _stage(n).output_paths(ctx.recipe)}
    return Resolved("v1", ("versions", "v1"), {"stage_inputs": keys}, files)


def _modes(ctx: BuildContext, previous: Resolved, names=("species", "observations", "grid")):
    return {n: reuse_mode(_stage(n), _stage(n).key(ctx), previous, ctx.recipe) for n in names}


def test_same_inputs_reuse_and_only_embeddings_changed_refreshes(key_ctx):
    prev = _previous_of(key_ctx)
    assert _modes(key_ctx, prev) == {"species": "reused", "observations": "reused",
                                     "grid": "reused"}
    # one embedding fewer: the counts of embeddings change, nothing else
    fewer = _context(key_ctx.recipe, Path(key_ctx.recipe.source["path"]),
                     images_edit=lambda im: im.iloc[:-1].reset_index(drop=True))
    assert _modes(fewer, prev) == {"species": "refreshed", "observations": "refreshed",
                                   "grid": "refreshed"}
    # other pooled vectors (changed embedding contents): only the composite reads them
    other = dataclasses.replace(key_ctx, results={"vision": key_ctx.results["vision"] + 1})
    assert _modes(other, prev) == {"species": "reused", "observations": "reused",
                                   "grid": "refreshed"}


def test_any_other_change_of_what_a_stage_reads_rebuilds_it(key_ctx, monkeypatch):
    prev = _previous_of(key_ctx)
    # the observations file
    files = {k: list(v) for k, v in key_ctx.tables["source_files"].items()}
    files[L.OBSERVATIONS_FILE][2] = "0" * 32
    changed = dataclasses.replace(key_ctx, tables={**key_ctx.tables, "source_files": files,
                                                   "input_digests": {}})
    assert set(_modes(changed, prev).values()) == {None}
    # a stage's recipe section, and the metadata every cube carries
    for dotted, value, rebuilt in (("cubes.grid.resolution", 0.02, {"grid"}),
                                   ("cubes.observations.chunk_size", 100, {"observations"}),
                                   ("cubes.species.compressor", None, {"species"}),
                                   ("metadata.title", "other", {"species", "observations",
                                                                "grid"})):
        data = json.loads(json.dumps(key_ctx.recipe.data))
        node = data
        *path, last = dotted.split(".")
        for k in path:
            node = node[k]
        node[last] = value
        ctx = dataclasses.replace(key_ctx, recipe=parse_recipe(data))
        modes = _modes(ctx, prev)
        assert {n for n, m in modes.items() if m is None} == rebuilt, dotted
        assert {m for n, m in modes.items() if n not in rebuilt} <= {"reused"}, dotted
    # the code format: a stage's version, the schema version, the grid-variable registry
    stage = dataclasses.replace(_stage("species"), version=2)
    assert reuse_mode(stage, stage.key(key_ctx), prev, key_ctx.recipe) is None
    monkeypatch.setattr(S, "SCHEMA_VERSION", S.SCHEMA_VERSION + ".next")
    assert set(_modes(key_ctx, prev).values()) == {None}
    monkeypatch.undo()
    entry = G.GRID_VARIABLES["observation_count"]
    monkeypatch.setitem(G.GRID_VARIABLES, "observation_count",
                        dataclasses.replace(entry, long_name="observations counted"))
    assert _modes(key_ctx, prev)["grid"] is None
    monkeypatch.undo()
    # a previous release without keys, or without the stage's outputs, is not reused
    assert set(_modes(key_ctx, Resolved("v1", ("versions", "v1"), {}, prev.files)
                      ).values()) == {None}
    bare = Resolved("v1", ("versions", "v1"), prev.manifest,
                    {k: v for k, v in prev.files.items() if not k.startswith("grid_species")})
    assert _modes(key_ctx, bare)["grid"] is None
