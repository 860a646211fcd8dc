"""The viewer customisation without a browser: panels, place group, prepared viewer, config.

The panel callbacks are called directly with the context chartlets gives them (the
server context of an in-process xcube ``Server`` over ``tiny_cubes``), and through
chartlets' own controllers with the viewer API's extension context, as the viewer
calls them. Their numbers are compared with :mod:`cube_gen.analysis` and the cubes.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse

import numpy as np
import pandas as pd
import pytest
from chartlets.controllers import get_callback_results, get_contributions, get_layout

from cube_gen import analysis
from cube_gen import schema as S
from cube_gen.access import CubeSet, Query
from server.launch import make_config
from server.viewer import places as V
from server.viewer import setup as VS
from server.viewer.panels import embedding_space, observation, region

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def xserver(tiny_cubes):
    """An in-process xcube Server with the ``deepearth serve`` config of tiny_cubes."""
    from xcube.server.server import Server
    from xcube.server.webservers.tornado import TornadoFramework

    server = Server(TornadoFramework(), make_config(str(tiny_cubes)))
    yield server
    server.ctx.on_dispose()


@pytest.fixture(scope="module")
def ctx(xserver):
    """The context the viewer's chartlets extension passes to layouts and callbacks."""
    return xserver.ctx


@pytest.fixture(scope="module")
def cs(tiny_cubes) -> CubeSet:
    return CubeSet.open(str(tiny_cubes))


def _with_vision(cs: CubeSet, n_embeddings: int | None = None) -> int:
    """gbif_id of an observation with photo embeddings (``n_embeddings`` of them if given)."""
    obs = cs.observations
    ok = obs.has_vision.values
    if n_embeddings is not None:
        ok &= obs.num_embeddings.values == n_embeddings
    return int(obs.gbif_id.values[np.flatnonzero(ok)[0]])


def _without_vision(cs: CubeSet) -> int:
    obs = cs.observations
    return int(obs.gbif_id.values[np.flatnonzero(~obs.has_vision.values)[0]])


def _walk(component: dict):
    yield component
    for child in component.get("children") or []:
        if isinstance(child, dict):
            yield from _walk(child)


def _by_id(component: dict, id: str) -> dict:
    found = [c for c in _walk(component) if c.get("id") == id]
    assert found, f"no component {id!r}"
    return found[0]


def _markdown(component: dict) -> str:
    return "\n".join(c["text"] for c in _walk(component) if c.get("type") == "Markdown")


def _image_urls(component: dict) -> list[str]:
    text = _markdown(component)
    return [part.split(")")[0] for part in text.split("](")[1:] if ".png" in part.split(")")[0]]


# -- the place group -----------------------------------------------------------------------
def test_place_ids_round_trip():
    assert V.place_id(123) == "obs-123"
    assert V.gbif_id_of_place("obs-123") == 123
    for other in (None, "", "user-1", "obs-", "obs-x", "123"):
        assert V.gbif_id_of_place(other) is None


def test_observation_features_are_every_observation(cs):
    features = V.observation_features(cs)
    obs = cs.observations
    assert len(features) == obs.sizes["obs"] == 240
    assert [f["id"] for f in features] == [f"obs-{g}" for g in obs.gbif_id.values]
    colors = cs.species_table().cluster_color.to_numpy()
    names = cs.species_table().taxon_name.to_numpy()
    for f, lat, lon, sp, t in zip(features, obs.lat.values, obs.lon.values,
                                  obs.species_index.values, obs.time.values, strict=True):
        assert f["geometry"]["coordinates"] == pytest.approx([lon, lat], abs=1e-6)
        assert f["properties"]["color"] == colors[sp]
        assert f["properties"]["label"] == f"{names[sp]} · {pd.Timestamp(t):%Y-%m-%d}"
    json.dumps(features)  # JSON-ready


def test_place_groups_reach_the_datasets_api(xserver, cs):
    from xcube.webapi.datasets.controllers import get_dataset_place_group

    datasets = xserver.ctx.get_api_ctx("datasets")
    groups = {g["id"]: g for g in datasets.get_dataset_place_groups("grid", "http://localhost")}
    # every observation is picked by a click on its dot: no group of all of them (MBs)
    assert V.VISION_PLACE_GROUP_ID in groups and V.PLACE_GROUP_ID not in groups
    assert groups[V.VISION_PLACE_GROUP_ID]["propertyMapping"] == {"label": "label",
                                                                  "color": "color"}
    served = get_dataset_place_group(datasets, "grid", V.VISION_PLACE_GROUP_ID,
                                     "http://localhost")
    assert "sourcePaths" not in served
    with_vision = cs.observations.gbif_id.values[cs.observations.has_vision.values]
    assert sorted(f["properties"]["gbif_id"] for f in served["features"]) == \
        sorted(with_vision.tolist())


