"""Observation panel: the observation selected on the map, its photos' embeddings.

Species, date and time, coordinates, split, links to GBIF and the photos; for every
vision embedding the attention map (method, frame, colour map, opacity; drawn over the
photo when it can be loaded: a synthetic cube set's own photos, else iNaturalist) and the
UMAP-RGB image, both as PNGs from the plugin's endpoints, the per-embedding statistics
and the most similar embeddings (narrowed by the viewer's filters; a click on a row
selects that observation on the map and in every panel). Patch search (cube sets with a
patch index): a click on a patch of a photo's 24 x 24 attention grid lists the other
photos with the most similar patches (:func:`server.deepearth.controllers.similar_patches`
grouped per image, within the filters), each as an attention crop around its best patch
with species and date; a click on a match selects its observation. The attention
controls show only for observations with embeddings.
"""

from typing import Any

import altair as alt
import pandas as pd
from chartlets import Component, Input, Output, State
from chartlets.components import Box, Select, Slider, Switch, Table, Typography, VegaChart
from xcube.webapi.viewer.components import Markdown
from xcube.webapi.viewer.contrib import Panel

from cube_gen import patch_index as PI
from cube_gen import schema as S
from cube_gen.errors import NotFoundError
from cube_gen.photos import photo_index

from ... import render
from ...common.errors import ApiProblem
from ...deepearth import controllers as C
from ...deepearth import params as D
from ..places import place_id as place_of
from .common import (
    COLUMN,
    FILTERS,
    PAGES_PREFIX,
    ROW,
    PanelProblem,
    api_url,
    cluster_text,
    deepearth,
    error_box,
    filters_query,
    filters_text,
    fmt,
    fmt_time,
    guarded,
    heading,
    lat_lon_text,
    md_escape,
    message,
    picked_keys,
    selected_gbif_id,
    url,
)

panel = Panel(__name__, title="Observation", icon="local_florist", position=5)

BODY = "obs_body"
METHOD_LABELS = {"l2norm": "L2 norm", "variance": "Variance", "entropy": "Entropy",
                 **{f"pca{k}": f"Principal component {k}" for k in range(1, 6)}}
METHODS = [(m, METHOD_LABELS.get(m, m)) for m in S.ATTENTION_METHODS]
FRAMES = [(f, "Frame mean" if f == "mean" else f"Frame {int(f) + 1}")
          for f in S.ATTENTION_FRAMES]
COLORMAPS = ["plasma", "viridis", "inferno", "magma", "cividis", "turbo", "hot", "gray"]
DEFAULTS = {"method": D.ATTENTION_METHOD, "frame": D.ATTENTION_FRAME, "colormap": D.COLORMAP,
            "opacity": round(D.ALPHA * 100), "photo": True}
IMAGE_SIZE = 256  # pixels per side of the attention and UMAP-RGB PNGs
SHOWN = 220  # pixels per side they are shown at (two fit side by side in the side panel)
SIMILAR_K = 8
PATCH_GRID = "obs_patch_grid"  # the clickable attention grids (a VegaChart)
PATCH_SELECTION = "patch"  # its click selection; chartlets reports it as property "patch"
PATCH_MATCHES = "obs_patch_matches"
PATCH_TABLE = "obs_patch_table"
PATCH_K = 8
GRID_SHOWN = 190  # pixels per side of a photo's clickable attention grid (two fit)
CROP_SIZE = 96  # pixels per side of a match's attention crop
CROP_MARGIN = 2  # patches of context around a matched patch
NO_PATCH_INDEX = ("Patch search is off: this cube set has no patch index "
                  "(recipe key cubes.patches.enabled).")
PATCH_HINT = "Click a patch of an attention grid to see where else a part like it occurs."
HINT = ("Select an observation on the map (the points, coloured by the language cluster "
        "of their species) to see its details and what the vision model attends to.")


