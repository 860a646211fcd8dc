"""Region panel: what lives in the selected region, and when it was observed.

The region is the selected place: a neighbourhood of the selected observation (radius
chosen in the panel), exactly the observations inside a drawn polygon (point in
polygon), or the whole cube set when nothing is selected; the viewer's filters (species
search, months, hours, year) narrow it. The numbers come from the DeepEarth controller
``region_stats`` (:func:`cube_gen.analysis.region_statistics`, shared cache), exactly
those of ``/deepearth/stats/region`` with the same parameters (the panel links them).
"""

import math
from typing import Any

import altair as alt
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
    ROW,
    api_url,
    deepearth,
    filter_params,
    filters_query,
    filters_text,
    fmt,
    guarded,
    lat_lon_text,
    md_escape,
)

panel = Panel(__name__, title="Region statistics", icon="bar_chart", position=7)

# metres: chartlets' Select turns a numeric choice into an integer (parseInt)
RADII_M = [(500, "± 0.5 km"), (1000, "± 1 km"), (2000, "± 2 km"), (5000, "± 5 km"),
           (10000, "± 10 km")]
DEFAULT_RADIUS_M = 2000
TIMES = [("all", "All years"), ("year", "Year of the time slider")]
SPLITS = [("all", "All observations"), ("train", "train (2010–2024)"),
          ("temporal_test", "temporal_test (2025)")]
TOP_SPECIES = 12
KM_PER_DEGREE = 111.32
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
COUNT_AXIS = alt.Axis(format="d", tickMinStep=1)


@panel.layout(
    State("@app", "selectedPlaceGeometry"),
    State("@app", "selectedPlaceId"),
    State("@app", "selectedTimeLabel"),
    State("@app", FILTERS),
)
def render_panel(ctx, geometry: dict | None = None, place_id: str | None = None,
                 time_label: str | None = None, filters: str | None = None) -> Component:
    controls = Box(style=ROW, children=[
        Select(id="reg_radius", label="Radius around an observation", value=DEFAULT_RADIUS_M,
               options=RADII_M, style={"minWidth": 200}),
        Select(id="reg_time", label="Time", value="all", options=TIMES,
               style={"minWidth": 190}),
        Select(id="reg_split", label="Split", value="all", options=SPLITS,
               style={"minWidth": 170}),
    ])
    summary, species, years, months = update_region(ctx, geometry, place_id, time_label,
                                                     DEFAULT_RADIUS_M, "all", "all", filters)
    chart_style = {"width": "100%"}
    return Box(style={**COLUMN, "padding": "8px"}, children=[
        controls,
        Markdown(id="reg_summary", text=summary),
        VegaChart(id="reg_species", chart=species, style=chart_style),
        VegaChart(id="reg_years", chart=years, style=chart_style),
        VegaChart(id="reg_months", chart=months, style=chart_style),
    ])


# -- the query -----------------------------------------------------------------------------
def _coordinates(geometry: Any) -> list[tuple[float, float]]:
    """All (lon, lat) positions of a GeoJSON geometry."""
    out: list[tuple[float, float]] = []

    def walk(c):
        if isinstance(c, list | tuple) and len(c) >= 2 and all(
                isinstance(v, int | float) for v in c[:2]):
            out.append((float(c[0]), float(c[1])))
        elif isinstance(c, list | tuple):
            for item in c:
                walk(item)

    if isinstance(geometry, dict):
        if geometry.get("type") == "GeometryCollection":
            for g in geometry.get("geometries") or []:
                out.extend(_coordinates(g))
        else:
            walk(geometry.get("coordinates"))
    return out


def polygon_ring(geometry: Any) -> list[tuple[float, float]] | None:
    """The outer ring of a drawn polygon (GeoJSON Polygon), else None."""
    if isinstance(geometry, dict) and geometry.get("type") == "Polygon":
        rings = geometry.get("coordinates") or []
        if rings and len(rings[0]) >= 3:
            return [(float(p[0]), float(p[1])) for p in rings[0]]
    return None


