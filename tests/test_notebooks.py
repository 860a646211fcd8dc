"""examples/*.ipynb executed with nbclient on the tiny cubes (local and S3), outputs checked;
the in-process notebook viewer (server.notebook.Viewer)."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
import requests
from conftest import copy_cubes
from nbclient import NotebookClient

from cube_gen.access import CubeSet
from cube_gen.predictions import Predictions

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_notebook(name: str, workdir: Path, monkeypatch, **env: str) -> dict:
    """Execute ``examples/<name>.ipynb`` in ``workdir``; the JSON its ``summary`` cell prints."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    book = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
    NotebookClient(book, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(workdir)}}).execute()
    for cell in book.cells:
        assert not any(o.get("output_type") == "error" for o in cell.get("outputs", []))
    summary = [c for c in book.cells if "summary" in c.metadata.get("tags", [])][0]
    text = "".join(o.get("text", "") for o in summary.outputs if o.get("name") == "stdout")
    images = sum(1 for c in book.cells for o in c.get("outputs", [])
                 if "image/png" in o.get("data", {}))
    return {**json.loads(text.strip().splitlines()[-1]), "_figures": images}


def test_explore_from_s3(s3, s3_cubes, tmp_path, monkeypatch):
    out = run_notebook("explore", tmp_path, monkeypatch, DEEPEARTH_CUBES=s3_cubes,
                       DEEPEARTH_STORAGE_OPTIONS=json.dumps(s3.storage_options),
                       DEEPEARTH_SHOW_VIEWER="0")
    cs = CubeSet.open(s3_cubes, s3.storage_options)
    west, south, east, north = cs.manifest["bbox"]
    expected = cs.select_observations(bbox=(west, south, (west + east) / 2, north),
                                      start="2012-01-01", end="2024-12-31",
                                      species=out["species"])
    assert out["selected"] == len(expected) > 0
    assert out["images"] == len(cs.select_images(split="train"))
    assert out["pooled_shape"] == [out["images"], 1408]
    assert out["feature_dtype"] == "float16"
    assert out["_figures"] >= 2


def test_train_and_compare(tiny_cubes, tmp_path, monkeypatch):
    cubes = copy_cubes(tiny_cubes, tmp_path / "cubes")
    env = {"DEEPEARTH_CUBES": str(cubes), "DEEPEARTH_STORAGE_OPTIONS": "{}",
           "DEEPEARTH_SPLIT": "random", "DEEPEARTH_EPOCHS": "3",
           "DEEPEARTH_RUNS": str(tmp_path / "runs")}
    out = run_notebook("train", tmp_path, monkeypatch, **env)
    assert out["epochs"] == 3 and len(out["runs"]) == 2
    assert out["split"]["train"] + out["split"]["test"] + out["split"]["excluded"] == 6
    store = Predictions.of(str(cubes))
    assert [r["run_id"] for r in store.runs()] == out["runs"]
    assert (tmp_path / "runs" / "mlruns").is_dir()
    cmp = run_notebook("compare", tmp_path, monkeypatch, **env)
    expected = store.compare(*out["runs"], role="test")
    assert (cmp["a"], cmp["b"]) == tuple(out["runs"])
    assert cmp["n"] == expected["n"] and cmp["accuracy_a"] == expected["accuracy_a"]
    assert cmp["_figures"] == 1


def test_notebook_viewer_in_process(tiny_cubes):
    from server.notebook import Viewer

    with Viewer(str(tiny_cubes)) as v:
        health = requests.get(f"{v.server_url}/deepearth/health", timeout=30)
        assert health.status_code == 200
        page = requests.get(v.viewer_url, timeout=30)
        assert page.status_code == 200 and "<html" in page.text.lower()
        html = v.show(height=500)._repr_html_()
        assert v.viewer_url in html and 'height="500"' in html
        assert requests.get(f"{v.server_url}/deepearth/stac", timeout=60).json()["type"] == \
            "Catalog"
    assert not v.is_running
    with pytest.raises(RuntimeError, match="stopped"):
        v.show()
