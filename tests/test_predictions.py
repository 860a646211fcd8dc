"""Predictions cubes: two training runs on the tiny cubes, served by xcube serve
(/deepearth/predictions, /deepearth/stac, error-map place groups) and shown by the panel."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import copy_cubes
from server_fixtures import Http, serve_cubeset

from cube_gen.errors import CubeError
from cube_gen.predictions import Predictions, write_predictions
from cube_gen.train import train


@pytest.fixture(scope="module")
def two_runs(tiny_cubes, tmp_path_factory):
    """A copy of the tiny cubes with a linear probe and an alignment run."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pred")
    cubes = copy_cubes(tiny_cubes, root / "cubes")
    common = {"cubes": str(cubes), "split": {"method": "random", "test_fraction": 0.4},
              "train": {"epochs": 4, "batch_size": 4, "lr": 0.01, "threads": 1,
                        "torch_threads": 1},
              "tracking": {"mlflow": False, "tensorboard": False, "dir": str(root / "runs")}}
    a = train({**common, "model": {"kind": "linear"}, "tracking": {
        **common["tracking"], "run_name": "linear-probe"}}, progress=False)
    b = train({**common, "task": "alignment", "tracking": {
        **common["tracking"], "run_name": "alignment"}}, progress=False)
    return cubes, a, b


def test_predictions_store(two_runs):
    cubes, a, b = two_runs
    store = Predictions.of(str(cubes))
    assert [r["run_id"] for r in store.runs()] == [a.run_id, b.run_id]
    assert store.run("latest")["run_id"] == b.run_id
    t = store.table(a.run_id)
    assert len(t) == 6 and set(t.role) <= {"train", "test"}
    assert (t.correct == (t.species_index == t.predicted_species)).all()
    c = store.compare(a.run_id, b.run_id, role="test")
    assert c["n"] == int((t.role == "test").sum())  # same split seed: same test side
    assert c["both_correct"] + c["only_a"] + c["only_b"] + c["both_wrong"] == c["n"]
    ds = store.open(a.run_id)
    assert ds.attrs["run_name"] == "linear-probe" and ds.attrs["model"] == "linear"
    # a run's cube is immutable
    cs = __import__("cube_gen.access", fromlist=["CubeSet"]).CubeSet.open(str(cubes))
    n = len(cs.image_table())
    with pytest.raises(CubeError, match="immutable"):
        write_predictions(cs, torch.zeros(n, 12), cs.image_table().species_index.to_numpy(),
                          np.arange(n), np.zeros(n, np.int8), run_id=a.run_id, run_name="x",
                          task="probe", model="linear", features="pooled", metrics={},
                          cube={})
    with pytest.raises(ValueError, match="every one of the 6 embeddings"):
        write_predictions(cs, torch.zeros(2, 12), [0, 0], [0, 1], np.zeros(n, np.int8),
                          run_id="bad", run_name="x", task="probe", model="linear",
                          features="pooled", metrics={}, cube={})


@pytest.fixture(scope="module")
def served(two_runs, tmp_path_factory):
    cubes, a, b = two_runs
    with serve_cubeset(str(cubes), tmp_path_factory.mktemp("served-pred")) as url:
        yield Http(url), cubes, a, b