def region_of(geometry: Any, radius_km: float) -> tuple[dict[str, Any], str]:
    """``(Query arguments, description)`` of the region a place geometry selects: a
    polygon exactly (point in polygon), a point's neighbourhood, another shape's box."""
    ring = polygon_ring(geometry)
    if ring is not None:
        n = len(ring) - (1 if ring[0] == ring[-1] else 0)
        return ({"polygon": ring},
                f"inside the drawn polygon ({n} vertices; observations inside it exactly, "
                "point in polygon)")
    coords = _coordinates(geometry)
    if not coords:
        return {}, "the whole cube set (select an observation or draw a polygon)"
    lons = [c[0] for c in coords]
    lats = [c[1] for c in coords]
    if len(coords) == 1 or (max(lons) == min(lons) and max(lats) == min(lats)):
        lon, lat = lons[0], lats[0]
        dlat = radius_km / KM_PER_DEGREE
        dlon = radius_km / (KM_PER_DEGREE * max(0.01, math.cos(math.radians(lat))))
        return ({"bbox": (lon - dlon, lat - dlat, lon + dlon, lat + dlat)},
                f"± {radius_km:g} km around {lat_lon_text(lat, lon)}")
    return ({"bbox": (min(lons), min(lats), max(lons), max(lats))},
            "the bounding box of the selected shape")


def region_bbox(geometry: Any, radius_km: float):
    """``(bbox or None, description)`` (kept for callers of the earlier API)."""
    args, where = region_of(geometry, radius_km)
    if "polygon" in args:
        from cube_gen.polygon import ring_bbox

        return ring_bbox(args["polygon"]), where
    return args.get("bbox"), where


def year_range(time_label: str | None) -> tuple[pd.Timestamp, pd.Timestamp] | None:
    """The calendar year of the time slider's label (grid time steps are years)."""
    if not time_label:
        return None
    try:
        t = pd.Timestamp(str(time_label).rstrip("Z"))
    except ValueError:
        return None
    start = pd.Timestamp(year=t.year, month=1, day=1)
    return start, pd.Timestamp(year=t.year + 1, month=1, day=1) - pd.Timedelta(1, "ns")


def region_filters(geometry: Any, time_label: str | None, radius_m: float, time_mode: str,
                   split: str, filters: str | None = None) -> tuple[Query, str, str]:
    """``(query, region description, time description)``; ``radius_m`` around a point;
    ``filters``: the viewer's filter string (species search, months, hours, year)."""
    region, where = region_of(geometry, float(radius_m or DEFAULT_RADIUS_M) / 1000)
    start = end = None
    when = "all years"
    if time_mode == "year":
        years = year_range(time_label)
        if years is not None:
            start, end = years
            when = f"{start.year}"
        else:
            when = "all years (the time slider has no time)"
    q = filters_query(filters, **region, start=start, end=end,
                      split=split if split in ("train", "temporal_test") else None)
    return q, where, when


# -- charts --------------------------------------------------------------------------------
def species_chart(stats: dict[str, Any]) -> alt.Chart:
    rows = stats["species"][:TOP_SPECIES]
    others = sum(r["count"] for r in stats["species"][TOP_SPECIES:])
    df = pd.DataFrame([{"species": r["taxon_name"], "count": r["count"],
                        "share": r["fraction"], "color": r["color"]} for r in rows])
    if others:
        df = pd.concat([df, pd.DataFrame([{
            "species": f"{len(stats['species']) - TOP_SPECIES} other species",
            "count": others, "share": others / max(1, stats["observations"]),
            "color": "#9e9e9e"}])], ignore_index=True)
    if df.empty:
        df = pd.DataFrame({"species": [], "count": [], "share": [], "color": []})
    return (
        alt.Chart(df, title="Species composition")
        .mark_bar()
        .encode(
            y=alt.Y("species:N", sort=None, title=None,
                    axis=alt.Axis(labelLimit=180, labelFontStyle="italic")),
            x=alt.X("count:Q", title="observations", axis=COUNT_AXIS),
            color=alt.Color("color:N", scale=None),
            tooltip=["species:N", "count:Q", alt.Tooltip("share:Q", format=".1%")],
        )
        .properties(width="container", height=alt.Step(20))
    )


def years_chart(stats: dict[str, Any]) -> alt.Chart:
    df = pd.DataFrame(stats["by_year"] or [], columns=["year", "count"])
    return (
        alt.Chart(df, title="Observations per year")
        .mark_bar(color="#2e7d32")
        .encode(x=alt.X("year:O", title=None, axis=alt.Axis(labelAngle=0)),
                y=alt.Y("count:Q", title="observations", axis=COUNT_AXIS),
                tooltip=["year:O", "count:Q"])
        .properties(width="container", height=160)
    )


