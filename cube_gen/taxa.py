"""Species search: scientific name, genus or language cluster, as one text field.

The viewer's species filter and the API's ``taxa=`` parameter both resolve their text
here, so a search narrows the dots, the panels and every endpoint the same way.

A search is one or more terms separated by commas; a species matches when any term does:

* ``cluster 3``, ``cluster:3`` or ``unclustered``: the species of that language cluster
  (``unclustered``: cluster -1, species the clustering left out);
* a genus name (whole word, any case): every species of the genus;
* otherwise part of the scientific name (any case): ``quercus vir`` matches
  *Quercus virginiana*.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

UNCLUSTERED = -1
_CLUSTER = re.compile(r"^(?:cluster\s*[:#]?\s*(-?\d+)|unclustered)$", re.IGNORECASE)


def cluster_label(cluster: int) -> str:
    """How a cluster number is shown: ``cluster 3``, or ``unclustered`` for -1."""
    c = int(cluster)
    return "unclustered" if c == UNCLUSTERED else f"cluster {c}"


@dataclass(frozen=True)
class Term:
    text: str
    kind: str  # "cluster", "genus" or "name"
    species: np.ndarray  # species indices matching the term


def parse_terms(text: str | None) -> list[str]:
    """The comma-separated, stripped, non-empty terms of a search."""
    return [t.strip() for t in str(text or "").split(",") if t.strip()]


def match_term(table: pd.DataFrame, term: str) -> Term:
    """The species of the species ``table`` (``species_index``, ``taxon_name``, ``genus``,
    ``cluster`` columns) that one search term selects."""
    m = _CLUSTER.match(term)
    if m:
        cluster = UNCLUSTERED if m.group(1) is None else int(m.group(1))
        hit = table.cluster.to_numpy().astype(np.int64) == cluster
        return Term(term, "cluster", table.species_index.to_numpy()[hit].astype(np.int64))
    low = term.lower()
    genus = table.genus.astype(str).str.lower().to_numpy()
    if (genus == low).any():
        return Term(term, "genus", table.species_index.to_numpy()[genus == low].astype(np.int64))
    names = table.taxon_name.astype(str).str.lower()
    hit = names.str.contains(low, regex=False).to_numpy()
    return Term(term, "name", table.species_index.to_numpy()[hit].astype(np.int64))


def search_species(table: pd.DataFrame, text: str | None) -> np.ndarray | None:
    """Species indices (sorted) the search ``text`` selects; None for an empty search
    (no species filter), an empty array when nothing matches."""
    terms = parse_terms(text)
    if not terms:
        return None
    hits = [match_term(table, t).species for t in terms]
    return np.unique(np.concatenate(hits)).astype(np.int64)


def suggestions(table: pd.DataFrame, text: str | None, limit: int = 12) -> list[dict]:
    """What the search field offers for the last term typed: clusters, genera and species
    (``value``: the term to search for, ``label``: how it is shown, ``count``: species)."""
    terms = parse_terms(text)
    low = terms[-1].lower() if terms else ""
    out: list[dict] = []
    clusters = sorted(set(table.cluster.to_numpy().astype(int).tolist()))
    for c in clusters:
        label = cluster_label(c)
        if not low or low in label:
            n = int((table.cluster.to_numpy() == c).sum())
            out.append({"value": label, "label": f"{label} ({n} species)", "count": n,
                        "kind": "cluster"})
    genera = table.groupby(table.genus.astype(str)).size()
    for g, n in genera.items():
        if not low or low in g.lower():
            out.append({"value": g, "label": f"genus {g} ({int(n)} species)", "count": int(n),
                        "kind": "genus"})
    for name in table.taxon_name.astype(str):
        if not low or low in name.lower():
            out.append({"value": name, "label": name, "count": 1, "kind": "name"})
    return out[:limit]