def test_served_predictions(served):
    http, cubes, a, b = served
    runs = http.json("/deepearth/predictions")
    assert [r["run_id"] for r in runs["runs"]] == [a.run_id, b.run_id]
    assert runs["runs"][0]["cube"]["recipe"] == a.cube_version["recipe"]
    one = http.json(f"/deepearth/predictions/{a.run_id}")
    store = Predictions.of(str(cubes))
    t = store.table(a.run_id)
    test = t[t.role == "test"]
    assert one["sides"]["test"]["embeddings"] == len(test)
    assert one["sides"]["test"]["correct"] == int(test.correct.sum())
    # one observation (two images) in both runs
    obs = http.json("/deepearth/predictions/observations/1949913261")
    assert [r["run_id"] for r in obs["runs"]] == [a.run_id, b.run_id]
    imgs = obs["runs"][0]["images"]
    assert [i["image_number"] for i in imgs] == [0, 1]
    row = t[(t.gbif_id == 1949913261) & (t.image_number == 0)].iloc[0]
    assert imgs[0]["score"] == pytest.approx(float(row.score), rel=1e-6)
    assert imgs[0]["correct"] == bool(row.correct)
    cmp = http.json("/deepearth/predictions/compare", a=a.run_id, b=b.run_id)
    assert cmp["embeddings"] == len(test)
    assert cmp["accuracy_a"] == pytest.approx(float(test.correct.mean()))
    # the error map: one point per test-side observation, coloured by correctness
    geo = http.json(f"/deepearth/predictions/{a.run_id}/errors")
    assert len(geo["features"]) == test.gbif_id.nunique()
    for f in geo["features"]:
        assert f["id"] == f"obs-{f['properties']['gbif_id']}"
        assert f["properties"]["color"] == ("#2e7d32" if f["properties"]["correct"] else "#d32f2f")
    assert len(http.json(f"/deepearth/predictions/{a.run_id}/errors", role="all")["features"]) == 5
    # errors: JSON envelope, no traceback
    assert "no predictions for run" in http.problem("/deepearth/predictions/nope", 404)["message"]
    assert http.problem(f"/deepearth/predictions/{a.run_id}/errors", 400, role="x")[
        "parameter"] == "role"
    assert http.problem("/deepearth/predictions/compare", 400, a=a.run_id)["parameter"] == "b"
    http.problem("/deepearth/predictions/observations/1", 404)


def test_served_stac_and_place_groups(served):
    http, cubes, a, b = served
    cat = http.json("/deepearth/stac")
    assert cat["type"] == "Catalog"
    children = [link["href"] for link in cat["links"] if link["rel"] == "child"]
    assert any(h.endswith("/deepearth/stac/vision/collection.json") for h in children)
    vision = http.json("/deepearth/stac/vision/collection.json")
    assert vision["cube:variables"]["features"]["deepearth:dtype"] == "float16"
    item = http.json(f"/deepearth/stac/predictions/{a.run_id}/{a.run_id}.json")
    assert item["properties"]["deepearth:model"] == "linear"
    http.problem("/deepearth/stac/nothing/collection.json", 404)
    # the error maps are place groups of the grid datasets
    datasets = [d["id"] for d in http.json("/datasets")["datasets"]]
    t = Predictions.of(str(cubes)).table(a.run_id)
    for run in (a, b):
        path = f"/datasets/{datasets[0]}/places/predictions-{run.run_id}"
        for _ in range(240):  # added in the background once the places API is up
            if http.get(path).status_code == 200:
                break
            time.sleep(0.5)
        group = http.json(path)
        assert group["type"] == "FeatureCollection"
        assert len(group["features"]) == t[t.role == "test"].gbif_id.nunique()


def test_panel_text(two_runs):
    """The panel's Markdown, from the same controllers, without a browser."""
    from server.ml import panel
    from server.ml.context import MlContext

    cubes, a, b = two_runs

    class FakeDeepEarth:  # the two attributes the ML context reads from the DeepEarth API
        def __init__(self):
            from cube_gen.access import CubeSet
            self.cubeset = CubeSet.open(str(cubes))
            self.storage_options = {}
            self.settings = {}

    class ServerCtx:
        def __init__(self):
            self.ml = MlContext.__new__(MlContext)
            MlContext.__init__(self.ml, self)
            self.de = FakeDeepEarth()

        def get_api_ctx(self, name, cls=None):
            return {"deepearth": self.de, "deepearth-ml": self.ml}.get(name)

    ctx = ServerCtx()
    text = panel.observation_text(ctx, "obs-1949913261")
    assert "Observation 1949913261" in text and text.count("linear-probe") == 2
    assert "Select an observation" in panel.observation_text(ctx, None)
    cmp = panel.compare_text(ctx, a.run_id, b.run_id)
    assert "only A" in cmp and "test embeddings" in cmp
    ds = xr.open_zarr(cubes / "predictions" / "runs" / f"{a.run_id}.zarr")
    assert int(ds.sizes["image"]) == 6
