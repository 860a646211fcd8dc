"""cube_gen.stac: the catalogue of the tiny cubes, validated offline against the STAC schemas."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pystac
import pytest
import torch
import xarray as xr

from cube_gen import schema as S
from cube_gen.access import CubeSet
from cube_gen.cli import main
from cube_gen.predictions import write_predictions
from cube_gen.stac import DATACUBE, FsspecStacIO, catalog_dicts, validate_catalog


@pytest.fixture(scope="module")
def cubes_with_run(tiny_cubes, tmp_path_factory):
    """A copy of the tiny cubes with one predictions run in it."""
    path = tmp_path_factory.mktemp("stac") / "cubes"
    shutil.copytree(tiny_cubes, path, symlinks=True)
    cs = CubeSet.open(str(path))
    t = cs.image_table()
    logits = torch.nn.functional.one_hot(torch.tensor(t.species_index.to_numpy()).long(), 12).float()
    write_predictions(cs, logits, t.species_index.to_numpy(), np.arange(len(t)),
                      np.zeros(len(t), np.int8), run_id="run1", run_name="probe", task="probe",
                      model="linear", features="pooled", metrics={"test_top1": 0.5},
                      cube={"url": cs.url, "version": None, "recipe": cs.manifest["recipe"]})
    return path


def _no_network(monkeypatch):
    """pystac may read local files, never a URL (a schema fetched from the web)."""
    original = pystac.stac_io.DefaultStacIO.read_text

    def local_only(self, source, *a, **k):
        if str(source).startswith(("http://", "https://")):
            raise AssertionError(f"tried to fetch {source}")
        return original(self, source, *a, **k)
    monkeypatch.setattr(pystac.stac_io.DefaultStacIO, "read_text", local_only)


def test_deepearth_stac_writes_a_valid_catalogue(cubes_with_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "stac"
    assert main(["stac", str(cubes_with_run), "--out", str(out)]) == 0
    assert "catalog.json" in capsys.readouterr().out
    _no_network(monkeypatch)  # everything below is offline: schemas come with pystac
    cat = pystac.Catalog.from_file(str(out / "catalog.json"))
    cubes = {c for c in S.CUBES if (cubes_with_run / S.CUBE_PATHS[c]).exists()}
    assert {"observations", "species", "vision", "grid"} <= cubes
    assert validate_catalog(cat) == 1 + len(cubes) + 1 + 1  # catalogue, cubes, predictions, run
    ids = {c.id for c in cat.get_collections()}
    assert ids == cubes | {"predictions"}
    manifest = json.loads((cubes_with_run / "cubeset.json").read_text())
    obs_times = xr.open_zarr(cubes_with_run / "observations.zarr").time.values
    for c in cat.get_collections():
        assert c.extent.spatial.bboxes[0] == pytest.approx(manifest["bbox"])
        if c.id != "predictions":
            assert c.extra_fields["deepearth:recipe"] == manifest["recipe"]
            assert c.extra_fields["deepearth:source"]["version"] == "0.2.0"
            assert DATACUBE in c.stac_extensions
            # assets point at cubes that open
            href = c.assets["zarr"].href
            assert xr.open_zarr(href + ("/0.zarr" if href.endswith(".levels") else ""),
                                consolidated=True) is not None
    obs = cat.get_child("observations")
    lo, hi = obs.extent.temporal.intervals[0]
    assert pd.Timestamp(lo).tz_localize(None) == pd.Timestamp(obs_times.min())
    assert pd.Timestamp(hi).tz_localize(None) == pd.Timestamp(obs_times.max())
    vision = cat.get_child("vision")
    v = vision.extra_fields["cube:variables"]
    assert v["features"]["dimensions"] == ["image", "frame", "patch_y", "patch_x", "feature"]
    assert v["features"]["deepearth:dtype"] == "float16"
    assert "deepearth:derived" in v["pooled"] and "deepearth:derived" not in v["features"]
    assert vision.extra_fields["deepearth:quantisation"]["features"]["dtype"] == "float16"
    assert vision.extra_fields["cube:dimensions"]["feature"]["extent"] == [0, 1407]
    grid = cat.get_child("grid")
    dims = grid.extra_fields["cube:dimensions"]
    assert dims["lon"]["type"] == "spatial" and dims["lon"]["axis"] == "x"
    assert dims["time"]["type"] == "temporal"
    parents = {link.get_target_str().split("/")[-2] for link in grid.get_links("derived_from")}
    assert parents == {"observations", "vision"}
    item = cat.get_child("predictions").get_item("run1")
    assert item.properties["deepearth:metrics"]["test_top1"] == 0.5
    assert item.properties["deepearth:cube_recipe"] == manifest["recipe"]


def test_validation_rejects_a_broken_collection(cubes_with_run, monkeypatch):
    from pystac.validation import validate_dict

    d = catalog_dicts(str(cubes_with_run), "http://127.0.0.1:1/deepearth/stac")
    _no_network(monkeypatch)
    validate_dict(d["vision/collection.json"], extensions=[])  # valid as served
    broken = json.loads(json.dumps(d["vision/collection.json"]))
    broken["extent"]["spatial"]["bbox"] = [[1, 2]]  # a bbox needs 4 or 6 numbers
    with pytest.raises(pystac.STACValidationError):
        validate_dict(broken, extensions=[])
    # served links are absolute, below the base URL
    links = {link["rel"]: link["href"] for link in d["catalog.json"]["links"]}
    assert links["self"] == "http://127.0.0.1:1/deepearth/stac/catalog.json"
    assert set(d) >= {"catalog.json", "vision/collection.json", "predictions/run1/run1.json"}


def test_stac_on_s3(s3, s3_cubes):
    out = "s3://deepearth/stac-test"
    assert main(["stac", s3_cubes, "--out", out, "--storage-options",
                 json.dumps(s3.storage_options)]) == 0
    io = FsspecStacIO(s3.storage_options)
    cat = pystac.Catalog.from_file(f"{out}/catalog.json", stac_io=io)
    assert {c.id for c in cat.get_collections()} >= {"observations", "species", "vision"}
    assert cat.get_child("vision").assets["zarr"].href.startswith("s3://deepearth/cubes")