@panel.layout(State("@app", "selectedPlaceId"), State("@app", FILTERS))
def render_panel(ctx, place_id: str | None = None, filters: str | None = None) -> Component:
    controls = Box(id="obs_controls", style=update_controls(ctx, place_id), children=[
        Select(id="obs_method", label="Attention", value=DEFAULTS["method"], options=METHODS,
               style={"minWidth": 170}),
        Select(id="obs_frame", label="Frame", value=DEFAULTS["frame"], options=FRAMES,
               style={"minWidth": 120}),
        Select(id="obs_colormap", label="Colour map", value=DEFAULTS["colormap"],
               options=COLORMAPS, style={"minWidth": 120}),
        Box(style={"minWidth": 160, "flexGrow": 1}, children=[
            Typography(text="Opacity", variant="caption"),
            Slider(id="obs_opacity", min=0, max=100, step=5, value=DEFAULTS["opacity"],
                   valueLabelDisplay="auto", size="small"),
        ]),
        Switch(id="obs_photo", label="Photo underneath", value=DEFAULTS["photo"]),
    ])
    body = update_body(ctx, place_id, **{k: DEFAULTS[k] for k in
                                        ("method", "frame", "colormap", "opacity", "photo")},
                       filters=filters)
    return Box(style={**COLUMN, "padding": "8px"}, children=[controls, body])


CONTROLS_STYLE = ROW
HIDDEN = {**ROW, "display": "none"}


def has_embeddings(ctx, place_id: str | None) -> bool:
    gbif_id = selected_gbif_id(place_id)
    if gbif_id is None:
        return False
    try:
        return len(deepearth(ctx).cubeset.images_of(gbif_id)) > 0
    except Exception:  # noqa: BLE001 - not an observation of this cube set
        return False


@panel.callback(Input("@app", "selectedPlaceId"), Output("obs_controls", "style"))
def update_controls(ctx, place_id: str | None = None) -> dict:
    """The attention controls only for an observation with photo embeddings."""
    return CONTROLS_STYLE if has_embeddings(ctx, place_id) else HIDDEN


def _place_of_row(row: Any) -> str | None:
    """The place id of a table row's ``gbif_id`` (None: no usable row)."""
    if not isinstance(row, dict) or row.get("gbif_id") in (None, ""):
        return None
    try:
        return place_of(int(row["gbif_id"]))
    except (TypeError, ValueError):
        return None


@panel.callback(Input("obs_similar", "value"), Output("@app", "selectedPlaceId"))
def select_similar(ctx, row: dict | None = None) -> str | None:
    """A click on a row of the similar embeddings selects that observation everywhere."""
    return _place_of_row(row)


@panel.callback(Input(PATCH_TABLE, "value"), Output("@app", "selectedPlaceId"))
def select_patch_match(ctx, row: dict | None = None) -> str | None:
    """A click on a patch match selects its observation everywhere."""
    return _place_of_row(row)


@panel.callback(
    Input("@app", "selectedPlaceId"),
    Input("obs_method"),
    Input("obs_frame"),
    Input("obs_colormap"),
    Input("obs_opacity"),
    Input("obs_photo"),
    Input("@app", FILTERS),
    Output(BODY, ""),
)
@guarded(lambda text: error_box(BODY, text))
def update_body(ctx, place_id: str | None = None, method: str | None = None,
                frame: str | None = None, colormap: str | None = None,
                opacity: int | None = None, photo: bool | None = None,
                filters: str | None = None) -> Component:
    """The panel body for the selected place (a hint unless it is an observation)."""
    gbif_id = selected_gbif_id(place_id)
    if gbif_id is None:
        return Box(id=BODY, style=COLUMN, children=[message(HINT)])
    de = deepearth(ctx)
    try:
        rec = C.observation(de, gbif_id)
    except (ApiProblem, NotFoundError) as problem:
        raise PanelProblem(str(problem)) from None
    style = {
        **_attention_map(method, frame, colormap),
        "alpha": max(0, min(100, int(DEFAULTS["opacity"] if opacity is None else opacity)))
        / 100,
        "photo": DEFAULTS["photo"] if photo is None else bool(photo),
    }
    photos = _local_photos(de)
    children: list[Component] = [*_summary(ctx, rec, photos)]
    if not rec["embeddings"]:
        children.append(message("This observation has no vision embedding."))
    for emb in rec["embeddings"]:
        children.extend(_embedding(ctx, rec, emb, style, photos))
    if rec["embeddings"]:
        children.extend(_similar(de, rec, filters))
        children.extend(_patch_search(ctx, de, rec, style, photos))
    children.append(Markdown(id="obs_3d", text=f"[The 3-D embedding space]("
                             f"{url(ctx, PAGES_PREFIX + '/embedding-space.html', gbif_id=gbif_id)})"
                             " follows this selection (open it in a new tab)."))
    return Box(id=BODY, style=COLUMN, children=children)


