"""Controllers of the ``deepearth-ml`` API: plain functions over :class:`.context.MlContext`
(no HTTP), shared by the routes, the viewer panel and notebooks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from cube_gen.sampling import ROLE_NAMES

from ..common.errors import NotFound, ParamError
from ..viewer.places import place_id

RIGHT, WRONG = "#2e7d32", "#d32f2f"
ROLES = (*ROLE_NAMES, "all")


def _names(ctx) -> np.ndarray:
    return ctx.deepearth.cubeset.species_table().taxon_name.to_numpy().astype(str)


def _role(role: str | None) -> str:
    role = role or "test"
    if role not in ROLES:
        raise ParamError(f"parameter 'role' must be one of {', '.join(ROLES)}, got {role!r}",
                         "role", list(ROLES), role)
    return role


def runs(ctx) -> dict[str, Any]:
    """Every run of the cube set's predictions store, latest last."""
    m = ctx.predictions.manifest()
    return {"runs": m.get("runs", []), "latest": m.get("latest")}


def run(ctx, run_id: str) -> dict[str, Any]:
    """One run: its manifest entry and counts per side (right / wrong)."""
    entry, table = ctx.table(run_id)
    sides = {}
    for role in ROLE_NAMES:
        t = table[table.role == role]
        sides[role] = {"embeddings": int(len(t)), "correct": int(t.correct.sum()),
                       "accuracy": float(t.correct.mean()) if len(t) else None}
    return {**entry, "sides": sides}


def _rows(ctx, table: pd.DataFrame) -> list[dict[str, Any]]:
    names = _names(ctx)
    return [{"gbif_id": int(r.gbif_id), "image_number": int(r.image_number),
             "species": names[int(r.species_index)],
             "predicted": names[int(r.predicted_species)], "score": float(r.score),
             "correct": bool(r.correct), "role": str(r.role)} for r in table.itertuples()]


def observation(ctx, gbif_id: int, run_ids: list[str] | None = None) -> dict[str, Any]:
    """The predictions for every embedding of one observation, in each run (or those given)."""
    cs = ctx.deepearth.cubeset
    cs.obs_position(gbif_id)  # 404 for an unknown gbif_id
    wanted = run_ids or [r["run_id"] for r in ctx.predictions.runs()]
    out = []
    for rid in wanted:
        entry, table = ctx.table(rid)
        rows = table[table.gbif_id == gbif_id]
        out.append({"run_id": entry["run_id"], "run_name": entry["run_name"],
                    "task": entry["task"], "model": entry["model"],
                    "features": entry["features"], "images": _rows(ctx, rows)})
    return {"gbif_id": int(gbif_id), "runs": out}


def compare(ctx, run_a: str, run_b: str, role: str | None = "test") -> dict[str, Any]:
    """Two runs side by side on the embeddings that are on ``role``'s side in both."""
    role = _role(role)
    ea, a = ctx.table(run_a)
    eb, b = ctx.table(run_b)
    if not (np.array_equal(a.gbif_id, b.gbif_id) and np.array_equal(a.image_number,
                                                                    b.image_number)):
        raise ParamError(f"runs {ea['run_id']} and {eb['run_id']} were made on different "
                         "embeddings", "run_b")
    keep = np.ones(len(a), bool) if role == "all" else (
        (a.role == role) & (b.role == role)).to_numpy()
    ca, cb = a.correct.to_numpy()[keep], b.correct.to_numpy()[keep]
    names = _names(ctx)
    differ = np.flatnonzero(keep & (a.predicted_species.to_numpy() != b.predicted_species.to_numpy()))
    return {
        "run_a": {k: ea[k] for k in ("run_id", "run_name", "task", "model", "features")},
        "run_b": {k: eb[k] for k in ("run_id", "run_name", "task", "model", "features")},
        "role": role, "embeddings": int(keep.sum()),
        "accuracy_a": float(ca.mean()) if keep.any() else None,
        "accuracy_b": float(cb.mean()) if keep.any() else None,
        "both_correct": int((ca & cb).sum()), "only_a": int((ca & ~cb).sum()),
        "only_b": int((~ca & cb).sum()), "both_wrong": int((~ca & ~cb).sum()),
        "disagreements": [{"gbif_id": int(a.gbif_id.iat[i]),
                           "image_number": int(a.image_number.iat[i]),
                           "species": names[int(a.species_index.iat[i])],
                           "predicted_a": names[int(a.predicted_species.iat[i])],
                           "predicted_b": names[int(b.predicted_species.iat[i])]}
                          for i in differ[:200]],
    }


def error_features(ctx, run_id: str, role: str | None = "test") -> list[dict[str, Any]]:
    """One GeoJSON point per observation on ``role``'s side: green when its first
    embedding is predicted right, red when wrong (ids ``obs-<gbif_id>``)."""
    role = _role(role)
    _, table = ctx.table(run_id)
    t = table if role == "all" else table[table.role == role]
    t = t.drop_duplicates("gbif_id")
    names = _names(ctx)
    feats = []
    for r in t.itertuples():
        true, pred = names[int(r.species_index)], names[int(r.predicted_species)]
        label = f"{true} ✓ ({r.score:.2f})" if r.correct else f"{true} → {pred} ({r.score:.2f})"
        feats.append({"type": "Feature", "id": place_id(int(r.gbif_id)),
                      "geometry": {"type": "Point",
                                   "coordinates": [round(float(r.lon), 6), round(float(r.lat), 6)]},
                      "properties": {"label": label, "color": RIGHT if r.correct else WRONG,
                                     "gbif_id": int(r.gbif_id), "species": true,
                                     "predicted": pred, "score": round(float(r.score), 4),
                                     "correct": bool(r.correct), "role": str(r.role)}})
    return feats


def errors_geojson(ctx, run_id: str, role: str | None = "test") -> dict[str, Any]:
    feats = error_features(ctx, run_id, role)
    return {"type": "FeatureCollection", "features": feats,
            "numberMatched": len(feats), "numberReturned": len(feats)}


def error_place_group(ctx, run_id: str) -> dict[str, Any]:
    """A run's error map as a place group in the form xcube's places context keeps."""
    entry, _ = ctx.table(run_id)
    return {"type": "FeatureCollection", "id": f"predictions-{entry['run_id']}",
            "title": f"Prediction errors: {entry['run_name']} ({entry['run_id'][:8]})",
            "description": "Test-side observations of the run: green right, red wrong",
            "propertyMapping": {"label": "label", "color": "color"},
            "features": error_features(ctx, entry["run_id"], "test"),
            "sourcePaths": [], "sourceEncoding": "utf-8", "join": None}


def stac_object(ctx, base: str, path: str) -> dict[str, Any]:
    """A catalogue object by its path below ``/deepearth/stac`` ('' is the catalogue)."""
    objects = ctx.stac(base)
    key = path.strip("/") or "catalog.json"
    if key not in objects:
        raise NotFound(f"no STAC object {key!r} (the catalogue has {len(objects)}: "
                       f"{', '.join(sorted(objects)[:8])}, ...)", "path", None, key)
    return objects[key]
