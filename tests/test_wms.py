"""The WMS 1.3.0 with TIME (server/wms), with OWSLib and GDAL as clients, and the readable-map
check of the all-years richness map on demo-like data (in-process)."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from PIL import Image

from cube_gen import grid_variables as G
from cube_gen import schema as S

TIMEOUT = 60


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))


@pytest.fixture(scope="module")
def wms_url(served) -> str:
    return served.url + "/deepearth/wms"


@pytest.fixture(scope="module")
def wms(wms_url):
    from owslib.wms import WebMapService

    return WebMapService(wms_url, version="1.3.0", timeout=TIMEOUT)


def _level0(cubes, cube: str) -> xr.Dataset:
    return xr.open_zarr(cubes / S.CUBE_PATHS[cube] / "0.zarr", consolidated=True).load()


def _expected_rgba(ds: xr.Dataset, name: str, t: int) -> np.ndarray:
    """The colours of a layer's level-0 cells as the registry defines them."""
    var = G.lookup(name, ds[name].attrs)
    stops = G.color_stops(var, ds[name].attrs["color_value_min"],
                          ds[name].attrs["color_value_max"])
    cmap, norm = G.colormap(stops)
    v = ds[name].values[t]
    rgba = cmap(norm(np.ma.masked_invalid(v)), bytes=True)
    rgba[~np.isfinite(v)] = 0
    return rgba


def test_capabilities_list_every_grid_dataset_with_time(wms, tiny_cubes):
    names = set(wms.contents)
    for cube in S.GRID_CUBES:
        assert any(n.startswith(f"{cube}.") for n in names), cube
    assert {"grid.observation_count", "grid_all_years.species_richness", "grid.rgb",
            "grid_month_of_year.observation_count"} <= names
    layer = wms["grid.observation_count"]
    years = pd.DatetimeIndex(_level0(tiny_cubes, S.GRID).time.values).strftime("%Y-%m-%d")
    assert layer.timepositions == list(years)
    assert layer.defaulttimeposition == years[-1]
    assert {"EPSG:4326", "EPSG:3857"} <= set(layer.crsOptions)
    assert len(wms["grid_month_of_year.observation_count"].timepositions) == 12
    assert not wms["grid_all_years.species_richness"].timepositions  # one step: no TIME
    assert layer.queryable == 1
    legend = layer.styles["default"]["legend"]
    r = __import__("requests").get(legend, timeout=TIMEOUT)
    assert r.status_code == 200 and _png(r.content).shape[1] == 340


def test_getmap_is_exact_to_the_cell_and_years_differ(wms, tiny_cubes):
    ds = _level0(tiny_cubes, S.GRID)
    res = float(ds.attrs["spatial_res"])
    lat, lon = ds.lat.values, ds.lon.values
    s, n = float(lat.min() - res / 2), float(lat.max() + res / 2)
    w, e = float(lon.min() - res / 2), float(lon.max() + res / 2)
    counts = ds.observation_count.values
    busiest = np.argsort(counts.sum(axis=(1, 2)))[-2:]
    images = {}
    for t in busiest:
        time = pd.Timestamp(ds.time.values[t]).strftime("%Y-%m-%d")
        img = wms.getmap(layers=["grid.observation_count"], styles=[""], srs="EPSG:4326",
                         bbox=(w, s, e, n), size=(len(lon), len(lat)), format="image/png",
                         transparent=True, time=time)
        rgba = _png(img.read())
        # one pixel per cell: transparent exactly where the year has no observation, and
        # the registry's colour elsewhere
        np.testing.assert_array_equal(rgba[..., 3] > 0, counts[t] > 0)
        np.testing.assert_array_equal(rgba, _expected_rgba(ds, "observation_count", t))
        images[t] = rgba
    a, b = images.values()
    assert (a != b).any()  # two years, two maps, as the data differ


def test_getmap_in_web_mercator_places_the_data(wms, tiny_cubes):
    ds = _level0(tiny_cubes, S.GRID_ALL_YEARS)
    w, s, e, n = ds.attrs["data_bbox"]

    def merc(lon, lat):
        return (math.radians(lon) * 6378137.0,
                math.log(math.tan(math.pi / 4 + math.radians(lat) / 2)) * 6378137.0)
    x0, y0 = merc(w, s)
    x1, y1 = merc(e, n)
    img = wms.getmap(layers=["grid_all_years.observation_count"], styles=[""],
                     srs="EPSG:3857", bbox=(x0, y0, x1, y1), size=(256, 256),
                     format="image/png", transparent=True)
    rgba = _png(img.read())
    assert rgba.shape == (256, 256, 4)
    coloured = rgba[..., 3] > 0
    assert 0.001 < coloured.mean() < 1
    # a map east of the data is empty (transparent)
    img = wms.getmap(layers=["grid_all_years.observation_count"], styles=[""],
                     srs="EPSG:3857", bbox=(x1 + 1e5, y0, x1 + 2e5, y1), size=(64, 64),
                     format="image/png", transparent=True)
    assert (_png(img.read())[..., 3] == 0).all()