def _tile_of(lon: float, lat: float, z: int) -> tuple[int, int, float, float]:
    """XYZ tile of a position and the position's pixel inside it (Web Mercator)."""
    n = 2 ** z
    u = (lon + 180) / 360 * n
    r = np.radians(lat)
    v = (1 - np.log(np.tan(r) + 1 / np.cos(r)) / np.pi) / 2 * n
    return int(u), int(v), (u - int(u)) * 256, (v - int(v)) * 256


def test_point_tiles_draw_observations_in_cluster_colours(cs):
    import io

    from PIL import Image

    tiles = V.PointTiles.of(cs)
    rec = cs.observation(_with_vision(cs))
    z = 14
    x, y, px, py = _tile_of(rec["lon"], rec["lat"], z)
    assert len(tiles.points_in(z, x, y)) >= 1
    rgba = np.asarray(Image.open(io.BytesIO(tiles.png(z, x, y))).convert("RGBA"))
    assert rgba.shape == (256, 256, 4)
    centre = rgba[int(py), int(px)]
    want = cs.species_table().cluster_color[rec["species_index"]].lstrip("#")
    assert centre[3] == 255
    assert np.abs(centre[:3].astype(int) - [int(want[i:i + 2], 16) for i in (0, 2, 4)]).max() \
        <= 40  # the dot's colour (resampling blends its dark outline a little)
    assert rgba[..., 3].sum() > 0
    # a tile without observations is transparent
    empty = np.asarray(Image.open(io.BytesIO(tiles.png(z, 0, 0))).convert("RGBA"))
    assert empty[..., 3].max() == 0


# -- observation panel ---------------------------------------------------------------------
def test_observation_panel_shows_the_selected_observation(ctx, cs):
    gid = _with_vision(cs, 2)
    body = observation.update_body(ctx, f"obs-{gid}", "variance", "3", "viridis", 40, True)
    d = body.to_dict()
    assert d["id"] == observation.BODY
    rec = cs.observation(gid)
    assert _by_id(d, "obs_species")["text"] == rec["taxon_name"]
    fields = _by_id(d, "obs_fields")["text"]
    assert f"[{gid}](https://www.gbif.org/occurrence/{gid})" in fields
    assert rec["split"] in fields and f"{abs(rec['lat']):.5f}° N" in fields
    # embedded images link the cube set's synthetic photos, the others iNaturalist
    local = fields.count("](/explore/photos/")
    assert local == len(cs.images_of(gid))
    assert local + fields.count("](https://inaturalist") == len(rec["image_urls"])
    # one attention map and one UMAP-RGB per embedding, from the plugin's endpoints
    urls = _image_urls(d)
    images = cs.images_of(gid)
    assert len(urls) == 2 * len(images) == 4
    attention = [u for u in urls if "/attention.png" in u]
    for n, u in enumerate(attention):
        parsed = urlparse(u)
        assert parsed.path == f"/deepearth/embeddings/{gid}/{n}/attention.png"
        assert parse_qs(parsed.query) == {"method": ["variance"], "frame": ["3"],
                                          "colormap": ["viridis"], "alpha": ["0.40"],
                                          "size": [str(observation.IMAGE_SIZE)]}
    assert all(u.startswith("/deepearth/embeddings/") for u in urls)
    # statistics: the cube's values, one table per embedding
    for n, pos in enumerate(images):
        rows = _by_id(d, f"obs_stats_{n}")["rows"]
        want = cs.image_stats(pos)
        assert [r[0] for r in rows] == [S.IMAGE_STATS[k] for k in want]
        assert [float(r[1]) for r in rows] == pytest.approx(list(want.values()), rel=1e-3)
    # similar embeddings: exactly analysis.similar_embeddings of the first photo
    rows = _by_id(d, "obs_similar")["rows"]
    want = analysis.similar_embeddings(cs, images[0], k=observation.SIMILAR_K)
    assert [(r[3], r[4] - 1) for r in rows] == [(w["gbif_id"], w["image_number"]) for w in want]
    assert [r[5] for r in rows] == pytest.approx([w["score"] for w in want], abs=1e-4)