def months_chart(stats: dict[str, Any]) -> alt.Chart:
    df = pd.DataFrame(stats["by_month"], columns=["month", "count"])
    df["name"] = [MONTHS[m - 1] for m in df["month"]]
    return (
        alt.Chart(df, title="Observations per month of year")
        .mark_bar(color="#00838f")
        .encode(x=alt.X("name:N", sort=MONTHS, title=None, axis=alt.Axis(labelAngle=0)),
                y=alt.Y("count:Q", title="observations", axis=COUNT_AXIS),
                tooltip=["name:N", "count:Q"])
        .properties(width="container", height=160)
    )


def _bbox_text(bbox) -> str:
    w, s_, e, n = bbox
    return (f"{abs(w):.4f}° {'W' if w < 0 else 'E'} to {abs(e):.4f}° {'W' if e < 0 else 'E'}, "
            f"{abs(s_):.4f}° {'S' if s_ < 0 else 'N'} to {abs(n):.4f}° {'S' if n < 0 else 'N'}")


def json_params(f: Query, filters: str | None) -> dict[str, Any]:
    """The /deepearth/stats/region query parameters of the panel's query."""
    params: dict[str, Any] = {}
    if f.polygon is not None:
        params["polygon"] = ";".join(f"{x:.6f},{y:.6f}" for x, y in f.polygon)
    elif f.bbox is not None:
        params["bbox"] = ",".join(f"{v:.6f}" for v in f.bbox)
    if f.start is not None:
        params["start"] = pd.Timestamp(f.start).strftime("%Y-%m-%d")
        params["end"] = pd.Timestamp(f.end).strftime("%Y-%m-%d")
    if f.split:
        params["split"] = f.split
    params.update(filter_params(filters))
    return params


def summary_text(ctx, stats: dict[str, Any], where: str, when: str, f: Query,
                 filters: str | None = None) -> str:
    n = stats["observations"]
    split = f", split {f.split}" if f.split else ""
    bbox = f.bbox
    narrowed = filters_text(filters)
    lines = [
        f"**Region:** {md_escape(where)}" + (f" ({_bbox_text(bbox)})" if bbox else ""),
        "",
        f"**Time:** {md_escape(when)}{split}",
        "",
        *([f"**{md_escape(narrowed)}**", ""] if narrowed else []),
        "| | |",
        "| --- | --- |",
        f"| Observations | {n:,} ({stats['with_vision']:,} with photo embeddings; "
        + ", ".join(f"{k} {v:,}" for k, v in stats["by_split"].items()) + ") |",
        f"| Species richness | {fmt(stats['richness'])} |",
        f"| Shannon H′ (nats) | {fmt(stats['shannon'])} |",
        f"| Gini–Simpson 1 − Σp² | {fmt(stats['gini_simpson'])} |",
        f"| Inverse Simpson 1 / Σp² | {fmt(stats['inverse_simpson'])} |",
        f"| Pielou evenness | {fmt(stats['evenness'])} |",
        f"| Month unknown | {stats['month_unknown']:,} |",
        "",
        "Same numbers as JSON: [/deepearth/stats/region]("
        f"{api_url(ctx, '/stats/region', **json_params(f, filters))})",
    ]
    return "\n".join(lines)


def _error_outputs(text: str):
    return text, None, None, None


@panel.callback(
    Input("@app", "selectedPlaceGeometry"),
    Input("@app", "selectedPlaceId"),
    Input("@app", "selectedTimeLabel"),
    Input("reg_radius"),
    Input("reg_time"),
    Input("reg_split"),
    Input("@app", FILTERS),
    Output("reg_summary", "text"),
    Output("reg_species", "chart"),
    Output("reg_years", "chart"),
    Output("reg_months", "chart"),
)
@guarded(_error_outputs)
def update_region(ctx, geometry: dict | None = None, place_id: str | None = None,
                  time_label: str | None = None, radius_m: int | None = DEFAULT_RADIUS_M,
                  time_mode: str | None = "all", split: str | None = "all",
                  filters: str | None = None) -> tuple[str, alt.Chart, alt.Chart, alt.Chart]:
    """Summary and charts of the region statistics for the current selection."""
    f, where, when = region_filters(geometry, time_label, radius_m or DEFAULT_RADIUS_M,
                                    time_mode or "all", split or "all", filters)
    stats = C.region_stats(deepearth(ctx), f)
    return (summary_text(ctx, stats, where, when, f, filters), species_chart(stats), years_chart(stats),
            months_chart(stats))
