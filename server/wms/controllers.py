"""What the WMS answers: GetCapabilities, GetMap, GetFeatureInfo, GetLegendGraphic, as
functions over the context and the request's key-value pairs (lower-case keys).

Synchronous and free of HTTP: the routes run them on the shared ``tiles`` worker pool.
"""

from __future__ import annotations

import json

from ..common.ows import OwsError
from . import render as R
from .capabilities import GETMAP_FORMATS, INFO_FORMATS, WMS_VERSION, capabilities_xml
from .context import WmsContext
from .errors import WmsError
from .layers import WmsLayer

MAX_CAPABILITIES = 16


def capabilities(ctx: WmsContext, base_url: str) -> bytes:
    xml = ctx.capabilities_cache.get(base_url)
    if xml is None:
        xml = capabilities_xml(ctx.layers(), base_url, ctx.titles)
        if len(ctx.capabilities_cache) >= MAX_CAPABILITIES:
            ctx.capabilities_cache.clear()
        ctx.capabilities_cache[base_url] = xml
    return xml


def _layers(ctx: WmsContext, text: str | None, locator: str = "LAYERS") -> list[WmsLayer]:
    if not text or not text.strip():
        raise WmsError("MissingParameterValue", f"parameter {locator} is required", locator)
    all_layers = ctx.layers()
    out = []
    for name in text.split(","):
        layer = all_layers.get(name.strip())
        if layer is None:
            hint = ", ".join(list(all_layers)[:6])
            raise WmsError("LayerNotDefined", f"{locator}: no layer {name.strip()!r}; layers "
                                              f"are named <dataset>.<variable>, e.g. {hint}",
                           locator)
        out.append(layer)
    if len(out) > 16:
        raise WmsError("InvalidParameterValue", f"{locator}: at most 16 layers", locator)
    return out


def _time_index(layer: WmsLayer, text: str | None) -> int:
    if layer.time is None:
        return 0
    if not layer.timed:
        return 0  # one step (all years): any TIME shows it
    try:
        return layer.time.resolve(text, "TIME")
    except OwsError as exc:
        raise WmsError("InvalidDimensionValue", exc.message, "TIME") from None


def _check_common(q: dict[str, str]) -> None:
    version = q.get("version")
    if version is not None and version != WMS_VERSION:
        raise WmsError("InvalidParameterValue", f"VERSION={version!r}; this server speaks "
                                                f"WMS {WMS_VERSION}", "VERSION")
    styles = q.get("styles")
    if styles:
        bad = [s for s in styles.split(",") if s.strip() not in ("", "default")]
        if bad:
            raise WmsError("StyleNotDefined", f"STYLES: unknown style {bad[0]!r}; every "
                                              "layer has one style, 'default'", "STYLES")


def _background(text: str | None) -> tuple[int, int, int]:
    if not text:
        return 255, 255, 255
    t = text.strip().lower().removeprefix("0x").removeprefix("#")
    try:
        v = int(t, 16)
    except ValueError:
        raise WmsError("InvalidParameterValue", f"BGCOLOR={text!r}: expected 0xRRGGBB",
                       "BGCOLOR") from None
    return (v >> 16) & 255, (v >> 8) & 255, v & 255


def get_map(ctx: WmsContext, q: dict[str, str]) -> bytes:
    """The PNG of GetMap."""
    _check_common(q)
    layers = _layers(ctx, q.get("layers"))
    fmt = (q.get("format") or "image/png").split(";")[0].strip().lower()
    if fmt not in GETMAP_FORMATS:
        raise WmsError("InvalidFormat", f"FORMAT={q.get('format')!r}; use image/png",
                       "FORMAT")
    view = R.parse_view(q.get("crs") or q.get("srs"), q.get("bbox"), q.get("width"),
                        q.get("height"))
    times = [_time_index(layer, q.get("time")) for layer in layers]
    transparent = (q.get("transparent") or "TRUE").strip().upper() != "FALSE"
    return R.render_map(layers, times, ctx.read, view, transparent, _background(q.get("bgcolor")))


def get_feature_info(ctx: WmsContext, q: dict[str, str]) -> tuple[bytes, str]:
    """``(body, content type)`` of GetFeatureInfo: the values of the cell under (I, J)."""
    _check_common(q)
    _layers(ctx, q.get("layers"))
    layers = _layers(ctx, q.get("query_layers"), "QUERY_LAYERS")
    view = R.parse_view(q.get("crs") or q.get("srs"), q.get("bbox"), q.get("width"),
                        q.get("height"))
    fmt = (q.get("info_format") or "text/plain").split(";")[0].strip().lower()
    if fmt not in INFO_FORMATS:
        raise WmsError("InvalidFormat", f"INFO_FORMAT={q.get('info_format')!r}; use one of "
                                        f"{', '.join(INFO_FORMATS)}", "INFO_FORMAT")
    pixel = []
    for name in ("i", "j"):
        text = q.get(name, q.get({"i": "x", "j": "y"}[name]))
        try:
            pixel.append(int(str(text)))
        except (TypeError, ValueError):
            raise WmsError("InvalidPoint", f"{name.upper()} must be a pixel column/row, got "
                                           f"{text!r}", name.upper()) from None
    infos = []
    for layer in layers:
        info = R.feature_info(layer, ctx.read, view, _time_index(layer, q.get("time")),
                              pixel[0], pixel[1])
        if info is not None:
            infos.append(info)
    if fmt == "text/plain":
        return R.feature_info_text(infos).encode(), "text/plain; charset=utf-8"
    if fmt == "text/html":
        return R.feature_info_html(infos).encode(), "text/html; charset=utf-8"
    return json.dumps(R.feature_info_geojson(infos)).encode(), fmt


def get_legend_graphic(ctx: WmsContext, q: dict[str, str]) -> bytes:
    (layer,) = _layers(ctx, q.get("layer") or q.get("layers"), "LAYER")[:1]
    fmt = (q.get("format") or "image/png").split(";")[0].strip().lower()
    if fmt != "image/png":
        raise WmsError("InvalidFormat", f"FORMAT={q.get('format')!r}; use image/png",
                       "FORMAT")
    cache = ctx.resources.named_cache("wms-legends", 4 * 1024 * 1024)
    return cache.get_or_compute(("legend", layer.name), lambda: R.render_legend(layer))
