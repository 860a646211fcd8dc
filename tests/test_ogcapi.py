"""OGC API - Features of the observations (server/ogcapi), against the served tiny cube set."""

from __future__ import annotations

import pandas as pd
import pytest
import requests

from cube_gen.reader import SourceDataset

TIMEOUT = 60


@pytest.fixture(scope="module")
def base(served) -> str:
    return served.url + "/deepearth/ogcapi"


@pytest.fixture(scope="module")
def obs(tiny_source) -> pd.DataFrame:
    return SourceDataset(str(tiny_source)).read_observations()


def _get(url: str, **params):
    r = requests.get(url, params=params or None, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r


def test_landing_conformance_and_collections(base):
    landing = _get(base).json()
    rels = {link["rel"]: link["href"] for link in landing["links"]}
    assert {"self", "conformance", "data", "service-desc"} <= set(rels)
    conf = _get(rels["conformance"]).json()["conformsTo"]
    assert "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson" in conf
    cols = _get(rels["data"]).json()["collections"]
    assert [c["id"] for c in cols] == ["observations", "observations_with_embeddings"]
    one = _get(f"{base}/collections/observations").json()
    w, s, e, n = one["extent"]["spatial"]["bbox"][0]
    assert -82 < w < e < -80.8 and 28 < s < n < 29
    assert one["extent"]["temporal"]["interval"][0][0].startswith("2010")


def test_items_filter_by_bbox_datetime_and_species(base, obs):
    bbox = (-81.6, 28.3, -81.1, 28.8)
    sel = obs[(obs.longitude >= bbox[0]) & (obs.longitude <= bbox[2])
              & (obs.latitude >= bbox[1]) & (obs.latitude <= bbox[3])]
    page = _get(f"{base}/collections/observations/items",
                bbox=",".join(map(str, bbox)), limit=100)
    assert page.headers["Content-Type"].startswith("application/geo+json")
    body = page.json()
    assert body["type"] == "FeatureCollection" and body["numberMatched"] == len(sel)
    for f in body["features"]:
        lon, lat = f["geometry"]["coordinates"]
        assert bbox[0] <= lon <= bbox[2] and bbox[1] <= lat <= bbox[3]
    # datetime: an interval of whole years, and an open one
    years = obs.year
    body = _get(f"{base}/collections/observations/items", datetime="2018/2020").json()
    assert body["numberMatched"] == int(((years >= 2018) & (years <= 2020)).sum())
    body = _get(f"{base}/collections/observations/items", datetime="2024-01-01/..").json()
    assert body["numberMatched"] == int((years >= 2024).sum())
    # species by scientific name
    name = obs.taxon_name.value_counts().index[0]
    body = _get(f"{base}/collections/observations/items", species=name, limit=100).json()
    assert body["numberMatched"] == int((obs.taxon_name == name).sum())
    assert {f["properties"]["taxon_name"] for f in body["features"]} == {name}


def test_paging_through_next_links_returns_every_feature_once(base, obs):
    url, params, seen = f"{base}/collections/observations/items", {"limit": 37}, []
    while url:
        body = _get(url, **params).json()
        assert body["numberReturned"] == len(body["features"]) <= 37
        seen += [f["id"] for f in body["features"]]
        nxt = [link["href"] for link in body["links"] if link["rel"] == "next"]
        url, params = (nxt[0], {}) if nxt else (None, {})
    assert sorted(seen) == sorted(obs.gbif_id.tolist())


def test_features_carry_species_time_and_embedding_attributes(base, obs):
    body = _get(f"{base}/collections/observations_with_embeddings/items").json()
    assert body["numberMatched"] == int(obs.has_vision.sum())
    f = body["features"][0]
    props = f["properties"]
    row = obs.set_index("gbif_id").loc[f["id"]]
    assert props["taxon_name"] == row.taxon_name and props["year"] == row.year
    assert props["has_vision"] and props["vision_umap_x"] is not None
    for key in ("species_umap_x", "species_umap_y", "species_umap_z", "species_cluster",
                "datetime", "split"):
        assert props[key] is not None, key
    one = _get(f"{base}/collections/observations/items/{f['id']}").json()
    assert one["id"] == f["id"] and one["properties"]["gbif_id"] == f["id"]


@pytest.mark.parametrize("path, params, status, parameter", [
    ("/collections/nope/items", {}, 404, "collectionId"),
    ("/collections/observations/items/123", {}, 404, "featureId"),
    ("/collections/observations/items", {"bbox": "1,2,3"}, 400, "bbox"),
    ("/collections/observations/items", {"datetime": "soon"}, 400, "datetime"),
    ("/collections/observations/items", {"species": "Nonexistens planta"}, 400, "species"),
    ("/collections/observations/items", {"limit": "0"}, 400, "limit"),
])
def test_errors_name_the_parameter(base, path, params, status, parameter):
    r = requests.get(base + path, params=params, timeout=TIMEOUT)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["parameter"] == parameter and "Traceback" not in r.text
