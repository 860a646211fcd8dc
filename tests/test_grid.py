"""The grid pyramids (cube_gen/grid.py) and the grid-variable registry (grid_variables.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from cube_gen import derive as D
from cube_gen import grid_variables as G
from cube_gen import schema as S
from cube_gen.reader import SourceDataset


# -- registry and pure functions -----------------------------------------------------------
def test_integer_range_leaves_at_most_the_top_fraction_at_the_top_colour():
    rng = np.random.default_rng(0)
    values = np.floor(rng.pareto(1.5, 5000) + 1)  # heavy tail, most cells 1 or 2
    lo, hi = G.ColorRange(vmin=1, integer=True).fit(values)
    assert lo == 1 and hi == int(hi)
    assert (values >= hi).mean() <= 0.015
    assert (values >= hi - 1).mean() > 0.015  # the smallest such integer
    # several levels: the busiest decides, so no level saturates
    _, hi2 = G.ColorRange(vmin=1, integer=True).fit([values, values * 10])
    assert (values * 10 >= hi2).mean() <= 0.015


def test_registry_drives_recipe_switches_and_attributes():
    assert "simpson_diversity" in G.switches() and "embedding_rgb" in G.switches()
    var = G.lookup("observation_density")
    assert var.units == "km-2" and var.attrs["color_scale"] == "log"
    sp = G.lookup("count_quercus_virginiana", {"taxon_name": "Quercus virginiana"})
    assert sp.long_name == "observations of Quercus virginiana"
    assert G.lookup("no_such_layer") is None


def test_cell_statistics_match_hand_computed_values():
    # cell 0: species 0,0,1 (3 obs); cell 1: species 2 x 5; cell 2: empty
    cell = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    sp = np.array([0, 0, 1, 2, 2, 2, 2, 2])
    day = np.array([1, 1, 2, 5, 6, 7, 7, 7])
    out = D.cell_statistics(cell, sp, 3, min_observations=3, visit=day)
    np.testing.assert_array_equal(out["observation_count"], [3, 5, 0])
    np.testing.assert_array_equal(out["species_richness"][:2], [2, 1])
    p = np.array([2 / 3, 1 / 3])
    assert out["shannon_diversity"][0] == pytest.approx(-(p * np.log(p)).sum())
    assert out["simpson_diversity"][0] == pytest.approx(1 - (p ** 2).sum())
    assert out["shannon_diversity"][1] == 0 and np.isnan(out["species_richness"][2])
    np.testing.assert_array_equal(out["sampling_effort"], [2, 3, 0])
    few = D.cell_statistics(cell, sp, 3, min_observations=4)
    assert np.isnan(few["species_richness"][0]) and few["species_richness"][1] == 1


def test_cell_area_is_the_spherical_cell_area():
    # a 1 degree cell at the equator: about 111.2 x 111.2 km
    assert D.cell_area_km2(np.array([0.5]), 1.0)[0] == pytest.approx(12364, rel=1e-3)
    assert D.cell_area_km2(np.array([60.5]), 1.0)[0] < 0.5 * 12364 + 200


# -- the pyramids of the tiny cube set -------------------------------------------------------
def _level(cubes, cube: str, level: int) -> xr.Dataset:
    return xr.open_zarr(cubes / S.CUBE_PATHS[cube] / f"{level}.zarr", consolidated=True).load()


@pytest.fixture(scope="module")
def obs(tiny_source):
    return SourceDataset(str(tiny_source)).read_observations()


def test_every_pyramid_has_six_levels_each_computed_from_the_points(tiny_cubes, obs):
    for cube in S.GRID_CUBES:
        meta = json.loads((tiny_cubes / S.CUBE_PATHS[cube] / ".zlevels").read_text())
        assert meta["num_levels"] == 6, cube
    n = len(obs)
    prev = None
    for level in range(6):
        ds = _level(tiny_cubes, S.GRID_ALL_YEARS, level)
        assert float(ds.observation_count.sum()) == n
        if prev is not None:
            assert ds.sizes["lat"] * 2 == prev.sizes["lat"]
        # richness of the fullest cell, recomputed from the table (not from finer cells)
        iy, ix = np.unravel_index(int(np.argmax(ds.observation_count.values[0])),
                                  ds.observation_count.shape[1:])
        res = float(ds.attrs["spatial_res"])
        lat, lon = float(ds.lat[iy]), float(ds.lon[ix])
        sel = obs[(obs.latitude >= lat - res / 2) & (obs.latitude < lat + res / 2)
                  & (obs.longitude >= lon - res / 2) & (obs.longitude < lon + res / 2)]
        assert len(sel) == ds.observation_count.values[0, iy, ix]
        if len(sel) >= ds.attrs["min_observations"]:
            assert ds.species_richness.values[0, iy, ix] == sel.taxon_name.nunique()
        prev = ds
    coarsest = _level(tiny_cubes, S.GRID_ALL_YEARS, 5)
    assert coarsest.sizes["lon"] <= 16 and coarsest.sizes["lat"] <= 16  # about one tile


def test_diversity_only_where_a_cell_has_enough_observations(tiny_cubes):
    ds = _level(tiny_cubes, S.GRID_ALL_YEARS, 0)
    n_min = ds.attrs["min_observations"]
    counts = ds.observation_count.values
    for name in ("species_richness", "shannon_diversity", "simpson_diversity"):
        v = ds[name].values
        assert np.isnan(v[counts < n_min]).all(), name
        assert np.isfinite(v[counts >= n_min]).all(), name
        assert ds[name].attrs["min_observations"] == n_min
    # density is the count over the cell area, NaN where empty
    area = D.cell_area_km2(ds.lat.values, float(ds.attrs["spatial_res"]))
    dens = ds.observation_density.values[0]
    full = counts[0] > 0
    np.testing.assert_allclose(dens[full], (counts[0] / area[:, None])[full], rtol=1e-5)
    assert np.isnan(dens[~full]).all() and ds.observation_density.attrs["units"] == "km-2"
    assert (ds.sampling_effort.values <= counts).all()


def test_month_of_year_and_species_pyramids(tiny_cubes, obs):
    ds = _level(tiny_cubes, S.GRID_MONTH_OF_YEAR, 2)
    assert ds.sizes["time"] == 12 and "climatology" in ds.time.attrs
    known = obs[obs.month.notna()]
    per_month = ds.observation_count.sum(("lat", "lon")).values
    np.testing.assert_array_equal(per_month, known.month.astype(int).value_counts()
                                  .reindex(range(1, 13), fill_value=0).to_numpy())
    sp = _level(tiny_cubes, S.GRID_SPECIES, 1)
    names = obs.taxon_name.unique()
    assert len(sp.data_vars) == len(names)  # every species, not only the top ones
    for name in names[:3]:
        layer = sp[G.SPECIES_FAMILY.prefix + S.species_slug(name)]
        assert float(layer.sum()) == (obs.taxon_name == name).sum()
        assert layer.attrs["taxon_name"] == name


def test_colour_ranges_are_fitted_and_do_not_saturate(tiny_cubes):
    for cube in (S.GRID, S.GRID_ALL_YEARS, S.GRID_MONTH_OF_YEAR):
        levels = [_level(tiny_cubes, cube, lv) for lv in range(6)]
        for name, var in levels[0].data_vars.items():
            lo, hi = var.attrs["color_value_min"], var.attrs["color_value_max"]
            assert hi > lo and var.attrs["units"] and var.attrs["color_bar_name"], (cube, name)
            if name.startswith("embedding_"):
                assert (lo, hi) == (0.0, 1.0)
                continue
            for ds in levels[:2]:  # the levels a map of the region shows: <= ~2 % at the top
                v = ds[name].values
                v = v[np.isfinite(v) & (v > 0)]
                if v.size >= 50:
                    assert (v >= hi).mean() <= 0.02, (cube, name, ds.attrs["level"])


def test_time_axes_of_the_aggregations(tiny_cubes, obs):
    years = _level(tiny_cubes, S.GRID, 0)
    assert list(pd.DatetimeIndex(years.time.values).year) == list(
        range(obs.year.min(), obs.year.max() + 1))
    everything = _level(tiny_cubes, S.GRID_ALL_YEARS, 0)
    assert everything.sizes["time"] == 1
    bounds = pd.DatetimeIndex(everything.time_bnds.values[0])
    assert bounds[0].year == obs.year.min() and bounds[1].year == obs.year.max() + 1


def test_distinct_pairs_equal_a_unique_over_the_stacked_pairs():
    rng = np.random.default_rng(3)
    cell, key = rng.integers(0, 5000, 20_000), rng.integers(-3, 300, 20_000)
    pairs, counts = np.unique(np.stack([cell, key]), axis=1, return_counts=True)
    got, got_counts = D._distinct_pairs(cell, key, return_counts=True)
    np.testing.assert_array_equal(got, pairs[0])
    np.testing.assert_array_equal(got_counts, counts)
    huge = cell.astype(np.int64) << 50  # a key span that would overflow: the stacked path
    np.testing.assert_array_equal(D._distinct_pairs(huge, key), np.unique(
        np.stack([huge, key]), axis=1)[0])
