"""cube_gen.access: selections, lookups and feature reads against independent reads.

Expected values come from the cubes read with xarray/pandas (positions) and from the
source dataset read with :class:`cube_gen.reader.SourceDataset` (values, gbif_ids).
"""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from conftest import copy_cubes, current_dir, reinventory

from cube_gen import schema as S
from cube_gen.access import CubeSet, Query
from cube_gen.errors import ChunkCorrupt, ChunkMissing, NotFoundError
from cube_gen.reader import SourceDataset
from cube_gen.store import zarr_store


# -- independent reads ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def cs(tiny_cubes: Path) -> CubeSet:
    return CubeSet.open(str(tiny_cubes))


@pytest.fixture(scope="module")
def obs_table(tiny_cubes: Path) -> pd.DataFrame:
    """observations.zarr as a DataFrame (xarray, no CubeSet)."""
    ds = xr.open_zarr(tiny_cubes / "observations.zarr")
    names = ["gbif_id", "lat", "lon", "time", "species_index", "split", "has_vision"]
    return pd.DataFrame({k: ds[k].values for k in names})


@pytest.fixture(scope="module")
def img_table(tiny_cubes: Path) -> pd.DataFrame:
    """vision.zarr's per-image coordinates as a DataFrame (xarray, no CubeSet)."""
    ds = xr.open_zarr(tiny_cubes / "vision.zarr")
    names = ["gbif_id", "image_number", "lat", "lon", "time", "species_index", "split"]
    return pd.DataFrame({k: ds[k].values for k in names})


@pytest.fixture(scope="module")
def species_names(tiny_cubes: Path) -> list[str]:
    return [str(s) for s in xr.open_zarr(tiny_cubes / "species.zarr").taxon_name.values]


@pytest.fixture(scope="module")
def source_obs(tiny_source: Path) -> pd.DataFrame:
    return SourceDataset(str(tiny_source)).read_observations()


@pytest.fixture(scope="module")
def source_features(tiny_source: Path) -> dict[tuple[int, int], np.ndarray]:
    """(gbif_id, image_number) -> (8, 24, 24, 1408) float16, straight from the parquet files."""
    src = SourceDataset(str(tiny_source))
    index = src.read_vision_index()
    key = {(int(f), int(r)): (int(g), int(n)) for g, n, f, r in
           zip(index.gbif_id, index.image_number, index.file_idx, index.row_idx, strict=True)}
    out = {}
    for f in sorted(index.file_idx.unique()):
        for row, gid, feats in src.iter_file_embeddings(int(f)):
            assert key[(int(f), row)][0] == gid
            out[key[(int(f), row)]] = feats
    return out


def _expected(table: pd.DataFrame, bbox=None, start=None, end=None, species=None, split=None,
              has_vision=None) -> np.ndarray:
    m = np.ones(len(table), bool)
    if bbox is not None:
        w, s, e, n = bbox
        m &= table.lon.between(w, e).to_numpy() & table.lat.between(s, n).to_numpy()
    if start is not None:
        m &= (table.time >= pd.Timestamp(start)).to_numpy()
    if end is not None:
        m &= (table.time <= pd.Timestamp(end)).to_numpy()
    if species is not None:
        m &= table.species_index.isin(np.atleast_1d(species)).to_numpy()
    if split is not None:
        m &= (table.split == S.SPLIT_CODES[split]).to_numpy()
    if has_vision is not None:
        m &= (table.has_vision == has_vision).to_numpy()
    return np.flatnonzero(m)


