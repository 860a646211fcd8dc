"""Helpers shared by the viewer panels: the API context, URLs, formatting, error handling.

Panel callbacks run synchronously on the server's IO loop. They only read precomputed
values through the DeepEarth API's controllers (:mod:`server.deepearth.controllers`: the
same functions and cache the HTTP endpoints use) and do bounded work; images are loaded by
the browser from the plugin's PNG endpoints.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import pandas as pd
from chartlets import Component
from chartlets.components import Box, Typography
from xcube.constants import LOG
from xcube.server.config import get_reverse_url_prefix

from ...deepearth.context import DeepEarthContext
from ..places import gbif_id_of_place

API_PREFIX = "/deepearth"
PAGES_PREFIX = "/explore"
COLUMN = {"display": "flex", "flexDirection": "column", "gap": "8px", "width": "100%"}
ROW = {"display": "flex", "flexDirection": "row", "gap": "8px", "flexWrap": "wrap",
       "alignItems": "center"}


class PanelProblem(Exception):
    """A message for the user instead of panel content (no cube set, unknown id, ...)."""


def deepearth(ctx) -> DeepEarthContext:
    """The DeepEarth API's context, the first argument of its controllers (raises
    :class:`PanelProblem` when the cube set is unavailable)."""
    api_ctx = ctx.get_api_ctx("deepearth") if ctx is not None else None
    if api_ctx is None:
        raise PanelProblem("The DeepEarth API is not running in this server.")
    try:
        _ = api_ctx.cubeset
        _ = api_ctx.cache
        return api_ctx
    except Exception as exc:  # noqa: BLE001 - Unavailable carries a readable message
        raise PanelProblem(f"The cube set is not available: {getattr(exc, 'message', exc)}") \
            from None


def url(ctx, path: str, **params: Any) -> str:
    """Server-relative URL of ``path`` (with the server's reverse URL prefix), plus a query."""
    prefix = get_reverse_url_prefix(ctx.config) if ctx is not None else ""
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return f"{prefix}{path}" + (f"?{query}" if query else "")


def api_url(ctx, path: str, **params: Any) -> str:
    return url(ctx, API_PREFIX + path, **params)


def selected_gbif_id(place_id: str | None) -> int | None:
    return gbif_id_of_place(place_id)


def picked_keys(picked: Any) -> list:
    """The ``key`` values of a VegaChart's point selection on field ``key`` (as chartlets
    reports it: ``{"key": [...], "vlPoint": ...}``)."""
    if not isinstance(picked, dict):
        return []
    keys = picked.get("key")
    return list(keys) if isinstance(keys, list) else []


def message(text: str, id: str | None = None, color: str = "text.secondary") -> Typography:
    return Typography(id=id, text=text, variant="body2", color=color)


def heading(text: str) -> Typography:
    return Typography(text=text, variant="subtitle2", style={"marginTop": "6px"})


def fmt(value: Any, digits: int = 3) -> str:
    """A number for display ('–' for None / NaN)."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def fmt_time(iso: str, precision: str | None = None) -> str:
    """An ISO time at its known precision (year, month, day, hour, minute or second)."""
    t = pd.Timestamp(iso)
    formats = {"year": "%Y", "month": "%Y-%m", "day": "%Y-%m-%d", "hour": "%Y-%m-%d %H:00",
               "minute": "%Y-%m-%d %H:%M", "second": "%Y-%m-%d %H:%M:%S"}
    return t.strftime(formats.get(precision or "second", "%Y-%m-%d %H:%M:%S"))


def md_escape(text: str) -> str:
    """Text safe inside Markdown (no emphasis, links or table breaks)."""
    out = str(text)
    for ch in "\\`*_[]|<>":
        out = out.replace(ch, "\\" + ch)
    return out


def guarded(render_error: Callable[[str], Any]):
    """Decorator for callbacks: a :class:`PanelProblem` or any error becomes a message.

    ``render_error(text)`` builds the callback's return value for the message. Errors
    are logged; no traceback reaches the browser.
    """
    def decorator(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except PanelProblem as problem:
                return render_error(str(problem))
            except Exception as exc:  # noqa: BLE001 - a panel must not break the viewer
                LOG.exception(f"DeepEarth panel callback {fn.__qualname__} failed")
                return render_error(f"Something went wrong ({type(exc).__name__}); "
                                    "see the server log.")
        return wrapper
    return decorator


def error_box(id: str, text: str) -> Component:
    return Box(id=id, style=COLUMN, children=[message(text, color="error")])


# -- the viewer's filters (app property "deepearthFilters", see viewer/dist-overlay) ----------
FILTERS = "deepearthFilters"  # Input("@app", FILTERS): 'taxa=..&months=3-5&hours=..&year=..'
FILTER_KEYS = ("taxa", "months", "hours", "year")


def filter_params(filters: str | None) -> dict[str, str]:
    """The filter query string of the viewer as a dict (only known, non-empty keys)."""
    from urllib.parse import parse_qs

    parsed = parse_qs(str(filters or ""), keep_blank_values=False)
    return {k: parsed[k][0].strip() for k in FILTER_KEYS if parsed.get(k) and parsed[k][0].strip()}


def filter_kwargs(filters: str | None) -> dict[str, str]:
    """:meth:`cube_gen.query.Query.make` arguments of the viewer's filters."""
    p = filter_params(filters)
    return {{"year": "years"}.get(k, k): v for k, v in p.items()}


def filters_query(filters: str | None, **base: Any):
    """The Query of the viewer's filters plus ``base`` (bbox, start, split, polygon, ...);
    a filter the user mistyped becomes a :class:`PanelProblem` naming it."""
    from cube_gen.query import Query

    try:
        return Query.make(**base, **filter_kwargs(filters))
    except ValueError as exc:
        raise PanelProblem(f"Filter not usable: {exc}") from None


def filters_text(filters: str | None) -> str:
    """The active filters in words ('' when none)."""
    p = filter_params(filters)
    if not p:
        return ""
    names = {"taxa": "species", "months": "months", "hours": "hours", "year": "year"}
    return "Filters: " + ", ".join(f"{names[k]} {v}" for k, v in p.items())


def lat_lon_text(lat: float, lon: float, digits: int = 4) -> str:
    """``28.4571° N, 81.4336° W``: hemispheres, no signs."""
    return (f"{abs(lat):.{digits}f}° {'N' if lat >= 0 else 'S'}, "
            f"{abs(lon):.{digits}f}° {'E' if lon >= 0 else 'W'}")


def cluster_text(cluster: Any) -> str:
    """``cluster 3``, or ``unclustered`` for the clustering's -1."""
    from cube_gen.taxa import cluster_label

    try:
        return cluster_label(int(cluster))
    except (TypeError, ValueError):
        return "cluster unknown"
