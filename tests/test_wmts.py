"""The DeepEarth WMTS (``server/wmts.py``) with real clients against a real ``xcube serve``.

OWSLib parses the capabilities and fetches tiles by KVP and REST; GDAL's WMTS driver
(``gdal_translate "WMTS:<capabilities url>,layer=...,tilematrixset=..."``) reads layers in
both tile matrix sets, and every grid cell's pixel colour is compared with the colour the
layer's configured colour map and value range give the cube's value at that time. GDAL
always requests a dimension's ``<Default>``; the capabilities' ``time`` parameter makes a
step the default, which is how a GDAL read selects a time.

The last test serves the same cube set from S3 (moto on loopback) and compares the bytes of
tiles, WMTS and plugin endpoints with those served from local disk.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pyproj
import pytest
import requests
import xarray as xr
from PIL import Image

from cube_gen import schema as S
from server.launch import free_port, make_config, running, write_config

TIMEOUT = 60
PREFIX = "/deepearth/wmts"
TMS_IDS = ("WorldCRS84Quad", "WorldWebMercatorQuad")
ATTR_STYLED = "sampling_effort"  # served without a Styles entry (attribute fallback)
OWS = "{http://www.opengis.net/ows/1.1}"
WMTS = "{http://www.opengis.net/wmts/1.0}"
# A tile at the finest level of each tile matrix set that holds grid cells of tiny_cubes.
DATA_TILES = {"WorldCRS84Quad": (7, 43, 70), "WorldWebMercatorQuad": (8, 106, 70)}
# Tiles inside the matrices, far from the data (central Florida).
EMPTY_TILES = {"WorldCRS84Quad": [(3, 1, 12), (0, 0, 1), (7, 0, 0)],
               "WorldWebMercatorQuad": [(2, 0, 3), (0, 0, 0), (8, 200, 200)]}


# -- a real xcube serve --------------------------------------------------------------------
@contextlib.contextmanager
def xcube_serve(config: dict, workdir: Path, env: dict | None = None) -> Iterator[str]:
    """``xcube serve -c`` on a free loopback port until the block ends; yields the base URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    path = write_config({**config, "port": port, "address": "127.0.0.1"},
                        workdir / "config.yml")
    with running(path, port, workdir / "xcube-serve.log", env=env) as url:
        yield url


@dataclass
class Served:
    url: str
    config: dict
    grid: xr.Dataset  # level 0 of grid.levels, read independently of the server

    @property
    def caps_url(self) -> str:
        return f"{self.url}{PREFIX}/1.0.0/WMTSCapabilities.xml"

    @property
    def kvp_url(self) -> str:
        return f"{self.url}{PREFIX}/kvp"

    @property
    def styles(self) -> dict:
        """Colour mappings per variable: the config's, else the variable's attributes."""
        mappings = dict(self.config["Styles"][0]["ColorMappings"])
        for name in self.variables:
            if name not in mappings:
                attrs = self.grid[name].attrs
                mappings[name] = {"ColorBar": attrs.get("color_bar_name", "viridis"),
                                  "ValueRange": [attrs.get("color_value_min", 0.0),
                                                 attrs["color_value_max"]]}
        return mappings

    @property
    def variables(self) -> list[str]:
        return list(grid_dataset(self.config)["Variables"])

    @property
    def custom_maps(self) -> dict[str, list]:
        """The config's custom colour maps: identifier -> [[value, colour], ...]."""
        return {c["Identifier"]: c["Colors"] for c in self.config.get("CustomColorMaps", [])}

    @property
    def time_labels(self) -> list[str]:
        return [pd.Timestamp(t).strftime("%Y-%m-%d") for t in self.grid.time.values]


def grid_dataset(config: dict) -> dict:
    """The config's entry of the per-year grid (under ``Datasets`` or a data store)."""
    entries = [*config.get("Datasets", []),
               *(d for store in config.get("DataStores", []) for d in store["Datasets"])]
    (entry,) = [d for d in entries if d["Identifier"] == S.GRID]
    return entry


