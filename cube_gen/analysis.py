"""Computations over an opened cube set, shared by the server, viewer panels and ML code.

Similarity search (exact cosine), region statistics (species composition, yearly and
monthly counts, diversity indices), the species language UMAP payload and the vision
UMAP of the pooled vectors (whole set precomputed, or a filtered subset recomputed).
Nothing here knows about HTTP: functions take a :class:`~cube_gen.access.CubeSet`
and plain values and return numpy arrays or JSON-ready dicts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from . import schema as S
from .access import SPLIT_NAMES, CubeSet, Query
from .timeparse import PRECISION_CODES


def _memoised(cs: CubeSet, key: str, make):
    """Per-cube-set memo of small derived arrays (owned and cleared by the cube set)."""
    return cs.memo(("analysis", key), make)


def is_empty(query: Query | None) -> bool:
    return query is None or query.is_empty


# -- species lookup ------------------------------------------------------------------------
def resolve_species(cs: CubeSet, token: str | int) -> int:
    """Species index of a taxon id, scientific name or name slug (case-insensitive).

    The one resolver is :meth:`CubeSet.species_index`; raises :class:`NotFoundError`.
    """
    return cs.species_index(token)


def species_record(cs: CubeSet, index: int) -> dict[str, Any]:
    t = cs.species_table()
    row = t.iloc[int(index)]
    return {
        "species_index": int(row.species_index),
        "taxon_id": str(row.taxon_id),
        "taxon_name": str(row.taxon_name),
        "slug": S.species_slug(str(row.taxon_name)),
        "genus": str(row.genus),
        "observation_count": int(row.observation_count),
        "vision_count": int(row.vision_count),
        "cluster": int(row.cluster),
        "color": str(row.color),
        "cluster_color": str(row.cluster_color),
    }


def species_records(cs: CubeSet) -> list[dict[str, Any]]:
    return [species_record(cs, i) for i in range(len(cs.species_table()))]


# -- similarity ----------------------------------------------------------------------------
def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1).astype(np.float32)


def top_k_cosine(unit_matrix: np.ndarray, query: np.ndarray, k: int,
                 candidates: np.ndarray | None = None,
                 exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k cosine search: ``(row indices, scores)``, best first.

    ``unit_matrix`` holds unit rows; ``query`` is any vector (normalised here).
    ``candidates`` restricts the rows searched, ``exclude`` removes rows. Ties are
    broken by row index, so results are deterministic.
    """
    q = unit_rows(np.asarray(query, np.float32)[None, :])[0]
    rows = np.arange(unit_matrix.shape[0]) if candidates is None else np.asarray(candidates,
                                                                               np.int64)
    if exclude is not None and len(exclude):
        rows = rows[~np.isin(rows, exclude)]
    if len(rows) == 0 or k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    sub = unit_matrix if candidates is None and (exclude is None or not len(exclude)) \
        else unit_matrix[rows]
    scores = sub @ q
    k = min(int(k), len(rows))
    if k < len(rows):
        part = np.argpartition(-scores, k - 1)[:k]
        # include every row tied with the k-th score so the tie-break is by index
        kth = scores[part].min()
        part = np.flatnonzero(scores >= kth)
    else:
        part = np.arange(len(rows))
    order = np.lexsort((rows[part], -scores[part]))[:k]
    sel = part[order]
    return rows[sel], scores[sel].astype(np.float32)


def pooled_unit(cs: CubeSet) -> np.ndarray:
    return _memoised(cs, "pooled_unit", lambda: unit_rows(cs.pooled()))


def language_unit(cs: CubeSet) -> np.ndarray:
    return _memoised(cs, "language_unit", lambda: unit_rows(cs.language_embeddings()))