def test_observation_panel_photo_under_the_attention_map(ctx, cs):
    gid = _with_vision(cs)
    on = observation.update_body(ctx, f"obs-{gid}", None, None, None, None, True).to_dict()
    off = observation.update_body(ctx, f"obs-{gid}", None, None, None, None, False).to_dict()
    under_on = _by_id(on, "obs_attention_0")["style"]
    # the synthetic cube set carries its own photos (real data: iNaturalist URLs)
    assert under_on["backgroundImage"].startswith(f"url(/explore/photos/{gid}/0.jpg")
    assert "backgroundImage" not in _by_id(off, "obs_attention_0")["style"]


def test_observation_panel_defaults_and_bad_values(ctx, cs):
    gid = _with_vision(cs)
    d = observation.update_body(ctx, f"obs-{gid}", "nonsense", "99", "no-such-map", 250,
                                None).to_dict()
    q = parse_qs(urlparse(_image_urls(d)[0]).query)
    assert (q["method"], q["frame"], q["colormap"], q["alpha"]) == \
        (["l2norm"], ["mean"], ["plasma"], ["1.00"])


def test_observation_panel_without_an_observation(ctx, cs):
    for place in (None, "user-abc", "obs-nonsense"):
        d = observation.update_body(ctx, place).to_dict()
        assert d["id"] == observation.BODY
        assert "Select an observation" in d["children"][0]["text"]
    d = observation.update_body(ctx, "obs-1").to_dict()  # no such gbif_id: a message
    assert d["id"] == observation.BODY and "no observation with gbif_id 1" in str(d)
    gid = _without_vision(cs)
    d = observation.update_body(ctx, f"obs-{gid}").to_dict()
    assert "no vision embedding" in str(d) and not _image_urls(d)


def test_panels_report_an_unavailable_cube_set():
    class NoDeepEarth:
        config: dict = {}

        def get_api_ctx(self, name):
            return None

    d = observation.update_body(NoDeepEarth(), "obs-1").to_dict()
    assert "DeepEarth API is not running" in str(d)
    assert embedding_space.update_chart(NoDeepEarth(), "species") is None
    summary, *charts = region.update_region(NoDeepEarth(), None)
    assert "DeepEarth API is not running" in summary and charts == [None, None, None]


# -- embedding space panel -----------------------------------------------------------------
def _chart_data(chart) -> list[dict]:
    spec = chart.to_dict()
    (values,) = spec["datasets"].values()
    return values


def test_species_chart_is_the_language_umap(ctx, cs):
    gid = _with_vision(cs)
    sp = cs.observation(gid)["species_index"]
    chart = embedding_space.update_chart(ctx, "species", "cluster", "x-z", f"obs-{gid}")
    spec = chart.to_dict()
    rows = _chart_data(chart)
    assert len(rows) == 12
    umap = cs.species.umap.values
    table = cs.species_table()
    scale = spec["encoding"]["color"]["scale"]  # a legend: cluster label -> its colour
    colour_of = dict(zip(scale["domain"], scale["range"], strict=True))
    for r in rows:
        i = r["key"]
        assert (r["x"], r["y"], r["z"]) == pytest.approx(tuple(umap[i]), abs=1e-5)
        assert colour_of[r["fill"]] == table.cluster_color[i] and r["highlight"] == (i == sp)
    assert spec["encoding"]["x"]["field"] == "x" and spec["encoding"]["y"]["field"] == "z"
    # the click selection chartlets turns into the "picked" property
    (param,) = [p for p in spec["params"] if p["name"] == embedding_space.SELECTION]
    assert param["select"] == {"type": "point", "fields": ["key"], "on": "click"}
    by_species = _chart_data(embedding_space.update_chart(ctx, "species", "species", "x-y"))
    assert [r["fill"] for r in by_species] == list(table.color)


def test_vision_chart_is_the_vision_umap(ctx, cs):
    gid = _with_vision(cs, 2)
    rows = _chart_data(embedding_space.update_chart(ctx, "vision", "cluster", "y-z",
                                                    f"obs-{gid}"))
    assert len(rows) == 6
    t = cs.image_table()
    umap = cs.vision.umap.values
    for r in rows:
        pos = cs.image_position(int(r["gbif_id"]), int(r["image_number"]))
        assert (r["x"], r["y"], r["z"]) == pytest.approx(tuple(umap[pos]), abs=1e-5)
        assert r["highlight"] == (r["gbif_id"] == gid)
        assert r["key"] == f"{t.gbif_id[pos]}:{t.image_number[pos]}"
    assert sum(r["highlight"] for r in rows) == 2