def _attention_map(method: str | None, frame: str | None,
                   colormap: str | None) -> dict[str, str]:
    """The method, frame and colour map chosen, the defaults for unknown values."""
    return {"method": method if method in S.ATTENTION_METHODS else DEFAULTS["method"],
            "frame": str(frame) if str(frame) in S.ATTENTION_FRAMES else DEFAULTS["frame"],
            "colormap": colormap if colormap in COLORMAPS else DEFAULTS["colormap"]}


def _local_photos(de) -> set[tuple[int, int]]:
    """(gbif_id, image_number) of the photos a synthetic cube set carries (cached)."""
    cs = de.cubeset
    return cs.memo("viewer_photo_index", lambda: photo_index(cs))


def _summary(ctx, rec: dict[str, Any], local: set[tuple[int, int]]) -> list[Component]:
    sp = rec["species"]
    lat, lon = rec["lat"], rec["lon"]
    links = [f"[{i + 1}]({_photo_url(ctx, rec, i, local, full=True)})"
             for i in range(len(rec["image_urls"]))]
    synthetic = any((rec["gbif_id"], i) in local for i in range(len(rec["image_urls"])))
    photos = " · ".join(links) or "none"
    if synthetic:
        photos += " (synthetic photos of the demo data)"
    lines = [
        "| | |",
        "| --- | --- |",
        f"| Date | {fmt_time(rec['time'], rec['time_precision'])} "
        f"(known to the {rec['time_precision']}) |",
        f"| Location | {lat_lon_text(lat, lon, 5)} |",
        f"| Split | {rec['split']} |",
        f"| GBIF occurrence | [{rec['gbif_id']}](https://www.gbif.org/occurrence/{rec['gbif_id']}) |",
        f"| Species | [{md_escape(sp['taxon_id'])}](https://www.gbif.org/species/{sp['taxon_id']}), "
        f"{cluster_text(sp['cluster'])}, {sp['observation_count']:,} observations |",
        f"| Photos | {photos} |",
        f"| Embeddings | {len(rec['embeddings'])} |",
    ]
    title = Box(id="obs_title", style={**ROW, "flexWrap": "nowrap"}, children=[
        Box(style={"width": 14, "height": 14, "borderRadius": "50%", "flexShrink": 0,
                   "backgroundColor": sp["cluster_color"], "border": "1px solid #555"}),
        Typography(id="obs_species", text=sp["taxon_name"], variant="h6",
                   style={"fontStyle": "italic"}),
    ])
    return [title, Markdown(id="obs_fields", text="\n".join(lines))]


def _photo_url(ctx, rec: dict[str, Any], image_number: int,
               local: set[tuple[int, int]] | None = None, full: bool = False) -> str | None:
    """The photo: the cube set's own (synthetic data) or iNaturalist's medium size."""
    if local and (int(rec["gbif_id"]), int(image_number)) in local:
        return url(ctx, f"{PAGES_PREFIX}/photos/{int(rec['gbif_id'])}/{int(image_number)}.jpg")
    urls = rec["image_urls"]
    if image_number >= len(urls):
        return None
    return urls[image_number] if full else urls[image_number].replace("/original.", "/medium.")


def _embedding(ctx, rec: dict[str, Any], emb: dict[str, Any],
               style: dict[str, Any], local: set[tuple[int, int]]) -> list[Component]:
    gid, n = rec["gbif_id"], int(emb["image_number"])
    base = f"/embeddings/{gid}/{n}"
    attention = api_url(ctx, f"{base}/attention.png", method=style["method"],
                        frame=style["frame"], colormap=style["colormap"],
                        alpha=f"{style['alpha']:.2f}", size=IMAGE_SIZE)
    umap_rgb = api_url(ctx, f"{base}/umap_rgb.png", size=IMAGE_SIZE)
    photo = _photo_url(ctx, rec, n, local) if style["photo"] else None
    # The viewer's Markdown gives images a 1rem top margin: the photo is placed to match.
    under = {"width": SHOWN, "backgroundRepeat": "no-repeat",
             "backgroundSize": f"{SHOWN}px {SHOWN}px",
             "backgroundPosition": "0 1rem"}
    if photo:
        under["backgroundImage"] = f"url({photo})"
    label = f"{METHOD_LABELS.get(style['method'], style['method'])}, " + \
        dict(FRAMES)[style["frame"]].lower()
    images = Box(style=ROW, children=[
        Box(style={"display": "flex", "flexDirection": "column"}, children=[
            Box(id=f"obs_attention_{n}", style=under, children=[
                Markdown(text=f"![attention map of photo {n + 1}]({attention})")]),
            Typography(text=f"Attention: {label}", variant="caption"),
        ]),
        Box(style={"display": "flex", "flexDirection": "column", "width": SHOWN},
            children=[Markdown(text=f"![UMAP-RGB of photo {n + 1}]({umap_rgb})"),
                      Typography(text="UMAP-RGB of the 24 × 24 patches", variant="caption")]),
    ])
    rows = [[S.IMAGE_STATS.get(k, k), fmt(v, 4)] for k, v in emb["stats"].items()]
    stats = Table(id=f"obs_stats_{n}", columns=[
        {"id": "statistic", "label": "Statistic", "size": "small"},
        {"id": "value", "label": "Value", "size": "small", "align": "right"},
    ], rows=rows)
    return [heading(f"Photo {n + 1} (image {n}): what the vision model attends to"), images,
            stats]


