"""The customised xcube viewer end to end: headless Chromium against a real ``xcube serve``.

The server runs the ``deepearth serve`` config of ``tiny_cubes``; the browser is the
system Chromium (``DEEPEARTH_CHROMIUM``, default /usr/bin/chromium), driven by Playwright,
offline: requests to other hosts are aborted, as on a machine without internet (remote
base-map tiles and iNaturalist photos just fail). The tests run in file order on one page,
like a user: branding, a grid layer's tiles, an observation selected, the embedding space,
the region statistics, the 3-D page. Each step saves a screenshot under artifacts/viewer/.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import requests
from PIL import Image

from cube_gen import schema as S
from cube_gen.access import CubeSet

CHROMIUM = os.environ.get("DEEPEARTH_CHROMIUM", "/usr/bin/chromium")
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "artifacts" / "viewer"
WAIT_MS = 60_000  # generous: the panels' first callbacks read the cubes on a 2-core machine
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason=f"no Chromium at {CHROMIUM} (set DEEPEARTH_CHROMIUM; the Debian "
                              "package 'chromium' provides /usr/bin/chromium)"),
]


@pytest.fixture(scope="module")
def viewer_url(served) -> str:
    """The shared served cube set (tests/conftest.py)."""
    return served.url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def session(browser, viewer_url) -> dict:
    """One offline page for the whole module, and what it fetched from the grid's tiles."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    host = urlparse(viewer_url).netloc

    def offline(route):
        if urlparse(route.request.url).netloc == host:
            route.continue_()
        else:
            route.abort("internetdisconnected")

    context.route("**/*", offline)
    page = context.new_page()
    tiles: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: tiles.append(r.url) if "/tiles/grid" in r.url
            or "/explore/observations/" in r.url else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield {"page": page, "url": viewer_url, "tiles": tiles, "errors": errors}
    context.close()


@pytest.fixture(scope="module")
def observation(tiny_cubes) -> dict:
    """An observation with two photo embeddings: its record and its label on the map."""
    cs = CubeSet.open(str(tiny_cubes))
    obs = cs.observations
    i = int(np.flatnonzero(obs.num_embeddings.values == 2)[0])
    rec = cs.observation_rows(np.array([i]))[0]
    rec["place_label"] = f"{rec['taxon_name']} · {rec['time'][:10]}"
    return rec


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def choose(page, select_id: str, option: str) -> None:
    """Pick ``option`` in the panel Select whose chartlets id is ``select_id``."""
    page.locator(".MuiFormControl-root").filter(
        has=page.locator(f"#{select_id}-label")).get_by_role("combobox").click()
    page.get_by_role("option", name=option, exact=True).click()


def open_panel(page, title: str) -> None:
    if page.get_by_label("Show sidebar").count():
        page.get_by_label("Show sidebar").click()
    page.get_by_label(title, exact=True).click()


# -- 1. branding ---------------------------------------------------------------------------
def test_viewer_loads_with_branding(session):
    page = session["page"]
    page.goto(session["url"] + "/viewer/", wait_until="domcontentloaded")
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("DeepEarth Cube", exact=False).first.wait_for(timeout=WAIT_MS)
    # our privacy note, not the bundled one naming the xcube developers' company
    assert "Brockmann" not in dialog.inner_text()
    shot(page, "01-privacy-note")
    page.get_by_role("button", name="Accept").click()
    page.get_by_role("dialog").wait_for(state="detached", timeout=WAIT_MS)  # loading screen
    page.get_by_text("DeepEarth Cube", exact=True).first.wait_for(timeout=WAIT_MS)
    assert page.title().startswith("DeepEarth Cube")
    # the viewer talks to the server that served it (any port), the logo is loaded
    assert "serverUrl=" in page.url
    page.wait_for_function("() => [...document.images].some(i => i.src.includes("
                           "'deepearth-logo') && i.naturalWidth > 0)", timeout=WAIT_MS)
    page.get_by_text("DeepEarth test cubes: grid").first.wait_for(timeout=WAIT_MS)
    shot(page, "02-branding")