def wmts_config(cubeset: str, storage_options: dict | None = None) -> dict:
    """The ``deepearth serve`` config with the per-year grid dataset only, less one layer's
    colour mapping: that layer's colours come from the variable's ``color_value_max``
    attribute (fitted at build time) and its ``color_bar_name``."""
    config = make_config(cubeset, storage_options=storage_options)
    for holder in [config, *config.get("DataStores", [])]:
        if "Datasets" in holder:
            holder["Datasets"] = [d for d in holder["Datasets"] if d["Identifier"] == S.GRID]
    style_id = grid_dataset(config)["Style"]
    config["Styles"] = [st for st in config["Styles"] if st["Identifier"] == style_id]
    del config["Styles"][0]["ColorMappings"][ATTR_STYLED]
    return config


@pytest.fixture(scope="module")
def served(tiny_cubes: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    config = wmts_config(str(tiny_cubes))
    grid = xr.open_zarr(tiny_cubes / "grid.levels" / "0.zarr").load()
    with xcube_serve(config, tmp_path_factory.mktemp("wmts-serve")) as url:
        yield Served(url, config, grid)


def get(url: str, **params) -> requests.Response:
    return requests.get(url, params=params or None, timeout=TIMEOUT)


def rgba(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))


def rest_tile(s: Served, layer: str, tms: str, z: int, y: int, x: int,
              t: str | None = "default") -> requests.Response:
    time_part = "" if t is None else f"{t}/"
    return get(f"{s.url}{PREFIX}/1.0.0/{layer}/default/{time_part}{tms}/{z}/{y}/{x}.png")


def kvp_tile(s: Served, layer: str, tms: str, z: int, y: int, x: int, **extra
             ) -> requests.Response:
    return get(s.kvp_url, SERVICE="WMTS", REQUEST="GetTile", VERSION="1.0.0", LAYER=layer,
               STYLE="default", FORMAT="image/png", TILEMATRIXSET=tms, TILEMATRIX=z,
               TILEROW=y, TILECOL=x, **extra)


def ok_png(r: requests.Response) -> bytes:
    assert r.status_code == 200, r.text[:500]
    assert r.headers["Content-Type"] == "image/png"
    return r.content


def expected_rgba(values: np.ndarray, color_bar: str, value_range,
                  custom_maps: dict | None = None) -> np.ndarray:
    """What a colour-mapped tile shows for ``values``: the colour bar (a custom colour map
    of the config, else xcube's registry, which adds ``*_alpha`` variants to matplotlib's)
    over the linear value range, 8 bits."""
    from xcube.util.cmaps import ColormapRegistry

    from cube_gen import grid_variables as G

    if color_bar in (custom_maps or {}):
        cmap, norm = G.colormap([tuple(c) for c in custom_maps[color_bar]])
        return (255 * cmap(norm(values))).astype(np.uint8)
    cmap, _ = ColormapRegistry().get_cmap(color_bar)
    if color_bar in matplotlib.colormaps:
        assert np.allclose(cmap(np.linspace(0, 1, 11)),
                           matplotlib.colormaps[color_bar](np.linspace(0, 1, 11)))
    norm = matplotlib.colors.Normalize(*value_range, clip=True)
    return (255 * cmap(norm(values))).astype(np.uint8)