def _similar(de, rec: dict[str, Any], filters: str | None = None) -> list[Component]:
    first = int(rec["embeddings"][0]["image_number"])
    q = filters_query(filters)
    result = C.similar_embeddings(de, D.EmbeddingId(rec["gbif_id"], first), SIMILAR_K,
                                  None if q.is_empty else q)
    table = _matches_table("obs_similar", result["results"])
    narrowed = filters_text(filters)
    out = [heading(f"Most similar photo embeddings (cosine of pooled vectors, photo {first + 1})"),
           message("Click a row to select that observation."
                   + (f" {narrowed}." if narrowed else ""))]
    out.append(table if result["results"] else message("No other embeddings match."))
    return out


def _matches_table(id: str, matches: list[dict[str, Any]]) -> Table:
    """Ranked embeddings (species, date, GBIF id, photo, cosine); a row click selects."""
    return Table(id=id, hover=True, style={"width": "100%", "tableLayout": "fixed"}, columns=[
        {"id": "rank", "label": "#", "size": "small"},
        {"id": "species", "label": "Species", "size": "small"},
        {"id": "date", "label": "Date", "size": "small"},
        {"id": "gbif_id", "label": "GBIF id", "size": "small"},
        {"id": "photo", "label": "Photo", "size": "small", "align": "right"},
        {"id": "cosine", "label": "Cosine", "size": "small", "align": "right"},
    ], rows=[[m["rank"], m["taxon_name"], m["time"][:10], m["gbif_id"], m["image_number"] + 1,
              round(float(m["score"]), 4)] for m in matches])


# -- patch search ------------------------------------------------------------------------------
def _patch_search(ctx, de, rec: dict[str, Any], style: dict[str, Any],
                  local: set[tuple[int, int]]) -> list[Component]:
    out: list[Component] = [heading("Patch search: where else does a part like this occur?")]
    if not PI.has_patch_index(de.cubeset):
        return [*out, message(NO_PATCH_INDEX, id=PATCH_MATCHES)]
    chart = VegaChart(id=PATCH_GRID, chart=_patch_grid(ctx, de, rec, style, local))
    return [*out, chart, Box(id=PATCH_MATCHES, style=COLUMN, children=[message(PATCH_HINT)])]


def _patch_grid(ctx, de, rec: dict[str, Any], style: dict[str, Any],
               local: set[tuple[int, int]]) -> alt.FacetChart:
    """One 24 x 24 attention grid per photo (the attention map's colours and opacity, the
    photo underneath), a click on a cell selecting patch key ``gbif_id:image:py:px``."""
    gid = int(rec["gbif_id"])
    cmap = render.get_colormap(style["colormap"])
    rows: list[dict[str, Any]] = []
    for emb in rec["embeddings"]:
        n = int(emb["image_number"])
        att = C.attention(de, D.EmbeddingId(gid, n), D.AttentionMap(style["method"],
                                                                    style["frame"]))
        photo = f"Photo {n + 1}"
        under = _photo_url(ctx, rec, n, local) if style["photo"] else None
        if under:
            rows.append({"photo": photo, "kind": "photo", "url": under})
        for py, line in enumerate(att["normalised"]):
            for px, v in enumerate(line):
                r, g, b, _ = cmap(float(v), bytes=True)
                rows.append({"photo": photo, "kind": "cell", "py": py, "px": px,
                             "value": round(float(v), 4), "key": f"{gid}:{n}:{py}:{px}",
                             "fill": f"#{r:02x}{g:02x}{b:02x}",
                             "opacity": round(float(v) * style["alpha"], 4)})
    picked = alt.selection_point(name=PATCH_SELECTION, fields=["key"], on="click")
    cells = alt.Chart().mark_rect().encode(
        x=alt.X("px:O", axis=None), y=alt.Y("py:O", axis=None),
        fill=alt.Fill("fill:N", scale=None), opacity=alt.Opacity("opacity:Q", scale=None),
        stroke=alt.value("#ffffff"),
        strokeWidth=alt.condition(picked, alt.value(2), alt.value(0), empty=False),
        tooltip=[alt.Tooltip("py:Q", title="patch row"), alt.Tooltip("px:Q", title="column"),
                 alt.Tooltip("value:Q", title="attention", format=".2f")],
    ).transform_filter("datum.kind == 'cell'").add_params(picked)
    image = alt.Chart().mark_image(width=GRID_SHOWN, height=GRID_SHOWN, align="left",
                                   baseline="top", aspect=False).encode(
        x=alt.value(0), y=alt.value(0), url="url:N").transform_filter("datum.kind == 'photo'")
    data = pd.DataFrame(rows).astype({"py": "Int64", "px": "Int64"})  # photo rows: none
    return (alt.layer(image, cells, data=data)
            .properties(width=GRID_SHOWN, height=GRID_SHOWN)
            .facet(column=alt.Column("photo:N", title=None), spacing=8)
            .properties(usermeta={"embedOptions": {"renderer": "svg"}}))


