"""The DeepEarth xcube plugin against a real ``xcube serve`` subprocess over ``tiny_cubes``.

Every endpoint's values are checked against the cubes read independently (xarray /
numpy / pandas), every error path answers JSON naming the parameter, never a traceback.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import requests
import xarray as xr
from PIL import Image
from server_fixtures import Http, load_npy

from cube_gen import schema as S
from cube_gen.access import CubeSet

TIMEOUT = 60


SERVER_CONFIG: dict = {}


@pytest.fixture(scope="session")
def server(served) -> str:
    """Base URL of the shared ``xcube serve`` of tiny_cubes (tests/conftest.py ``served``)."""
    SERVER_CONFIG.update(served.config)
    return served.url


@pytest.fixture(scope="module")
def cubes(tiny_cubes: Path) -> dict:
    """The cubes read straight from Zarr (independent of the server)."""
    obs = xr.open_zarr(tiny_cubes / "observations.zarr").load()
    species = xr.open_zarr(tiny_cubes / "species.zarr").load()
    vision = xr.open_zarr(tiny_cubes / "vision.zarr")
    table = pd.DataFrame({
        "gbif_id": obs.gbif_id.values, "time": obs.time.values, "lat": obs.lat.values,
        "lon": obs.lon.values, "species_index": obs.species_index.values,
        "split": obs.split.values, "has_vision": obs.has_vision.values,
        "precision": obs.time_precision.values,
    })
    return {"obs": obs, "species": species, "vision": vision, "table": table,
            "cs": CubeSet.open(str(tiny_cubes))}


def get(server: str, path: str, **params) -> requests.Response:
    return Http(server, TIMEOUT).get(path, **params)


def ok_json(server: str, path: str, **params):
    return Http(server, TIMEOUT).json(path, **params)


def embedding_ids(cubes) -> list[tuple[int, int]]:
    v = cubes["vision"]
    return list(zip(v.gbif_id.values.tolist(), v.image_number.values.tolist(), strict=True))


# -- service, docs, xcube's own APIs ------------------------------------------------------
def test_health(server):
    h = ok_json(server, "/deepearth/health")
    assert h["status"] == "ok" and h["configured"]
    assert h["cubeset_status"]["reachable"]
    assert h["cubeset_status"]["manifest"]["counts"] == {"images": 6, "observations": 240,
                                                         "species": 12}
    assert h["versions"]["xcube-core"].startswith("1.14")
    for key in ("capacity_bytes", "bytes", "items", "hits", "misses", "evictions"):
        assert key in h["cache"]
    assert h["settings"]["MaxK"] == 50


OPERATIONS = {
    ("get", "/deepearth"): "deepearthIndex",
    ("get", "/deepearth/health"): "deepearthHealth",
    ("get", "/deepearth/observations"): "deepearthObservations",
    ("get", "/deepearth/observations/{gbif_id}"): "deepearthObservation",
    ("get", "/deepearth/species"): "deepearthSpeciesList",
    ("get", "/deepearth/species/{species}"): "deepearthSpecies",
    ("get", "/deepearth/species/{species}/similar"): "deepearthSimilarSpecies",
    ("get", "/deepearth/embeddings"): "deepearthEmbeddings",
    ("post", "/deepearth/embeddings/batch"): "deepearthEmbeddingsBatch",
    ("get", "/deepearth/embeddings/{gbif_id}/{image_number}/features"): "deepearthFeatures",
    ("get", "/deepearth/embeddings/{gbif_id}/{image_number}/pooled"): "deepearthPooled",
    ("get", "/deepearth/embeddings/{gbif_id}/{image_number}/attention.png"):
        "deepearthAttentionPng",
    ("get", "/deepearth/embeddings/{gbif_id}/{image_number}/attention.json"):
        "deepearthAttentionJson",
    ("get", "/deepearth/embeddings/{gbif_id}/{image_number}/umap_rgb.png"): "deepearthUmapRgb",
    ("get", "/deepearth/embeddings/{gbif_id}/{image_number}/stats"): "deepearthEmbeddingStats",
    ("get", "/deepearth/embeddings/{gbif_id}/{image_number}/similar"):
        "deepearthSimilarEmbeddings",
    ("get", "/deepearth/umap/species"): "deepearthSpeciesUmap",
    ("get", "/deepearth/umap/vision"): "deepearthVisionUmap",
    ("get", "/deepearth/stats/region"): "deepearthRegionStats",
}


def test_openapi_lists_every_operation(server):
    doc = ok_json(server, "/openapi.json")
    found = {}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if isinstance(op, dict) and op.get("tags") == ["deepearth"]:
                found[(method, path)] = op
    # these operations, unchanged; other APIs' engineers may add more
    ids = {k: v["operationId"] for k, v in found.items()}
    assert {k: ids.get(k) for k in OPERATIONS} == OPERATIONS
    for (_, path), op in found.items():
        assert op["summary"] and "200" in op["responses"] and "400" in op["responses"]
        declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert declared == {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}
    index = ok_json(server, "/deepearth")
    assert {e["operation_id"] for e in index["endpoints"]} == set(ids.values())
    assert set(OPERATIONS.values()) <= set(ids.values())


def test_xcube_datasets_and_tiles_still_work(server):
    ds = ok_json(server, "/datasets")
    # only the gridded cubes: one xcube dataset per grid pyramid
    assert sorted(d["id"] for d in ds["datasets"]) == sorted(S.GRID_CUBES)
    meta = ok_json(server, "/datasets/grid")
    names = {v["name"] for v in meta["variables"]}
    assert set(S.GRID_VARS) <= names
    assert any(n.startswith(S.TOP_SPECIES_PREFIX) for n in names)
    assert meta.get("rgbSchema", {}).get("varNames") == ["embedding_r", "embedding_g",
                                                        "embedding_b"]
    by_name = {v["name"]: v for v in meta["variables"]}
    entries = [*SERVER_CONFIG.get("Datasets", []), *(
        d for store in SERVER_CONFIG.get("DataStores", []) for d in store["Datasets"])]
    (grid,) = [d for d in entries if d["Identifier"] == S.GRID]
    (style,) = [st for st in SERVER_CONFIG["Styles"] if st["Identifier"] == grid["Style"]]
    styles = style["ColorMappings"]
    for name in S.GRID_VARS:  # the configured style ranges reach xcube
        assert [by_name[name]["colorBarMin"], by_name[name]["colorBarMax"]] == \
            styles[name]["ValueRange"]
    r = get(server, "/tiles/grid/observation_count/0/0/0")
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (256, 256)
    r = get(server, "/tiles/grid/rgb/0/0/0")
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/png"


# -- observations and species -------------------------------------------------------------
def _expected_obs(cubes, bbox=None, start=None, end=None, species=None, split=None,
                  has_vision=None) -> list[int]:
    t = cubes["table"]
    m = np.ones(len(t), bool)
    if bbox is not None:
        w, s, e, n = bbox
        m &= (t.lon >= w) & (t.lon <= e) & (t.lat >= s) & (t.lat <= n)
    if start is not None:
        m &= t.time >= pd.Timestamp(start)
    if end is not None:
        m &= t.time <= pd.Timestamp(end)
    if species is not None:
        m &= t.species_index.isin(species)
    if split is not None:
        m &= t.split == S.SPLIT_CODES[split]
    if has_vision is not None:
        m &= t.has_vision == has_vision
    return t.gbif_id[m].tolist()


def test_observations_paging_covers_everything(server, cubes):
    seen, offset = [], 0
    while offset is not None:
        page = ok_json(server, "/deepearth/observations", limit=70, offset=offset)
        assert page["total"] == 240 and page["returned"] == len(page["observations"])
        seen += [o["gbif_id"] for o in page["observations"]]
        offset = page["next_offset"]
    assert seen == cubes["obs"].gbif_id.values.tolist()  # cube order, no duplicates


def test_observations_filters(server, cubes):
    sp = cubes["species"]
    names = sp.taxon_name.values.tolist()
    bbox = (-81.7, 28.1, -81.1, 28.7)
    want = _expected_obs(cubes, bbox=bbox, start="2015-01-01",
                         end="2021-12-31T23:59:59.999999999", species=[0, 2, 5],
                         split="train")
    page = ok_json(server, "/deepearth/observations", bbox=",".join(map(str, bbox)),
                   start="2015", end="2021",
                   species=f"{sp.taxon_id.values[0]},{names[2]},{S.species_slug(names[5])}",
                   split="train", limit=100)
    assert [o["gbif_id"] for o in page["observations"]] == want and page["total"] == len(want)
    assert len(want) > 3
    page = ok_json(server, "/deepearth/observations", has_vision="true", limit=100)
    assert sorted(o["gbif_id"] for o in page["observations"]) == sorted(
        _expected_obs(cubes, has_vision=True))
    page = ok_json(server, "/deepearth/observations", split="temporal_test", limit=100)
    assert page["total"] == len(_expected_obs(cubes, split="temporal_test")) == 20
    assert all(o["time"].startswith("2025") for o in page["observations"])


def test_observations_geojson(server, cubes):
    r = get(server, "/deepearth/observations", format="geojson", limit=100, offset=200)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/geo+json"
    fc = r.json()
    assert fc["type"] == "FeatureCollection" and fc["numberMatched"] == 240
    assert fc["numberReturned"] == len(fc["features"]) == 40 and fc["next_offset"] is None
    obs = cubes["obs"]
    for f in fc["features"][:10]:
        i = int(np.flatnonzero(obs.gbif_id.values == f["id"])[0])
        assert f["geometry"] == {"type": "Point",
                                 "coordinates": [float(obs.lon[i]), float(obs.lat[i])]}


def test_one_observation_with_its_images(server, cubes):
    obs, v = cubes["obs"], cubes["vision"]
    gid = int(v.gbif_id.values[1])  # the observation with two embeddings
    rec = ok_json(server, f"/deepearth/observations/{gid}")
    i = int(np.flatnonzero(obs.gbif_id.values == gid)[0])
    assert rec["time"] == pd.Timestamp(obs.time.values[i]).isoformat()
    assert rec["lat"] == float(obs.lat[i]) and rec["lon"] == float(obs.lon[i])
    assert rec["taxon_id"] == str(obs.taxon_id.values[i])
    assert rec["species_index"] == int(obs.species_index[i])
    assert rec["taxon_name"] == str(cubes["species"].taxon_name.values[rec["species_index"]])
    assert rec["split"] == "train" and rec["has_vision"] is True
    assert rec["num_images"] == int(obs.num_images[i])
    assert rec["image_urls"] == [u for u in obs.image_urls.values[i].tolist() if u]
    numbers = v.image_number.values[v.gbif_id.values == gid].tolist()
    assert [e["image_number"] for e in rec["embeddings"]] == numbers == [0, 1]
    e = rec["embeddings"][1]
    assert e["image_url"] == rec["image_urls"][1]
    assert e["links"]["features"].endswith(f"/deepearth/embeddings/{gid}/1/features")
    assert e["links"]["stats"] == f"{server}/deepearth/embeddings/{gid}/1/stats"
    assert requests.get(e["links"]["attention"], timeout=TIMEOUT).status_code == 200
    no_vision = int(obs.gbif_id.values[~obs.has_vision.values][0])
    assert ok_json(server, f"/deepearth/observations/{no_vision}")["embeddings"] == []


def test_species_list_equals_species_zarr(server, cubes):
    sp = cubes["species"]
    body = ok_json(server, "/deepearth/species")
    assert body["count"] == 12
    for i, rec in enumerate(body["species"]):
        assert rec["species_index"] == i
        assert rec["taxon_id"] == str(sp.taxon_id.values[i])
        assert rec["taxon_name"] == str(sp.taxon_name.values[i])
        assert rec["genus"] == str(sp.genus.values[i])
        assert rec["observation_count"] == int(sp.observation_count[i])
        assert rec["vision_count"] == int(sp.vision_count[i])
        assert rec["cluster"] == int(sp.cluster[i])
        assert rec["color"] == str(sp.color.values[i])
        assert rec["cluster_color"] == str(sp.cluster_color.values[i])


def test_one_species_with_observations(server, cubes):
    sp = cubes["species"]
    i = int(np.argmax(sp.vision_count.values))
    name = str(sp.taxon_name.values[i])
    by_id = ok_json(server, f"/deepearth/species/{sp.taxon_id.values[i]}", limit=5)
    by_slug = ok_json(server, f"/deepearth/species/{S.species_slug(name)}", limit=5)
    by_name = ok_json(server, f"/deepearth/species/{name}", limit=5)
    assert by_id == by_slug == by_name
    assert by_id["taxon_name"] == name
    assert by_id["umap"] == dict(zip("xyz", sp.umap.values[i].astype(float).tolist(),
                                     strict=True))
    want = _expected_obs(cubes, species=[i])
    assert by_id["observations"]["total"] == len(want) == int(sp.observation_count[i])
    assert [o["gbif_id"] for o in by_id["observations"]["items"]] == want[:5]
    v = cubes["vision"]
    assert [(e["gbif_id"], e["image_number"]) for e in by_id["embeddings"]] == [
        (int(g), int(n)) for g, n, s in zip(v.gbif_id.values, v.image_number.values,
                                            v.species_index.values, strict=True) if s == i]


# -- embeddings ---------------------------------------------------------------------------
def test_features_full_tensor_equals_cubeset(server, cubes):
    cs = cubes["cs"]
    for pos, (gid, num) in enumerate(embedding_ids(cubes)[:3]):
        r = get(server, f"/deepearth/embeddings/{gid}/{num}/features")
        assert r.status_code == 200 and r.headers["Content-Type"] == "application/x-npy"
        arr = load_npy(r.content)
        expected = cs.features(pos)
        assert arr.dtype == np.float16 and arr.shape == (8, 24, 24, 1408)
        np.testing.assert_array_equal(arr, expected)
        assert r.headers["X-DeepEarth-Shape"] == "8,24,24,1408"


def test_features_raw_float32_and_slices(server, cubes):
    cs = cubes["cs"]
    gid, num = embedding_ids(cubes)[2]
    full = cs.features(2)
    r = get(server, f"/deepearth/embeddings/{gid}/{num}/features", format="raw",
            dtype="float32")
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert r.headers["X-DeepEarth-Dtype"] == "float32"
    shape = tuple(int(n) for n in r.headers["X-DeepEarth-Shape"].split(","))
    arr = np.frombuffer(r.content, dtype="<f4").reshape(shape)
    np.testing.assert_array_equal(arr, full.astype(np.float32))

    arr = load_npy(get(server, f"/deepearth/embeddings/{gid}/{num}/features", frame="3",
                       patch_y="4:10", patch_x=":6", feature="100:164").content)
    np.testing.assert_array_equal(arr, full[3:4, 4:10, 0:6, 100:164])
    arr = load_npy(get(server, f"/deepearth/embeddings/{gid}/{num}/features", frame="2:5",
                       feature="1407").content)
    np.testing.assert_array_equal(arr, full[2:5, :, :, 1407:1408])
    arr = load_npy(get(server, f"/deepearth/embeddings/{gid}/{num}/features", frame="mean",
                       dtype="float32", patch_y="0:2").content)
    np.testing.assert_allclose(arr, full[:, 0:2].astype(np.float32).mean(axis=0,
                                                                         keepdims=True),
                               rtol=1e-6)


def test_pooled_vector(server, cubes):
    cs = cubes["cs"]
    pooled = cubes["vision"].pooled.values
    for pos, (gid, num) in enumerate(embedding_ids(cubes)):
        arr = load_npy(get(server, f"/deepearth/embeddings/{gid}/{num}/pooled").content)
        assert arr.dtype == np.float32
        np.testing.assert_array_equal(arr, pooled[pos])
        np.testing.assert_array_equal(arr, cs.pooled([pos])[0])
    body = ok_json(server, f"/deepearth/embeddings/{gid}/{num}/pooled", format="json")
    np.testing.assert_array_equal(np.array(body["pooled"], np.float32), pooled[-1])
    arr = load_npy(get(server, f"/deepearth/embeddings/{gid}/{num}/pooled",
                       dtype="float16").content)
    assert arr.dtype == np.float16
    np.testing.assert_array_equal(arr, pooled[-1].astype(np.float16))


def _reference_attention(feats: np.ndarray, method: str, frame: str) -> np.ndarray:
    """The attention reductions, written independently of cube_gen.embedding_math."""
    f = feats.astype(np.float32).reshape(8, 576, -1)
    x = f.mean(axis=0) if frame == "mean" else f[int(frame)]
    if method == "l2norm":
        out = np.sqrt((x.astype(np.float64) ** 2).sum(axis=1))
    elif method == "variance":
        out = x.astype(np.float64).var(axis=1)
    elif method == "entropy":
        a = np.abs(x.astype(np.float64))
        p = a / a.sum(axis=1, keepdims=True)
        out = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(axis=1)
    else:
        k = int(method[3:]) - 1
        xc = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
        u, s, _ = np.linalg.svd(xc, full_matrices=False)
        out = u[:, k] * s[k]
        out *= np.sign(out[np.argmax(np.abs(out))])
    return out.reshape(24, 24)


@pytest.mark.parametrize("method,frame", [("l2norm", "mean"), ("variance", "mean"),
                                          ("entropy", "mean"), ("pca1", "mean"),
                                          ("pca2", "mean"), ("pca3", "0"), ("pca5", "mean"),
                                          ("l2norm", "7"), ("entropy", "4")])
def test_attention_json_equals_reference(server, cubes, method, frame):
    gid, num = embedding_ids(cubes)[3]
    body = ok_json(server, f"/deepearth/embeddings/{gid}/{num}/attention.json",
                   method=method, frame=frame)
    raw = np.array(body["raw"])
    ref = _reference_attention(cubes["cs"].features(3), method, frame)
    assert raw.shape == (24, 24)
    np.testing.assert_allclose(raw, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())
    norm = np.array(body["normalised"])
    np.testing.assert_allclose(norm, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)
    assert body["min"] == pytest.approx(raw.min()) and body["max"] == pytest.approx(raw.max())


def test_attention_png(server, cubes):
    gid, num = embedding_ids(cubes)[0]
    raw = np.array(ok_json(server, f"/deepearth/embeddings/{gid}/{num}/attention.json",
                           method="variance", frame="2")["raw"], np.float32)
    norm = (raw - raw.min()) / (raw.max() - raw.min())
    r = get(server, f"/deepearth/embeddings/{gid}/{num}/attention.png", method="variance",
            frame="2", colormap="viridis", alpha="0.5", size="24")
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/png"
    img = np.asarray(Image.open(io.BytesIO(r.content)))
    assert img.shape == (24, 24, 4)
    expected = np.round(matplotlib.colormaps["viridis"](norm) * 255)
    np.testing.assert_allclose(img[..., :3], expected[..., :3], atol=1)
    np.testing.assert_allclose(img[..., 3], np.round(norm * 0.5 * 255), atol=1)
    r = get(server, f"/deepearth/embeddings/{gid}/{num}/attention.png")  # defaults
    img = np.asarray(Image.open(io.BytesIO(r.content)))
    assert img.shape == (384, 384, 4)
    assert abs(int(img[..., 3].max()) - round(0.7 * 255)) <= 2 and img[..., 3].min() <= 2


def test_umap_rgb_png_precomputed(server, cubes):
    gid, num = embedding_ids(cubes)[4]
    r = get(server, f"/deepearth/embeddings/{gid}/{num}/umap_rgb.png", size="24")
    assert r.status_code == 200 and r.headers["X-DeepEarth-Source"] == "precomputed"
    img = np.asarray(Image.open(io.BytesIO(r.content)))
    np.testing.assert_array_equal(img, cubes["vision"].umap_rgb.values[4])
    big = np.asarray(Image.open(io.BytesIO(
        get(server, f"/deepearth/embeddings/{gid}/{num}/umap_rgb.png", size="48").content)))
    np.testing.assert_array_equal(big[::2, ::2], img)  # nearest upscaling


def test_embedding_stats(server, cubes):
    v = cubes["vision"]
    for pos, (gid, num) in enumerate(embedding_ids(cubes)):
        body = ok_json(server, f"/deepearth/embeddings/{gid}/{num}/stats")
        assert set(body["stats"]) == set(S.IMAGE_STATS) == set(body["descriptions"])
        for k, value in body["stats"].items():
            assert value == float(v[f"stat_{k}"].values[pos])


def test_embeddings_listing(server, cubes):
    body = ok_json(server, "/deepearth/embeddings", limit=4)
    assert body["total"] == 6 and body["next_offset"] == 4
    assert [(e["gbif_id"], e["image_number"]) for e in body["embeddings"]] == \
        embedding_ids(cubes)[:4]


# -- similarity ---------------------------------------------------------------------------
def _cosine_rank(matrix: np.ndarray, q: int) -> tuple[np.ndarray, np.ndarray]:
    m = matrix.astype(np.float64)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    scores = m @ m[q]
    order = sorted(range(len(m)), key=lambda i: (-scores[i], i))
    return np.array(order), scores


def test_similar_embeddings_equal_brute_force(server, cubes):
    pooled = cubes["vision"].pooled.values
    ids = embedding_ids(cubes)
    for q in (0, 3):
        order, scores = _cosine_rank(pooled, q)
        order = [i for i in order if i != q]
        gid, num = ids[q]
        body = ok_json(server, f"/deepearth/embeddings/{gid}/{num}/similar", k=4)
        got = [(r["gbif_id"], r["image_number"]) for r in body["results"]]
        assert got == [ids[i] for i in order[:4]]
        np.testing.assert_allclose([r["score"] for r in body["results"]],
                                   scores[order[:4]], rtol=1e-5, atol=1e-6)
        assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4]
    body = ok_json(server, f"/deepearth/embeddings/{ids[0][0]}/{ids[0][1]}/similar", k=50,
                   include_self="true")
    assert len(body["results"]) == 6 and body["results"][0]["gbif_id"] == ids[0][0]
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_similar_embeddings_with_filters(server, cubes):
    v = cubes["vision"]
    pooled = v.pooled.values
    ids = embedding_ids(cubes)
    lon = v.lon.values
    bbox = (-81.65, 28.2, -81.3, 28.3)
    inside = [i for i in range(6) if bbox[0] <= lon[i] <= bbox[2]
              and bbox[1] <= v.lat.values[i] <= bbox[3] and i != 5]
    order, _ = _cosine_rank(pooled, 5)
    want = [ids[i] for i in order if i in inside][:10]
    body = ok_json(server, f"/deepearth/embeddings/{ids[5][0]}/{ids[5][1]}/similar", k=10,
                   bbox=",".join(map(str, bbox)))
    assert [(r["gbif_id"], r["image_number"]) for r in body["results"]] == want
    assert 0 < len(want) < 5
    s = int(v.species_index.values[2])
    body = ok_json(server, f"/deepearth/embeddings/{ids[0][0]}/{ids[0][1]}/similar",
                   species=str(cubes["species"].taxon_id.values[s]))
    assert all(r["species_index"] == s for r in body["results"]) and body["results"]


def test_similar_species_equal_brute_force(server, cubes):
    sp = cubes["species"]
    lang = sp.language_embedding.values
    for q in (0, 7):
        order, scores = _cosine_rank(lang, q)
        order = [i for i in order if i != q]
        body = ok_json(server, f"/deepearth/species/{sp.taxon_id.values[q]}/similar", k=5)
        assert [r["species_index"] for r in body["results"]] == order[:5]
        np.testing.assert_allclose([r["score"] for r in body["results"]], scores[order[:5]],
                                   rtol=1e-5)


# -- projections --------------------------------------------------------------------------
def test_species_umap(server, cubes):
    sp = cubes["species"]
    body = ok_json(server, "/deepearth/umap/species")
    coords = np.array([[r["x"], r["y"], r["z"]] for r in body["species"]])
    np.testing.assert_array_equal(coords, sp.umap.values.astype(np.float64))
    assert [r["cluster"] for r in body["species"]] == sp.cluster.values.tolist()
    assert [r["color"] for r in body["species"]] == sp.color.values.tolist()
    sizes = {c["cluster"]: c["size"] for c in body["clusters"]}
    assert sizes == dict(zip(*np.unique(sp.cluster.values, return_counts=True), strict=True))


def test_vision_umap_whole_and_filtered(server, cubes):
    v = cubes["vision"]
    whole = ok_json(server, "/deepearth/umap/vision")
    assert whole["source"] == "precomputed" and whole["total"] == 6
    coords = np.array([[p["x"], p["y"], p["z"]] for p in whole["points"]])
    np.testing.assert_array_equal(coords, v.umap.values.astype(np.float64))
    bbox = "-81.65,28.2,-81.3,28.3"
    part = ok_json(server, "/deepearth/umap/vision", bbox=bbox)
    assert part["source"] == "computed" and part["total"] == 4 and not part["subsampled"]
    assert part["method"] in ("pca", "umap")
    assert {(p["gbif_id"], p["image_number"]) for p in part["points"]} == {
        embedding_ids(cubes)[i] for i in range(4)}
    again = ok_json(server, "/deepearth/umap/vision", bbox=bbox)
    assert again == part  # cached
    small = ok_json(server, "/deepearth/umap/vision", bbox=bbox, max_points=2)
    assert small["returned"] == 2 and small["total"] == 4 and small["subsampled"]


# -- region statistics ---------------------------------------------------------------------
def test_region_stats_equal_pandas(server, cubes):
    t = cubes["table"]
    bbox = (-81.8, 28.1, -81.2, 28.8)
    sel = t[(t.lon >= bbox[0]) & (t.lon <= bbox[2]) & (t.lat >= bbox[1]) & (t.lat <= bbox[3])
            & (t.time >= "2012-01-01") & (t.time < "2023-01-01")]
    body = ok_json(server, "/deepearth/stats/region", bbox=",".join(map(str, bbox)),
                   start="2012-01-01", end="2022-12-31")
    assert body["observations"] == len(sel) > 20
    counts = sel.species_index.value_counts()
    assert {r["species_index"]: r["count"] for r in body["species"]} == counts.to_dict()
    assert [r["count"] for r in body["species"]] == sorted(counts.values, reverse=True)
    years = sel.time.dt.year.value_counts().sort_index()
    assert body["by_year"] == [{"year": int(y), "count": int(c)} for y, c in years.items()]
    known = sel[sel.precision >= 1]
    months = known.time.dt.month.value_counts().reindex(range(1, 13), fill_value=0)
    assert body["by_month"] == [{"month": m, "count": int(c)} for m, c in months.items()]
    assert body["month_unknown"] == int((sel.precision < 1).sum())
    p = counts.values / counts.values.sum()
    assert body["richness"] == len(counts)
    assert body["shannon"] == pytest.approx(-(p * np.log(p)).sum())
    assert body["simpson_dominance"] == pytest.approx((p ** 2).sum())
    assert body["gini_simpson"] == pytest.approx(1 - (p ** 2).sum())
    assert body["inverse_simpson"] == pytest.approx(1 / (p ** 2).sum())
    assert body["with_vision"] == int(sel.has_vision.sum())
    empty = ok_json(server, "/deepearth/stats/region", bbox="0,0,1,1")
    assert empty["observations"] == 0 and empty["richness"] == 0 and empty["shannon"] is None
    everything = ok_json(server, "/deepearth/stats/region")
    assert everything["observations"] == 240 and everything["richness"] == 12


# -- batch --------------------------------------------------------------------------------
def test_batch_pooled_and_features(server, cubes):
    cs = cubes["cs"]
    ids = embedding_ids(cubes)
    order = [4, 0, 5, 2]
    r = requests.post(server + "/deepearth/embeddings/batch",
                      json={"ids": [list(ids[i]) for i in order]}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(load_npy(r.content), cubes["vision"].pooled.values[order])
    r = requests.post(server + "/deepearth/embeddings/batch", timeout=TIMEOUT,
                      json={"ids": [list(ids[i]) for i in (3, 1)], "kind": "features",
                            "format": "raw"})
    assert r.headers["X-DeepEarth-Shape"] == "2,8,24,24,1408"
    arr = np.frombuffer(r.content, "<f2").reshape(2, 8, 24, 24, 1408)
    np.testing.assert_array_equal(arr[0], cs.features(3))
    np.testing.assert_array_equal(arr[1], cs.features(1))


# -- errors -------------------------------------------------------------------------------
def _error_cases(cubes):
    gid, num = embedding_ids(cubes)[0]
    no_vision = int(cubes["obs"].gbif_id.values[~cubes["obs"].has_vision.values][0])
    e = f"/deepearth/embeddings/{gid}/{num}"
    return [
        # (path, params, status, parameter)
        ("/deepearth/observations/123", {}, 404, "gbif_id"),
        ("/deepearth/observations/abc", {}, 400, "gbif_id"),
        ("/deepearth/observations/99999999999999999999999999", {}, 400, "gbif_id"),
        ("/deepearth/observations", {"bbox": "1,2,3"}, 400, "bbox"),
        ("/deepearth/observations", {"bbox": "10,5,0,6"}, 400, "bbox"),
        ("/deepearth/observations", {"start": "yesterday"}, 400, "start"),
        ("/deepearth/observations", {"start": "2020", "end": "2019"}, 400, "end"),
        ("/deepearth/observations", {"split": "test"}, 400, "split"),
        ("/deepearth/observations", {"has_vision": "maybe"}, 400, "has_vision"),
        ("/deepearth/observations", {"limit": "0"}, 400, "limit"),
        ("/deepearth/observations", {"limit": "101"}, 400, "limit"),
        ("/deepearth/observations", {"offset": "-1"}, 400, "offset"),
        ("/deepearth/observations", {"format": "csv"}, 400, "format"),
        ("/deepearth/observations", {"species": "Unknown plant"}, 400, "species"),
        ("/deepearth/observations", {"colour": "red"}, 400, "colour"),
        ("/deepearth/species/nope", {}, 404, "species"),
        ("/deepearth/species/nope/similar", {}, 404, "species"),
        ("/deepearth/species/bidens_repens/similar", {"k": "51"}, 400, "k"),
        (f"/deepearth/embeddings/{gid}/99/features", {}, 404, "image_number"),
        (f"/deepearth/embeddings/{no_vision}/0/features", {}, 404, "gbif_id"),
        ("/deepearth/embeddings/1/0/features", {}, 404, "gbif_id"),
        ("/deepearth/embeddings/x/0/pooled", {}, 400, "gbif_id"),
        (f"/deepearth/embeddings/{gid}/-1/pooled", {}, 400, "image_number"),
        (e + "/features", {"dtype": "float64"}, 400, "dtype"),
        (e + "/features", {"format": "json"}, 400, "format"),
        (e + "/features", {"frame": "8"}, 400, "frame"),
        (e + "/features", {"frame": "3:2"}, 400, "frame"),
        (e + "/features", {"patch_y": "0:25"}, 400, "patch_y"),
        (e + "/features", {"patch_x": "a:b"}, 400, "patch_x"),
        (e + "/features", {"feature": "1408"}, 400, "feature"),
        (e + "/pooled", {"format": "xml"}, 400, "format"),
        (e + "/attention.png", {"method": "pca6"}, 400, "method"),
        (e + "/attention.png", {"frame": "9"}, 400, "frame"),
        (e + "/attention.png", {"colormap": "../../etc/passwd"}, 400, "colormap"),
        (e + "/attention.png", {"alpha": "2"}, 400, "alpha"),
        (e + "/attention.png", {"alpha": "nan"}, 400, "alpha"),
        (e + "/attention.png", {"size": "100000"}, 400, "size"),
        (e + "/attention.json", {"method": "max"}, 400, "method"),
        (e + "/umap_rgb.png", {"resample": "cubic"}, 400, "resample"),
        (e + "/similar", {"k": "0"}, 400, "k"),
        (e + "/similar", {"k": "1000000"}, 400, "k"),
        (e + "/stats", {"x": "1"}, 400, "x"),
        ("/deepearth/umap/vision", {"max_points": "101"}, 400, "max_points"),
        ("/deepearth/stats/region", {"end": "2020-13"}, 400, "end"),
        ("/deepearth/no/such/endpoint", {}, 404, "path"),
        ("/deepearth/embeddings/1/2", {}, 404, "path"),
    ]


def test_error_paths(server, cubes):
    for path, params, status, parameter in _error_cases(cubes):
        r = get(server, path, **params)
        assert r.status_code == status, (path, params, r.text)
        assert r.headers["Content-Type"].startswith("application/json"), (path, r.headers)
        assert "Traceback" not in r.text and "File \"" not in r.text
        err = r.json()["error"]
        assert err["status_code"] == status and err["message"]
        assert err.get("parameter") == parameter, (path, params, err)
        if status == 400:
            assert err.get("allowed"), (path, params, err)


def test_batch_errors(server, cubes):
    ids = [list(x) for x in embedding_ids(cubes)]
    url = server + "/deepearth/embeddings/batch"
    cases = [
        (b"not json", 400, "body"),
        (json.dumps([1, 2]).encode(), 400, "body"),
        (json.dumps({"ids": []}).encode(), 400, "ids"),
        (json.dumps({"ids": [[1, 2, 3]]}).encode(), 400, "ids"),
        (json.dumps({"ids": [["1", 0]]}).encode(), 400, "ids"),
        (json.dumps({"ids": ids[:4], "kind": "features"}).encode(), 400, "ids"),  # max 3
        (json.dumps({"ids": ids[:1], "kind": "tensor"}).encode(), 400, "kind"),
        (json.dumps({"ids": ids[:1], "dtype": "int8"}).encode(), 400, "dtype"),
        (json.dumps({"ids": ids[:1], "format": "csv"}).encode(), 400, "format"),
        (json.dumps({"ids": ids[:1], "extra": 1}).encode(), 400, "extra"),
        (json.dumps({"ids": [ids[0], [1, 0]]}).encode(), 404, "ids"),
        (b"x" * (5 * 1024 * 1024), 400, "body"),
    ]
    for body, status, parameter in cases:
        r = requests.post(url, data=body, timeout=TIMEOUT)
        assert r.status_code == status, (body[:60], r.text)
        assert "Traceback" not in r.text
        assert r.json()["error"]["parameter"] == parameter


def test_methods_not_allowed_answer_json(server):
    for method, path in (("post", "/deepearth/health"), ("delete", "/deepearth/species"),
                         ("put", "/deepearth/observations"),
                         ("get", "/deepearth/embeddings/batch")):
        r = requests.request(method, server + path, timeout=TIMEOUT)
        assert r.status_code == 405, (method, path, r.status_code)
        assert "Traceback" not in r.text and r.json()["error"]["status_code"] == 405
    r = requests.options(server + "/deepearth/embeddings/batch", timeout=TIMEOUT)
    assert r.status_code == 204 and "POST" in r.headers["Access-Control-Allow-Methods"]


def test_concurrent_requests_are_correct(server, cubes):
    """Many clients at once (worker threads, shared cache) get correct, complete answers."""
    ids = embedding_ids(cubes)
    cs = cubes["cs"]

    def fetch(i):
        gid, num = ids[i % 6]
        return i % 6, load_npy(get(server, f"/deepearth/embeddings/{gid}/{num}/features")
                               .content)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(fetch, range(16)))
    for pos, arr in results:
        np.testing.assert_array_equal(arr, cs.features(pos))
    health = ok_json(server, "/deepearth/health")
    assert health["cache"]["hits"] > 0 and health["cache"]["bytes"] <= \
        health["cache"]["capacity_bytes"]