def test_vision_chart_keeps_the_selected_points_when_thinned(ctx, cs, monkeypatch):
    monkeypatch.setattr(embedding_space, "MAX_VISION_POINTS", 2)
    gid = int(cs.image_table().gbif_id.iloc[-1])
    df, total = embedding_space.vision_frame(ctx, gid)
    assert total == 6 and len(df) < 6 and (df.gbif_id == gid).any()


def test_embedding_info_describes_picked_points(ctx, cs):
    table = cs.species_table()
    text = embedding_space.update_info(ctx, {"key": [0, 3]}, "species", None)
    for i in (0, 3):
        assert table.taxon_name[i] in text
    nearest = analysis.similar_species(cs, 0, 3)
    assert nearest[0]["taxon_name"] in text
    t = cs.image_table()
    key = f"{t.gbif_id[1]}:{t.image_number[1]}"
    text = embedding_space.update_info(ctx, {"key": [key], "vlPoint": {}}, "vision", None)
    assert f"GBIF {t.gbif_id[1]}" in text and "/attention.png?size=96" in text
    assert embedding_space.HINT in embedding_space.update_info(ctx, None, "species", None)
    # keys of the other view are ignored
    assert embedding_space.HINT in embedding_space.update_info(ctx, {"key": [key]}, "species")
    gid = _with_vision(cs)
    assert "Selected on the map" in embedding_space.update_info(ctx, None, "vision",
                                                                f"obs-{gid}")
    link = embedding_space.update_link(ctx, f"obs-{gid}")
    assert f"(/explore/embedding-space.html?gbif_id={gid})" in link


# -- patch search in the observation panel -------------------------------------------------
@pytest.fixture(scope="module")
def patch_ctx(patch_cubes):
    """The panels' context over the patch-indexed cube set."""
    from xcube.server.server import Server
    from xcube.server.webservers.tornado import TornadoFramework

    server = Server(TornadoFramework(), make_config(str(patch_cubes)))
    yield server.ctx
    server.ctx.on_dispose()


def test_patch_search_says_when_there_is_no_patch_index(ctx, cs):
    d = observation.update_body(ctx, f"obs-{_with_vision(cs)}").to_dict()
    assert _by_id(d, observation.PATCH_MATCHES)["text"] == observation.NO_PATCH_INDEX
    assert not [c for c in _walk(d) if c.get("id") == observation.PATCH_GRID]


def test_patch_grid_is_the_attention_map_with_a_click_selection(patch_ctx, patch_cubes):
    from cube_gen.embedding_math import normalise
    from server import render

    pcs = CubeSet.open(str(patch_cubes))
    gid = _with_vision(pcs, 2)
    d = observation.update_body(patch_ctx, f"obs-{gid}", "variance", "2", "viridis", 50,
                                True).to_dict()
    spec = _by_id(d, observation.PATCH_GRID)["chart"]
    assert _by_id(d, observation.PATCH_MATCHES)["children"][0]["text"] == \
        observation.PATCH_HINT
    (param,) = spec["params"]
    assert param["name"] == observation.PATCH_SELECTION
    assert param["select"] == {"type": "point", "fields": ["key"], "on": "click"}
    assert spec["facet"]["column"]["field"] == "photo"
    (rows,) = spec["datasets"].values()
    photos = [r for r in rows if r["kind"] == "photo"]
    assert [r["url"] for r in photos] == [f"/explore/photos/{gid}/{n}.jpg" for n in (0, 1)]
    cmap = render.get_colormap("viridis")
    for n, pos in enumerate(pcs.images_of(gid)):
        cells = [r for r in rows if r["kind"] == "cell" and r["photo"] == f"Photo {n + 1}"]
        assert len(cells) == 576
        norm = normalise(np.asarray(pcs.attention(pos, "variance", "2"), np.float32))
        for r in cells[::37]:
            assert r["key"] == f"{gid}:{n}:{r['py']}:{r['px']}"
            assert r["value"] == pytest.approx(norm[r["py"], r["px"]], abs=1e-4)
            rgb = cmap(float(norm[r["py"], r["px"]]), bytes=True)[:3]
            assert r["fill"] == "#" + "".join(f"{int(c):02x}" for c in rgb)
            assert r["opacity"] == pytest.approx(r["value"] * 0.5, abs=1e-3)