def _patch_key(picked: Any) -> tuple[int, int, int, int] | None:
    """(gbif_id, image_number, py, px) of the last picked grid cell."""
    keys = [k for k in picked_keys(picked) if isinstance(k, str) and k.count(":") == 3]
    try:
        return tuple(int(v) for v in keys[-1].split(":")) if keys else None
    except ValueError:
        return None


@panel.callback(
    Input(PATCH_GRID, PATCH_SELECTION),
    State("obs_method"),
    State("obs_frame"),
    State("obs_colormap"),
    State("@app", FILTERS),
    Output(PATCH_MATCHES, ""),
)
@guarded(lambda text: error_box(PATCH_MATCHES, text))
def update_patch_matches(ctx, picked: dict | None = None, method: str | None = None,
                         frame: str | None = None, colormap: str | None = None,
                         filters: str | None = None) -> Component:
    """The photos whose best patches are most like the clicked one: crops and a table."""
    key = _patch_key(picked)
    if key is None:
        return Box(id=PATCH_MATCHES, style=COLUMN, children=[message(PATCH_HINT)])
    gid, n, py, px = key
    q = filters_query(filters)
    try:
        result = C.similar_patches(deepearth(ctx), D.EmbeddingId(gid, n),
                                   PI.Window.patch(py, px), PATCH_K, None if q.is_empty else q,
                                   group=True, per_image=1)
    except (ApiProblem, NotFoundError, ValueError) as problem:
        raise PanelProblem(str(problem)) from None
    crop = {**_attention_map(method, frame, colormap), "alpha": "1.00", "size": CROP_SIZE,
            "margin": CROP_MARGIN}
    matches = [{**r, **r["patches"][0]} for r in result["results"]]  # its best patch
    narrowed = filters_text(filters)
    lead = message(f"Patch ({py}, {px}) of photo {n + 1}: the {len(matches)} other photos with "
                   "the most similar patches (cosine; the best patch of each, outlined); "
                   "click a row to select that observation."
                   + (f" {narrowed}." if narrowed else ""))
    if not matches:
        return Box(id=PATCH_MATCHES, style=COLUMN,
                   children=[lead, message("No patches of other photos match.")])
    crops = Box(style=ROW, children=[_crop(ctx, m, crop) for m in matches])
    table = _matches_table(PATCH_TABLE, matches)
    return Box(id=PATCH_MATCHES, style=COLUMN, children=[lead, crops, table])


def _crop(ctx, m: dict[str, Any], crop: dict[str, Any]) -> Component:
    """A match: its attention crop (the patch outlined), species, date and cosine."""
    src = api_url(ctx, f"/embeddings/{m['gbif_id']}/{m['image_number']}/patches/"
                       f"{m['patch_y']}/{m['patch_x']}/crop.png", **crop)
    return Box(style={"display": "flex", "flexDirection": "column", "width": CROP_SIZE + 8},
               children=[
        Markdown(text=f"![patch match {m['rank']}: patch {m['patch_y']}, {m['patch_x']}]({src})"),
        Typography(text=f"{m['rank']}. {m['taxon_name']}", variant="caption",
                   style={"fontStyle": "italic"}),
        Typography(text=f"{m['time'][:10]} · {float(m['score']):.3f}", variant="caption"),
    ])