# -- capabilities --------------------------------------------------------------------------
def test_capabilities_with_owslib_rest_and_kvp(served: Served):
    from owslib.wmts import WebMapTileService

    expected_layers = {f"grid.{v}" for v in served.variables} | {"grid.rgb"}
    for url in (served.caps_url, served.kvp_url,
                served.kvp_url + "?SERVICE=WMTS&REQUEST=GetCapabilities"):
        wmts = WebMapTileService(url, timeout=TIMEOUT)
        assert set(wmts.contents) == expected_layers
        assert set(TMS_IDS) <= set(wmts.tilematrixsets)
        for tms_id in TMS_IDS:
            levels = list(wmts.tilematrixsets[tms_id].tilematrix)
            assert levels == [str(i) for i in range(len(levels))]
        for layer_id in expected_layers:
            layer = wmts.contents[layer_id]
            assert set(layer.tilematrixsetlinks) == set(TMS_IDS)
            assert list(layer.styles) == ["default"]
            time_dim = layer.dimensions["Time"]
            assert time_dim["values"] == served.time_labels
            assert time_dim["default"] == served.time_labels[-1]  # the latest step
            assert time_dim["UOM"] == "ISO8601"
            templates = [r["template"] for r in layer.resourceURLs if r["resourceType"] == "tile"]
            assert templates == [f"{served.url}{PREFIX}/1.0.0/{layer_id}/{{Style}}/{{Time}}/"
                                 "{TileMatrixSet}/{TileMatrix}/{TileRow}/{TileCol}.png"]
            lon0, lat0, lon1, lat1 = layer.boundingBoxWGS84
            assert lon0 < -81.8 and lon1 > -80.9 and lat0 < 28.1 and lat1 > 28.9
        ops = {op.name for op in wmts.operations}
        assert {"GetCapabilities", "GetTile"} <= ops


def test_capabilities_time_parameter_sets_the_default(served: Served):
    for url, key in ((served.caps_url, "time"), (served.kvp_url, "TIME")):
        params = {key: "2015-07-01T00:00:00Z"}
        if "kvp" in url:
            params.update(SERVICE="WMTS", REQUEST="GetCapabilities")
        root = ET.fromstring(get(url, **params).content)
        defaults = {d.text for d in root.iter(f"{WMTS}Default")}
        assert defaults == {"2015-01-01"}
    r = get(served.caps_url, time="1999-01-01")
    assert r.status_code == 400 and b"InvalidParameterValue" in r.content


def test_layer_colours_come_from_the_config_or_the_attributes(served: Served):
    from owslib.wmts import WebMapTileService


    configured = served.config["Styles"][0]["ColorMappings"]
    assert ATTR_STYLED not in configured
    contents = WebMapTileService(served.caps_url, timeout=TIMEOUT).contents
    for name in served.variables:
        style = served.styles[name]
        lo, hi = style["ValueRange"]
        abstract = contents[f"grid.{name}"].abstract
        assert f"colour map {style['ColorBar']}, value range [{lo:g}, {hi:g}]" in abstract
    # the attribute fallback: the range fitted at build time, written on the variable
    assert served.styles[ATTR_STYLED]["ValueRange"][1] == \
        served.grid[ATTR_STYLED].attrs["color_value_max"]
    rgb = contents["grid.rgb"].abstract
    for c in "rgb":
        assert f"embedding_{c} [0, 1]" in rgb


