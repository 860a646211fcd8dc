"""The viewer's exploration loop (issue 15).

Fast parts: the hooks patched into xcube's bundled viewer, species search, phenology
ranges, the dots' time step, picking the nearest dot, synthetic photos consistent with the
attention maps. Slow parts (a real ``xcube serve``, headless Debian Chromium through
Playwright, offline): 64 concurrent first tile requests at fresh servers answer no 5xx;
one page walks the loop like a user: dot click -> Observation panel, UMAP click -> map
selection moves, species filter -> fewer dots, reload -> state restored, drawn polygon ->
statistics of exactly the observations inside, a search naming one species -> its layer and a
narrowed place list, the 3-D page (same browser) -> the viewer's selection and filters.
Screenshots go to artifacts/viewer-loop/.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cube_gen import phenology, taxa
from cube_gen import schema as S
from cube_gen.timeparse import PRECISION_CODES
from server.viewer import bundle as viewer_bundle
from server.viewer.loop import DotFilter, FilterError, pick, time_step_period

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "artifacts" / "viewer-loop"
CHROMIUM = os.environ.get("DEEPEARTH_CHROMIUM", "/usr/bin/chromium")


# -- the bundle hooks ------------------------------------------------------------------------
def test_bundle_hooks_match_the_bundled_viewer():
    from server.viewer.setup import bundled_viewer_dist

    dist = bundled_viewer_dist()
    if dist is None:
        pytest.skip("xcube has no bundled viewer")
    js = viewer_bundle.bundle_file(dist).read_text(encoding="utf-8")
    patched = viewer_bundle.patch_source(js)
    assert patched.startswith(viewer_bundle.MARKER)
    for needle in ("window.deepearthOnStore&&window.deepearthOnStore(",
                   "window.deepearthReduxLog===!0&&", "=window.deepearthMapObjects={}",
                   "set(t,n){window.deepearthHost&&window.deepearthHost.set(t,n)}"):
        assert patched.count(needle) == 1, needle
    assert viewer_bundle.patch_source(patched) == patched  # idempotent
    assert len(patched) - len(js) < 600  # four small hooks, nothing else changed


def test_bundle_hooks_fail_loudly_on_another_build():
    with pytest.raises(viewer_bundle.BundlePatchError, match="hook 'store'"):
        viewer_bundle.patch_source("console.log('another viewer build')")


# -- species search ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def species_table() -> pd.DataFrame:
    return pd.DataFrame({
        "species_index": [0, 1, 2, 3, 4],
        "taxon_name": ["Quercus virginiana", "Quercus nigra", "Sabal palmetto",
                       "Serenoa repens", "Bidens alba"],
        "genus": ["Quercus", "Quercus", "Sabal", "Serenoa", "Bidens"],
        "cluster": [0, 0, 1, 1, -1],
    })


def test_species_search_by_genus_name_and_cluster(species_table):
    assert taxa.search_species(species_table, None) is None
    assert taxa.search_species(species_table, " , ") is None
    assert taxa.search_species(species_table, "quercus").tolist() == [0, 1]
    assert taxa.search_species(species_table, "palm").tolist() == [2]  # part of a name
    assert taxa.search_species(species_table, "cluster 1").tolist() == [2, 3]
    assert taxa.search_species(species_table, "cluster:0, Bidens alba").tolist() == [0, 1, 4]
    assert taxa.search_species(species_table, "unclustered").tolist() == [4]
    assert taxa.search_species(species_table, "Pinus").tolist() == []
    assert taxa.cluster_label(-1) == "unclustered" and taxa.cluster_label(3) == "cluster 3"
    values = [s["value"] for s in taxa.suggestions(species_table, "s")]
    assert "Sabal" in values and "unclustered" in values


# -- phenology ---------------------------------------------------------------------------------
def test_phenology_ranges_wrap_and_respect_precision():
    t = np.array(["2020-12-15T23:10", "2021-01-02T03:00", "2021-06-01T12:00",
                  "2022-03-01T00:00", "2019-01-01T00:00"], dtype="datetime64[ns]")
    p = np.array([PRECISION_CODES["minute"], PRECISION_CODES["hour"], PRECISION_CODES["hour"],
                  PRECISION_CODES["day"], PRECISION_CODES["year"]], dtype=np.int8)
    winter = phenology.phenology_mask(t, p, months=(11, 2))
    assert winter.tolist() == [True, True, False, False, False]  # year-only: no month
    night = phenology.phenology_mask(t, p, hours=(22, 3))
    assert night.tolist() == [True, True, False, False, False]  # day precision: no hour
    assert phenology.phenology_mask(t, p, years=(2021, 2021)).tolist() == \
        [False, True, True, False, False]
    assert phenology.parse_range("months", "3-5") == (3, 5)
    assert phenology.parse_range("hours", "7") == (7, 7)
    assert phenology.parse_range("years", None) is None
    with pytest.raises(ValueError, match="months values must lie in 1..12"):
        phenology.parse_range("months", "0-5")
    with pytest.raises(ValueError, match="first <= last"):
        phenology.parse_range("years", "2024-2020")


def test_dot_filter_parameters():
    f = DotFilter.from_query({"taxa": ["Quercus"], "months": ["3-5"], "year": ["2021"],
                              "time": ["2021-01-01T00:00:00Z"], "crs": ["EPSG:3857"]})
    assert f.taxa == "Quercus" and f.months == (3, 5) and f.years == (2021, 2021)
    assert f.time == pd.Timestamp("2021-01-01")
    assert f.dataset is None  # the yearly grid by default
    assert DotFilter.from_query({"time": ["2021-05-01"], "dataset": ["grid_month_of_year"]}) \
        .dataset == "grid_month_of_year"
    assert DotFilter.from_query({}).is_empty
    with pytest.raises(FilterError) as err:
        DotFilter.from_query({"hours": ["25"]})
    assert err.value.parameter == "hours"
    with pytest.raises(FilterError) as err:
        DotFilter.from_query({"year": ["20x"]})
    assert err.value.parameter == "year"


def test_time_step_period():
    steps = pd.date_range("2010-01-01", "2012-01-01", freq="YS").values
    start, end = time_step_period(steps, pd.Timestamp("2011-01-01"))
    assert (pd.Timestamp(start), pd.Timestamp(end)) == (pd.Timestamp("2011"), pd.Timestamp("2012"))
    start, end = time_step_period(steps, pd.Timestamp("2012-01-01"))  # the last: a year long
    assert pd.Timestamp(end) == pd.Timestamp("2013-01-01")


class _Obs:
    """The columns :func:`pick` reads, as an xarray-like object."""

    def __init__(self, lon, lat, gbif):
        import xarray as xr

        self.observations = xr.Dataset({"lon": ("obs", lon), "lat": ("obs", lat),
                                        "gbif_id": ("obs", gbif)})


def test_pick_is_the_nearest_within_the_radius():
    rng = np.random.default_rng(1)
    lon = -81.5 + rng.uniform(-0.2, 0.2, 500)
    lat = 28.5 + rng.uniform(-0.2, 0.2, 500)
    cs = _Obs(lon, lat, np.arange(500) + 1000)
    # brute force in the test: equirectangular distances are fine at this scale
    x = np.radians(lon + 81.5) * np.cos(np.radians(28.5)) * 6_371_008.8
    y = np.radians(lat - 28.5) * 6_371_008.8
    d = np.hypot(x, y)
    j = int(np.argmin(d))
    r = pick(cs, -81.5, 28.5, radius_m=float(d[j]) * 1.5)
    assert r["gbif_id"] == 1000 + j and abs(r["distance_m"] - d[j]) < 0.01 * d[j] + 1
    assert pick(cs, -81.5, 28.5, radius_m=float(d[j]) * 0.5)["gbif_id"] is None
    keep = np.ones(500, bool)
    keep[j] = False
    second = int(np.argsort(d)[1])
    assert pick(cs, -81.5, 28.5, 50_000, keep)["gbif_id"] == 1000 + second


# -- the query: polygon and species search ------------------------------------------------------
def test_query_polygon_and_taxa_select_what_an_independent_count_finds(tiny_cubes):
    from matplotlib.path import Path as PolygonPath

    from cube_gen.access import CubeSet
    from cube_gen.query import Query

    cs = CubeSet.open(str(tiny_cubes))
    o = cs.observations
    lon, lat = o.lon.values, o.lat.values
    ring = [(-81.7, 28.2), (-81.1, 28.35), (-81.3, 28.8), (-81.65, 28.6)]
    inside = PolygonPath(np.asarray(ring)).contains_points(np.c_[lon, lat])
    got = cs.select_observations(Query.make(polygon=ring))
    assert inside.sum() > 0 and got.tolist() == np.flatnonzero(inside).tolist()
    assert Query.make(polygon=ring).bbox == (-81.7, 28.2, -81.1, 28.8)
    table = cs.species_table()
    genus = table.genus.iat[0]
    want = np.flatnonzero(np.isin(o.species_index.values,
                                  table.species_index[table.genus == genus].to_numpy()))
    assert cs.select_observations(Query.make(taxa=genus)).tolist() == want.tolist()
    months = pd.DatetimeIndex(o.time.values).month
    spring = np.flatnonzero((months >= 3) & (months <= 5) & (o.time_precision.values >= 1))
    assert cs.select_observations(Query.make(months="3-5")).tolist() == spring.tolist()
    with pytest.raises(ValueError, match="at least 3 distinct vertices"):
        Query.make(polygon=[(0, 0), (1, 1)])


def test_dots_follow_the_time_step_of_the_dataset_shown(tiny_cubes):
    from cube_gen.access import CubeSet

    cs = CubeSet.open(str(tiny_cubes))
    t = pd.DatetimeIndex(cs.observations.time.values)
    precision = cs.observations.time_precision.values

    def shown(**q):
        return int(DotFilter.from_query({k: [v] for k, v in q.items()}).mask(cs).sum())

    assert shown(time="2020-01-01T00:00:00Z", dataset="grid") == int((t.year == 2020).sum())
    assert shown(time="2020-01-01T00:00:00Z") == int((t.year == 2020).sum())
    assert shown(time="2010-01-01T00:00:00Z", dataset="grid_all_years") == len(t)
    may = int(((t.month == 5) & (precision >= PRECISION_CODES["month"])).sum())
    assert shown(time="2010-05-01T00:00:00Z", dataset="grid_month_of_year") == may
    assert shown(time="2010-05-01T00:00:00Z", dataset="grid_month_of_year", months="6-7") == 0


# -- synthetic photos ----------------------------------------------------------------------------
def test_synthetic_photos_show_the_plant_where_the_attention_is(tiny_source, tiny_cubes):
    from PIL import Image

    from cube_gen.access import CubeSet
    from cube_gen.embedding_math import attention_map
    from cube_gen.photos import PHOTO_SIZE, photo_path

    cs = CubeSet.open(str(tiny_cubes))
    images = cs.image_table()
    assert len(images) > 0
    for pos in range(len(images)):
        gbif, n = int(images.gbif_id.iat[pos]), int(images.image_number.iat[pos])
        path = photo_path(tiny_source, gbif, n)
        assert path is not None, f"no synthetic photo for {gbif}/{n}"
        rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
        assert rgb.shape == (PHOTO_SIZE, PHOTO_SIZE, 3)
        att = attention_map(np.asarray(cs.features(pos), np.float32), "l2norm", "mean")
        # the plant: green over red (the soil and dry grass are reddish brown)
        green = (rgb[..., 1] - rgb[..., 0]).reshape(24, PHOTO_SIZE // 24, 24, -1).mean((1, 3))
        plant = green > np.percentile(green, 85)
        assert att[plant].mean() > att[~plant].mean() * 1.1, (gbif, n)


# -- a real server: the tile race ---------------------------------------------------------------
def _race_urls(base: str, tiny_cubes) -> list[str]:
    """64 first tile requests: 4 variables x 2 times x 8 tiles around the data."""
    import math

    import requests

    info = requests.get(f"{base}/datasets/grid", timeout=60).json()
    names = [v["name"] for v in info["variables"]][:4]
    times = [d for d in info["dimensions"] if d["name"] == "time"][0]["coordinates"][-2:]
    (w, s, e, n) = CubeSetBox.of(tiny_cubes)
    z = 11
    lon, lat = (w + e) / 2, (s + n) / 2
    x0 = int((lon + 180) / 360 * (1 << z))
    y0 = int((1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * (1 << z))
    tiles = [(x0 + dx, y0 + dy) for dx in (-2, -1, 0, 1) for dy in (-1, 0)]
    return [f"{base}/tiles/grid/{v}/{z}/{y}/{x}?crs=EPSG%3A3857&time={t}"
            for v in names for t in times for x, y in tiles]


class CubeSetBox:
    @staticmethod
    def of(cubes) -> tuple[float, float, float, float]:
        from cube_gen.access import CubeSet

        o = CubeSet.open(str(cubes)).observations
        return (float(o.lon.min()), float(o.lat.min()), float(o.lon.max()), float(o.lat.max()))


def _fire(urls: list[str]) -> list[int]:
    """All requests at once (a barrier releases them together); their status codes."""
    import threading

    import requests

    barrier = threading.Barrier(len(urls))

    def get(u):
        barrier.wait()
        return requests.get(u, timeout=120).status_code

    with cf.ThreadPoolExecutor(len(urls)) as pool:
        return list(pool.map(get, urls))


@pytest.fixture(scope="module")
def loop_server(tiny_cubes, tmp_path_factory):
    from server_fixtures import serve_cubeset

    workdir = tmp_path_factory.mktemp("loop-serve")
    with serve_cubeset(tiny_cubes, workdir, plugin={"RequestTimeout": 60}) as url:
        yield {"url": url, "fresh": True}


@pytest.mark.slow
def test_concurrent_first_tile_requests_get_no_5xx(loop_server, tiny_cubes, tmp_path):
    """Two fresh servers (the loop's, before any tile, and one more) x 64 requests."""
    from server_fixtures import serve_cubeset

    assert loop_server["fresh"], "run this before the browser tests (file order)"
    codes = _fire(_race_urls(loop_server["url"], tiny_cubes))
    with serve_cubeset(tiny_cubes, tmp_path / "second") as url:
        codes += _fire(_race_urls(url, tiny_cubes))
    assert len(codes) == 128
    assert not [c for c in codes if c >= 500], codes
    assert codes.count(200) == 128, sorted(set(codes))


# -- the loop in a browser -------------------------------------------------------------------------
WAIT_MS = 60_000
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (Debian package chromium)")


@pytest.fixture(scope="module")
def cubes_info(tiny_cubes) -> dict:
    """Observations, species and embeddings of the tiny cube set, read independently."""
    from cube_gen.access import CubeSet

    cs = CubeSet.open(str(tiny_cubes))
    o = cs.observations
    obs = pd.DataFrame({"gbif_id": o.gbif_id.values, "lon": o.lon.values, "lat": o.lat.values,
                        "time": pd.DatetimeIndex(o.time.values),
                        "species_index": o.species_index.values,
                        "num_embeddings": o.num_embeddings.values})
    return {"obs": obs, "species": cs.species_table(), "images": cs.image_table()}


@pytest.fixture(scope="module")
def loop(loop_server, cubes_info):
    """One offline page walking the loop (tests below run in file order)."""
    from urllib.parse import urlparse

    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    host = urlparse(loop_server["url"]).netloc
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        context.route("**/*", lambda r: r.continue_() if urlparse(r.request.url).netloc == host
                      else r.abort("internetdisconnected"))
        page = context.new_page()
        errors: list[str] = []
        console: list[str] = []
        tiles: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: console.append(m.text))
        page.on("request", lambda r: tiles.append(r.url) if "/explore/observations/" in r.url
                else None)
        loop_server["fresh"] = False
        yield {"page": page, "url": loop_server["url"], "errors": errors, "console": console,
               "tiles": tiles, **cubes_info}
        context.close()
        browser.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def app_state(page) -> dict:
    return page.evaluate("""() => { const cs = window.deepearth.store.getState().controlState;
        const m = window.deepearthMapObjects.map, v = m.getView(), c = v.getCenter();
        const R = 6378137;
        return {place: cs.selectedPlaceId, time: cs.selectedTime, zoom: v.getZoom(),
                lon: c[0] / R * 180 / Math.PI,
                lat: (2 * Math.atan(Math.exp(c[1] / R)) - Math.PI / 2) * 180 / Math.PI,
                filters: window.deepearth.filters(), url: location.href}; }""")