def test_getfeatureinfo_returns_the_cells_values(wms, tiny_cubes):
    ds = _level0(tiny_cubes, S.GRID)
    res = float(ds.attrs["spatial_res"])
    t, iy, ix = np.unravel_index(int(np.argmax(ds.observation_count.values)),
                                 ds.observation_count.shape)
    lat, lon = float(ds.lat[iy]), float(ds.lon[ix])
    # OWSLib takes x/y (lon/lat) and writes the EPSG:4326 lat/lon order of WMS 1.3.0
    bbox = (lon - 5 * res, lat - 5 * res, lon + 5 * res, lat + 5 * res)
    time = pd.Timestamp(ds.time.values[t]).strftime("%Y-%m-%d")
    r = wms.getfeatureinfo(layers=["grid.observation_count"], srs="EPSG:4326", bbox=bbox,
                           size=(100, 100), format="image/png",
                           query_layers=["grid.observation_count"],
                           info_format="application/json", xy=(50, 50), time=time)
    import json

    (feat,) = json.loads(r.read())["features"]
    props = feat["properties"]
    assert props["time"] == time
    assert props["observation_count"] == float(ds.observation_count.values[t, iy, ix])
    assert props["sampling_effort"] == float(ds.sampling_effort.values[t, iy, ix])
    w, s, e, n = (np.array(feat["geometry"]["coordinates"][0])[[0, 0, 2, 2], [0, 1, 0, 1]])
    assert w == pytest.approx(lon - res / 2) and n == pytest.approx(lat + res / 2)
    text = wms.getfeatureinfo(layers=["grid.observation_count"], srs="EPSG:4326",
                              bbox=bbox, size=(100, 100), format="image/png",
                              query_layers=["grid.observation_count"],
                              info_format="text/plain", xy=(50, 50), time=time).read().decode()
    assert f"observation_count = {ds.observation_count.values[t, iy, ix]:g}" in text


@pytest.mark.parametrize("params, code", [
    ({"LAYERS": "grid.nope"}, "LayerNotDefined"),
    ({"CRS": "EPSG:32617"}, "InvalidCRS"),
    ({"TIME": "1999-01-01"}, "InvalidDimensionValue"),
    ({"TIME": "yesterday"}, "InvalidDimensionValue"),
    ({"BBOX": "1,2,3"}, "InvalidParameterValue"),
    ({"WIDTH": "99999"}, "InvalidParameterValue"),
    ({"FORMAT": "image/gif"}, "InvalidFormat"),
    ({"STYLES": "fancy"}, "StyleNotDefined"),
])
def test_errors_are_service_exception_reports(wms_url, params, code):
    import requests

    q = {"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap",
         "LAYERS": "grid.observation_count", "STYLES": "", "CRS": "EPSG:4326",
         "BBOX": "28,-82,29,-81", "WIDTH": "64", "HEIGHT": "64", "FORMAT": "image/png",
         **params}
    r = requests.get(wms_url, params=q, timeout=TIMEOUT)
    assert r.status_code == 400
    assert "ServiceExceptionReport" in r.text and f'code="{code}"' in r.text
    assert "Traceback" not in r.text


def test_bare_url_answers_capabilities_as_qgis_asks(wms_url):
    import requests

    for url in (wms_url, wms_url + "?SERVICE=WMS&REQUEST=GetCapabilities",
                wms_url + "?service=wms&request=GetCapabilities&version=1.3.0"):
        r = requests.get(url, timeout=TIMEOUT)
        assert r.status_code == 200 and "<WMS_Capabilities" in r.text