# -- tiles: values, time, both tile matrix sets --------------------------------------------
@pytest.mark.parametrize("tms", TMS_IDS)
@pytest.mark.parametrize("layer", ["observation_count", ATTR_STYLED])
def test_gdal_reads_layer_colours_at_a_time(served: Served, tms: str, layer: str,
                                            tmp_path: Path):
    from osgeo import gdal

    style = served.styles[layer]
    env = {**os.environ, "GDAL_ENABLE_WMS_CACHE": "NO", "GDAL_HTTP_TIMEOUT": "60"}
    n_times = served.grid.sizes["time"]
    cases = [(13, f"?time={served.time_labels[13]}"),  # 2023 by its label
             (5, "?time=2015-06-30"),  # any instant inside the step
             (n_times - 1, "")]  # no time: the advertised default, the latest step
    for t_index, query in cases:
        out = tmp_path / f"{tms}-{t_index}.tif"
        source = f"WMTS:{served.caps_url}{query},layer=grid.{layer},tilematrixset={tms}"
        subprocess.run(["gdal_translate", "-q", source, str(out)], check=True, env=env,
                       timeout=120)
        ds = gdal.Open(str(out))
        image = ds.ReadAsArray()  # (4, rows, cols) RGBA
        gt = ds.GetGeoTransform()
        values = served.grid[layer].isel(time=t_index).values
        lon, lat = np.meshgrid(served.grid.lon.values, served.grid.lat.values)
        if tms == "WorldWebMercatorQuad":
            to_3857 = pyproj.Transformer.from_crs("OGC:CRS84", "EPSG:3857", always_xy=True)
            x, y = to_3857.transform(lon, lat)
        else:
            x, y = lon, lat
        cols = np.floor((x - gt[0]) / gt[1]).astype(int)
        rows = np.floor((y - gt[3]) / gt[5]).astype(int)
        got = image[:, rows, cols].transpose(1, 2, 0).astype(int)
        want = expected_rgba(values, style["ColorBar"], style["ValueRange"],
                             served.custom_maps).astype(int)
        diff = np.abs(got - want).max(axis=-1)
        assert (values > 0).sum() > 5  # cells coloured above the bottom of the range
        assert diff.max() <= 2, (f"{(diff > 2).sum()} of {diff.size} cells differ, e.g. "
                                 f"value {values[diff > 2][0]}")
        ds = None


def test_default_time_is_the_advertised_default_everywhere(served: Served):
    tms = "WorldCRS84Quad"
    z, y, x = DATA_TILES[tms]
    layer = "grid.observation_count"
    latest, first = served.time_labels[-1], served.time_labels[0]
    default = ok_png(kvp_tile(served, layer, tms, z, y, x))  # KVP without TIME
    assert ok_png(kvp_tile(served, layer, tms, z, y, x, TIME=latest)) == default
    assert ok_png(kvp_tile(served, layer, tms, z, y, x, TIME="default")) == default
    assert ok_png(rest_tile(served, layer, tms, z, y, x, "default")) == default
    assert ok_png(rest_tile(served, layer, tms, z, y, x, "current")) == default
    assert ok_png(rest_tile(served, layer, tms, z, y, x, latest)) == default
    assert ok_png(rest_tile(served, layer, tms, z, y, x, None)) == default
    # A client that leaves the template's {Time} unfilled gets the default too.
    assert ok_png(rest_tile(served, layer, tms, z, y, x, "%7BTime%7D")) == default
    assert ok_png(kvp_tile(served, layer, tms, z, y, x, TIME=first)) != default


def expected_tile(s: Served, var: str, t_index: int, tms: str, z: int, y: int, x: int
                  ) -> np.ndarray:
    """The RGBA tile computed from the cube: nearest cell per pixel centre, transparent
    outside the grid."""
    n = 256
    i = (np.arange(n) + 0.5)
    if tms == "WorldCRS84Quad":
        res = 180.0 / n / 2**z
        lon = -180.0 + (x * n + i) * res
        lat = 90.0 - (y * n + i) * res
        lon, lat = np.meshgrid(lon, lat)
    else:
        half = np.pi * 6378137.0
        res = 2 * half / n / 2**z
        mx, my = np.meshgrid(-half + (x * n + i) * res, half - (y * n + i) * res)
        to_lonlat = pyproj.Transformer.from_crs("EPSG:3857", "OGC:CRS84", always_xy=True)
        lon, lat = to_lonlat.transform(mx, my)
    glon, glat = s.grid.lon.values, s.grid.lat.values
    col = np.rint((lon - glon[0]) / (glon[1] - glon[0])).astype(int)
    row = np.rint((lat - glat[0]) / (glat[1] - glat[0])).astype(int)
    inside = (col >= 0) & (col < len(glon)) & (row >= 0) & (row < len(glat))
    def cells(name: str) -> np.ndarray:
        return s.grid[name].isel(time=t_index).values[np.where(inside, row, 0),
                                                      np.where(inside, col, 0)]

    style = s.styles[var]
    if var == "rgb":  # direct RGB: each channel scaled by its range, opaque where all finite
        channels = [cells(style[c]["Variable"]) for c in ("Red", "Green", "Blue")]
        out = np.zeros((n, n, 4), dtype=np.uint8)
        for k, (c, v) in enumerate(zip(("Red", "Green", "Blue"), channels, strict=True)):
            norm = matplotlib.colors.Normalize(*style[c]["ValueRange"], clip=True)
            out[..., k] = (255 * np.nan_to_num(np.ma.filled(norm(v), 0.0))).astype(np.uint8)
        out[..., 3] = np.where(np.isfinite(sum(channels)), 255, 0)
    else:
        out = expected_rgba(cells(var), style["ColorBar"], style["ValueRange"], s.custom_maps)
    out[~inside] = 0
    return out