@pytest.mark.parametrize("filters", [None, "months", "taxa"])
def test_patch_matches_are_the_patch_search(patch_ctx, patch_cubes, filters):
    from patch_reference import brute, reference_vectors

    from cube_gen import patch_index as P
    from server.deepearth import controllers as C
    from server.deepearth.params import EmbeddingId

    pcs = CubeSet.open(str(patch_cubes))
    gid = _with_vision(pcs, 2)
    t = pcs.image_table()
    if filters:  # the species, or the month, of another photo's observation
        other = pcs.observation(int(t.gbif_id[t.gbif_id != gid].iloc[0]))
        month = pd.Timestamp(other["time"]).month
        filters = urlencode({"taxa": other["taxon_name"]}) if filters == "taxa" \
            else f"months={month}-{month}"
    de = patch_ctx.get_api_ctx("deepearth")
    q = observation.filters_query(filters)
    grouped = C.similar_patches(de, EmbeddingId(gid, 1), P.Window.patch(11, 7),
                                observation.PATCH_K, None if q.is_empty else q, group=True,
                                per_image=1)["results"]
    want = [{**w, **w["patches"][0]} for w in grouped]  # each photo's best patch
    got = observation.update_patch_matches(patch_ctx, {"key": [f"{gid}:1:11:7"], "vlPoint": {}},
                                           "entropy", "mean", "magma", filters).to_dict()
    assert got["id"] == observation.PATCH_MATCHES
    rows = _by_id(got, observation.PATCH_TABLE)["rows"]
    assert rows and [(r[3], r[4] - 1) for r in rows] == \
        [(w["gbif_id"], w["image_number"]) for w in want]
    assert [r[5] for r in rows] == pytest.approx([w["score"] for w in want], abs=1e-4)
    assert [(r[1], r[2]) for r in rows] == [(w["taxon_name"], w["time"][:10]) for w in want]
    # the photos are a numpy brute force's best, in order, each with its best patch
    vectors = reference_vectors(pcs)
    image = pcs.image_position(gid, 1)
    allowed = np.zeros(pcs.vision.sizes["image"], bool)
    allowed[pcs.select_images(C.resolve(de, q))] = True
    allowed[image] = False
    ids, scores = brute(vectors, vectors[P.patch_id(image, 11, 7)], int(allowed.sum()) * 576,
                        allowed)
    best = {}
    for i, sc in zip(ids.tolist(), scores.tolist(), strict=True):
        best.setdefault(i // 576, (i, sc))
    pos = pcs.image_positions([r[3] for r in rows], [r[4] - 1 for r in rows])
    assert pos.tolist() == list(best)[:len(rows)]
    np.testing.assert_array_equal(
        P.patch_id(pos, [w["patch_y"] for w in want], [w["patch_x"] for w in want]),
        [best[int(i)][0] for i in pos])
    assert [r[5] for r in rows] == pytest.approx([best[int(i)][1] for i in pos], abs=1e-4)
    if filters:  # every match within the filters
        if filters.startswith("taxa"):
            assert {r[1] for r in rows} == {other["taxon_name"]}
        else:
            assert {pd.Timestamp(w["time"]).month for w in want} == {month}
    # one attention crop per match, from the crop endpoint, with the panel's style
    crops = [u for u in _image_urls(got) if "/crop.png" in u]
    assert [urlparse(u).path for u in crops] == [
        f"/deepearth/embeddings/{w['gbif_id']}/{w['image_number']}/patches/{w['patch_y']}/"
        f"{w['patch_x']}/crop.png" for w in want]
    assert parse_qs(urlparse(crops[0]).query) == {
        "method": ["entropy"], "frame": ["mean"], "colormap": ["magma"], "alpha": ["1.00"],
        "size": [str(observation.CROP_SIZE)], "margin": [str(observation.CROP_MARGIN)]}
    # a click on a match selects its observation
    columns = [c["id"] for c in _by_id(got, observation.PATCH_TABLE)["columns"]]
    row = dict(zip(columns, rows[0], strict=True))
    assert observation.select_patch_match(patch_ctx, row) == f"obs-{want[0]['gbif_id']}"


def test_patch_matches_hint_and_bad_clicks(patch_ctx, ctx, cs):
    for picked in (None, {}, {"key": []}, {"key": ["nonsense"]}, {"key": [3]}):
        d = observation.update_patch_matches(patch_ctx, picked).to_dict()
        assert d["children"][0]["text"] == observation.PATCH_HINT
    assert observation.select_patch_match(patch_ctx, None) is None
    assert observation.select_patch_match(patch_ctx, {"gbif_id": "x"}) is None
    gid = _with_vision(cs)
    d = observation.update_patch_matches(patch_ctx, {"key": [f"{gid}:0:30:0"]}).to_dict()
    assert "patch_y" in str(d) and d["id"] == observation.PATCH_MATCHES  # outside the grid
    d = observation.update_patch_matches(ctx, {"key": [f"{gid}:0:3:4"]}).to_dict()
    assert "no patch index" in str(d)  # a stale click on a set without one: a message


# -- region panel --------------------------------------------------------------------------
def test_region_bbox_and_year():
    bbox, where = region.region_bbox({"type": "Point", "coordinates": [-81.5, 28.5]}, 2.0)
    dlat = 2.0 / region.KM_PER_DEGREE
    dlon = dlat / np.cos(np.radians(28.5))
    assert bbox == pytest.approx((-81.5 - dlon, 28.5 - dlat, -81.5 + dlon, 28.5 + dlat))
    assert "± 2 km" in where
    poly = {"type": "Polygon", "coordinates": [[[-81.8, 28.1], [-81.2, 28.1], [-81.2, 28.6],
                                                [-81.8, 28.1]]]}
    assert region.region_bbox(poly, 2.0)[0] == (-81.8, 28.1, -81.2, 28.6)
    assert region.region_bbox(None, 2.0)[0] is None
    start, end = region.year_range("2019-01-01T00:00:00Z")
    assert start == pd.Timestamp("2019-01-01") and end.year == 2019 and end.month == 12
    assert region.year_range(None) is None and region.year_range("garbage") is None


def _summary_numbers(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0]:
            out[cells[0]] = cells[1]
    return out


@pytest.mark.parametrize("geometry, time_mode, split", [
    (None, "all", "all"),
    ({"type": "Polygon", "coordinates": [[[-81.9, 28.0], [-81.3, 28.0], [-81.3, 28.7],
                                          [-81.9, 28.0]]]}, "all", "train"),
    ("observation", "year", "all"),
])
def test_region_panel_numbers_are_the_region_statistics(ctx, cs, geometry, time_mode, split):
    if geometry == "observation":
        rec = cs.observation(_with_vision(cs))
        geometry = {"type": "Point", "coordinates": [rec["lon"], rec["lat"]]}
    time_label = "2019-01-01T00:00:00Z"
    summary, species, years, months = region.update_region(ctx, geometry, None, time_label,
                                                           5000, time_mode, split)
    f, _, _ = region.region_filters(geometry, time_label, 5000, time_mode, split)
    want = analysis.region_statistics(cs, Query.make(
        bbox=None if f.polygon else f.bbox, polygon=f.polygon, start=f.start, end=f.end,
        split=f.split))
    if geometry and geometry["type"] == "Polygon":  # exactly the points inside, not its box
        from matplotlib.path import Path as PolygonPath

        inside = PolygonPath(np.asarray(geometry["coordinates"][0])).contains_points(
            np.c_[cs.observations.lon.values, cs.observations.lat.values])
        if split != "all":
            inside &= cs.observations.split.values == S.SPLIT_CODES[split]
        assert want["observations"] == int(inside.sum())
        assert "inside the drawn polygon" in summary
    nums = _summary_numbers(summary)
    assert nums["Observations"].startswith(f"{want['observations']:,} ")
    assert nums["Species richness"] == f"{want['richness']:,}"
    assert nums["Shannon H′ (nats)"] == region.fmt(want["shannon"])
    assert nums["Gini–Simpson 1 − Σp²"] == region.fmt(want["gini_simpson"])
    top = want["species"][:region.TOP_SPECIES]
    rows = _chart_data(species)
    assert [(r["species"], r["count"]) for r in rows[:len(top)]] == \
        [(s["taxon_name"], s["count"]) for s in top]
    assert sum(r["count"] for r in rows) == want["observations"]
    assert [(r["year"], r["count"]) for r in _chart_data(years)] == \
        [(y["year"], y["count"]) for y in want["by_year"]]
    assert [r["count"] for r in _chart_data(months)] == [m["count"] for m in want["by_month"]]
    # the link names the same query at the HTTP endpoint
    link = summary.split("](")[-1].rstrip(")")
    q = parse_qs(urlparse(link).query)
    assert urlparse(link).path == "/deepearth/stats/region"
    if f.polygon:
        assert "bbox" not in q
        ring = [tuple(float(v) for v in p.split(",")) for p in q["polygon"][0].split(";")]
        assert np.ravel(ring) == pytest.approx(np.ravel(f.polygon), abs=1e-6)
    elif f.bbox:
        assert [float(v) for v in q["bbox"][0].split(",")] == pytest.approx(f.bbox, abs=1e-6)
    assert q.get("split") == ([split] if split != "all" else None)
    if time_mode == "year":
        assert q["start"] == ["2019-01-01"] and q["end"] == ["2019-12-31"]


def test_region_panel_uses_the_shared_service_cache(ctx):
    cache = ctx.get_api_ctx("deepearth").cache
    region.update_region(ctx, None, None, None, 2000, "all", "train")
    hits = cache.stats()["hits"]
    region.update_region(ctx, None, None, None, 2000, "all", "train")
    assert cache.stats()["hits"] > hits


# -- the extension as the viewer sees it ---------------------------------------------------
def test_extension_contributions_layouts_and_callbacks(xserver, cs):
    ext_ctx = xserver.ctx.get_api_ctx("viewer").ext_ctx
    assert ext_ctx is not None, "the config's Viewer: Augmentation did not load the panels"
    r = get_contributions(ext_ctx)
    assert r.ok, r.reason
    panels = r.data["contributions"]["panels"]
    assert [p["initialState"]["title"] for p in panels] == \
        ["Observation", "Embedding space", "Region statistics", "Model predictions"]
    gid = _with_vision(cs)
    for index in range(len(panels)):
        r = get_layout(ext_ctx, "panels", index, {"inputValues": [f"obs-{gid}", None, None][
            :len(panels[index]["layout"]["inputs"])]})
        assert r.ok, r.reason
        json.dumps(r.data)
    # the observation panel's body callback, as the viewer calls it on a map selection
    callbacks = panels[0]["callbacks"]
    (k,) = [i for i, c in enumerate(callbacks) if c["outputs"][0]["id"] == observation.BODY]
    r = get_callback_results(ext_ctx, {"callbackRequests": [{
        "contribPoint": "panels", "contribIndex": 0, "callbackIndex": k,
        "inputValues": [f"obs-{gid}", "entropy", "mean", "magma", 70, True]}]})
    assert r.ok, r.reason
    (change,) = r.data[0]["stateChanges"]
    assert change["id"] == observation.BODY and "entropy" in json.dumps(change["value"])


# -- the prepared viewer, config -----------------------------------------------------------
def _fake_bundle(root: Path) -> Path:
    (root / "assets").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "images").mkdir()
    (root / "assets" / "main-x.js").write_text("// viewer")
    (root / "docs" / "privacy-note.en.md").write_text("data from Brockmann Consult GmbH")
    (root / "index.html").write_text(
        '<html><head><link rel="icon" href="./images/favicon.ico"/>'
        "<title>xcube Viewer</title></head><body></body></html>")
    return root


