"""Predictions cubes: one immutable Zarr per training run, beside the cube set.

Layout (local folder or object-store prefix; default ``<cube set>/predictions``)::

    predictions.json          manifest: every run (id, name, task, model, features,
                              created, metrics, the cube version trained on), ``latest``
    runs/<run_id>.zarr        one cube per run, never changed once published

A run's cube has one entry per embedding, aligned with ``vision.zarr`` ``image``:
``species_index`` (the label), ``predicted_species``, ``score`` (probability of the
prediction), ``correct``, ``top5_species`` / ``top5_score``, ``role`` (train / test /
excluded, from the split) and the coordinates ``gbif_id``, ``image_number``, ``time``,
``lat``, ``lon``. Its attributes record the run id, model, task, metrics and the cube
set (URL, version, recipe fingerprint) it was trained on. A cube is written under
``.staging/`` and published whole; the manifest is updated last, so a listed run is
always complete.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from .errors import CubeError, NotFoundError
from .sampling import ROLE_NAMES
from .store import Target

MANIFEST = "predictions.json"
RUNS = "runs"
DIR = "predictions"
TOP_K = 5
_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def default_root(cubes_url: str) -> str:
    return f"{str(cubes_url).rstrip('/')}/{DIR}"


def _check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(str(run_id)):
        raise ValueError(f"run id must be 1-64 letters, digits, '.', '_' or '-', got {run_id!r}")
    return str(run_id)


def predictions_dataset(cs: Any, logits: Any, labels: Any, images: Any, roles: np.ndarray,
                        attrs: dict[str, Any]) -> xr.Dataset:
    """The predictions cube of one run (``logits`` rows belong to image positions ``images``)."""
    import torch

    table = cs.image_table()
    n = len(table)
    images = np.asarray(images, np.int64)
    if len(images) != n or not np.array_equal(np.sort(images), np.arange(n)):
        raise ValueError(f"predictions need every one of the {n} embeddings exactly once, got "
                         f"{len(images)} rows")
    order = np.argsort(images)
    lg = torch.as_tensor(logits).float()[order]
    prob = torch.softmax(lg, dim=1)
    k = min(TOP_K, lg.shape[1])
    top_p, top_i = prob.topk(k, dim=1)
    y = np.asarray(labels, np.int64)[order]
    if not np.array_equal(y, table.species_index.to_numpy(np.int64)):
        raise ValueError("labels do not match species_index of vision.zarr")
    pred = top_i[:, 0].numpy().astype(np.int32)
    role_attrs = {"long_name": "side of the split", "flag_values": [0, 1, 2],
                  "flag_meanings": " ".join(ROLE_NAMES)}
    ds = xr.Dataset(
        {
            "species_index": ("image", y.astype(np.int32),
                              {"long_name": "true species (index into species.zarr)"}),
            "predicted_species": ("image", pred,
                                  {"long_name": "predicted species (index into species.zarr)"}),
            "score": ("image", top_p[:, 0].numpy().astype(np.float32),
                      {"long_name": "model probability of the predicted species", "units": "1"}),
            "correct": ("image", pred == y, {"long_name": "prediction equals the true species"}),
            "top5_species": (("image", "rank"), top_i.numpy().astype(np.int32),
                             {"long_name": "the most probable species, best first"}),
            "top5_score": (("image", "rank"), top_p.numpy().astype(np.float32),
                           {"long_name": "probabilities of top5_species", "units": "1"}),
            "role": ("image", np.asarray(roles, np.int8), role_attrs),
        },
        coords={
            "gbif_id": ("image", table.gbif_id.to_numpy(np.int64)),
            "image_number": ("image", table.image_number.to_numpy(np.int16)),
            "time": ("image", table.time.to_numpy("datetime64[ns]")),
            "lat": ("image", table.lat.to_numpy(np.float64), {"units": "degrees_north"}),
            "lon": ("image", table.lon.to_numpy(np.float64), {"units": "degrees_east"}),
        },
        attrs={k: (json.dumps(v, default=str) if isinstance(v, dict | list) else v)
               for k, v in attrs.items() if v is not None},
    )
    return ds


def write_predictions(cs: Any, logits: Any, labels: Any, images: Any, roles: np.ndarray, *,
                      run_id: str, run_name: str, task: str, model: str, features: str,
                      metrics: dict[str, float], cube: dict[str, Any], root: str | None = None,
                      storage_options: dict[str, Any] | None = None,
                      tracking_uri: str | None = None) -> str:
    """Write a run's predictions cube and list it in the manifest; returns the cube's URL."""
    run_id = _check_run_id(run_id)
    root = root or default_root(cs.url)
    created = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    entry = {"run_id": run_id, "run_name": run_name, "task": task, "model": model,
             "features": features, "created": created, "cube": cube,
             "metrics": {k: float(v) for k, v in metrics.items()},
             "tracking_uri": tracking_uri, "path": f"{RUNS}/{run_id}.zarr"}
    attrs = {"title": f"DeepEarth predictions of run {run_name} ({run_id})", **{
        k: v for k, v in entry.items() if k != "path"},
        "cube_url": cube.get("url"), "cube_version": cube.get("version"),
        "cube_recipe": cube.get("recipe"), "Conventions": "CF-1.10 ACDD-1.3"}
    ds = predictions_dataset(cs, logits, labels, images, roles, attrs)
    target = Target(root, storage_options)
    staged_url = target.staging_url(f"{run_id}.zarr")
    target.remove(target.staging(f"{run_id}.zarr"))
    ds.to_zarr(staged_url, mode="w", consolidated=True, zarr_format=3,
               storage_options=None if target.is_local else target.storage_options)
    final = target.path(RUNS, f"{run_id}.zarr")
    if target.fs.exists(final):
        raise CubeError(f"predictions of run {run_id} already exist at {target.url_of(RUNS)}; "
                        "a run's predictions are immutable")
    target.publish(target.staging(f"{run_id}.zarr"), final)
    manifest = target.read_json(target.path(MANIFEST)) or {"runs": []}
    manifest["runs"] = [r for r in manifest["runs"] if r["run_id"] != run_id] + [entry]
    manifest["latest"] = run_id
    target.write_json(target.path(MANIFEST), manifest)
    return target.url_of(RUNS, f"{run_id}.zarr")


@dataclass
class Predictions:
    """The predictions store of a cube set: list runs, open one, compare two."""

    root: str
    storage_options: dict[str, Any] | None = None

    @classmethod
    def of(cls, cubes_url: str, storage_options: dict[str, Any] | None = None) -> Predictions:
        return cls(default_root(cubes_url), storage_options)

    @property
    def target(self) -> Target:
        return Target(self.root, self.storage_options)

    def manifest(self) -> dict[str, Any]:
        return self.target.read_json(self.target.path(MANIFEST)) or {"runs": [], "latest": None}

    def runs(self) -> list[dict[str, Any]]:
        return list(self.manifest()["runs"])

    def run(self, run_id: str | None = None) -> dict[str, Any]:
        """A run's manifest entry (``None`` or ``"latest"``: the latest run)."""
        m = self.manifest()
        if run_id in (None, "latest"):
            run_id = m.get("latest")
        for r in m["runs"]:
            if r["run_id"] == run_id:
                return r
        known = ", ".join(r["run_id"] for r in m["runs"]) or "none"
        raise NotFoundError(f"no predictions for run {run_id!r} (runs: {known})",
                            parameter="run", value=run_id)

    def open(self, run_id: str | None = None) -> xr.Dataset:
        r = self.run(run_id)
        return xr.open_zarr(self.target.url_of(r["path"]), consolidated=True,
                            storage_options=self.storage_options or None).load()

    def table(self, run_id: str | None = None) -> pd.DataFrame:
        """One row per embedding: ids, position, label, prediction, score, correct, role."""
        ds = self.open(run_id)
        return pd.DataFrame({
            "gbif_id": ds.gbif_id.values, "image_number": ds.image_number.values,
            "lat": ds.lat.values, "lon": ds.lon.values, "time": ds.time.values,
            "species_index": ds.species_index.values,
            "predicted_species": ds.predicted_species.values, "score": ds.score.values,
            "correct": ds.correct.values,
            "role": np.asarray(ROLE_NAMES, dtype=object)[ds.role.values],
        })

    def compare(self, run_a: str, run_b: str, role: str | None = "test") -> dict[str, Any]:
        """Two runs side by side on the same embeddings: accuracies and where they differ."""
        a, b = self.table(run_a), self.table(run_b)
        if not (np.array_equal(a.gbif_id, b.gbif_id)
                and np.array_equal(a.image_number, b.image_number)):
            raise CubeError(f"runs {run_a} and {run_b} were not made on the same embeddings")
        keep = (np.ones(len(a), bool) if role is None
                else ((a.role == role) & (b.role == role)).to_numpy())  # on that side in both
        ca, cb = a.correct.to_numpy()[keep], b.correct.to_numpy()[keep]
        return {"run_a": self.run(run_a)["run_id"], "run_b": self.run(run_b)["run_id"],
                "role": role, "n": int(keep.sum()),
                "accuracy_a": float(ca.mean()) if keep.any() else None,
                "accuracy_b": float(cb.mean()) if keep.any() else None,
                "both_correct": int((ca & cb).sum()), "only_a": int((ca & ~cb).sum()),
                "only_b": int((~ca & cb).sum()), "both_wrong": int((~ca & ~cb).sum()),
                "agree": int((a.predicted_species.to_numpy()[keep]
                              == b.predicted_species.to_numpy()[keep]).sum())}