@pytest.mark.parametrize("tms", TMS_IDS)
def test_time_parameter_selects_the_step(served: Served, tms: str):
    z, y, x = DATA_TILES[tms]
    var = "observation_count"
    layer = f"grid.{var}"
    distinct = set()
    for t_index, label in enumerate(served.time_labels):
        png = ok_png(kvp_tile(served, layer, tms, z, y, x, TIME=label))
        distinct.add(png)
        assert ok_png(rest_tile(served, layer, tms, z, y, x, label)) == png
        year = label[:4]
        for other in (year, f"{year}-07-04T10:30:00Z", f"{year}-12-31T23:59:59+00:00"):
            assert ok_png(kvp_tile(served, layer, tms, z, y, x, TIME=other)) == png
        got = rgba(png).astype(int)
        want = expected_tile(served, var, t_index, tms, z, y, x).astype(int)
        bad = np.abs(got - want).max(axis=-1) > 2
        assert bad.mean() < 0.002, f"{label}: {bad.sum()} pixels differ"
    assert len(distinct) > 5


def test_owslib_gets_tiles_by_kvp_and_rest(served: Served):
    from owslib.wmts import WebMapTileService

    wmts = WebMapTileService(served.caps_url, timeout=TIMEOUT)
    for tms in TMS_IDS:
        z, y, x = DATA_TILES[tms]
        for var, label in (("observation_count", "2024-01-01"), ("rgb", "2020-01-01"),
                           (ATTR_STYLED, "2019-01-01")):
            kvp = wmts.gettile(layer=f"grid.{var}", tilematrixset=tms, tilematrix=str(z),
                               row=y, column=x, format="image/png", TIME=label).read()
            rest_url = wmts.buildTileResource(layer=f"grid.{var}", tilematrixset=tms,
                                              tilematrix=str(z), row=y, column=x, Time=label)
            assert kvp == ok_png(get(rest_url))
            got = rgba(kvp).astype(int)
            want = expected_tile(served, var, served.time_labels.index(label), tms, z, y, x)
            assert (want[..., 3] > 0).any()
            bad = np.abs(got - want.astype(int)).max(axis=-1) > 2
            assert bad.mean() < 0.002, f"{var} {label}: {bad.sum()} pixels differ"


def test_tiles_outside_the_data_are_transparent(served: Served):
    for tms, tiles in EMPTY_TILES.items():
        for z, y, x in tiles:
            for layer in ("grid.observation_count", "grid.rgb"):
                for r in (rest_tile(served, layer, tms, z, y, x, "2020-01-01"),
                          kvp_tile(served, layer, tms, z, y, x)):
                    image = rgba(ok_png(r))
                    assert image.shape == (256, 256, 4)
                    assert (image[..., 3] == 0).all(), (tms, z, y, x, layer)
        z, y, x = DATA_TILES[tms]
        assert (rgba(ok_png(rest_tile(served, "grid.observation_count", tms, z, y, x)))
                [..., 3] > 0).any()