def wait_place(page, gbif_id: int, timeout: int = WAIT_MS) -> None:
    page.wait_for_function(
        f"() => window.deepearth && window.deepearth.store && "
        f"window.deepearth.store.getState().controlState.selectedPlaceId === 'obs-{gbif_id}'",
        timeout=timeout)


def click_until_selected(page, click, gbif_id: int, tries: int = 3) -> None:
    """Call ``click()`` until observation ``gbif_id`` is selected: on a loaded machine the
    map may still be moving, or a chart re-rendering, at the first click."""
    for attempt in range(tries):
        click()
        try:
            wait_place(page, gbif_id, timeout=WAIT_MS // 3)
            return
        except Exception:
            if attempt == tries - 1:
                raise
            page.wait_for_timeout(500)


def click_dot(page, lon: float, lat: float, gbif_id: int, tries: int = 3) -> None:
    """Click the dot at (lon, lat) until it is selected (its position taken anew each try)."""
    def click() -> None:
        x, y = screen_xy(page, lon, lat)
        page.mouse.click(x + 1, y + 1)
    click_until_selected(page, click, gbif_id, tries)


def open_panel(page, title: str) -> None:
    if page.get_by_label("Show sidebar").count():
        page.get_by_label("Show sidebar").click()
    page.get_by_label(title, exact=True).click()


def screen_xy(page, lon: float, lat: float) -> tuple[float, float]:
    return tuple(page.evaluate("""([lon, lat]) => { const m = window.deepearthMapObjects.map;
        const R = 6378137, x = R * lon * Math.PI / 180,
              y = R * Math.log(Math.tan(Math.PI / 4 + lat * Math.PI / 360));
        const p = m.getPixelFromCoordinate([x, y]), r = m.getTargetElement().getBoundingClientRect();
        return [p[0] + r.left, p[1] + r.top]; }""", [lon, lat]))


def dots_count(page) -> int:
    page.wait_for_function("() => document.getElementById('deepearth-count')"
                           " && document.getElementById('deepearth-count').dataset.observations",
                           timeout=WAIT_MS)
    return int(page.locator("#deepearth-count").get_attribute("data-observations"))


@pytest.mark.slow
@needs_chromium
def test_dot_click_shows_the_observation(loop):
    """A URL opens the viewer at an observation's place and year; a click on its dot selects it."""
    page, obs = loop["page"], loop["obs"]
    target = obs[obs.num_embeddings >= 1].iloc[0]
    year = target.time.year
    page.goto(f"{loop['url']}/viewer/?dataset=grid&time={year}-01-01T00:00:00Z&zoom=14"
              f"&center={target.lon:.6f},{target.lat:.6f}", wait_until="domcontentloaded")
    page.get_by_role("button", name="Accept").click(timeout=WAIT_MS)
    page.wait_for_function("() => window.deepearth && window.deepearth.store && "
                           "document.getElementById('deepearth-filters')", timeout=WAIT_MS)
    page.wait_for_function(f"() => new Date(window.deepearth.store.getState().controlState"
                           f".selectedTime).getUTCFullYear() === {year}", timeout=WAIT_MS)
    page.wait_for_timeout(800)  # the view is restored after the viewer's own first fit
    st = app_state(page)
    assert abs(st["zoom"] - 14) < 0.01 and abs(st["lon"] - target.lon) < 1e-4
    click_dot(page, target.lon, target.lat, int(target.gbif_id))
    open_panel(page, "Observation")
    name = loop["species"].taxon_name.iat[int(target.species_index)]
    page.get_by_text(name, exact=True).first.wait_for(timeout=WAIT_MS)
    # its synthetic photo, served by the server, under the attention map
    page.wait_for_function("() => [...document.querySelectorAll('[style]')].some(e => "
                           "e.style.backgroundImage.includes('/explore/photos/'))", timeout=WAIT_MS)
    photo = page.evaluate("() => [...document.querySelectorAll('[style]')].map(e => "
                          "e.style.backgroundImage).find(b => b.includes('/explore/photos/'))")
    import re

    import requests

    path = re.search(r'url\("?([^")]+)', photo).group(1)
    r = requests.get(loop["url"] + path, timeout=60)
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
    assert f"obs={int(target.gbif_id)}" in page.url
    shot(page, "01-dot-click-observation")
    loop["first"] = int(target.gbif_id)


@pytest.mark.slow
@needs_chromium
def test_umap_click_moves_the_map_selection(loop):
    """A point of the vision UMAP selects its observation on the map (centred) and panels."""
    page, images = loop["page"], loop["images"]
    other = images[images.gbif_id != loop["first"]].iloc[0]
    gid = int(other.gbif_id)
    open_panel(page, "Embedding space")
    page.locator(".MuiFormControl-root").filter(has=page.locator("#emb_view-label")) \
        .get_by_role("combobox").click()
    page.get_by_role("option", name="Photos: vision UMAP", exact=True).click()
    point = page.locator(f'.vega-embed svg path[aria-label*="gbif_id: {gid}"]').first
    point.wait_for(timeout=WAIT_MS)
    # vega may still be re-rendering the chart just switched to: a first click can be lost
    click_until_selected(page, lambda: point.click(force=True), gid)
    page.wait_for_timeout(600)  # the map pans to it
    st = app_state(page)
    row = loop["obs"][loop["obs"].gbif_id == gid].iloc[0]
    assert abs(st["lon"] - row.lon) < 1e-4 and abs(st["lat"] - row.lat) < 1e-4
    assert f"obs={gid}" in page.url
    shot(page, "02-umap-click-selection")
    loop["second"] = gid


@pytest.mark.slow
@needs_chromium
def test_species_filter_reduces_the_dots(loop):
    page, obs, species = loop["page"], loop["obs"], loop["species"]
    # the view: every observation of the selected year on screen
    year = pd.Timestamp(app_state(page)["time"], unit="ms").year
    in_year = obs[obs.time.dt.year == year]
    before = dots_count(page)
    assert before == len(in_year)
    genus = species.genus.iat[int(in_year.species_index.value_counts().index[0])]
    page.fill("#deepearth-taxa", genus)
    page.press("#deepearth-taxa", "Enter")
    keep = species.species_index[species.genus == genus].to_numpy()
    expected = int(np.isin(in_year.species_index, keep).sum())
    page.wait_for_function(f"() => document.getElementById('deepearth-count').dataset"
                           f".observations === '{expected}'", timeout=WAIT_MS)
    assert 0 < expected < before
    assert page.evaluate("window.deepearth.filters()") == {"taxa": genus}
    page.wait_for_timeout(500)
    assert any(f"taxa={genus}" in u for u in loop["tiles"]), "the dots were not re-requested"
    assert f"taxa={genus}" in page.url
    shot(page, "03-species-filter")
    loop["genus"] = genus


@pytest.mark.slow
@needs_chromium
def test_reload_restores_the_state_and_back_moves_within_the_app(loop):
    page = loop["page"]
    before = app_state(page)
    page.reload(wait_until="domcontentloaded")
    wait_place(page, loop["second"])
    page.wait_for_function(f"() => window.deepearth.filters().taxa === '{loop['genus']}'",
                           timeout=WAIT_MS)
    page.wait_for_timeout(800)
    after = app_state(page)
    assert after["time"] == before["time"]
    assert abs(after["zoom"] - before["zoom"]) < 0.05
    assert abs(after["lon"] - before["lon"]) < 1e-3 and abs(after["lat"] - before["lat"]) < 1e-3
    assert page.input_value("#deepearth-taxa") == loop["genus"]
    shot(page, "04-reload-restored")
    # Back: the filter goes, then the selection returns to the dot clicked first
    page.go_back()
    page.wait_for_function("() => !window.deepearth.filters().taxa", timeout=WAIT_MS)
    page.go_back()
    wait_place(page, loop["first"])
    assert page.url.startswith(loop["url"] + "/viewer/")


@pytest.mark.slow
@needs_chromium
def test_polygon_statistics_count_the_observations_inside(loop):
    """A drawn polygon: Region statistics of exactly the observations inside it."""
    from matplotlib.path import Path as PolygonPath

    page, obs = loop["page"], loop["obs"]
    page.locator("#deepearth-clear").click()
    page.wait_for_function("() => Object.keys(window.deepearth.filters()).length === 0",
                           timeout=WAIT_MS)
    # zoom out so the polygon covers many observations
    page.evaluate("() => window.deepearthMapObjects.map.getView().setZoom(10)")
    page.wait_for_timeout(500)
    box = page.evaluate("() => window.deepearthMapObjects.map.getTargetElement()"
                        ".getBoundingClientRect().toJSON()")
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.locator('button[value="Polygon"]').click()
    for dx, dy in ((-260, -180), (240, -150), (200, 190), (-150, 160)):
        page.mouse.click(cx + dx, cy + dy)
        page.wait_for_timeout(150)
    page.mouse.dblclick(cx - 150, cy + 160)
    page.wait_for_function("() => { const g = window.deepearth.store.getState();"
                           " return g.controlState.selectedPlaceId &&"
                           " !g.controlState.selectedPlaceId.startsWith('obs-'); }",
                           timeout=WAIT_MS)
    ring = page.evaluate("""() => { const s = window.deepearth.store.getState();
        const id = s.controlState.selectedPlaceId;
        for (const g of s.dataState.userPlaceGroups) for (const f of g.features)
            if (f.id === id) return f.geometry.coordinates[0];
        return null; }""")
    assert ring and len(ring) >= 4
    inside = PolygonPath(np.asarray(ring)).contains_points(obs[["lon", "lat"]].to_numpy())
    expected = int(inside.sum())
    assert expected > 0
    open_panel(page, "Region statistics")
    page.get_by_text("inside the drawn polygon", exact=False).first.wait_for(timeout=WAIT_MS)
    table = page.locator("table").filter(has_text="Species richness").first
    table.wait_for(timeout=WAIT_MS)
    page.wait_for_function(f"() => [...document.querySelectorAll('table')].some(t => "
                           f"t.innerText.includes('Species richness') && "
                           f"t.innerText.includes('{expected:,} ('))", timeout=WAIT_MS)
    region_line = page.get_by_text("inside the drawn polygon", exact=False).first.inner_text()
    assert "± " not in region_line  # not labelled as a neighbourhood
    href = page.get_by_role("link", name="/deepearth/stats/region").first.get_attribute("href")
    assert "polygon=" in href
    import requests

    stats = requests.get(loop["url"] + href, timeout=60).json()
    assert stats["observations"] == expected
    shot(page, "05-polygon-statistics")
    assert not loop["errors"], loop["errors"]
    redux = [c for c in loop["console"] if "prev state" in c or "next state" in c]
    assert not redux, f"{len(redux)} Redux log lines"


@pytest.mark.slow
@needs_chromium
def test_one_species_search_shows_its_layer_and_narrows_the_place_list(loop):
    """A search naming one species: its per-species layer on the map, the place list of
    observations with embeddings narrowed to it; clearing it restores both."""
    page, obs, species = loop["page"], loop["obs"], loop["species"]
    before = page.evaluate("() => { const c = window.deepearth.store.getState().controlState;"
                           " return [c.selectedDatasetId, c.selectedVariableName]; }")
    # the place group as the viewer loads it when it is chosen in Places
    page.evaluate("""async () => { const s = window.deepearth.store, st = s.getState();
        const id = st.controlState.selectedDatasetId;
        const g = await (await fetch(`/datasets/${id}/places/observations-with-embeddings`)).json();
        s.dispatch({type: 'UPDATE_DATASET_PLACE_GROUP', datasetId: id, placeGroup: g}); }""")
    vision = obs[obs.num_embeddings >= 1]
    year = int(vision.time.dt.year.value_counts().index[0])  # the most photographed year
    page.evaluate(f"""() => {{ const st = window.deepearth.store.getState();
        const ds = st.dataState.datasets.find(d => d.id === st.controlState.selectedDatasetId);
        const t = ds.dimensions.find(d => d.name === 'time').coordinates
            .find(c => new Date(c).getUTCFullYear() === {year});
        if (t !== undefined) window.deepearth.store.dispatch({{type: 'SELECT_TIME',
                                                              selectedTime: t}}); }}""")
    page.wait_for_timeout(300)
    s_idx = int(vision[vision.time.dt.year == year].species_index.value_counts().index[0])
    name = str(species.taxon_name.iat[s_idx])
    variable = "count_" + S.species_slug(name)
    page.fill("#deepearth-taxa", name)
    page.press("#deepearth-taxa", "Enter")
    page.wait_for_function(f"() => window.deepearth.store.getState().controlState"
                           f".selectedVariableName === '{variable}'", timeout=WAIT_MS)
    shown = page.evaluate("""() => { const st = window.deepearth.store.getState();
        const id = st.controlState.selectedDatasetId;
        const ds = st.dataState.datasets.find(d => d.id === id);
        return [id, ds.variables.map(v => v.name), ds.dimensions.find(d => d.name === 'time')
                .coordinates.length]; }""")
    assert variable in shown[1]
    # the place list: that species' observations with embeddings in the step shown
    mine = vision[vision.species_index == s_idx]
    if shown[2] > 1:  # a yearly grid holding the layer: the selected year
        mine = mine[mine.time.dt.year == pd.Timestamp(app_state(page)["time"], unit="ms").year]
    want = sorted(mine.gbif_id.tolist())
    assert want
    group_ids = """() => { const st = window.deepearth.store.getState();
        for (const d of st.dataState.datasets) for (const g of d.placeGroups || [])
            if (g.id === 'observations-with-embeddings' && g.features)
                return g.features.map(f => f.properties.gbif_id).sort((a, b) => a - b);
        return null; }"""
    page.wait_for_function(f"() => JSON.stringify(({group_ids})()) === '{want}'.replace(/ /g, '')",
                           timeout=WAIT_MS)
    page.wait_for_function(f"() => location.href.includes('variable={variable}')",
                           timeout=WAIT_MS)
    shot(page, "06-one-species-layer")
    page.locator("#deepearth-clear").click()
    page.wait_for_function(f"() => {{ const c = window.deepearth.store.getState().controlState;"
                           f" return c.selectedDatasetId === '{before[0]}' &&"
                           f" c.selectedVariableName === '{before[1]}'; }}", timeout=WAIT_MS)
    steps = page.evaluate("""() => { const st = window.deepearth.store.getState();
        const ds = st.dataState.datasets.find(d => d.id === st.controlState.selectedDatasetId);
        return ds.dimensions.find(d => d.name === 'time').coordinates.length; }""")
    every = vision
    if steps > 1:
        every = vision[vision.time.dt.year ==
                       pd.Timestamp(app_state(page)["time"], unit="ms").year]
    everything = sorted(every.gbif_id.tolist())
    assert everything != want
    try:
        page.wait_for_function(f"() => JSON.stringify(({group_ids})()) === "
                               f"'{everything}'.replace(/ /g, '')", timeout=WAIT_MS)
    except Exception:
        got = page.evaluate(f"() => ({group_ids})()")
        raise AssertionError((len(got), len(everything), steps, app_state(page))) from None


@pytest.mark.slow
@needs_chromium
def test_3d_page_follows_the_selection_and_the_filters(loop):
    """The 3-D page in the same browser: the viewer's selection is outlined, its filters
    narrow the points (species with a matching observation; matching photo embeddings)."""
    page, obs, species, images = loop["page"], loop["obs"], loop["species"], loop["images"]
    three = page.context.new_page()
    three.goto(f"{loop['url']}/explore/embedding-space.html", wait_until="domcontentloaded")
    three.wait_for_function("() => window.deepearth3d && window.deepearth3d.state().ready",
                            timeout=WAIT_MS)
    everything = three.evaluate("window.deepearth3d.state()")
    assert everything["filters"] == "" and everything["shown"] == everything["total"]
    gid = int(images.gbif_id.iat[len(images) // 2])
    row = obs[obs.gbif_id == gid].iloc[0]
    s_idx, year = int(row.species_index), int(row.time.year)
    genus = str(species.genus.iat[s_idx])
    page.evaluate(f"() => {{ window.deepearth.setFilters({{taxa: '{genus}', year: '{year}'}});"
                  f" return window.deepearth.selectObservation({gid}, true); }}")
    wait_place(page, gid)
    three.wait_for_function(f"() => {{ const s = window.deepearth3d.state();"
                            f" return s.ready && s.focusGbif === {gid} && s.focusSpecies === {s_idx}"
                            f" && s.filters === 'taxa={genus}&year={year}'; }}", timeout=WAIT_MS)
    keep = species.species_index[species.genus == genus].to_numpy()
    in_year = obs[obs.species_index.isin(keep) & (obs.time.dt.year == year)]
    st = three.evaluate("window.deepearth3d.state()")
    assert st["view"] == "species" and st["shown"] == int(in_year.species_index.nunique()) >= 1
    three.evaluate("window.deepearth3d.setView('vision')")
    st = three.evaluate("window.deepearth3d.state()")
    image_year = pd.DatetimeIndex(images.time).year
    want = int((images.species_index.isin(keep) & (image_year == year)).sum())
    assert st["shown"] == want and 1 <= want < st["total"] == len(images)
    assert f"taxa={genus}" in three.url and f"gbif_id={gid}" in three.url
    three.screenshot(path=str(ARTIFACTS / "07-3d-page-follows.png"))
    # clearing the filters in the viewer shows everything again
    page.locator("#deepearth-clear").click()
    three.wait_for_function("() => { const s = window.deepearth3d.state();"
                            " return s.filters === '' && s.shown === s.total; }", timeout=WAIT_MS)
    three.close()
    assert not loop["errors"], loop["errors"]
