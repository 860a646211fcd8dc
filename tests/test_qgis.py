"""QGIS 3.22 (Debian ``python3-qgis``, offscreen, the system python3) as a client of the
WMS-T and OGC API - Features, driven in a subprocess.

QGIS loads the WMS layer as the Add Layer dialog writes it (``type=wmst`` with the time
dimension of the capabilities), so the layer has temporal capabilities and the Temporal
Controller steps through the years; two frames are rendered and compared with the server's
own GetMap of those years and with the data.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import requests
import xarray as xr
from PIL import Image

from cube_gen import schema as S
from cube_gen.reader import SourceDataset

SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin") or "/usr/bin/python3"

QGIS_SCRIPT = r'''
import json, os, sys, urllib.request, xml.etree.ElementTree as ET
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
from qgis.core import (QgsApplication, QgsCoordinateReferenceSystem, QgsDateTimeRange,
                       QgsInterval, QgsMapRendererSequentialJob, QgsMapSettings,
                       QgsRasterLayer, QgsRectangle, QgsTemporalNavigationObject,
                       QgsVectorLayer, QgsUnitTypes)
from qgis.PyQt.QtCore import QDate, QDateTime, QSize, QTime, Qt
from qgis.PyQt.QtGui import QColor

args = json.loads(sys.argv[1])
QgsApplication.setPrefixPath("/usr", True)
app = QgsApplication([], False)
app.initQgis()
out = {}

# -- WMS-T: the layer as QGIS's dialog adds it --------------------------------------------
caps = urllib.request.urlopen(args["wms"] + "?SERVICE=WMS&REQUEST=GetCapabilities").read()
ns = {"w": "http://www.opengis.net/wms"}
dim = None
for layer in ET.fromstring(caps).iter("{http://www.opengis.net/wms}Layer"):
    name = layer.find("w:Name", ns)
    if name is not None and name.text == args["layer"]:
        dim = layer.find("w:Dimension", ns).text
uri = ("crs=EPSG:4326&format=image/png&layers=" + args["layer"] + "&styles=&url="
       + args["wms"] + "&type=wmst&timeDimensionExtent=" + dim
       + "&allowTemporalUpdates=true&temporalSource=provider")
rl = QgsRasterLayer(uri, "wmst", "wms")
out["wms_valid"] = rl.isValid()
out["wms_error"] = "" if rl.isValid() else "invalid layer: " + uri
if not rl.isValid():
    print("RESULT " + json.dumps(out), flush=True)
    os._exit(0)
caps_t = rl.dataProvider().temporalCapabilities()
out["temporal"] = bool(caps_t.hasTemporalCapabilities())
out["temporal_active"] = bool(rl.temporalProperties().isActive())
rng = caps_t.availableTemporalRange()
out["temporal_range"] = [rng.begin().toString(Qt.ISODate), rng.end().toString(Qt.ISODate)]

# the Temporal Controller: whole data range, one year per frame
nav = QgsTemporalNavigationObject()
y0, y1 = args["years"][0], args["years"][-1]
nav.setTemporalExtents(QgsDateTimeRange(QDateTime(QDate(y0, 1, 1), QTime(0, 0), Qt.UTC),
                                        QDateTime(QDate(y1 + 1, 1, 1), QTime(0, 0), Qt.UTC)))
nav.setFrameDuration(QgsInterval(1, QgsUnitTypes.TemporalYears))
out["frames"] = nav.totalFrameCount()
w, s, e, n = args["bbox"]
images = []
for year in args["render_years"]:
    frame = year - y0
    r = nav.dateTimeRangeForFrameNumber(frame)
    ms = QgsMapSettings()
    ms.setLayers([rl])
    ms.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:4326"))
    ms.setExtent(QgsRectangle(w, s, e, n))
    ms.setOutputSize(QSize(args["width"], args["height"]))
    ms.setBackgroundColor(QColor(0, 0, 0, 0))
    ms.setIsTemporal(True)
    ms.setTemporalRange(r)
    job = QgsMapRendererSequentialJob(ms)
    job.start()
    job.waitForFinished()
    path = os.path.join(args["out"], f"frame-{year}.png")
    job.renderedImage().save(path, "PNG")
    images.append({"year": year, "path": path, "begin": r.begin().toString(Qt.ISODate)})
out["images"] = images

# -- OGC API - Features -------------------------------------------------------------------
vl = QgsVectorLayer(f"url='{args['ogcapi']}' typename='observations'", "obs", "OAPIF")
out["oapif_valid"] = vl.isValid()
out["oapif_fields"] = [f.name() for f in vl.fields()]
out["oapif_count"] = sum(1 for _ in vl.getFeatures())
vl2 = QgsVectorLayer(f"url='{args['ogcapi']}' typename='observations_with_embeddings'",
                     "obs2", "OAPIF")
out["oapif_vision_count"] = sum(1 for _ in vl2.getFeatures())
print("RESULT " + json.dumps(out), flush=True)
os._exit(0)  # QGIS 3.22 can crash in its exit handlers offscreen; the result is out
'''


def _has_qgis() -> bool:
    try:
        return subprocess.run([SYSTEM_PYTHON, "-c", "import qgis.core"], capture_output=True,
                              timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(not _has_qgis(), reason="QGIS (python3-qgis) is not installed; "
                                "scripts/install.sh installs it")


def _rgba(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))


@pytest.fixture(scope="module")
def qgis_run(served, tiny_cubes, tmp_path_factory):
    out = tmp_path_factory.mktemp("qgis")
    ds = xr.open_zarr(tiny_cubes / S.CUBE_PATHS[S.GRID] / "0.zarr", consolidated=True).load()
    years = pd.DatetimeIndex(ds.time.values).year.tolist()
    per_year = ds.observation_count.sum(("lat", "lon")).values
    render_years = [years[i] for i in np.argsort(per_year)[-2:]]
    res = float(ds.attrs["spatial_res"])
    bbox = [float(ds.lon.min() - res / 2), float(ds.lat.min() - res / 2),
            float(ds.lon.max() + res / 2), float(ds.lat.max() + res / 2)]
    args = {"wms": served.url + "/deepearth/wms", "ogcapi": served.url + "/deepearth/ogcapi",
            "layer": "grid.observation_count", "years": years, "render_years": render_years,
            "bbox": bbox, "width": ds.sizes["lon"], "height": ds.sizes["lat"],
            "out": str(out)}
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "HOME": str(out),
           "XDG_RUNTIME_DIR": str(out), "XDG_CACHE_HOME": str(out / "cache")}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([SYSTEM_PYTHON, "-c", QGIS_SCRIPT, json.dumps(args)],
                          capture_output=True, text=True, timeout=600, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"QGIS run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                  f"{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):]), args, ds


def test_qgis_loads_the_wms_t_layer_with_temporal_capabilities(qgis_run):
    res, args, _ = qgis_run
    assert res["wms_valid"], res["wms_error"]
    assert res["temporal"] and res["temporal_active"]
    assert res["temporal_range"][0].startswith(str(args["years"][0]))
    assert res["temporal_range"][1].startswith(str(args["years"][-1]))
    assert res["frames"] == len(args["years"])


def test_qgis_renders_two_years_that_differ_as_the_data_do(qgis_run, served):
    res, args, ds = qgis_run
    frames = {}
    for img in res["images"]:
        year = img["year"]
        assert img["begin"].startswith(str(year))
        got = np.asarray(Image.open(img["path"]).convert("RGBA"))
        t = pd.DatetimeIndex(ds.time.values).year.tolist().index(year)
        counts = ds.observation_count.values[t]
        # one screen pixel per cell: coloured exactly where that year has observations
        coloured = got[..., 3] > 0
        assert (coloured == (counts > 0)).mean() > 0.995, year
        # and the colours are the server's own GetMap colours for that year
        w, s, e, n = args["bbox"]
        r = requests.get(args["wms"], params={
            "SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap",
            "LAYERS": args["layer"], "STYLES": "", "CRS": "EPSG:4326",
            "BBOX": f"{s},{w},{n},{e}", "WIDTH": args["width"], "HEIGHT": args["height"],
            "FORMAT": "image/png", "TRANSPARENT": "TRUE", "TIME": f"{year}-01-01"},
            timeout=60)
        want = _rgba(r.content)
        both = coloured & (want[..., 3] > 0)
        diff = np.abs(got[both][:, :3].astype(int) - want[both][:, :3].astype(int)).max(axis=1)
        assert (diff <= 2).mean() >= 0.9  # QGIS may shift a cell edge by a pixel
        frames[year] = (got, counts)
    (a, ca), (b, cb) = frames.values()
    assert ((a[..., 3] > 0) != (b[..., 3] > 0)).any()
    assert ((ca > 0) != (cb > 0)).any()


def test_qgis_loads_the_observations_as_ogc_api_features(qgis_run, tiny_source):
    res, _, _ = qgis_run
    obs = SourceDataset(str(tiny_source)).read_observations()
    assert res["oapif_valid"]
    assert res["oapif_count"] == len(obs)
    assert res["oapif_vision_count"] == int(obs.has_vision.sum())
    assert {"taxon_name", "datetime", "species_umap_x", "species_cluster"} <= set(
        res["oapif_fields"])
