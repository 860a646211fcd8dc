"""The one selection type (:class:`Query`), its row mask and the paging helper.

A :class:`Query` is what every reader filters by: the server's parameter groups, the
viewer panels, :class:`~cube_gen.access.CubeSet`, :mod:`cube_gen.analysis` and the torch
datasets. Species may be given as indices, taxon ids, scientific names or slugs; the
cube set resolves them (:meth:`CubeSet.species_index <cube_gen.access.CubeSet.species_index>`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from . import schema as S
from .phenology import parse_range, phenology_mask
from .polygon import parse_ring, points_in_polygon, ring_bbox

SPLIT_NAMES = {v: k for k, v in S.SPLIT_CODES.items()}


@dataclass(frozen=True)
class Query:
    """A selection: bbox (west, south, east, north), time range, species, split, has_vision;
    phenology (month-of-year, hour-of-day and year ranges, :mod:`cube_gen.phenology`) and
    a polygon ring of (lon, lat) vertices (:mod:`cube_gen.polygon`)."""

    bbox: tuple[float, float, float, float] | None = None
    start: np.datetime64 | None = None
    end: np.datetime64 | None = None  # inclusive
    species: tuple[int | str, ...] | None = None  # species indices, taxon ids, names or slugs
    split: str | None = None
    has_vision: bool | None = None
    months: tuple[int, int] | None = None  # inclusive, wraps (11, 2): Nov..Feb
    hours: tuple[int, int] | None = None  # inclusive, wraps; needs hour precision
    years: tuple[int, int] | None = None  # inclusive
    polygon: tuple[tuple[float, float], ...] | None = None  # one ring; sets bbox to its box
    taxa: str | None = None  # a species search (cube_gen.taxa): names, genera, clusters

    @staticmethod
    def make(bbox=None, start=None, end=None, species=None, split=None,
             has_vision=None, months=None, hours=None, years=None, polygon=None,
             taxa=None) -> Query:
        """A validated query from loose values (sequences, strings, timestamps)."""
        if polygon is not None:
            polygon = parse_ring(polygon)
            if bbox is None:
                bbox = ring_bbox(polygon)
        if bbox is not None:
            bbox = tuple(float(v) for v in bbox)
            if len(bbox) != 4:
                raise ValueError("bbox must be (west, south, east, north)")
        if split is not None and split not in S.SPLIT_CODES:
            raise ValueError(f"split must be one of {', '.join(S.SPLIT_CODES)}")
        if species is not None and (isinstance(species, str) or np.ndim(species) == 0):
            species = (species,)
        return Query(
            bbox, None if start is None else np.datetime64(pd.Timestamp(start), "ns"),
            None if end is None else np.datetime64(pd.Timestamp(end), "ns"),
            None if species is None else tuple(
                s.strip() if isinstance(s, str) else int(s) for s in species),
            split, None if has_vision is None else bool(has_vision),
            parse_range("months", months), parse_range("hours", hours),
            parse_range("years", years), polygon,
            str(taxa).strip() if taxa is not None and str(taxa).strip() else None,
        )

    @property
    def is_empty(self) -> bool:
        """True when the query selects everything."""
        return self == Query()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready echo of the query."""
        return {
            "bbox": None if self.bbox is None else list(self.bbox),
            "start": None if self.start is None else pd.Timestamp(self.start).isoformat(),
            "end": None if self.end is None else pd.Timestamp(self.end).isoformat(),
            "species": None if self.species is None else list(self.species),
            "split": self.split,
            "has_vision": self.has_vision,
            "months": None if self.months is None else list(self.months),
            "hours": None if self.hours is None else list(self.hours),
            "years": None if self.years is None else list(self.years),
            "polygon": None if self.polygon is None else [list(p) for p in self.polygon],
            "taxa": self.taxa,
        }


def mask(cols: dict[str, np.ndarray], q: Query, species: tuple[int, ...] | None) -> np.ndarray:
    """Rows of ``cols`` (lat, lon, time, species_index, split, has_vision) matching ``q``.

    ``species`` are the query's species already resolved to indices.
    """
    m = np.ones(len(cols["lat"]), bool)
    if q.bbox is not None:
        w, s, e, n = q.bbox
        lat, lon = cols["lat"], cols["lon"]
        m &= (lon >= w) & (lon <= e) & (lat >= s) & (lat <= n)
    if q.start is not None:
        m &= cols["time"] >= q.start
    if q.end is not None:
        m &= cols["time"] <= q.end
    if species is not None:
        m &= np.isin(cols["species_index"], np.asarray(species, dtype=np.int64))
    if q.split is not None:
        m &= cols["split"] == S.SPLIT_CODES[q.split]
    if q.has_vision is not None:
        m &= cols["has_vision"] == bool(q.has_vision)
    if q.months is not None or q.hours is not None or q.years is not None:
        m &= phenology_mask(cols["time"], cols.get("time_precision"), q.months, q.hours,
                            q.years)
    if q.polygon is not None:
        idx = np.flatnonzero(m)
        m[idx] = points_in_polygon(cols["lon"][idx], cols["lat"][idx], q.polygon)
    return m


@dataclass(frozen=True)
class Page:
    """One page of a selection: ``items`` (positions) and where it lies in the whole."""

    items: np.ndarray
    total: int
    offset: int
    limit: int

    @property
    def next_offset(self) -> int | None:
        nxt = self.offset + len(self.items)
        return nxt if nxt < self.total else None

    def meta(self) -> dict[str, Any]:
        """``total``, ``offset``, ``limit``, ``returned`` and ``next_offset`` (JSON-ready)."""
        return {"total": self.total, "offset": self.offset, "limit": self.limit,
                "returned": len(self.items), "next_offset": self.next_offset}


def paginate(items: Any, offset: int = 0, limit: int | None = None) -> Page:
    """The page ``items[offset:offset + limit]`` (all from ``offset`` when limit is None)."""
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    total = len(items)
    end = total if limit is None else offset + limit
    return Page(items[offset:end], int(total), int(offset),
                int(total - offset if limit is None else limit))
