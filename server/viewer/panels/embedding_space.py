"""Embedding space panel: the species language UMAP and the photo-embedding vision UMAP.

Two interactive altair scatter plots of the precomputed 3-D UMAPs (two axes at a time),
coloured by language cluster (with a legend) or by species. Clicking a point selects
an observation on the map and in every panel (a photo embedding: its observation; a
species: its most recent observation with a photo embedding, else its most recent one)
and describes the picked points below the chart; the observation selected on the map is
outlined. The viewer's filters narrow the points. A link opens the full 3-D view, which
follows the selection.
"""

from dataclasses import replace

import altair as alt
import numpy as np
import pandas as pd
from chartlets import Component, Input, Output, State
from chartlets.components import Box, Select, VegaChart
from xcube.webapi.viewer.components import Markdown
from xcube.webapi.viewer.contrib import Panel

from cube_gen.query import Query

from ...deepearth import controllers as C
from .common import (
    COLUMN,
    FILTERS,
    PAGES_PREFIX,
    ROW,
    api_url,
    cluster_text,
    deepearth,
    filter_params,
    filters_query,
    filters_text,
    fmt_time,
    guarded,
    md_escape,
    picked_keys,
    selected_gbif_id,
    url,
)

panel = Panel(__name__, title="Embedding space", icon="scatter_plot", position=6)

VIEWS = [("species", "Species: language UMAP"), ("vision", "Photos: vision UMAP")]
COLOR_BY = [("cluster", "Language cluster"), ("species", "Species")]
AXES = [("x-y", "UMAP 1 / UMAP 2"), ("x-z", "UMAP 1 / UMAP 3"), ("y-z", "UMAP 2 / UMAP 3")]
SELECTION = "picked"  # the chart's click selection; chartlets reports it as property "picked"
MAX_VISION_POINTS = 3000  # points drawn in the panel (the 3-D page draws all)
CHART_HEIGHT = 300
HINT = ("Click a point to select its observation on the map and in every panel "
        "(shift-click for several: the last one is selected).")
SVG = {"embedOptions": {"renderer": "svg"}}  # vega-embed: SVG marks (with aria labels)


@panel.layout(State("@app", "selectedPlaceId"), State("@app", FILTERS))
def render_panel(ctx, place_id: str | None = None, filters: str | None = None) -> Component:
    controls = Box(style=ROW, children=[
        Select(id="emb_view", label="Embedding", value="species", options=VIEWS,
               style={"minWidth": 200}),
        Select(id="emb_color", label="Colour by", value="cluster", options=COLOR_BY,
               style={"minWidth": 150}),
        Select(id="emb_axes", label="Axes", value="x-y", options=AXES,
               style={"minWidth": 150}),
    ])
    chart = VegaChart(id="emb_chart", chart=update_chart(ctx, "species", "cluster", "x-y",
                                                         place_id, filters),
                      style={"width": "100%"})
    info = Markdown(id="emb_info", text=update_info(ctx, None, "species", place_id))
    link = Markdown(id="emb_link", text=update_link(ctx, place_id))
    return Box(style={**COLUMN, "padding": "8px"}, children=[controls, chart, info, link])


# -- data ----------------------------------------------------------------------------------
def species_frame(ctx) -> pd.DataFrame:
    """One row per species: UMAP x, y, z, names, cluster and colours."""
    data = C.species_umap(deepearth(ctx))
    df = pd.DataFrame(data["species"])
    df["key"] = df["species_index"].astype(int)
    return df