def test_zoomed_out_tile_holds_the_data(served: Served):
    # Level 0 of WorldCRS84Quad: column 0 is the western hemisphere (Florida included).
    # (A colour bar without alpha ramp: cells with 0 are opaque too.)
    image = rgba(ok_png(rest_tile(served, f"grid.{ATTR_STYLED}", "WorldCRS84Quad", 0, 0, 0)))
    assert 0 < (image[..., 3] == 255).sum() < 100


def _exception(r: requests.Response) -> tuple[str, str | None]:
    assert r.headers["Content-Type"].startswith("application/xml"), r.text[:300]
    assert b"Traceback" not in r.content
    root = ET.fromstring(r.content)
    assert root.tag == f"{OWS}ExceptionReport"
    exc = root.find(f"{OWS}Exception")
    assert exc.find(f"{OWS}ExceptionText").text
    return exc.get("exceptionCode"), exc.get("locator")


def test_errors_are_ows_exception_reports(served: Served):
    tms = "WorldCRS84Quad"
    layer = "grid.observation_count"
    cases = [
        (kvp_tile(served, "grid.nope", tms, 0, 0, 0), 400, "InvalidParameterValue", "LAYER"),
        (kvp_tile(served, layer, "EPSG:4326", 0, 0, 0), 400, "InvalidParameterValue",
         "TILEMATRIXSET"),
        (kvp_tile(served, layer, tms, 0, 0, 0, TIME="1999-01-01"), 400,
         "InvalidParameterValue", "TIME"),
        (kvp_tile(served, layer, tms, 0, 0, 0, TIME="yesterday"), 400,
         "InvalidParameterValue", "TIME"),
        (kvp_tile(served, layer, tms, 0, 5, 0), 400, "TileOutOfRange", "TILEROW"),
        (kvp_tile(served, layer, tms, 0, 0, "x"), 400, "InvalidParameterValue", "TILECOL"),
        (kvp_tile(served, layer, tms, 30, 0, 0), 400, "InvalidParameterValue", "TILEMATRIX"),
        (get(served.kvp_url, SERVICE="WMTS", REQUEST="GetTile", LAYER=layer), 400,
         "MissingParameterValue", "TILEMATRIXSET"),
        (get(served.kvp_url, SERVICE="WMTS", REQUEST="GetTile", LAYER=layer,
             TILEMATRIXSET=tms, TILEMATRIX=0, TILEROW=0, TILECOL=0, FORMAT="image/jpeg"),
         400, "InvalidParameterValue", "FORMAT"),
        (get(served.kvp_url, SERVICE="WMTS", REQUEST="GetFeatureInfo"), 501,
         "OperationNotSupported", "REQUEST"),
        # SERVICE=WMS&REQUEST=GetCapabilities is QGIS's probe of a pasted URL: answered
        (get(served.kvp_url, SERVICE="WMS", REQUEST="GetMap"), 400,
         "InvalidParameterValue", "SERVICE"),
        (get(served.kvp_url, SERVICE="WMTS"), 400, "MissingParameterValue", "REQUEST"),
        (get(served.kvp_url, SERVICE="WMTS", REQUEST="GetCapabilities",
             ACCEPTVERSIONS="2.0.0"), 400, "VersionNegotiationFailed", "ACCEPTVERSIONS"),
        (rest_tile(served, layer, tms, 0, 0, 0, "1999"), 400, "InvalidParameterValue",
         "Time"),
        (get(f"{served.url}{PREFIX}/1.0.0/{layer}/fancy/2020/{tms}/0/0/0.png"), 400,
         "InvalidParameterValue", "style"),
        (get(f"{served.url}{PREFIX}/1.0.0/{layer}/default"), 404, "InvalidParameterValue",
         None),
        (requests.post(served.kvp_url, timeout=TIMEOUT), 405, "OperationNotSupported", None),
    ]
    for r, status, code, locator in cases:
        assert r.status_code == status, (r.url, r.status_code, r.text[:300])
        assert _exception(r) == (code, locator), r.url