def test_prepare_viewer_dist_lays_our_files_over_a_copy(tmp_path):
    bundle = _fake_bundle(tmp_path / "bundle")
    viewer = tmp_path / "viewer"
    (viewer / "images").mkdir(parents=True)
    (viewer / "images" / "deepearth-logo.png").write_bytes(b"png")
    overlay = viewer / VS.OVERLAY_FOLDER
    (overlay / "docs").mkdir(parents=True)
    (overlay / "docs" / "privacy-note.en.md").write_text("DeepEarth Cube note")
    (overlay / VS.INIT_SCRIPT).write_text("// init")
    dist = VS.prepare_viewer_dist(viewer, bundle)
    assert dist.parent == viewer / VS.DIST_FOLDER
    assert (dist / "docs" / "privacy-note.en.md").read_text() == "DeepEarth Cube note"
    assert (dist / "assets" / "main-x.js").is_file() and (dist / VS.INIT_SCRIPT).is_file()
    assert (dist / "images" / "deepearth-logo.png").read_bytes() == b"png"
    html = (dist / "index.html").read_text()
    assert "<title>DeepEarth Cube</title>" in html
    assert html.index(VS.INIT_SCRIPT) < html.index("<title>")  # runs before the viewer
    assert VS.patch_index_html(html) == html
    assert "Brockmann" not in (bundle / "index.html").read_text()  # the bundle is untouched
    # unchanged inputs: the same folder; a changed overlay: a new one
    assert VS.prepare_viewer_dist(viewer, bundle) == dist
    (overlay / "docs" / "privacy-note.en.md").write_text("changed")
    again = VS.prepare_viewer_dist(viewer, bundle)
    assert again != dist and (again / "docs" / "privacy-note.en.md").read_text() == "changed"
    assert not [p for p in (viewer / VS.DIST_FOLDER).iterdir() if p.name.startswith("tmp-")]
    # old copies are pruned (the newest three stay)
    for k in range(4):
        (overlay / "docs" / "privacy-note.en.md").write_text(f"change {k}")
        latest = VS.prepare_viewer_dist(viewer, bundle)
    kept = sorted((viewer / VS.DIST_FOLDER).glob("viewer-*"))
    assert len(kept) == 3 and latest in kept