def vision_frame(ctx, keep_gbif_id: int | None = None) -> tuple[pd.DataFrame, int]:
    """Embeddings with UMAP x, y, z (at most MAX_VISION_POINTS, evenly strided, always
    keeping those of ``keep_gbif_id``) and the total number of embeddings."""
    de = deepearth(ctx)
    data = C.vision_umap_cached(de, Query(), de.settings["MaxUmapPoints"])
    if data is None:  # pragma: no cover - the whole-set projection is precomputed
        return pd.DataFrame(), 0
    df = pd.DataFrame(data["points"])
    total = len(df)
    if total > MAX_VISION_POINTS:
        step = -(-total // MAX_VISION_POINTS)
        keep = (df.index % step == 0) | (df["gbif_id"] == (keep_gbif_id or -1))
        df = df[keep]
    table = de.cubeset.species_table()
    df["cluster"] = table.cluster.to_numpy()[df["species_index"].to_numpy()]
    df["cluster_color"] = table.cluster_color.to_numpy()[df["species_index"].to_numpy()]
    df["key"] = df["gbif_id"].astype(str) + ":" + df["image_number"].astype(str)
    df["date"] = df["time"].str[:10]
    return df.reset_index(drop=True), total


# -- chart ---------------------------------------------------------------------------------
@panel.callback(
    Input("emb_view"),
    Input("emb_color"),
    Input("emb_axes"),
    Input("@app", "selectedPlaceId"),
    Input("@app", FILTERS),
    Output("emb_chart", "chart"),
)
@guarded(lambda text: None)
def update_chart(ctx, view: str | None = "species", color_by: str | None = "cluster",
                 axes: str | None = "x-y", place_id: str | None = None,
                 filters: str | None = None) -> alt.Chart:
    """The scatter plot of the chosen embedding, two UMAP axes, coloured as chosen."""
    a, b = (axes or "x-y").split("-") if axes in dict(AXES) else ("x", "y")
    gbif_id = selected_gbif_id(place_id)
    q = filters_query(filters)
    narrowed = filters_text(filters)
    if view == "vision":
        df, total = vision_frame(ctx, gbif_id)
        if not q.is_empty and len(df):
            df = _matching_images(ctx, df, q)
        df["highlight"] = df["gbif_id"] == (gbif_id if gbif_id is not None else -1)
        tooltip = ["taxon_name:N", "date:N", "gbif_id:Q", "image_number:Q", "cluster_label:N"]
        title = f"Vision UMAP of {len(df):,} photo embeddings" + \
            (f" (of {total:,})" if total > len(df) else "")
    else:
        df = species_frame(ctx)
        if not q.is_empty:
            keep = _matching_species(ctx, q)
            df = df[df["species_index"].isin(keep)].reset_index(drop=True)
        sel = None
        if gbif_id is not None:
            try:
                sel = C.observation(deepearth(ctx), gbif_id)["species_index"]
            except Exception:  # noqa: BLE001 - an unknown id just highlights nothing
                sel = None
        df["highlight"] = df["species_index"] == (-1 if sel is None else sel)
        tooltip = ["taxon_name:N", "cluster_label:N", "observation_count:Q", "vision_count:Q"]
        title = f"Language UMAP of {len(df):,} species"
    if narrowed:
        title += f" · {narrowed}"
    df["cluster_label"] = [cluster_text(c) for c in df["cluster"]] if len(df) else []
    if color_by == "species":
        df["fill"] = df["color"]
        color = alt.Color("fill:N", scale=None, legend=None)
    else:  # a legend of the clusters: label -> colour
        pairs = (df[["cluster", "cluster_label", "cluster_color"]].drop_duplicates("cluster")
                 .sort_values("cluster"))
        df["fill"] = df["cluster_label"]
        color = alt.Color("fill:N", title="Language cluster",
                          scale=alt.Scale(domain=pairs["cluster_label"].tolist(),
                                          range=pairs["cluster_color"].tolist()),
                          legend=alt.Legend(orient="bottom", columns=4, symbolType="circle"))
    cols = ["key", "x", "y", "z", "fill", "highlight"] + [t.split(":")[0] for t in tooltip]
    df = df[list(dict.fromkeys(cols))]
    picked = alt.selection_point(name=SELECTION, fields=["key"], on="click")
    return (
        alt.Chart(df, title=title)
        .mark_circle(stroke="#111111")
        .encode(
            x=alt.X(f"{a}:Q", title=f"UMAP {'xyz'.index(a) + 1}", scale=alt.Scale(zero=False)),
            y=alt.Y(f"{b}:Q", title=f"UMAP {'xyz'.index(b) + 1}", scale=alt.Scale(zero=False)),
            color=color,
            size=alt.condition("datum.highlight", alt.value(220), alt.value(45)),
            strokeWidth=alt.condition("datum.highlight", alt.value(2.5), alt.value(0)),
            opacity=alt.condition(picked, alt.value(0.95), alt.value(0.35)),
            tooltip=tooltip,
        )
        .add_params(picked)
        .properties(width="container", height=CHART_HEIGHT, usermeta=SVG)
        .interactive()
    )


def _matching_images(ctx, df: pd.DataFrame, q: Query) -> pd.DataFrame:
    """The rows of ``df`` (gbif_id, image_number) whose embeddings match the filters."""
    cs = deepearth(ctx).cubeset
    t = cs.image_table()
    pos = cs.select_images(C.resolve(deepearth(ctx), q))
    keys = set(zip(t.gbif_id.to_numpy()[pos].tolist(), t.image_number.to_numpy()[pos].tolist(),
                   strict=True))
    hit = [(int(g), int(n)) in keys for g, n in zip(df["gbif_id"], df["image_number"],
                                                     strict=True)]
    return df[hit].reset_index(drop=True)


def _matching_species(ctx, q: Query) -> set[int]:
    """Species with at least one observation matching the filters."""
    de = deepearth(ctx)
    cs = de.cubeset
    pos = cs.select_observations(C.resolve(de, q))
    return set(cs.observations.species_index.values[pos].tolist())


# -- a click selects an observation ------------------------------------------------------------
def observation_of_species(ctx, species_index: int, q: Query | None = None) -> int | None:
    """The observation a species point stands for: its most recent one with a photo
    embedding (within the filters), else its most recent one."""
    de = deepearth(ctx)
    cs = de.cubeset
    base = q if q is not None else Query()
    pos = cs.select_observations(C.resolve(de, replace(base, species=(int(species_index),))))
    if len(pos) == 0:
        return None
    o = cs.observations
    times = o.time.values[pos]
    vision = o.has_vision.values[pos]
    pick = pos[vision][np.argmax(times[vision])] if vision.any() else pos[np.argmax(times)]
    return int(o.gbif_id.values[pick])


@panel.callback(
    Input("emb_chart", SELECTION),
    Input("emb_view"),
    State("@app", FILTERS),
    Output("@app", "selectedPlaceId"),
)
def select_picked(ctx, picked: dict | None = None, view: str | None = "species",
                  filters: str | None = None) -> str | None:
    """A click on a point selects its observation everywhere (None: nothing picked)."""
    keys = picked_keys(picked)
    if not keys:
        return None
    key = keys[-1]
    try:
        if view == "vision":
            if isinstance(key, str) and ":" in key:
                return f"obs-{int(key.split(':')[0])}"
            return None
        gid = observation_of_species(ctx, int(key), filters_query(filters))
    except Exception:  # noqa: BLE001 - a stale key selects nothing
        return None
    return None if gid is None else f"obs-{gid}"


# -- details of the picked points ----------------------------------------------------------
@panel.callback(
    Input("emb_chart", SELECTION),
    Input("emb_view"),
    Input("@app", "selectedPlaceId"),
    Output("emb_info", "text"),
)
@guarded(lambda text: text)
def update_info(ctx, picked: dict | None = None, view: str | None = "species",
                place_id: str | None = None) -> str:
    """Markdown describing the picked species or embeddings (at most 5)."""
    keys = picked_keys(picked)
    de = deepearth(ctx)
    lines: list[str] = []
    gbif_id = selected_gbif_id(place_id)
    if gbif_id is not None:
        try:
            rec = C.observation(de, gbif_id)
            lines.append(f"Selected on the map: *{md_escape(rec['taxon_name'])}*, "
                         f"{fmt_time(rec['time'], 'day')} (outlined in the chart).")
        except Exception:  # noqa: BLE001 - not an observation of this cube set
            pass
    if view == "vision":
        wanted = [k for k in keys if isinstance(k, str) and ":" in k][:5]
        for key in wanted:
            gid, n = (int(v) for v in key.split(":"))
            rec = C.observation(de, gid)
            thumb = api_url(ctx, f"/embeddings/{gid}/{n}/attention.png", size=96)
            lines.append(
                f"* *{md_escape(rec['taxon_name'])}*, {fmt_time(rec['time'], 'day')}, "
                f"photo {n + 1} of [GBIF {gid}](https://www.gbif.org/occurrence/{gid}), "
                f"{rec['split']}\n\n  ![attention]({thumb})")
    else:
        table = de.cubeset.species_table()
        wanted = [int(k) for k in keys if isinstance(k, int | float) and
                  0 <= int(k) < len(table)][:5]
        for idx in wanted:
            row = table.iloc[idx]
            similar = C.similar_species(de, str(row.taxon_id), 3)["results"]
            near = ", ".join(f"*{md_escape(r['taxon_name'])}* ({r['score']:.2f})"
                             for r in similar)
            lines.append(
                f"* **_{md_escape(row.taxon_name)}_**: {cluster_text(row.cluster)}, "
                f"{int(row.observation_count):,} observations, {int(row.vision_count):,} "
                f"photo embeddings; closest names: {near}")
    if not wanted:
        lines.append(HINT)
    return "\n\n".join(lines)


@panel.callback(Input("@app", "selectedPlaceId"), Input("@app", FILTERS),
                Output("emb_link", "text"))
@guarded(lambda text: text)
def update_link(ctx, place_id: str | None = None, filters: str | None = None) -> str:
    """The link to the 3-D page, at the selection and with the filters (the page then
    follows the viewer in the same browser)."""
    gbif_id = selected_gbif_id(place_id)
    target = url(ctx, f"{PAGES_PREFIX}/embedding-space.html",
                 gbif_id=gbif_id if gbif_id is not None else None, **filter_params(filters))
    return f"[Open the full 3-D embedding space]({target}) (new tab)"
