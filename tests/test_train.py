"""cube_gen.train: models and metrics by value; `deepearth train` end to end on the tiny cubes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import yaml

from cube_gen.cli import main
from cube_gen.errors import RecipeError
from cube_gen.train import (
    SpeciesModel,
    TrainConfig,
    balanced_accuracy,
    chance_levels,
    topk_accuracy,
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small models on a shared 2-core machine: intra-op threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_topk_and_balanced_accuracy_values():
    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 2.0], [1.0, 3.0, 2.0], [5.0, 0.0, 1.0]])
    y = torch.tensor([0, 1, 2, 0])
    assert topk_accuracy(logits, y, 1) == pytest.approx(0.5)   # rows 0 and 3
    assert topk_accuracy(logits, y, 2) == pytest.approx(1.0)
    assert topk_accuracy(logits, y, 10) == pytest.approx(1.0)  # k capped at the species
    pred = logits.argmax(1)  # 0, 2, 1, 0
    # species 0: 2/2, species 1: 0/1, species 2: 0/1 -> mean 1/3
    assert balanced_accuracy(pred, y) == pytest.approx(1 / 3)
    assert np.isnan(topk_accuracy(logits[:0], y[:0], 1))


def test_chance_levels():
    c = chance_levels(np.array([0, 0, 0, 1, 2]), np.array([0, 1, 1, 3]), n_species=10)
    assert c["chance_top1_uniform"] == pytest.approx(0.1)
    assert c["chance_top5_uniform"] == pytest.approx(0.5)
    assert c["chance_top1_majority"] == pytest.approx(0.25)  # always "species 0"
    # the five most frequent training species: 0, 1, 2, then 3, 4 (ties by index)
    assert c["chance_top5_majority"] == pytest.approx(1.0)


@pytest.mark.parametrize("language", [False, True])
@pytest.mark.parametrize("patch", [False, True])
def test_species_model_learns_a_separable_problem(language, patch):
    torch.manual_seed(0)
    n_species, dim = 6, 16
    centres = torch.randn(n_species, dim) * 3
    y = torch.arange(n_species).repeat(20)
    x = centres[y] + torch.randn(len(y), dim)
    if patch:  # the signal in a few patches of noise
        noise = torch.randn(len(y), 9, dim)
        noise[:, 4] += centres[y] * 2
        x = noise
    lang = torch.randn(n_species, 24) if language else None
    model = SpeciesModel(dim, n_species, "mlp", 32, 0.0, patch=patch, language=lang)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert topk_accuracy(model(x), y, 1) > 0.95
        if language:  # logits are scaled cosines to the (centred, unit) language rows
            z = torch.nn.functional.normalize(model.embed(x), dim=-1)
            cos = z @ model.language.T
            assert torch.allclose(model(x), model.log_scale.exp() * cos, atol=1e-4)
            assert torch.allclose(model.language.norm(dim=1), torch.ones(n_species))


def test_config_errors_name_the_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"cubes": "x", "train": {"epochz": 3}}))
    with pytest.raises(RecipeError, match=r"train\.epochz.*unknown key"):
        TrainConfig.load(f)
    f.write_text(yaml.safe_dump({"cubes": "x", "task": "regress"}))
    with pytest.raises(RecipeError, match="task: must be one of probe, alignment"):
        TrainConfig.load(f)
    with pytest.raises(RecipeError, match="train.epochs: must be a positive integer"):
        TrainConfig.from_dict({"cubes": "x", "train": {"epochs": 0}})
    with pytest.raises(RecipeError, match="cubes.path"):
        TrainConfig.from_dict({})
    # relative cube paths are relative to the config file; --set values are YAML
    f.write_text(yaml.safe_dump({"cubes": "../cubes"}))
    cfg = TrainConfig.load(f, {"train.epochs": "3", "split.method": "random"})
    assert cfg["cubes"]["path"] == str(tmp_path.parent / "cubes")
    assert cfg["train"]["epochs"] == 3 and cfg["split"]["method"] == "random"
    assert cfg.flat()["model.kind"] == "mlp"


def _config(tmp_path: Path, cubes: Path, **extra) -> Path:
    data = {"cubes": str(cubes), "split": {"method": "random", "test_fraction": 0.4, "seed": 0},
            "train": {"epochs": 3, "batch_size": 4, "lr": 0.01, "threads": 1, "torch_threads": 1},
            "tracking": {"dir": str(tmp_path / "runs"), "experiment": "test"},
            "predictions": {"path": str(tmp_path / "predictions")}}
    for k, v in extra.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _mlflow_run(tmp_path: Path, run_id: str):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient((tmp_path / "runs" / "mlruns").as_uri())
    return client, client.get_run(run_id)


def test_train_probe_end_to_end(tiny_cubes, tmp_path, capsys):
    cfg = _config(tmp_path, tiny_cubes, model={"kind": "linear"})
    assert main(["train", str(cfg), "--quiet", "--set", "train.epochs=25"]) == 0
    out = capsys.readouterr().out
    run_id = out.split()[1]
    manifest = json.loads((tiny_cubes / "cubeset.json").read_text())
    client, run = _mlflow_run(tmp_path, run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["task"] == "probe" and p["model.kind"] == "linear" and p["train.epochs"] == "25"
    assert int(p["split.train"]) + int(p["split.test"]) == 6
    assert p["cube_recipe"] == manifest["recipe"]
    hist = client.get_metric_history(run_id, "train_loss")
    assert [m.step for m in hist] == list(range(25))
    assert hist[-1].value < hist[0].value  # it learns
    assert len(client.get_metric_history(run_id, "test_top1")) == 25
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert {"model.pt", "config.yaml", "split.json", "metrics.json"} <= arts
    tb = list((tmp_path / "runs" / "tensorboard").rglob("events.out.tfevents.*"))
    assert tb and tb[0].stat().st_size > 0
    # the predictions cube: one row per embedding, consistent with the split and labels
    pred_root = tmp_path / "predictions"
    m = json.loads((pred_root / "predictions.json").read_text())
    assert m["latest"] == run_id and m["runs"][0]["cube"]["recipe"] == manifest["recipe"]
    ds = xr.open_zarr(pred_root / "runs" / f"{run_id}.zarr").load()
    vision = xr.open_zarr(tiny_cubes / "vision.zarr")
    assert ds.sizes["image"] == 6
    assert np.array_equal(ds.gbif_id.values, vision.gbif_id.values)
    assert np.array_equal(ds.species_index.values, vision.species_index.values)
    assert np.array_equal(ds.correct.values, ds.predicted_species.values == ds.species_index.values)
    assert np.array_equal(ds.top5_species.values[:, 0], ds.predicted_species.values)
    assert ((ds.score > 0) & (ds.score <= 1)).all()
    assert np.allclose(ds.top5_score.values[:, 0], ds.score.values)
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="split.json",
                                                dst_path=str(tmp_path / "dl"),
                                                tracking_uri=client.tracking_uri)
    split = json.loads(Path(local).read_text())
    assert int((ds.role == 0).sum()) == split["train"] and int((ds.role == 1).sum()) == split["test"]
    # a linear probe memorises its 3-4 training embeddings in 25 epochs
    assert bool(ds.correct.values[ds.role.values == 0].all())
    assert ds.attrs["run_id"] == run_id and ds.attrs["cube_recipe"] == manifest["recipe"]
    assert json.loads(ds.attrs["metrics"])["test_top1"] == pytest.approx(
        float(ds.correct.values[ds.role.values == 1].mean()))


def test_train_alignment_on_patches(tiny_cubes, tmp_path, capsys):
    cfg = _config(tmp_path, tiny_cubes, task="alignment", features="patch",
                  split={"method": "spatial", "block_km": 10, "buffer_km": 1},
                  sampling={"balance": "cap"})
    assert main(["train", str(cfg), "--quiet"]) == 0
    run_id = capsys.readouterr().out.split()[1]
    client, run = _mlflow_run(tmp_path, run_id)
    assert run.data.params["task"] == "alignment" and run.data.params["features"] == "patch"
    assert run.data.params["split.method"] == "spatial"
    metrics = run.data.metrics
    assert 0.0 <= metrics["test_top1"] <= metrics["test_top5"] <= 1.0
    assert run.data.tags["chance_top1_uniform"] == f"{1 / 12:.4f}"
    ds = xr.open_zarr(tmp_path / "predictions" / "runs" / f"{run_id}.zarr")
    assert ds.attrs["task"] == "alignment" and ds.sizes["rank"] == 5


def test_train_errors_are_one_line(tiny_cubes, tmp_path, capsys):
    # the tiny cubes have no embedding in 2025: the temporal split has no test side
    cfg = _config(tmp_path, tiny_cubes, split={"method": "temporal"})
    data = yaml.safe_load(cfg.read_text())
    data["split"] = {"method": "temporal"}
    cfg.write_text(yaml.safe_dump(data))
    assert main(["train", str(cfg), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "split.method" in err and "0 test embeddings" in err and "Traceback" not in err
    assert main(["train", str(cfg), "--set", "split.block_km=3"]) == 1
    assert "no parameters" in capsys.readouterr().err