def test_unwritable_viewer_folder_falls_back_to_the_bundled_viewer(tmp_path, monkeypatch):
    monkeypatch.delenv(VS.ENV_VIEWER_PATH, raising=False)
    viewer = tmp_path / "viewer"
    viewer.mkdir()
    (viewer / "config.json").write_text("{}")
    (viewer / VS.DIST_FOLDER).write_text("a file where the folder should be")
    assert VS.viewer_static_routes(tmp_path) == []


def test_repository_overlay_replaces_the_privacy_note():
    bundle = VS.bundled_viewer_dist()
    assert bundle is not None, "xcube ships no viewer build"
    for lang in ("en", "de", "se"):
        ours = REPO / "viewer" / VS.OVERLAY_FOLDER / "docs" / f"privacy-note.{lang}.md"
        assert ours.is_file() and "Brockmann" not in ours.read_text()
        assert (bundle / "docs" / ours.name).is_file()  # the file the viewer asks for
    assert "<head>" in (bundle / "index.html").read_text()


def test_config_names_the_viewer_and_serves_the_prepared_copy(tiny_cubes, monkeypatch):
    monkeypatch.delenv(VS.ENV_VIEWER_PATH, raising=False)
    cfg = make_config(str(tiny_cubes))
    assert cfg["Viewer"] == {"Configuration": {"Path": str(REPO / "viewer")},
                             "Augmentation": {"Extensions": [VS.PANELS_EXTENSION]}}
    (route,) = cfg["static_routes"]
    assert route["path"] == "/viewer" and route["default_filename"] == "index.html"
    dist = Path(route["dir_path"])
    assert dist.parent == REPO / "viewer" / VS.DIST_FOLDER and (dist / "index.html").is_file()
    note = (dist / "docs" / "privacy-note.en.md").read_text()
    assert "DeepEarth Cube" in note and "Brockmann" not in note
    # a viewer chosen with XCUBE_VIEWER_PATH is left alone
    monkeypatch.setenv(VS.ENV_VIEWER_PATH, "/somewhere/else")
    assert "static_routes" not in make_config(str(tiny_cubes))


