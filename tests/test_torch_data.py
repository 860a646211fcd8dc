"""cube_gen.torch_data: samples equal the source, selections, sharding, shuffling, workers."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import copy_cubes, current_dir
from torch.utils.data import DataLoader

from cube_gen.access import CubeSet
from cube_gen.errors import ChunkMissing
from cube_gen.reader import SourceDataset
from cube_gen.torch_data import (
    CubeDataset,
    CubeIterableDataset,
    ThreadedLoader,
    collate,
    make_loader,
    resolve_device,
)


@pytest.fixture(scope="module")
def source(tiny_source: Path) -> dict:
    """What the source says about every embedding, keyed by (gbif_id, image_number)."""
    src = SourceDataset(str(tiny_source))
    obs = src.read_observations().set_index("gbif_id")
    lang = src.read_species_language().set_index("taxon_name")
    index = src.read_vision_index()
    key = {(int(f), int(r)): (int(g), int(n)) for g, n, f, r in
           zip(index.gbif_id, index.image_number, index.file_idx, index.row_idx, strict=True)}
    out = {}
    for f in sorted(index.file_idx.unique()):
        for row, gid, feats in src.iter_file_embeddings(int(f)):
            o = obs.loc[gid]
            out[key[(int(f), row)]] = {
                "features": feats, "taxon_name": o.taxon_name, "lat": o.latitude,
                "lon": o.longitude, "time": pd.Timestamp(o.time), "split": o.split,
                "language": lang.language_embedding[o.taxon_name]}
    return out


def _ids(samples) -> list[int]:
    return sorted(int(i) for s in samples for i in torch.atleast_1d(s["image"]))


def _year_fraction(t: pd.Timestamp) -> float:
    start = pd.Timestamp(year=t.year, month=1, day=1)
    end = pd.Timestamp(year=t.year + 1, month=1, day=1)
    return t.year + (t - start) / (end - start)


# -- sample contents -------------------------------------------------------------------------
def test_samples_equal_the_source(tiny_cubes, source):
    ds = CubeDataset(str(tiny_cubes), features="full", dtype="float16")
    assert len(ds) == len(source)
    for i in range(len(ds)):
        s = ds[i]
        want = source[(int(s["gbif_id"]), int(s["image_number"]))]
        assert s["features"].dtype == torch.float16 and s["features"].shape == (8, 24, 24, 1408)
        np.testing.assert_array_equal(s["features"].numpy(), want["features"])
        assert ds.species_names[int(s["species"])] == want["taxon_name"]
        assert s["species"].dtype == torch.int64
        np.testing.assert_array_equal(s["language"].float().numpy(),
                                      want["language"].astype(np.float16).astype(np.float32))
        assert s["lat"].dtype == torch.float64 and float(s["lat"]) == want["lat"]
        assert float(s["lon"]) == want["lon"]
        assert float(s["time"]) == want["time"].value / 1e9


def test_float32_frame_pooled_and_year_time(tiny_cubes, source):
    cs = CubeSet.open(str(tiny_cubes))
    full32 = CubeDataset(str(tiny_cubes), features="full")
    frame = CubeDataset(cs, features="frame", frame=3, dtype="float16", time_format="year")
    pooled = CubeDataset(cs, features="pooled", language=False)
    assert full32.dtype == "float32"
    for i in (0, len(full32) - 1):
        a, b, c = full32[i], frame[i], pooled[i]
        want = source[(int(a["gbif_id"]), int(a["image_number"]))]
        assert a["features"].dtype == torch.float32 and a["language"].dtype == torch.float32
        np.testing.assert_array_equal(a["features"].numpy(), want["features"].astype(np.float32))
        np.testing.assert_array_equal(a["language"].numpy(), want["language"])
        assert b["features"].shape == (24, 24, 1408)
        np.testing.assert_array_equal(b["features"].numpy(), want["features"][3])
        assert float(b["time"]) == pytest.approx(_year_fraction(want["time"]), abs=1e-9)
        assert c["features"].shape == (1408,) and "language" not in c
        np.testing.assert_array_equal(c["features"].numpy(), cs.pooled([int(c["image"])])[0])


def test_selection_passes_through(tiny_cubes, source):
    cs = CubeSet.open(str(tiny_cubes))
    t = cs.image_table()
    name = cs.species_table().taxon_name[int(t.species_index[0])]
    lat, lon = t.lat.to_numpy(), t.lon.to_numpy()
    bbox = (float(lon.min()), float(lat.min()), float(np.median(lon)), float(lat.max()))
    start, end = str(t.time.min()), str(t.time.sort_values().iloc[len(t) // 2])
    for q in ({"split": "train"}, {"species": name}, {"bbox": bbox},
              {"start": start, "end": end}, {"bbox": bbox, "split": "temporal_test"}):
        ds = CubeDataset(str(tiny_cubes), features=None, **q)
        np.testing.assert_array_equal(ds.positions, cs.select_images(**q), err_msg=str(q))
        keys = {(int(ds[i]["gbif_id"]), int(ds[i]["image_number"])) for i in range(len(ds))}
        want = set()
        for k, v in source.items():
            ok = True
            if "split" in q:
                ok &= v["split"] == q["split"]
            if "species" in q:
                ok &= v["taxon_name"] == name
            if "bbox" in q:
                ok &= bbox[0] <= v["lon"] <= bbox[2] and bbox[1] <= v["lat"] <= bbox[3]
            if "start" in q:
                ok &= pd.Timestamp(start) <= v["time"] <= pd.Timestamp(end)
            if ok:
                want.add(k)
        assert keys == want, q


def test_invalid_arguments(tiny_cubes):
    with pytest.raises(ValueError, match="features must be one of full, frame, pooled or None"):
        CubeDataset(str(tiny_cubes), features="mean")
    with pytest.raises(ValueError, match="dtype must be float32 or float16"):
        CubeDataset(str(tiny_cubes), dtype="float64")
    with pytest.raises(ValueError, match=r"frame must be in \[0, 8\)"):
        CubeDataset(str(tiny_cubes), features="frame", frame=8)
    with pytest.raises(ValueError, match="time_format must be one of seconds, year"):
        CubeDataset(str(tiny_cubes), time_format="days")
    with pytest.raises(ValueError, match="rank must be in"):
        CubeIterableDataset(str(tiny_cubes), rank=2, world_size=2)
    ds = CubeDataset(str(tiny_cubes))
    with pytest.raises(IndexError, match="out of range"):
        ds[len(ds)]


# -- loaders, sharding, shuffling -------------------------------------------------------------
def test_map_style_two_workers_see_each_sample_once(tiny_cubes):
    ds = CubeDataset(str(tiny_cubes), features="full", dtype="float16")
    ref = {int(ds[i]["image"]): ds[i]["features"] for i in range(len(ds))}
    seen = []
    for batch in DataLoader(ds, batch_size=2, shuffle=True, num_workers=2, timeout=60,
                            generator=torch.Generator().manual_seed(0)):
        assert batch["features"].shape == (len(batch["image"]), 8, 24, 24, 1408)
        for img, feats in zip(batch["image"], batch["features"], strict=True):
            assert torch.equal(feats, ref[int(img)])
            seen.append(int(img))
    assert sorted(seen) == sorted(ref)


def test_iterable_two_workers_and_two_ranks_partition_each_epoch(tiny_cubes):
    everything = list(range(len(CubeDataset(str(tiny_cubes), features=None))))
    it = CubeIterableDataset(str(tiny_cubes), features="pooled", shuffle=True, seed=3,
                             block_size=2)
    for epoch in (0, 1):
        it.set_epoch(epoch)
        batches = list(DataLoader(it, batch_size=2, num_workers=2, timeout=60))
        assert _ids(batches) == everything
    shards = []
    for rank in (0, 1):
        part = CubeIterableDataset(str(tiny_cubes), features=None, shuffle=True, seed=3,
                                   rank=rank, world_size=2)
        shards.append(_ids(DataLoader(part, batch_size=None, num_workers=2, timeout=60)))
        assert len(part) == len(shards[-1])
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == everything
    # drop_last: equal shares
    odd = CubeIterableDataset(str(tiny_cubes), features=None, images=everything[:5],
                              world_size=2, rank=1, drop_last=True)
    assert len(odd) == 2 == len(list(odd))


def test_deterministic_shuffle(tiny_cubes):
    def order(seed, epoch=0, shuffle=True):
        it = CubeIterableDataset(str(tiny_cubes), features=None, shuffle=shuffle, seed=seed)
        it.set_epoch(epoch)
        return [int(s["image"]) for s in it]

    n = len(CubeDataset(str(tiny_cubes), features=None))
    assert order(7) == order(7)
    assert sorted(order(7)) == list(range(n))
    assert order(7) != order(7, epoch=1) or order(7) != order(8)
    assert order(7, shuffle=False) == list(range(n))
    # map-style: the sampler is deterministic too, and shards exactly
    ds = CubeDataset(str(tiny_cubes), features=None)
    a = [list(ds.sampler(seed=5, rank=r, world_size=2)) for r in (0, 1)]
    assert a == [list(ds.sampler(seed=5, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(a[0] + a[1]) == list(range(n))


def test_collate_passes_the_batch_on_uncopied(tiny_cubes):
    ds = CubeDataset(str(tiny_cubes), features="full", dtype="float16")
    samples = ds.__getitems__([4, 1, 4])
    batch = collate(samples)
    assert batch["features"].shape == (3, 8, 24, 24, 1408)
    assert batch["features"].data_ptr() == samples[0]["features"].data_ptr()  # no stacking
    assert batch["image"].tolist() == [4, 1, 4]
    for j, i in enumerate([4, 1, 4]):
        assert torch.equal(batch["features"][j], ds[i]["features"])
    # samples not from one read are stacked as default_collate does
    mixed = collate([ds[2], ds[0]])
    assert torch.equal(mixed["features"][1], ds[0]["features"])
    assert mixed["features"].data_ptr() != ds[2]["features"].data_ptr()


def test_threaded_loader_and_iterable_batches(tiny_cubes):
    ds = CubeDataset(str(tiny_cubes), features="frame", frame=4, dtype="float16")
    g = torch.Generator().manual_seed(1)
    loader = make_loader(ds, batch_size=4, threads=2, shuffle=True, generator=g)
    assert isinstance(loader, ThreadedLoader) and len(loader) == 2
    batches = list(loader)
    assert _ids(batches) == list(range(len(ds)))
    for b in batches:
        for img, feats in zip(b["image"], b["features"], strict=True):
            assert torch.equal(feats, ds[int(img)]["features"])
    with pytest.raises(ValueError, match="threads need a map-style CubeDataset"):
        make_loader(ds, threads=2, num_workers=2)
    it = CubeIterableDataset(str(tiny_cubes), features="pooled", batch_size=4, shuffle=True,
                             seed=2)
    got = list(make_loader(it, num_workers=2))  # the dataset batches; workers split blocks
    assert [len(b["image"]) for b in got] in ([4, 2], [2, 4], [3, 3])
    assert _ids(got) == list(range(len(ds)))


def test_dataset_pickles_without_handles(tiny_cubes):
    ds = CubeDataset(str(tiny_cubes), features="pooled")
    ds[0]
    assert ds._cubes is not None and ds._language is not None
    blob = pickle.dumps(ds)
    assert len(blob) < 100_000  # no cube handles, no language table
    copy = pickle.loads(blob)
    assert copy._cubes is None
    assert torch.equal(copy[1]["features"], ds[1]["features"])


def test_device_placement(tiny_cubes):
    dev = resolve_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")
    ds = CubeDataset(str(tiny_cubes), features="pooled", device="auto")
    assert ds[0]["features"].device.type == dev.type
    for workers in (0, 2):
        batches = list(make_loader(ds, batch_size=4, num_workers=workers))
        assert all(b["features"].device.type == dev.type for b in batches)
        assert _ids(batches) == list(range(len(ds)))


def test_from_s3(s3, tiny_cubes):
    """storage_options pass through to every worker process."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3.storage_options)
    s3.create_bucket("deepearth-ml")
    images = [0, 3]
    chunks = {f"vision.zarr/features/c/{i}/0/0/0/0" for i in images}
    vdir = current_dir(tiny_cubes)
    fs.pipe_file("deepearth-ml/cubes/cubeset.json", (tiny_cubes / "cubeset.json").read_bytes())
    for path in sorted(vdir.rglob("*")):  # what the dataset reads (moto is slow)
        rel = path.relative_to(vdir).as_posix()
        if path.is_file() and rel.split("/")[0] in ("release.json", "species.zarr",
                                                     "observations.zarr", "vision.zarr") and (
                "/c/" not in rel or "/features/" not in rel and "/attention/" not in rel
                or rel in chunks):
            fs.pipe_file(f"deepearth-ml/cubes/versions/{vdir.name}/{rel}", path.read_bytes())
    url = "s3://deepearth-ml/cubes"
    local = CubeDataset(str(tiny_cubes), features="frame", frame=2, images=images)
    remote = CubeDataset(url, storage_options=s3.storage_options, features="frame", frame=2,
                         images=images)
    assert remote.cubes.raw_layout() is None
    assert remote.version == local.version == vdir.name  # the version read is recorded
    np.testing.assert_array_equal(remote.positions, images)
    batches = list(DataLoader(remote, batch_size=1, num_workers=2, timeout=120))
    got = torch.cat([b["features"] for b in batches])
    want = torch.stack([local[i]["features"] for i in range(len(local))])
    assert torch.equal(got, want)
    assert torch.equal(torch.cat([b["gbif_id"] for b in batches]),
                       torch.stack([local[i]["gbif_id"] for i in range(len(local))]))


def test_a_missing_chunk_is_an_error_in_the_datasets(tiny_cubes, tmp_path):
    cubes = copy_cubes(tiny_cubes, tmp_path / "cubes")
    ds = CubeDataset(str(cubes), features="full", dtype="float16")
    want = ds[2]["features"].clone()
    chunk = Path(ds.cubes.raw_chunk_path(int(ds.positions[2])))
    blob = chunk.read_bytes()
    chunk.unlink()
    with pytest.raises(ChunkMissing, match=r"chunk vision.zarr/features/c/\d+/0/0/0/0 is missing"):
        ds[2]
    with pytest.raises(ChunkMissing):
        next(iter(make_loader(ds, batch_size=4, threads=2)))
    it = CubeIterableDataset(str(cubes), features="frame", frame=1)
    with pytest.raises(ChunkMissing):
        list(it)
    chunk.write_bytes(blob)  # restored: read again
    assert torch.equal(ds[2]["features"], want)