def test_gdal_reads_the_wms_and_the_wmts(served, tiny_cubes):
    from osgeo import gdal

    gdal.UseExceptions()
    ds = _level0(tiny_cubes, S.GRID_ALL_YEARS)
    w, s, e, n = ds.attrs["data_bbox"]
    url = (f"WMS:{served.url}/deepearth/wms?SERVICE=WMS&VERSION=1.3.0&REQUEST=GetMap"
           f"&LAYERS=grid_all_years.observation_count&CRS=EPSG:4326&BBOX={s},{w},{n},{e}"
           "&FORMAT=image/png&TRANSPARENT=TRUE")
    src = gdal.Open(url)
    assert src.RasterCount == 4
    band = src.GetRasterBand(4)
    alpha = band.ReadAsArray(0, 0, src.RasterXSize, src.RasterYSize, 256, 256)
    assert 0 < (alpha > 0).mean() < 1
    # WMTS: the deepest tile matrix gives a finest cell at least 4 tile pixels
    cap = f"{served.url}/deepearth/wmts/1.0.0/WMTSCapabilities.xml"
    wmts = gdal.Open(f"WMTS:{cap},layer=grid_all_years.observation_count,"
                     "tilematrixset=WorldCRS84Quad")
    px = abs(wmts.GetGeoTransform()[1])
    assert float(ds.attrs["spatial_res"]) / px >= 4
    assert wmts.RasterCount == 4


# -- readable maps on demo-like data (in-process: grid stage + WMS rendering) --------------
@pytest.fixture(scope="module")
def demo_all_years():
    """The all-years pyramid of the demo preset's 33,665 observations (no images)."""
    from cube_gen import grid as GR
    from cube_gen import source_layout as L
    from cube_gen import synth
    from cube_gen.recipe import parse_recipe

    rng = np.random.default_rng(0)
    p = synth.PRESETS["demo"]
    species = synth._species_table(rng, p.n_species)
    synth._language_embeddings(rng, species)  # same random stream as the demo
    obs = synth._observations(rng, p, species)
    t = pd.to_datetime(dict(year=obs.year, month=obs.month.fillna(1), day=obs.day.fillna(1)))
    pts = GR.Points(obs.latitude.to_numpy(), obs.longitude.to_numpy(),
                    t.to_numpy("datetime64[ns]"), obs.sp.to_numpy(),
                    np.where(obs.month.isna(), 0, 2))
    none = GR.Points(np.zeros(0), np.zeros(0), np.zeros(0, "datetime64[ns]"),
                     np.zeros(0, np.int64))
    cfg = parse_recipe({"source": {"path": "x"}, "target": {"path": "y"}}).cubes["grid"]
    bbox = (L.BBOX["west"], L.BBOX["south"], L.BBOX["east"], L.BBOX["north"])
    return GR.build_pyramid(GR.GRID_DATASETS[S.GRID_ALL_YEARS], cfg, bbox, pts, none, None,
                            list(species.taxon_name), [], {"title": "demo"})


def test_all_years_richness_map_of_the_demo_is_readable(demo_all_years):
    from server.wms import render as R
    from server.wms.layers import dataset_layers

    levels = demo_all_years
    layer = {x.name: x for x in dataset_layers(S.GRID_ALL_YEARS, "demo", levels)}[
        f"{S.GRID_ALL_YEARS}.species_richness"]

    def read(_ds, lv, name, t):
        return levels[lv][name].values[t]
    w, s, e, n = layer.bbox
    for width in (256, 768):  # the region in one tile, and zoomed in
        view = R.MapView("CRS:84", layer.bbox, width, int(width * (n - s) / (e - w)))
        values = R.sample(layer, read, view, 0)
        rgba = R.colorize(layer, values)
        coloured = rgba[..., 3] > 0
        assert coloured.mean() >= 0.35, coloured.mean()  # of the data's extent
        distinct = len(np.unique(rgba[coloured].reshape(-1, 4), axis=0))
        assert distinct >= 20, distinct
        top = layer.stops[-1][0]
        assert (values[0][coloured] >= top).mean() <= 0.02
    # the finest level: a typical cell holds several observations
    counts = levels[0].observation_count.values
    assert np.median(counts[counts > 0]) >= 3


def test_wmts_kvp_url_works_as_pasted_into_qgis(served):
    import requests

    # QGIS appends SERVICE=WMS&REQUEST=GetCapabilities to the bare URL in its dialog
    r = requests.get(served.url + "/deepearth/wmts/kvp",
                     params={"SERVICE": "WMS", "REQUEST": "GetCapabilities"}, timeout=TIMEOUT)
    assert r.status_code == 200 and "http://www.opengis.net/wmts/1.0" in r.text
    assert "grid_all_years.species_richness" in r.text