def test_viewer_config_json_is_branded():
    config = json.loads((REPO / "viewer" / "config.json").read_text())
    branding = config["branding"]
    assert branding["appBarTitle"] == "DeepEarth Cube"
    assert (REPO / "viewer" / branding["logoImage"]).is_file()
    assert branding["logoImage"].endswith(".png")  # the config route serves no SVG type
    assert (REPO / "viewer" / "about.en.md").is_file()
    assert branding["allowAboutPage"] is True


def test_styles_fit_the_data_by_the_grid_variable_registry(tiny_cubes):
    """The viewer shows the config's styles: colours and ranges of the registry
    (cube_gen.grid_variables), ranges fitted to the data when the cubes were built."""
    from cube_gen import grid_variables as G

    cfg = make_config(str(tiny_cubes))
    grid = CubeSet.open(str(tiny_cubes)).grid(0)
    (style,) = [st for st in cfg["Styles"] if st["Identifier"] == f"deepearth-{S.GRID}"]
    m = style["ColorMappings"]
    customs = {c["Identifier"]: c["Colors"] for c in cfg["CustomColorMaps"]}
    transparent = "#00000000"
    for name in ("observation_count", "species_richness", "vision_count", "shannon_diversity"):
        var = G.lookup(name)
        colors = customs[m[name]["ColorBar"]]
        assert m[name]["ValueRange"] == [colors[0][0], colors[-1][0]]
        assert colors[-1][0] == pytest.approx(grid[name].attrs["color_value_max"])
        assert (colors[0][1] == transparent) == var.color_range.transparent_zero, name
    assert G.lookup("observation_count").color_range.transparent_zero  # zero: base map shows
    assert m["embedding_r"]["ValueRange"] == [0.0, 1.0]
    assert m["rgb"]["Red"]["ValueRange"] == [0.0, 1.0]
    species = [k for k in m if k.startswith(S.TOP_SPECIES_PREFIX)]
    assert species and all(customs[m[k]["ColorBar"]][0][1] == transparent for k in species)