# -- 2. a grid layer's tiles ---------------------------------------------------------------
def _visible_pixels(png: bytes) -> int:
    rgba = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))
    return int((rgba[..., 3] > 0).sum())


def _fetched(session, part: str) -> list[str]:
    page = session["page"]
    for _ in range(120):  # the map asks for tiles once the dataset and layers are set up
        urls = sorted({u for u in session["tiles"] if part in u})
        if urls:
            return urls
        page.wait_for_timeout(500)
    return []


def _visible_tiles(urls: list[str]) -> dict[str, int]:
    """Visible pixels of each tile, fetched again from the same URLs the page used."""
    visible = {}
    for u in urls[:24]:
        r = requests.get(u, timeout=60)
        if r.status_code == 200 and r.headers["Content-Type"] == "image/png":
            visible[u] = _visible_pixels(r.content)
    return visible


def test_grid_layer_tiles_render(session):
    page = session["page"]
    # the viewer opens on the all-years pyramid, its first variable (species richness)
    urls = _fetched(session, f"/tiles/{S.GRID_ALL_YEARS}/")
    assert urls, "the page fetched no tiles of the all-years grid dataset"
    assert any(f"/tiles/{S.GRID_ALL_YEARS}/species_richness/" in u for u in urls), urls[:5]
    visible = _visible_tiles(urls)
    assert visible, "no grid tile answered with a PNG"
    # richness is blank below the grid's min_observations (all of the tiny set's cells);
    # the same tiles of the observation count show the cells the page looks at
    counts = _visible_tiles([u.replace("/species_richness/", "/observation_count/")
                             for u in urls])
    assert max(counts.values()) > 0, "every grid tile the page fetched is blank"
    # the observations overlay (dots in cluster colours) is on by default
    dots = _visible_tiles(_fetched(session, "/explore/observations/"))
    assert dots and max(dots.values()) > 0, "no observation dots on the overlay tiles"
    # ... and the map canvas shows them (the base map is offline: every drawn pixel is ours)
    drawn = page.evaluate("""() => Math.max(...[...document.querySelectorAll('.ol-layer canvas')]
        .map(c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                    let n = 0; for (let i = 3; i < d.length; i += 4) { if (d[i] > 0) n++; }
                    return n; }))""")
    assert drawn > 0, "the map canvas is blank"
    shot(page, "03-grid-layer")


# -- 3. an observation selected ------------------------------------------------------------
def test_selecting_an_observation_shows_the_observation_panel(session, observation):
    page = session["page"]
    page.locator("#mui-component-select-place-groups").click()
    page.get_by_role("option", name="Observations with photo embeddings", exact=True).click()
    page.locator("#menu-place-groups .MuiBackdrop-root").click()
    page.locator("#mui-component-select-place").click()
    page.get_by_role("option", name=observation["place_label"]).first.click()
    open_panel(page, "Observation")
    species = page.get_by_text(observation["taxon_name"], exact=True).first
    species.wait_for(timeout=WAIT_MS)
    # the attention map: a PNG from the plugin's endpoint, loaded by the browser
    page.wait_for_function(
        "() => { const imgs = [...document.querySelectorAll('img[alt^=\"attention map\"]')];"
        " return imgs.length >= 2 && imgs.every(i => i.complete && i.naturalWidth > 0); }",
        timeout=WAIT_MS)
    src = page.locator('img[alt^="attention map"]').first.get_attribute("src")
    assert re.match(rf"/deepearth/embeddings/{observation['gbif_id']}/0/attention\.png\?", src)
    page.wait_for_function(
        "() => [...document.querySelectorAll('img[alt^=\"UMAP-RGB\"]')]"
        ".some(i => i.complete && i.naturalWidth > 0)", timeout=WAIT_MS)
    assert page.get_by_text("Most similar photo embeddings", exact=False).count()
    assert page.get_by_text(str(observation["gbif_id"]), exact=True).count()
    shot(page, "04-observation-panel")
    # a control drives the image: another colour map and method
    choose(page, "obs_method", "Entropy")
    page.wait_for_function(
        "() => [...document.querySelectorAll('img[alt^=\"attention map\"]')]"
        ".some(i => i.src.includes('method=entropy') && i.complete && i.naturalWidth > 0)",
        timeout=WAIT_MS)
    page.get_by_role("listbox").wait_for(state="detached", timeout=WAIT_MS)
    shot(page, "05-observation-entropy")