def _queries(table: pd.DataFrame) -> list[dict]:
    lat, lon = table.lat.to_numpy(), table.lon.to_numpy()
    bbox = (float(np.quantile(lon, 0.2)), float(np.quantile(lat, 0.3)),
            float(np.quantile(lon, 0.8)), float(np.quantile(lat, 0.9)))
    t = table.time.sort_values().to_numpy()
    start, end = str(pd.Timestamp(t[len(t) // 4])), str(pd.Timestamp(t[3 * len(t) // 4]))
    sp = [int(x) for x in table.species_index.value_counts().index[:2]]
    return [
        {},
        {"bbox": bbox},
        {"start": start},
        {"end": end},
        {"start": start, "end": end},
        {"species": sp},
        {"species": sp[0]},
        {"split": "train"},
        {"split": "temporal_test"},
        {"has_vision": True},
        {"has_vision": False},
        {"bbox": bbox, "start": start, "end": end, "split": "train"},
        {"bbox": bbox, "species": sp, "has_vision": False},
        {"bbox": (0.0, 0.0, 1.0, 1.0)},  # nothing there
    ]


# -- selections ----------------------------------------------------------------------------
def test_select_observations_matches_the_table(cs, obs_table):
    for q in _queries(obs_table):
        got = cs.select_observations(**q)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, _expected(obs_table, **q), err_msg=str(q))
        # the same through a Query object, twice (second time from the chunk cache)
        np.testing.assert_array_equal(cs.select_observations(Query.make(**q)), got)


def test_select_observations_matches_the_source(cs, obs_table, source_obs, species_names):
    """gbif_ids selected from the cube equal those selected from the parquet source."""
    w, s, e, n = -81.7, 28.2, -81.1, 28.8
    name = species_names[int(obs_table.species_index.value_counts().index[0])]
    src = source_obs
    cases = [
        ({"bbox": (w, s, e, n)}, src.longitude.between(w, e) & src.latitude.between(s, n)),
        ({"split": "temporal_test"}, src.split == "temporal_test"),
        ({"has_vision": True}, src.has_vision),
        ({"species": name}, src.taxon_name == name),
        ({"start": "2015-01-01", "end": "2019-12-31T23:59:59"},
         (src.time >= "2015-01-01") & (src.time <= "2019-12-31T23:59:59")),
    ]
    for q, mask in cases:
        got = obs_table.gbif_id.to_numpy()[cs.select_observations(**q)]
        assert sorted(got.tolist()) == sorted(src.gbif_id[mask.to_numpy()].tolist()), q


def test_select_images_matches_the_vision_table(cs, img_table):
    for q in _queries(img_table.assign(has_vision=True)):
        np.testing.assert_array_equal(cs.select_images(**q),
                                      _expected(img_table.assign(has_vision=True), **q),
                                      err_msg=str(q))


def test_select_images_matches_the_source_index(cs, img_table, tiny_source, source_obs):
    index = SourceDataset(str(tiny_source)).read_vision_index()
    train = set(source_obs.gbif_id[source_obs.split == "train"])
    got = img_table.gbif_id.to_numpy()[cs.select_images(split="train")]
    want = index.gbif_id[index.gbif_id.isin(train)]
    assert sorted(got.tolist()) == sorted(want.tolist())


def test_species_by_name_and_taxon_id(cs, obs_table, species_names):
    table = cs.species_table()
    i = int(obs_table.species_index.value_counts().index[0])
    by_index = cs.select_observations(species=[i])
    assert len(by_index)
    np.testing.assert_array_equal(cs.select_observations(species=species_names[i]), by_index)
    np.testing.assert_array_equal(
        cs.select_observations(species=species_names[i].upper()), by_index)
    np.testing.assert_array_equal(
        cs.select_observations(species=[str(table.taxon_id[i])]), by_index)
    with pytest.raises(NotFoundError, match="unknown species 'Nonexistent plant'"):
        cs.select_images(species=["Nonexistent plant"])


def test_query_validation():
    with pytest.raises(ValueError, match="bbox must be"):
        Query.make(bbox=(1, 2, 3))
    with pytest.raises(ValueError, match="split must be one of train, temporal_test"):
        Query.make(split="test")


# -- lookups -------------------------------------------------------------------------------
def test_lookups_and_not_found_messages(cs, img_table, obs_table):
    for i, (g, n) in enumerate(zip(img_table.gbif_id, img_table.image_number, strict=True)):
        assert cs.image_position(int(g), int(n)) == i
        assert i in cs.images_of(int(g))
    rev = np.arange(len(img_table))[::-1]
    np.testing.assert_array_equal(
        cs.image_positions(img_table.gbif_id.to_numpy()[rev],
                           img_table.image_number.to_numpy()[rev]), rev)
    for k in (0, len(obs_table) - 1):
        assert cs.obs_position(int(obs_table.gbif_id[k])) == k
        assert cs.observation(int(obs_table.gbif_id[k]))["gbif_id"] == int(obs_table.gbif_id[k])
    unknown = int(obs_table.gbif_id.max()) + 1
    with pytest.raises(NotFoundError, match=f"no observation with gbif_id {unknown}$") as err:
        cs.image_position(unknown)
    assert (err.value.parameter, err.value.value) == ("gbif_id", unknown)
    no_vision = int(obs_table.gbif_id[~obs_table.gbif_id.isin(img_table.gbif_id)].iloc[0])
    with pytest.raises(NotFoundError, match=f"observation {no_vision} has no vision embedding$"):
        cs.image_position(no_vision)
    with pytest.raises(NotFoundError, match=f"no observation with gbif_id {unknown}$"):
        cs.obs_position(unknown)
    multi = img_table.gbif_id[img_table.image_number == 1]
    g = int(multi.iloc[0])
    with pytest.raises(NotFoundError, match=rf"observation {g} has no embedding for image 7 "
                       r"\(image numbers: 0, 1\)") as err:
        cs.image_position(g, 7)
    assert (err.value.parameter, err.value.allowed) == ("image_number", [0, 1])
    with pytest.raises(NotFoundError, match=rf"observation {g} has no embedding for image 7"):
        cs.image_positions([int(img_table.gbif_id[0]), g], [0, 7])
    n = len(img_table)
    with pytest.raises(NotFoundError, match=rf"image position {n} is out of range \[0, {n}\)$"):
        cs.features(n)
    with pytest.raises(NotFoundError, match=r"image position -1 is out of range .* \(item 1 of"):
        cs.features_batch([0, -1])
    with pytest.raises(ValueError, match=r"frame must be in \[0, 8\)"):
        cs.features(0, frame=8)


# -- feature reads ---------------------------------------------------------------------------
def test_features_equal_the_source(cs, source_features):
    assert cs.raw_layout() is not None  # the raw fast path applies to the default cube
    for (g, n), want in source_features.items():
        pos = cs.image_position(g, n)
        got = cs.features(pos)
        assert got.dtype == np.float16 and got.shape == (8, 24, 24, 1408)
        np.testing.assert_array_equal(got, want)
        got32 = cs.features(pos, "float32")
        assert got32.dtype == np.float32
        np.testing.assert_array_equal(got32, want.astype(np.float32))
        np.testing.assert_array_equal(cs.features(pos, frame=5), want[5])
        np.testing.assert_array_equal(cs.features(pos, "float32", frame=0), want[0].astype("f4"))
    # the raw path and zarr agree
    arr = cs.features_array()
    np.testing.assert_array_equal(cs.features(1), arr[1])


def test_features_into_a_preallocated_array(cs):
    buf = np.empty((8, 24, 24, 1408), np.float32)
    assert cs.features(2, "float32", out=buf) is buf
    np.testing.assert_array_equal(buf, cs.features(2).astype(np.float32))
    with pytest.raises(ValueError, match="out has shape"):
        cs.features(2, out=np.empty((24, 24, 1408), np.float16))


def test_features_batch_keeps_the_order(cs):
    n = cs.features_array().shape[0]
    order = [3, 0, n - 1, 3, 1, 0]
    singles = {i: cs.features(i) for i in set(order)}
    got = cs.features_batch(order)
    assert got.shape == (len(order), 8, 24, 24, 1408) and got.dtype == np.float16
    for k, i in enumerate(order):
        np.testing.assert_array_equal(got[k], singles[i])
    got32 = cs.features_batch(order, "float32", frame=2, max_workers=1)
    assert got32.dtype == np.float32 and got32.shape == (len(order), 24, 24, 1408)
    for k, i in enumerate(order):
        np.testing.assert_array_equal(got32[k], singles[i][2].astype(np.float32))
    assert cs.features_batch([]).shape == (0, 8, 24, 24, 1408)


def test_pooled_vectors(cs, source_features):
    allp = cs.pooled()
    assert allp.dtype == np.float32 and not allp.flags.writeable
    for (g, n), feats in source_features.items():
        pos = cs.image_position(g, n)
        want = feats.astype(np.float64).mean(axis=(0, 1, 2))
        np.testing.assert_allclose(allp[pos], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(cs.pooled([4, 1, 4]), allp[[4, 1, 4]])


def test_cubeset_pickles_and_closes(cs):
    other = pickle.loads(pickle.dumps(cs))
    assert other.url == cs.url and other is not cs
    np.testing.assert_array_equal(other.features(0), cs.features(0))
    with CubeSet.open(cs.url) as c2:
        c2.features(0)
        assert c2.raw_layout().maps.used > 0
    assert not c2._cache  # closed: maps and tables dropped
    np.testing.assert_array_equal(c2.features(0), cs.features(0))  # and reopened on demand


# -- other encodings: sharded, compressed, Zarr v2, missing chunks, remote ---------------------
def _reencode(src: Path, dst: Path, zarr_format: int = 3, **kw) -> np.ndarray:
    """A copy of the cube set whose vision features use another encoding; returns the data."""
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("grid*.levels"))
    vision = current_dir(dst) / "vision.zarr"
    group = zarr.open_group(zarr_store(str(vision)), mode="r+")
    data = group["features"][:]
    attrs = dict(group["features"].attrs)
    del group["features"]
    if zarr_format == 2:
        arr = zarr.create_array(zarr_store(str(vision)), name="features",
                                shape=data.shape, dtype=data.dtype, zarr_format=2,
                                fill_value=np.nan, **kw)
    else:
        arr = group.create_array("features", shape=data.shape, dtype=data.dtype,
                                 fill_value=np.nan, dimension_names=(
                                     "image", "frame", "patch_y", "patch_x", "feature"), **kw)
    arr[:] = data
    arr.attrs.update(attrs)
    if zarr_format == 3:
        zarr.consolidate_metadata(zarr_store(str(vision)))
    reinventory(dst)
    return data


CHUNK = (1, 8, 24, 24, 1408)


@pytest.mark.parametrize("name, kw, per_file", [
    ("sharded", {"chunks": CHUNK, "shards": (4, 8, 24, 24, 1408), "compressors": None}, 4),
    ("zstd", {"chunks": CHUNK, "compressors": zarr.codecs.ZstdCodec(level=1)}, None),
    ("v2", {"chunks": CHUNK, "compressors": None, "zarr_format": 2}, 1),
])
def test_other_encodings_read_the_same(tiny_cubes, tmp_path, name, kw, per_file):
    data = _reencode(tiny_cubes, tmp_path / name, **kw)
    cs = CubeSet.open(str(tmp_path / name))
    layout = cs.raw_layout()
    assert (layout.per_file if layout else None) == per_file
    np.testing.assert_array_equal(cs.features(5), data[5])
    np.testing.assert_array_equal(cs.features(2, "float32", frame=7), data[2, 7].astype("f4"))
    order = [5, 0, 3, 3, 1, 2, 4]
    np.testing.assert_array_equal(cs.features_batch(order), data[order])
    np.testing.assert_array_equal(cs.features_batch(order[:3], "float32", frame=1, max_workers=1),
                                  data[order[:3]][:, 1].astype(np.float32))


def test_a_missing_chunk_is_an_error_naming_it_and_a_restored_one_reads_again(tiny_cubes,
                                                                            tmp_path):
    plain = copy_cubes(tiny_cubes, tmp_path / "plain")
    cs = CubeSet.open(str(plain))
    want = cs.features(2)
    path = Path(cs.raw_chunk_path(2))
    saved = path.read_bytes()
    path.unlink()
    key = "vision.zarr/features/c/2/0/0/0/0"
    for read in (lambda: cs.features(2), lambda: cs.features_batch([1, 2, 3]),
                 lambda: cs.features(2, frame=3), lambda: cs.vision.features[2].values):
        with pytest.raises(ChunkMissing, match=re.escape(f"chunk {key} is missing")) as err:
            read()
        assert err.value.chunk == key and err.value.version == cs.version
    path.write_bytes(saved)  # restored: read again, nothing cached from the failure
    np.testing.assert_array_equal(cs.features(2), want)
    np.testing.assert_array_equal(cs.features_batch([1, 2])[1], want)

    # another array: an attention chunk, through zarr
    att = current_dir(plain) / "vision.zarr" / "attention" / "c" / "1" / "0" / "0" / "0" / "0"
    att.unlink()
    with pytest.raises(ChunkMissing, match="vision.zarr/attention/c/1/0/0/0/0"):
        cs.attention(1)
    # the pooled vectors (read whole and cached): nothing cached when a chunk is missing
    pooled = current_dir(plain) / "vision.zarr" / "pooled" / "c" / "0" / "0"
    blob = pooled.read_bytes()
    pooled.unlink()
    cs.clear_caches()
    with pytest.raises(ChunkMissing, match="vision.zarr/pooled/c/0/0"):
        cs.pooled()
    pooled.write_bytes(blob)
    assert cs.pooled().shape == (6, 1408)


def test_an_all_fill_inner_chunk_of_a_shard_reads_as_fill(tiny_cubes, tmp_path):
    sharded = tmp_path / "sharded"
    data = _reencode(tiny_cubes, sharded, chunks=CHUNK, shards=(4, 8, 24, 24, 1408),
                     compressors=None)
    vision = current_dir(sharded) / "vision.zarr"
    arr = zarr.open_array(zarr_store(str(vision)), path="features", mode="r+")
    arr[1] = np.nan  # an all-fill inner chunk is not written: the data is the fill value
    reinventory(sharded)
    cs = CubeSet.open(str(sharded))
    got = cs.features_batch([0, 1, 2, 5])
    assert np.isnan(got[1]).all()
    np.testing.assert_array_equal(got[[0, 2, 3]], data[[0, 2, 5]])


def test_truncated_chunk_is_an_error(tiny_cubes, tmp_path):
    broken = copy_cubes(tiny_cubes, tmp_path / "broken")
    cs = CubeSet.open(str(broken))
    path = Path(cs.raw_chunk_path(0))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ChunkCorrupt, match=r"chunk vision.zarr/features/c/0/0/0/0/0 is damaged"
                       r".*chunk data is truncated"):
        cs.features(0)
    # through zarr too (a remote-style read of the same chunk): the size differs from the manifest
    with pytest.raises(ChunkCorrupt, match="vision.zarr/features/c/0/0/0/0/0"):
        cs.features_array()[0]


def test_remote_cubes_read_through_zarr(tiny_cubes, cs):
    """An fsspec URL (here memory://) takes the zarr path: same values, batch order kept."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.put(str(tiny_cubes), "/ml-remote", recursive=True)
    try:
        remote = CubeSet.open("memory://ml-remote")
        assert remote.raw_layout() is None
        np.testing.assert_array_equal(remote.features(3), cs.features(3))
        order = [4, 0, 5, 4]
        np.testing.assert_array_equal(remote.features_batch(order), cs.features_batch(order))
        np.testing.assert_array_equal(remote.features_batch(order, "float32", frame=3),
                                      cs.features_batch(order, "float32", frame=3))
        np.testing.assert_array_equal(remote.select_images(split="train"),
                                      cs.select_images(split="train"))
    finally:
        fs.rm("/ml-remote", recursive=True)


def _observation_in_child(cs: CubeSet, gbif_id: int, queue) -> None:
    queue.put(cs.observation(gbif_id)["gbif_id"])  # a dask computation in the child


def test_dask_reads_work_in_a_forked_child(cs, obs_table):
    """A forked process (a DataLoader worker) computes with dask after the parent did."""
    import multiprocessing as mp

    gid = int(obs_table.gbif_id[0])
    assert cs.observation(gid)["gbif_id"] == gid  # the parent starts dask's thread pool
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_observation_in_child, args=(cs, gid, queue))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung on dask's thread pool")
    assert child.exitcode == 0 and queue.get(timeout=5) == gid
