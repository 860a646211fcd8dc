"""The recipe engine: every cube's values against the source, resume after SIGKILL, reruns."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml
from conftest import tiny_recipe_data
from cubecompare import assert_cubesets_equal, open_cube

from cube_gen import embedding_math as em
from cube_gen import schema as S
from cube_gen.errors import SourceError
from cube_gen.pipeline import run_recipe
from cube_gen.reader import SourceDataset
from cube_gen.recipe import parse_recipe
from cube_gen.timeparse import PRECISIONS


@pytest.fixture(scope="module")
def source(tiny_source):
    s = SourceDataset(str(tiny_source))
    obs = s.read_observations()
    index = s.read_vision_index(obs)
    language = s.read_species_language()
    return s, obs, index, language


def test_every_cube_opens_with_cf_attributes(tiny_cubes):
    for cube in S.CUBES:
        ds = open_cube(str(tiny_cubes), cube)
        assert ds.attrs["deepearth_cube"] == cube
        assert ds.attrs["Conventions"].startswith("CF-")
        for name, var in ds.data_vars.items():
            units = var.attrs.get("units") or var.encoding.get("units")  # times: CF encoding
            assert "long_name" in var.attrs and units, (cube, name)
    manifest = json.loads((tiny_cubes / S.MANIFEST).read_text())
    assert manifest["counts"] == {"observations": 240, "species": 12, "images": 6}
    assert not (tiny_cubes / ".staging").exists()


def test_observations_match_the_source(tiny_cubes, source):
    _, obs, index, _ = source
    ds = open_cube(str(tiny_cubes), S.OBSERVATIONS).load()
    src = obs.set_index("gbif_id")
    gid = ds.gbif_id.values
    assert sorted(gid) == sorted(src.index)
    row = src.loc[gid]
    np.testing.assert_array_equal(ds.lat.values, row.latitude.to_numpy())
    np.testing.assert_array_equal(ds.lon.values, row.longitude.to_numpy())
    np.testing.assert_array_equal(ds.time.values, row.time.to_numpy())
    assert [PRECISIONS[p] for p in ds.time_precision.values] == \
        [PRECISIONS[p] for p in row.time_precision]
    assert ds.taxon_id.values.astype(object).tolist() == row.taxon_id.tolist()
    assert (ds.split.values == (row.split == "temporal_test").to_numpy().astype(int)).all()
    np.testing.assert_array_equal(ds.has_vision.values, row.has_vision.to_numpy())
    np.testing.assert_array_equal(ds.num_images.values, row.num_images.to_numpy())
    for i in (0, 17, 123):
        urls = [u for u in ds.image_urls.values[i].astype(object).tolist() if u]
        assert urls == list(row.image_urls.iloc[i])
    counts = index.groupby("gbif_id").size()
    np.testing.assert_array_equal(ds.num_embeddings.values,
                                  counts.reindex(gid).fillna(0).to_numpy())
    # species index points at the right species
    sp = open_cube(str(tiny_cubes), S.SPECIES)
    names = sp.taxon_name.values.astype(object)[ds.species_index.values]
    assert names.tolist() == row.taxon_name.tolist()
    # gbif_id index: sorted ids and their positions
    np.testing.assert_array_equal(ds.gbif_id_sorted.values, np.sort(gid))
    np.testing.assert_array_equal(gid[ds.gbif_id_order.values], ds.gbif_id_sorted.values)
    # rows are ordered by year, and each chunk's stored extent holds its rows
    years = pd.DatetimeIndex(ds.time.values).year
    assert (np.diff(years) >= 0).all()
    chunk = ds.attrs["obs_chunk_size"]
    for c in range(ds.sizes["obs_chunk"]):
        sl = slice(c * chunk, (c + 1) * chunk)
        assert ds.chunk_lat_min.values[c] == ds.lat.values[sl].min()
        assert ds.chunk_time_max.values[c] == ds.time.values[sl].max()


def test_species_match_the_source(tiny_cubes, source):
    _, obs, index, language = source
    ds = open_cube(str(tiny_cubes), S.SPECIES).load()
    names = ds.taxon_name.values.astype(object).tolist()
    assert names == sorted(language.taxon_name)
    lang = language.set_index("taxon_name")
    for i, name in enumerate(names):
        np.testing.assert_array_equal(ds.language_embedding.values[i],
                                      lang.loc[name, "language_embedding"])
        assert ds.taxon_id.values[i] == lang.loc[name, "taxon_id"]
    counts = obs.groupby("taxon_name").size()
    np.testing.assert_array_equal(ds.observation_count.values, counts.reindex(names).to_numpy())
    vis = obs.set_index("gbif_id").loc[index.gbif_id, "taxon_name"].value_counts()
    np.testing.assert_array_equal(ds.vision_count.values, vis.reindex(names).fillna(0).to_numpy())
    assert ds.umap.shape == (12, 3) and np.isfinite(ds.umap.values).all()
    assert ds.cluster.values.min() >= -1
    assert all(c.startswith("#") and len(c) == 7 for c in ds.color.values.astype(object))


def test_vision_matches_the_source(tiny_cubes, source):
    s, obs, index, _ = source
    ds = open_cube(str(tiny_cubes), S.VISION)
    keys = list(zip(ds.gbif_id.values.tolist(), ds.image_number.values.tolist(), strict=True))
    assert keys == sorted(zip(index.gbif_id, index.image_number, strict=True))
    assert ds.features.dtype == np.float16
    assert ds.features.encoding["chunks"] == (1, 8, 24, 24, 1408)
    by_key = {(r.gbif_id, r.image_number): r.features for r in s.iter_embeddings()}
    pooled = ds.pooled.values
    attention = ds.attention.values
    for i, key in enumerate(keys):
        src = by_key[key]
        np.testing.assert_array_equal(ds.features[i].values, src)  # tensor round trip
        np.testing.assert_allclose(pooled[i], src.astype(np.float32).mean(axis=(0, 1, 2)),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(attention[i], em.attention_summaries(src), rtol=1e-4, atol=1e-4)
        stats = em.image_stats(src)
        for k, v in stats.items():
            assert float(ds[f"stat_{k}"].values[i]) == pytest.approx(v, rel=1e-5)
    # the l2norm map equals an independent reduction
    f0 = by_key[keys[0]].astype(np.float32)
    np.testing.assert_allclose(attention[0, 0, 0], np.linalg.norm(f0.mean(axis=0), axis=-1),
                               rtol=1e-5)
    o = obs.set_index("gbif_id").loc[ds.gbif_id.values]
    np.testing.assert_array_equal(ds.lat.values, o.latitude.to_numpy())
    np.testing.assert_array_equal(ds.time.values, o.time.to_numpy())
    obs_cube = open_cube(str(tiny_cubes), S.OBSERVATIONS)
    np.testing.assert_array_equal(obs_cube.gbif_id.values[ds.obs_index.values], ds.gbif_id.values)
    assert ds.umap_rgb.dtype == np.uint8 and ds.umap_rgb.shape == (6, 24, 24, 3)
    assert ds.umap_rgb.values.max() == 255 and ds.umap_rgb.values.min() == 0


def test_grid_counts_equal_counts_from_the_table(tiny_cubes, source):
    _, obs, index, _ = source
    g0 = open_cube(str(tiny_cubes), S.GRID, 0).load()
    g1 = open_cube(str(tiny_cubes), S.GRID, 1).load()
    assert g0.sizes["lat"] == 2 * g1.sizes["lat"] and g0.sizes["lon"] == 2 * g1.sizes["lon"]
    years = obs.time.dt.year.value_counts().sort_index()
    per_step = g0.observation_count.sum(("lat", "lon")).values
    grid_years = pd.DatetimeIndex(g0.time.values).year
    for y, n in years.items():
        assert per_step[list(grid_years).index(y)] == n
    assert float(g1.observation_count.sum()) == len(obs)
    assert float(g0.vision_count.sum()) == len(index)
    # richness and Shannon of the fullest cell, recomputed from the table
    t, iy, ix = np.unravel_index(int(np.nanargmax(g0.observation_count.values)),
                                 g0.observation_count.shape)
    res = float(g0.attrs["spatial_res"])
    lat, lon = float(g0.lat[iy]), float(g0.lon[ix])
    sel = obs[(obs.time.dt.year == grid_years[t])
              & (obs.latitude >= lat - res / 2) & (obs.latitude < lat + res / 2)
              & (obs.longitude >= lon - res / 2) & (obs.longitude < lon + res / 2)]
    assert len(sel) == g0.observation_count.values[t, iy, ix]
    if len(sel) >= g0.attrs["min_observations"]:  # diversity is NaN in sparser cells
        assert sel.taxon_name.nunique() == g0.species_richness.values[t, iy, ix]
        p = sel.taxon_name.value_counts(normalize=True).to_numpy()
        assert g0.shannon_diversity.values[t, iy, ix] == pytest.approx(-(p * np.log(p)).sum(),
                                                                      rel=1e-5)
    else:
        assert np.isnan(g0.species_richness.values[t, iy, ix])
    # top species layers
    top = obs.taxon_name.value_counts().index[0]
    layer = g0[S.TOP_SPECIES_PREFIX + S.species_slug(top)]
    assert float(layer.sum()) == (obs.taxon_name == top).sum()
    rgb = g0.embedding_r.values
    assert np.nanmin(rgb) >= 0 and np.nanmax(rgb) <= 1 and np.isfinite(rgb).sum() >= 1
    levels = json.loads((tiny_cubes / "grid.levels" / ".zlevels").read_text())
    assert levels["num_levels"] == 6


def test_rerunning_a_finished_recipe_changes_nothing(tiny_cubes, tiny_source, tmp_path):
    target = tmp_path / "cubes"
    shutil.copytree(tiny_cubes, target)
    before = {p: p.stat().st_mtime_ns for p in target.rglob("*")}
    recipe = parse_recipe(tiny_recipe_data(tiny_source, target))
    # the copy was built by the same recipe except for the target path
    manifest = json.loads((target / S.MANIFEST).read_text())
    assert manifest["recipe"] == recipe.fingerprint()
    run_recipe(recipe, progress=False)
    after = {p: p.stat().st_mtime_ns for p in target.rglob("*")}
    assert before == after


def _gen_cmd(recipe_file: Path) -> list[str]:
    return [sys.executable, "-m", "cube_gen.cli", "gen", str(recipe_file), "--quiet"]


def test_killed_run_resumes_to_an_identical_cube(tiny_cubes, tiny_source, tmp_path):
    target = tmp_path / "cubes"
    data = tiny_recipe_data(tiny_source, target, vision={"batch_size": 1})
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    parts = target / ".staging" / "vision.parts"
    proc = subprocess.Popen(_gen_cmd(recipe_file), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if parts.exists() and any(parts.glob("part-*.npz")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # nothing looks complete
    assert not (target / S.MANIFEST).exists()
    assert not (target / "vision.zarr").exists()
    with pytest.raises(Exception):  # noqa: B017 - any failure to open is right here
        xr.open_zarr(str(target / "vision.zarr"))
    n_done = len(list(parts.glob("part-*.npz")))
    assert 1 <= n_done < 6
    out = subprocess.run(_gen_cmd(recipe_file), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (target / S.MANIFEST).exists()
    assert_cubesets_equal(str(tiny_cubes), str(target))


def test_local_dask_cluster_gives_the_same_cubes(tiny_cubes, tiny_source, tmp_path):
    target = tmp_path / "cubes"
    data = tiny_recipe_data(tiny_source, target, vision={"umap_rgb": False, "batch_size": 2})
    data["compute"] = {"scheduler": "local", "n_workers": 2, "threads_per_worker": 1,
                       "memory_limit": "2GB"}
    before = _live_children()
    run_recipe(parse_recipe(data), progress=False)
    assert not _wait_gone(_live_children() - before), "the build left cluster processes"
    for name in ("features", "pooled", "attention", "stat_mean_l2norm", "gbif_id"):
        a = open_cube(str(tiny_cubes), S.VISION)[name].values
        b = open_cube(str(target), S.VISION)[name].values
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert open_cube(str(target), S.VISION).umap_rgb.attrs.get("computed") is False


def _live_children() -> set[int]:
    """This process's live spawned children (Dask workers; not multiprocessing's resource
    tracker, which lives as long as this process)."""
    import psutil

    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(p.cmdline()):
                out.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_gone(pids: set[int], seconds: float = 10) -> set[int]:
    deadline = time.monotonic() + seconds
    while (left := pids & _live_children()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_build_compute_one_cluster_per_build_warm_and_shut_down():
    from cube_gen.compute import BuildCompute

    before = _live_children()
    compute = {"scheduler": "local", "n_workers": 2, "threads_per_worker": 1,
               "memory_limit": "2GB"}
    with BuildCompute(compute).start() as bc:
        client = bc.client()
        assert bc.client() is client  # every stage gets the same cluster
        assert len(client.scheduler_info()["workers"]) == 2
        # the task modules were imported on every worker when the cluster started
        warm = client.run(lambda: "cube_gen.chunkio" in __import__("sys").modules)
        assert list(warm.values()) == [True, True]
        workers = _live_children() - before
        assert len(workers) >= 2
    assert not _wait_gone(workers), "worker processes survived the build"
    with pytest.raises(RuntimeError, match="shut down"):
        bc.client()
    bc.close()  # twice is fine
    BuildCompute(compute).close()  # never started: nothing to shut down
    assert BuildCompute({"scheduler": "synchronous"}).start().client() is None


def test_compressed_sharded_float32_variant(tiny_source, tmp_path):
    target = tmp_path / "cubes"
    data = tiny_recipe_data(tiny_source, target, vision={
        "umap_rgb": False, "dtype": "float32", "shards": 4,
        "compressor": {"name": "zstd", "level": 1}})
    run_recipe(parse_recipe(data), progress=False)
    ds = open_cube(str(target), S.VISION)
    assert ds.features.dtype == np.float32
    assert ds.features.encoding["shards"] == (4, 8, 24, 24, 1408)
    s = SourceDataset(str(tiny_source))
    rec = next(s.iter_embeddings(dtype="float32"))
    i = int(np.flatnonzero((ds.gbif_id.values == rec.gbif_id)
                           & (ds.image_number.values == rec.image_number))[0])
    np.testing.assert_array_equal(ds.features[i].values, rec.features)


def test_broken_source_leaves_published_cubes_untouched(tiny_cubes, tiny_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_source, src)
    target = tmp_path / "cubes"
    shutil.copytree(tiny_cubes, target)
    before = {p: p.stat().st_mtime_ns for p in target.rglob("*")}
    # truncate an embedding file: the run must stop naming it, and write nothing
    f = src / "vision_embeddings" / "embeddings_000001.parquet"
    f.write_bytes(f.read_bytes()[: 1000])
    data = tiny_recipe_data(src, target)
    data["metadata"]["title"] = "changed"  # a different recipe: would rebuild everything
    with pytest.raises(SourceError, match="embeddings_000001.parquet"):
        run_recipe(parse_recipe(data), progress=False)
    after = {p: p.stat().st_mtime_ns for p in target.rglob("*")}
    assert before == after