def test_legend(served: Served):
    image = rgba(ok_png(get(f"{served.url}{PREFIX}/legend/grid.observation_count.png")))
    assert image.shape[1] > 100 and (image[..., 3] > 0).any()
    r = get(f"{served.url}{PREFIX}/legend/grid.nope.png")
    assert r.status_code == 404 and _exception(r)[0] == "InvalidParameterValue"


def test_wmts_work_runs_off_the_io_loop(served: Served):
    """Tiles rendered concurrently with capabilities: nothing blocks, all answers agree."""
    from concurrent.futures import ThreadPoolExecutor

    tms = "WorldWebMercatorQuad"
    z, y, x = DATA_TILES[tms]
    layers = [f"grid.{v}" for v in served.variables[:6]]
    with ThreadPoolExecutor(8) as pool:
        tiles = list(pool.map(lambda lid: rest_tile(served, lid, tms, z, y, x, "2022")
                              .status_code, layers * 3))
        caps = list(pool.map(lambda _: get(served.caps_url).status_code, range(4)))
    assert set(tiles) == {200} and set(caps) == {200}


# -- S3 ------------------------------------------------------------------------------------
def test_s3_cube_set_serves_the_same_bytes(served: Served, s3, s3_cubes: str,
                                           tmp_path_factory: pytest.TempPathFactory):
    """``xcube serve`` with the plugin over s3://deepearth/cubes answers byte-identically."""
    config = wmts_config(s3_cubes, storage_options=s3.storage_options)
    assert config["DeepEarth"]["CubeSet"] == s3_cubes
    with xcube_serve(config, tmp_path_factory.mktemp("wmts-serve-s3"), env=s3.env) as url:
        health = requests.get(url + "/deepearth/health", timeout=TIMEOUT).json()
        assert health["status"] == "ok", health

        def both(path: str, **params) -> tuple[bytes, bytes]:
            a = requests.get(served.url + path, params=params, timeout=TIMEOUT)
            b = requests.get(url + path, params=params, timeout=TIMEOUT)
            assert a.status_code == b.status_code == 200, (path, a.text[:200], b.text[:200])
            return a.content, b.content

        local, remote = both(f"{PREFIX}/1.0.0/WMTSCapabilities.xml")
        assert local.replace(served.url.encode(), b"") == remote.replace(url.encode(), b"")
        for tms, (z, y, x) in DATA_TILES.items():
            for layer in ("grid.observation_count", "grid.species_richness", "grid.rgb"):
                for t in ("2019-01-01", "default"):
                    a, b = both(f"{PREFIX}/1.0.0/{layer}/default/{t}/{tms}/{z}/{y}/{x}.png")
                    assert a == b
            a, b = both(f"{PREFIX}/kvp", SERVICE="WMTS", REQUEST="GetTile",
                        LAYER="grid.vision_count", TILEMATRIXSET=tms, TILEMATRIX=z,
                        TILEROW=y, TILECOL=x, TIME="2024")
            assert a == b
        a, b = both("/tiles/grid/observation_count/7/43/70", crs="CRS84", vmin=0, vmax=50,
                    time="2023-01-01")
        assert a == b and rgba(a)[..., 3].any()
        for path, params in (("/deepearth/observations", {"limit": 50}),
                             ("/deepearth/species", {}),
                             ("/deepearth/embeddings", {"limit": 6})):
            a, b = both(path, **params)
            assert a == b
        embeddings = requests.get(url + "/deepearth/embeddings", params={"limit": 2},
                                  timeout=TIMEOUT).json()["embeddings"]
        for e in embeddings:
            base = f"/deepearth/embeddings/{e['gbif_id']}/{e['image_number']}"
            for path in ("/pooled", "/attention.png", "/stats"):
                a, b = both(base + path)
                assert a == b, path