def image_records(cs: CubeSet, positions: np.ndarray) -> list[dict[str, Any]]:
    """JSON-ready records of embeddings at ``image`` positions."""
    t = cs.image_table()
    names = cs.species_table().taxon_name.to_numpy()
    p = np.asarray(positions, np.int64)
    gid = t.gbif_id.to_numpy()[p]
    num = t.image_number.to_numpy()[p]
    sp = t.species_index.to_numpy()[p]
    times = pd.DatetimeIndex(t.time.to_numpy()[p])
    lat = t.lat.to_numpy()[p]
    lon = t.lon.to_numpy()[p]
    split = t.split.to_numpy()[p]
    return [{
        "gbif_id": int(gid[i]),
        "image_number": int(num[i]),
        "species_index": int(sp[i]),
        "taxon_name": str(names[sp[i]]),
        "time": times[i].isoformat(),
        "lat": float(lat[i]),
        "lon": float(lon[i]),
        "split": SPLIT_NAMES[int(split[i])],
    } for i in range(len(p))]


def similar_embeddings(cs: CubeSet, image: int, k: int = 10, query: Query | None = None,
                       include_self: bool = False) -> list[dict[str, Any]]:
    """The k embeddings most similar to the one at ``image`` (cosine of pooled vectors).

    ``query`` restricts the candidates (bbox, time, species, split). Exact search below
    :data:`cube_gen.ann.EXACT_BELOW` embeddings (or a filter leaving few), else the
    recipe's FAISS index with exact re-ranking (:func:`cube_gen.ann.search`).
    """
    from .ann import open_similarity, search

    unit = pooled_unit(cs)
    allowed = None
    if not is_empty(query):
        allowed = np.zeros(len(unit), bool)
        allowed[cs.select_images(query)] = True
    exclude = None if include_self else np.array([image])
    rows, scores = search(unit, unit[image], k, open_similarity(cs), allowed, exclude,
                          top_k=top_k_cosine)
    recs = image_records(cs, rows)
    for rank, (rec, score) in enumerate(zip(recs, scores, strict=True), start=1):
        rec["rank"] = rank
        rec["score"] = float(score)
    return recs


def similar_species(cs: CubeSet, species_index: int, k: int = 10,
                    include_self: bool = False) -> list[dict[str, Any]]:
    """The k species whose language embeddings are most similar (cosine)."""
    unit = language_unit(cs)
    exclude = None if include_self else np.array([species_index])
    rows, scores = top_k_cosine(unit, unit[species_index], k, None, exclude)
    out = []
    for rank, (r, score) in enumerate(zip(rows, scores, strict=True), start=1):
        rec = species_record(cs, int(r))
        rec["rank"] = rank
        rec["score"] = float(score)
        out.append(rec)
    return out


# -- region statistics ---------------------------------------------------------------------
def diversity(counts: np.ndarray) -> dict[str, float | int | None]:
    """Richness, Shannon H' (nats), Simpson indices and Pielou evenness of species counts."""
    c = np.asarray(counts, np.float64)
    c = c[c > 0]
    n = float(c.sum())
    richness = int(len(c))
    if n == 0:
        return {"richness": 0, "shannon": None, "simpson_dominance": None,
                "gini_simpson": None, "inverse_simpson": None, "evenness": None}
    p = c / n
    h = float(-(p * np.log(p)).sum())
    d = float((p * p).sum())
    return {
        "richness": richness,
        "shannon": h,
        "simpson_dominance": d,
        "gini_simpson": 1.0 - d,
        "inverse_simpson": 1.0 / d,
        "evenness": h / float(np.log(richness)) if richness > 1 else None,
    }


def _obs_columns(cs: CubeSet) -> dict[str, np.ndarray]:
    def make():
        ds = cs.observations
        return {k: ds[k].values for k in ("species_index", "time", "time_precision", "split",
                                          "has_vision")}
    return _memoised(cs, "obs_columns", make)


