"""The viewer's filters reach the batch API, the place list and the species layer (issue 15).

Over HTTP at the shared served cube set; every expected answer is computed here from the
cube set's tables with pandas (not through :class:`cube_gen.query.Query`):

* ``POST /deepearth/embeddings/batch?months=&hours=&year=&taxa=`` keeps the requested ids
  that match, in the order requested, and names them in ``X-DeepEarth-Rows``;
* ``/explore/places`` narrows the observations-with-embeddings place group like the dots;
* ``/explore/count`` names the per-species grid layer of a search that names one species.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cube_gen import schema as S
from cube_gen.timeparse import PRECISION_CODES
from server.deepearth.routes import row_ranges


@pytest.fixture(scope="module")
def tables(tiny_cubes) -> dict:
    from cube_gen.access import CubeSet

    cs = CubeSet.open(str(tiny_cubes))
    o = cs.observations
    obs = pd.DataFrame({"gbif_id": o.gbif_id.values, "time": pd.DatetimeIndex(o.time.values),
                        "precision": o.time_precision.values,
                        "species_index": o.species_index.values,
                        "has_vision": o.has_vision.values.astype(bool)})
    images = cs.image_table().copy()
    images["precision"] = obs.precision.to_numpy()[images.obs_index.to_numpy()]
    return {"obs": obs, "images": images, "species": cs.species_table()}


def _expected_rows(images: pd.DataFrame, ids: list[list[int]], months: tuple[int, int],
                   hours: tuple[int, int], year: int, genus_species: set[int]) -> list[int]:
    by_key = images.set_index(["gbif_id", "image_number"])
    rows = []
    for i, (g, n) in enumerate(ids):
        r = by_key.loc[(g, n)]
        t = pd.Timestamp(r.time)
        if (months[0] <= t.month <= months[1] and r.precision >= PRECISION_CODES["month"]
                and hours[0] <= t.hour <= hours[1] and r.precision >= PRECISION_CODES["hour"]
                and t.year == year and int(r.species_index) in genus_species):
            rows.append(i)
    return rows


def test_row_ranges():
    assert row_ranges(np.array([0, 1, 2, 5, 7, 8])) == "0-2,5,7-8"
    assert row_ranges(np.array([], int)) == ""


def test_batch_filters_keep_the_matching_ids_in_the_order_requested(http, tables):
    from server_fixtures import load_npy

    images, species = tables["images"], tables["species"]
    hour_known = images[images.precision >= PRECISION_CODES["hour"]]
    assert len(hour_known) > 0
    target = hour_known.iloc[len(hour_known) // 2]
    t = pd.Timestamp(target.time)
    genus = species.genus.iat[int(target.species_index)]
    genus_species = set(species.species_index[species.genus == genus].tolist())
    rng = np.random.default_rng(7)
    order = rng.permutation(len(images))
    ids = [[int(images.gbif_id.iat[i]), int(images.image_number.iat[i])] for i in order]
    months = (max(t.month - 1, 1), min(t.month + 1, 12))
    hours = (max(t.hour - 2, 0), min(t.hour + 2, 23))
    want = _expected_rows(images, ids, months, hours, t.year, genus_species)
    assert 0 < len(want) < len(ids)
    url = "/deepearth/embeddings/batch"
    everything = http.post(url, json={"ids": ids})
    assert everything.status_code == 200, everything.text
    assert everything.headers["X-DeepEarth-Rows"] == f"0-{len(ids) - 1}"
    all_rows = load_npy(everything.content)
    query = (f"?months={months[0]}-{months[1]}&hours={hours[0]}-{hours[1]}&year={t.year}"
             f"&taxa={genus}")
    r = http.post(url + query, json={"ids": ids})
    assert r.status_code == 200, r.text
    assert r.headers["X-DeepEarth-Matched"] == str(len(want))
    assert r.headers["X-DeepEarth-Rows"] == row_ranges(np.array(want))
    got = load_npy(r.content)
    assert got.shape == (len(want), all_rows.shape[1])
    np.testing.assert_array_equal(got, all_rows[want])
    none = http.post(url + "?months=2&year=1900", json={"ids": ids, "dtype": "float16"})
    assert none.status_code == 200 and load_npy(none.content).shape == (0, all_rows.shape[1])
    bad = http.post(url + "?months=13", json={"ids": ids[:2]})
    assert bad.status_code == 400 and bad.json()["error"]["parameter"] == "months"


def test_place_list_follows_the_filters(http, tables):
    obs, species = tables["obs"], tables["species"]
    genus = species.genus.iat[int(obs[obs.has_vision].species_index.value_counts().index[0])]
    keep = set(species.species_index[species.genus == genus].tolist())
    of_genus = obs[obs.has_vision & obs.species_index.isin(keep)]
    year = int(of_genus.time.dt.year.value_counts().index[0])
    full = http.get("/explore/places").json()
    assert full["id"] == "observations-with-embeddings"
    assert sorted(f["properties"]["gbif_id"] for f in full["features"]) == \
        sorted(obs.gbif_id[obs.has_vision].tolist())
    narrowed = http.get(f"/explore/places?taxa={genus}&year={year}").json()
    want = obs[obs.has_vision & obs.species_index.isin(keep) & (obs.time.dt.year == year)]
    assert 0 < len(want) < int(obs.has_vision.sum())
    assert sorted(f["properties"]["gbif_id"] for f in narrowed["features"]) == \
        sorted(want.gbif_id.tolist())
    # the time step shown: the dots' period (a year of the yearly grid)
    step = http.get(f"/explore/places?time={year}-01-01T00:00:00Z&dataset=grid").json()
    assert len(step["features"]) == int((obs.has_vision & (obs.time.dt.year == year)).sum())


def test_a_search_naming_one_species_names_its_layer(http, tables):
    species = tables["species"]
    info = http.get(f"/datasets/{S.GRID_SPECIES}").json()
    layers = {v["name"] for v in info["variables"]}
    name = str(species.taxon_name.iat[0])
    r = http.get("/explore/count", taxa=name).json()
    slug = S.species_slug(name)
    assert r["layer"] == {"species_index": 0, "taxon_name": name, "variable": f"count_{slug}"}
    assert r["layer"]["variable"] in layers
    obs = tables["obs"]
    assert r["observations"] == int((obs.species_index == 0).sum())
    clusters = species.cluster.value_counts()
    several = f"cluster {clusters.index[0]}"
    assert clusters.iat[0] > 1
    assert http.get("/explore/count", taxa=several).json()["layer"] is None
    assert http.get("/explore/count").json()["layer"] is None


def test_embedding_space_link_carries_the_selection_and_the_filters():
    from server.viewer.panels import embedding_space

    link = embedding_space.update_link(None, "obs-5", "taxa=Quercus+alba&year=2020&other=1")
    assert "(/explore/embedding-space.html?gbif_id=5&taxa=Quercus+alba&year=2020)" in link
    assert "(/explore/embedding-space.html)" in embedding_space.update_link(None, None, None)