# -- 4. the embedding space ----------------------------------------------------------------
def _chart_drawn(page) -> bool:
    return page.evaluate("""() => [...document.querySelectorAll('.vega-embed canvas')]
        .some(c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                     for (let i = 3; i < d.length; i += 4) { if (d[i] > 0) return true; }
                     return false; })
        || document.querySelectorAll('.vega-embed svg .mark-symbol path').length > 0""")


def test_embedding_space_chart_renders(session):
    page = session["page"]
    open_panel(page, "Embedding space")
    page.locator(".vega-embed canvas, .vega-embed svg").first.wait_for(timeout=WAIT_MS)
    page.wait_for_function("() => document.body.innerText.includes('UMAP 2')",
                           timeout=WAIT_MS)  # the axes are drawn
    assert _chart_drawn(page)
    assert page.get_by_text("Selected on the map", exact=False).count()
    link = page.get_by_role("link", name="Open the full 3-D embedding space")
    assert "/explore/embedding-space.html?gbif_id=" in link.get_attribute("href")
    shot(page, "06-embedding-space-species")
    choose(page, "emb_view", "Photos: vision UMAP")
    page.wait_for_function("() => document.body.innerText.includes('Vision UMAP of 6 photo')",
                           timeout=WAIT_MS)
    assert _chart_drawn(page)
    shot(page, "07-embedding-space-vision")


# -- 5. the region statistics --------------------------------------------------------------
def test_region_panel_matches_the_endpoint(session, observation):
    page = session["page"]
    open_panel(page, "Region statistics")
    page.get_by_text("Species richness", exact=True).wait_for(timeout=WAIT_MS)
    href = page.get_by_role("link", name="/deepearth/stats/region").get_attribute("href")
    stats = requests.get(session["url"] + href, timeout=60).json()
    assert stats["observations"] >= 1  # the selected observation itself
    text = page.locator("table").filter(has_text="Species richness").inner_text()
    assert f"{stats['observations']:,} (" in text
    assert re.search(rf"Species richness\s+{stats['richness']}\b", text)
    page.locator(".vega-embed").nth(2).wait_for(timeout=WAIT_MS)
    shot(page, "08-region-statistics")
    assert not session["errors"], session["errors"]


# -- 6. the 3-D page -----------------------------------------------------------------------
def test_3d_embedding_page(browser, viewer_url, observation):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        page.goto(f"{viewer_url}/explore/embedding-space.html?gbif_id={observation['gbif_id']}")
        page.get_by_text("12 species").wait_for(timeout=WAIT_MS)
        page.locator("#plot .main-svg").first.wait_for(timeout=WAIT_MS)
        shot(page, "09-3d-species")
        page.click("#view-vision")
        page.get_by_text("6 photo embeddings").wait_for(timeout=WAIT_MS)
        shot(page, "10-3d-vision")
    finally:
        page.close()


def test_explore_page_links_resolve(viewer_url):
    import html.parser
    from urllib.parse import urljoin

    class Links(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.hrefs: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag == "a":
                self.hrefs += [v for k, v in attrs if k == "href"]

    page = f"{viewer_url}/explore/"
    r = requests.get(page, timeout=60)
    assert r.status_code == 200 and "DeepEarth Cube" in r.text
    links = Links()
    links.feed(r.text)
    assert len(links.hrefs) >= 5
    for href in links.hrefs:
        target = urljoin(page, href)
        assert requests.get(target, timeout=60).status_code == 200, target