def region_statistics(cs: CubeSet, query: Query | None = None) -> dict[str, Any]:
    """Statistics of the observations matching ``query`` (bbox, time range, species, split).

    ``by_month`` counts month of year over the observations whose time is known at
    least to the month (``month_unknown`` counts the others).
    """
    q = query or Query()
    positions = cs.select_observations(q)
    cols = _obs_columns(cs)
    sp_idx = cols["species_index"][positions]
    times = pd.DatetimeIndex(cols["time"][positions])
    precision = cols["time_precision"][positions]
    n_species = len(cs.species_table())
    counts = np.bincount(sp_idx, minlength=n_species) if len(sp_idx) else np.zeros(n_species,
                                                                                   np.int64)
    total = int(len(positions))
    order = sorted(np.flatnonzero(counts), key=lambda i: (-counts[i], i))
    composition = []
    for i in order:
        rec = species_record(cs, int(i))
        composition.append({
            "species_index": rec["species_index"], "taxon_id": rec["taxon_id"],
            "taxon_name": rec["taxon_name"], "color": rec["color"],
            "count": int(counts[i]), "fraction": float(counts[i] / total),
        })
    years = times.year.to_numpy()
    by_year = [{"year": int(y), "count": int(c)}
               for y, c in zip(*np.unique(years, return_counts=True), strict=True)]
    known = precision >= PRECISION_CODES["month"]
    months = np.bincount(times.month.to_numpy()[known], minlength=13)[1:13]
    split_codes = cols["split"][positions]
    return {
        "query": query_dict(q),
        "observations": total,
        "with_vision": int(cols["has_vision"][positions].sum()),
        "by_split": {name: int((split_codes == code).sum()) for code, name in SPLIT_NAMES.items()},
        **diversity(counts),
        "species": composition,
        "by_year": by_year,
        "by_month": [{"month": m + 1, "count": int(c)} for m, c in enumerate(months)],
        "month_unknown": int((~known).sum()),
    }


def query_dict(q: Query | None) -> dict[str, Any]:
    """A JSON-ready echo of a query (:meth:`Query.to_dict`)."""
    return (q or Query()).to_dict()


# -- projections ---------------------------------------------------------------------------
def species_umap(cs: CubeSet) -> dict[str, Any]:
    """The language UMAP of the species: 3-D coordinates, clusters and colours."""
    coords = _memoised(cs, "species_umap", lambda: cs.species.umap.values.astype(np.float32))
    species = []
    for i, rec in enumerate(species_records(cs)):
        rec.update({"x": float(coords[i, 0]), "y": float(coords[i, 1]),
                    "z": float(coords[i, 2])})
        species.append(rec)
    clusters: dict[int, dict[str, Any]] = {}
    for rec in species:
        c = clusters.setdefault(rec["cluster"], {"cluster": rec["cluster"],
                                                 "color": rec["cluster_color"], "size": 0,
                                                 "species_indices": []})
        c["size"] += 1
        c["species_indices"].append(rec["species_index"])
    return {
        "count": len(species),
        "axes": list(S.UMAP_AXES),
        "description": cs.species.umap.attrs.get("long_name", ""),
        "species": species,
        "clusters": [clusters[k] for k in sorted(clusters)],
    }


def vision_umap(cs: CubeSet, query: Query | None = None, max_points: int = 5000,
                seed: int = 42) -> dict[str, Any]:
    """3-D UMAP of the pooled vectors.

    Without a query: the precomputed ``umap`` variable of all embeddings. With one: the
    matching embeddings (at most ``max_points``, a seeded random subset when more match)
    projected again with :func:`cube_gen.derive.vision_projection`.
    """
    from .derive import vision_projection

    if is_empty(query):
        positions = np.arange(len(cs.image_table()))
        coords = _memoised(cs, "vision_umap", lambda: cs.vision.umap.values.astype(np.float32))
        source, method, total, subsampled = "precomputed", "umap", len(positions), False
    else:
        positions = cs.select_images(query)
        total = len(positions)
        subsampled = total > max_points
        if subsampled:
            rng = np.random.default_rng(seed)
            positions = np.sort(rng.choice(positions, max_points, replace=False))
        coords, method = vision_projection(cs.pooled(positions), seed=seed)
        source = "computed"
    recs = image_records(cs, positions)
    colors = cs.species_table().color.to_numpy()
    for rec, xyz in zip(recs, coords, strict=True):
        rec.update({"x": float(xyz[0]), "y": float(xyz[1]), "z": float(xyz[2]),
                    "color": str(colors[rec["species_index"]])})
    return {
        "source": source,
        "method": method,
        "query": query_dict(query),
        "total": int(total),
        "returned": len(recs),
        "subsampled": bool(subsampled),
        "axes": list(S.UMAP_AXES),
        "points": recs,
    }
