"""cube_gen.sampling: leakage rules (groups, time, spatial buffer) and species balance."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cube_gen.sampling import (
    EXCLUDED,
    TEST,
    TRAIN,
    LeakageError,
    SpeciesBalancedSampler,
    Split,
    check_split,
    make_split,
    min_distance_km,
    project_km,
    random_split,
    spatial_block_split,
    split_datasets,
    temporal_split,
)


def fake_table(n_obs: int = 600, seed: int = 1) -> pd.DataFrame:
    """An image table like CubeSet.image_table(): 1-3 images per observation."""
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 4, n_obs)
    gid = np.repeat(np.arange(1000, 1000 + n_obs), per)
    num = np.concatenate([np.arange(k) for k in per])
    lat = np.repeat(rng.uniform(28.03, 28.98, n_obs), per)
    lon = np.repeat(rng.uniform(-81.93, -80.90, n_obs), per)
    year = np.repeat(rng.integers(2010, 2026, n_obs), per)
    time = pd.to_datetime({"year": year, "month": 6, "day": 1}).to_numpy()
    species = np.repeat(rng.choice(8, n_obs, p=[.4, .2, .1, .1, .08, .06, .04, .02]), per)
    return pd.DataFrame({"gbif_id": gid, "image_number": num, "obs_index": np.repeat(
        np.arange(n_obs), per), "species_index": species, "time": time, "lat": lat, "lon": lon,
        "split": (year == 2025).astype(np.int8)})


def test_temporal_split_is_the_published_split():
    t = fake_table()
    s = temporal_split(t)
    assert np.array_equal(s.train, np.flatnonzero(t.split == 0))
    assert np.array_equal(s.test, np.flatnonzero(t.split == 1))
    assert len(s.train) + len(s.test) == len(t) and len(s.excluded) == 0
    assert t.time.iloc[s.train].max() < t.time.iloc[s.test].min()
    assert set(t.time.iloc[s.test].dt.year) == {2025}
    roles = s.roles(len(t))
    assert (roles[s.train] == TRAIN).all() and (roles[s.test] == TEST).all()


def test_temporal_split_rejects_time_leakage():
    t = fake_table()
    t.loc[t.index[t.split == 0][0], "time"] = pd.Timestamp("2025-07-01")  # a "train" row in 2025
    with pytest.raises(LeakageError, match="not earlier"):
        temporal_split(t)


@pytest.mark.parametrize("block_km,buffer_km", [(10.0, 2.0), (5.0, 7.5), (20.0, 0.0)])
def test_spatial_blocks_respect_the_buffer(block_km, buffer_km):
    t = fake_table()
    s = spatial_block_split(t, block_km=block_km, buffer_km=buffer_km, test_fraction=0.25,
                            seed=3)
    assert len(s.train) > 0 and len(s.test) > 0
    # every image is in exactly one of train / test / excluded
    allpos = np.concatenate([s.train, s.test, s.excluded])
    assert np.array_equal(np.sort(allpos), np.arange(len(t)))
    # brute force: no training point within the buffer of a test point
    d = min_distance_km(t, s.train, s.test)
    assert d >= buffer_km
    if buffer_km:
        assert len(s.excluded) > 0  # something really was dropped
        # and what was dropped really was near a test point
        assert min_distance_km(t, s.excluded, s.test) < buffer_km
    # no observation on both sides
    assert not set(t.gbif_id.iloc[s.train]) & set(t.gbif_id.iloc[s.test])
    # test points cover whole blocks: every point of a test block is a test point
    lat0 = float(t.lat.mean())
    x, y = project_km(t.lat.to_numpy(), t.lon.to_numpy(), lat0)
    bi = np.floor((x - x.min()) / block_km)
    bj = np.floor((y - y.min()) / block_km)
    tb = set(zip(bi[s.test], bj[s.test], strict=True))
    member = np.array([(a, b) in tb for a, b in zip(bi, bj, strict=True)])
    assert np.array_equal(np.flatnonzero(member), s.test)


def test_spatial_split_is_deterministic_and_seeded():
    t = fake_table()
    a = spatial_block_split(t, seed=0)
    b = spatial_block_split(t, seed=0)
    c = spatial_block_split(t, seed=1)
    assert np.array_equal(a.test, b.test)
    assert not np.array_equal(a.test, c.test)


def test_random_split_keeps_observations_whole():
    t = fake_table()
    s = random_split(t, test_fraction=0.3, seed=2)
    gid = t.gbif_id.to_numpy()
    assert not set(gid[s.train]) & set(gid[s.test])
    assert len(s.train) + len(s.test) == len(t)
    n_groups = len(np.unique(gid))
    assert len(np.unique(gid[s.test])) == round(0.3 * n_groups)
    multi = t.groupby("gbif_id").size()
    assert (multi > 1).any()  # the table really has multi-image observations


def test_check_split_names_observations_on_both_sides():
    t = fake_table()
    gid = t.gbif_id.to_numpy()
    two = int(t.gbif_id.value_counts().index[0])  # an observation with several images
    rows = np.flatnonzero(gid == two)
    bad = Split("random", rows[:1], rows[1:])
    with pytest.raises(LeakageError, match=str(two)):
        check_split(t, bad)
    with pytest.raises(LeakageError, match="both sides"):
        check_split(t, Split("random", rows, rows))


def test_make_split_dispatch_and_errors():
    t = fake_table()
    assert make_split(t, "temporal").method == "temporal"
    assert make_split(t, "random", test_fraction=0.5).method == "random"
    with pytest.raises(ValueError, match="split method"):
        make_split(t, "kfold")
    with pytest.raises(ValueError, match="no parameters"):
        make_split(t, "temporal", seed=1)
    with pytest.raises(ValueError, match="test_fraction"):
        make_split(t, "spatial", test_fraction=1.5)
    # candidates: only the given images are split
    sub = np.arange(0, len(t), 2)
    s = make_split(t, "random", images=sub, seed=0)
    assert set(s.train) | set(s.test) <= set(sub)


@pytest.mark.parametrize("mode", ["weights", "cap"])
def test_species_balanced_sampler_balances(mode):
    t = fake_table(n_obs=2000)
    labels = t.species_index.to_numpy()
    raw = np.bincount(labels, minlength=8) / len(labels)
    assert raw.max() / raw.min() > 10  # strongly unbalanced to start with
    s = SpeciesBalancedSampler(labels, mode=mode, num_samples=40_000, per_species=500, seed=0)
    idx = np.fromiter(iter(s), np.int64)
    assert len(idx) == len(s)
    freq = np.bincount(labels[idx], minlength=8) / len(idx)
    if mode == "cap":
        assert np.allclose(freq, 1 / 8)  # exactly per_species of each
        assert len(idx) == 8 * 500
    else:
        assert np.abs(freq - 1 / 8).max() < 0.01
        assert np.isclose(s.weights().sum(), 1.0)
    s.set_epoch(1)
    assert not np.array_equal(np.fromiter(iter(s), np.int64), idx)  # reshuffled per epoch
    s.set_epoch(0)
    assert np.array_equal(np.fromiter(iter(s), np.int64), idx)  # deterministic


def test_species_balanced_cap_without_replacement_keeps_rare_species_unique():
    labels = np.array([0] * 50 + [1] * 3)
    s = SpeciesBalancedSampler(torch.tensor(labels), mode="cap", per_species=10,
                               replacement=False, seed=0)
    idx = list(s)
    assert len(idx) == len(s) == 13 and len(set(idx)) == 13
    assert sorted(i for i in idx if labels[i] == 1) == [50, 51, 52]


def test_split_datasets_on_the_tiny_cubes(tiny_cubes):
    train, test, split = split_datasets(tiny_cubes, "random", {"test_fraction": 0.4, "seed": 0},
                                        features="pooled", language=False)
    assert len(train) + len(test) == 6  # the tiny cubes hold 6 embeddings of 5 observations
    tr = {int(train[i]["gbif_id"]) for i in range(len(train))}
    te = {int(test[i]["gbif_id"]) for i in range(len(test))}
    assert tr and te and not tr & te
    assert np.array_equal(train.positions, split.train)
    assert train[0]["features"].shape == (1408,)
    # the published split of the tiny cubes: all 6 embeddings are from before 2025
    _, test_t, s = split_datasets(tiny_cubes, "temporal", features=None)
    assert len(test_t) == 0 and len(s.train) == 6
    assert (s.roles(6) != EXCLUDED).all()
