"""Server side of the viewer's exploration loop: the dots' filters, picking a dot, warm-up.

* :class:`DotFilter`: what the viewer's dots layer shows, from the same query parameters the
  panels pass to the API (``taxa``, ``months``, ``hours``, ``year``) plus ``time``: the
  grid time step selected in the viewer (the dots follow the time slider: the step's
  period, e.g. one year);
* :func:`pick`: the observation nearest to a clicked point within a radius (the viewer
  selects it; no place group has to be loaded first);
* :func:`species_layer`: the per-species grid layer of a species search that names one
  species (the filter bar switches the map to it);
* :func:`warm_time_indexes`: build the pandas indexes of every level of the served
  datasets once, before requests arrive. pandas fills an index's hash table and its
  uniqueness flag lazily and not thread-safely: 64 concurrent first tile requests made
  some threads see a half-built engine and fail with "Reindexing only valid with uniquely
  valued Index objects" (HTTP 500) in xcube's nearest-time lookup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cube_gen import schema as S
from cube_gen.phenology import parse_range, phenology_mask
from cube_gen.query import Query

EARTH_RADIUS_M = 6_371_008.8
FILTER_PARAMS = ("taxa", "months", "hours", "year")
MAX_PICK_RADIUS_M = 50_000.0


class FilterError(ValueError):
    """A filter parameter that cannot be used (names the parameter and the value)."""

    def __init__(self, parameter: str, message: str):
        super().__init__(message)
        self.parameter = parameter


@dataclass(frozen=True)
class DotFilter:
    """The observations the dots layer shows (all fields optional)."""

    taxa: str | None = None
    months: tuple[int, int] | None = None
    hours: tuple[int, int] | None = None
    years: tuple[int, int] | None = None
    time: pd.Timestamp | None = None  # a time step of the dataset shown: its period
    dataset: str | None = None  # the grid dataset shown (its time steps give the period)

    @staticmethod
    def from_query(query: dict[str, list[str]]) -> DotFilter:
        """From request query arguments (unknown ones are ignored: tile URLs carry more)."""
        def one(name: str) -> str | None:
            values = query.get(name) or []
            if len(values) > 1:
                raise FilterError(name, f"parameter {name!r} is given {len(values)} times")
            return values[0].strip() if values and values[0].strip() else None

        try:
            months = parse_range("months", one("months"))
            hours = parse_range("hours", one("hours"))
            years = parse_range("years", one("year"))
        except ValueError as exc:
            name = str(exc).split(" ", 1)[0]
            raise FilterError("year" if name == "years" else name, str(exc)) from None
        t = one("time")
        try:
            time = None if t is None else pd.Timestamp(t).tz_localize(None) \
                if pd.Timestamp(t).tzinfo else pd.Timestamp(t)
        except ValueError:
            raise FilterError("time", f"parameter 'time': not an ISO time: {t!r}") from None
        return DotFilter(one("taxa"), months, hours, years, time,
                         one("dataset") if time is not None else None)

    @property
    def is_empty(self) -> bool:
        return self == DotFilter()

    def time_constraint(self, cs) -> dict[str, Any]:
        """Query arguments of the selected time step in the shown dataset: a period
        (start, end) for yearly steps, a month of year for the month-of-year climatology,
        nothing for a dataset with one step (all years)."""
        if self.time is None:
            return {}
        cube = self.dataset if self.dataset in S.GRID_CUBES else S.GRID
        try:
            grid = cs.grid(0, cube=cube)
        except Exception:  # noqa: BLE001 - a cube set without that pyramid: the yearly one
            grid = cs.grid(0)
        steps = np.asarray(grid.time.values).astype("datetime64[ns]")
        if len(steps) <= 1:
            return {}
        if "climatology" in grid.time.attrs:
            month = pd.Timestamp(self.time).month
            return {"months_of_step": (month, month)}
        start, end = time_step_period(steps, self.time)
        bounds = grid.time.attrs.get("bounds")
        if bounds in grid:
            i = int(np.argmin(np.abs(steps - np.datetime64(pd.Timestamp(self.time), "ns"))))
            start, end = (np.datetime64(v, "ns") for v in grid[bounds].values[i])
        return {"start": start, "end": end - np.timedelta64(1, "ns")}  # Query ends: inclusive

    def query(self, cs) -> Query:
        """The :class:`~cube_gen.query.Query` of the dots (the time step as start/end)."""
        t = self.time_constraint(cs)
        return Query.make(start=t.get("start"), end=t.get("end"), taxa=self.taxa,
                          months=self.months, hours=self.hours, years=self.years)

    def mask(self, cs) -> np.ndarray:
        """Boolean mask along ``obs`` of the observations this filter keeps."""
        keep = np.zeros(cs.observations.sizes["obs"], bool)
        keep[cs.select_observations(self.query(cs))] = True
        step_months = self.time_constraint(cs).get("months_of_step")
        if step_months is not None:  # the climatology's month and the user's months
            o = cs.observations
            keep &= phenology_mask(o.time.values, o.time_precision.values, months=step_months)
        return keep


def time_step_period(steps: np.ndarray, t: pd.Timestamp) -> tuple[np.datetime64, np.datetime64]:
    """[start, end) of the grid time step that ``t`` lies in (steps: sorted step starts;
    the last step is as long as the one before it; before the first: the first)."""
    steps = np.asarray(steps).astype("datetime64[ns]")
    t64 = np.datetime64(pd.Timestamp(t), "ns")
    i = int(np.clip(np.searchsorted(steps, t64, side="right") - 1, 0, len(steps) - 1))
    if i + 1 < len(steps):
        return steps[i], steps[i + 1]
    if len(steps) > 1:
        step = (pd.Timestamp(steps[-1]) - pd.Timestamp(steps[-2]))
        # calendar periods: a year after a year start is the next year start
        nxt = pd.Timestamp(steps[-1]) + pd.DateOffset(years=1) \
            if step.days in (365, 366) else pd.Timestamp(steps[-1]) + step
        return steps[i], np.datetime64(nxt, "ns")
    return steps[i], np.datetime64("2262-01-01", "ns")


def pick(cs, lon: float, lat: float, radius_m: float,
         keep: np.ndarray | None = None) -> dict[str, Any]:
    """The observation nearest to (lon, lat) within ``radius_m`` (haversine), among ``keep``.

    Returns ``{"gbif_id", "distance_m", "lon", "lat"}``, ``gbif_id`` None when no
    observation is that close."""
    obs = cs.observations
    olat = obs.lat.values.astype(np.float64)
    olon = obs.lon.values.astype(np.float64)
    # a cheap box first: only nearby points get the haversine
    dlat = np.degrees(radius_m / EARTH_RADIUS_M)
    dlon = dlat / max(np.cos(np.radians(lat)), 1e-6)
    near = (np.abs(olat - lat) <= dlat) & (np.abs(olon - lon) <= dlon)
    if keep is not None:
        near &= keep
    idx = np.flatnonzero(near)
    none = {"gbif_id": None, "distance_m": None, "lon": None, "lat": None}
    if len(idx) == 0:
        return none
    p1, p2 = np.radians(lat), np.radians(olat[idx])
    a = (np.sin((p2 - p1) / 2) ** 2
         + np.cos(p1) * np.cos(p2) * np.sin(np.radians(olon[idx] - lon) / 2) ** 2)
    d = 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0, 1)))
    j = int(np.argmin(d))
    if d[j] > radius_m:
        return none
    i = int(idx[j])
    return {"gbif_id": int(obs.gbif_id.values[i]), "distance_m": round(float(d[j]), 1),
            "lon": float(olon[i]), "lat": float(olat[i])}


def species_layer(cs, taxa_text: str | None) -> dict[str, Any] | None:
    """The grid layer of the one species a search names: ``{"species_index",
    "taxon_name", "variable"}`` (``count_<slug>``, a variable of ``grid_species``), else
    None (no search, or it selects no species or several)."""
    from cube_gen import grid_variables as G
    from cube_gen.taxa import search_species

    table = cs.species_table()
    hits = search_species(table, taxa_text)
    if hits is None or len(hits) != 1:
        return None
    i = int(hits[0])
    name = str(table.taxon_name.to_numpy()[i])
    return {"species_index": i, "taxon_name": name,
            "variable": G.SPECIES_FAMILY.prefix + S.species_slug(name)}


def warm_time_indexes(datasets_ctx, dataset_ids: list[str]) -> int:
    """Build the pandas indexes of every level of the datasets before requests arrive (see
    the module docstring and :func:`server.common.datasets.warm_datasets`)."""
    from ..common.datasets import warm_datasets

    return warm_datasets(datasets_ctx, dataset_ids)
