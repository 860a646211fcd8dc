"""Phenology filters: month-of-year, hour-of-day and year ranges over observation times.

Ranges are inclusive; month and hour ranges wrap when the first bound is larger
(``months=(11, 2)``: November to February, ``hours=(22, 3)``: 22:00 to 03:59). An hour
range only matches observations whose time is known to the hour or better (a date
without a time of day has no hour). Shared by :class:`cube_gen.query.Query` and so by
every reader, endpoint and panel.
"""

from __future__ import annotations

import re

import numpy as np

from .timeparse import PRECISION_CODES

BOUNDS = {"months": (1, 12), "hours": (0, 23), "years": (1000, 9999)}
_RANGE = re.compile(r"^\s*(\d{1,4})\s*(?:-\s*(\d{1,4})\s*)?$")


def parse_range(name: str, value) -> tuple[int, int] | None:
    """``value`` as an inclusive (first, last) range for the filter ``name`` (months,
    hours, years): a pair, one number or a string ``'3-5'`` / ``'7'``; None stays None.
    Raises ValueError naming the filter, the value and the allowed bounds."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    lo, hi = BOUNDS[name]
    if isinstance(value, str):
        m = _RANGE.match(value)
        if not m:
            raise ValueError(f"{name} must be a number or a range such as '{lo}-{hi}', "
                             f"got {value!r}")
        first, last = int(m.group(1)), int(m.group(2) or m.group(1))
    elif np.ndim(value) == 0:
        first = last = int(value)
    else:
        pair = [int(v) for v in value]
        if len(pair) != 2:
            raise ValueError(f"{name} must be (first, last), got {value!r}")
        first, last = pair
    for v in (first, last):
        if not lo <= v <= hi:
            raise ValueError(f"{name} values must lie in {lo}..{hi}, got {v}")
    if name == "years" and first > last:
        raise ValueError(f"years must be (first, last) with first <= last, got {first}-{last}")
    return first, last


def _in_range(values: np.ndarray, rng: tuple[int, int]) -> np.ndarray:
    a, b = rng
    return (values >= a) & (values <= b) if a <= b else (values >= a) | (values <= b)


def phenology_mask(time: np.ndarray, precision: np.ndarray | None,
                   months: tuple[int, int] | None = None,
                   hours: tuple[int, int] | None = None,
                   years: tuple[int, int] | None = None) -> np.ndarray:
    """Rows whose ``time`` (datetime64) lies in the month, hour and year ranges.

    ``precision``: the rows' time precision codes (:data:`cube_gen.timeparse.PRECISIONS`);
    needed for ``hours`` (rows coarser than an hour never match) and ``months``
    (year-only times never match)."""
    t = np.asarray(time).astype("datetime64[ns]")
    m = ~np.isnat(t)
    if months is None and hours is None and years is None:
        return m
    y = t.astype("datetime64[Y]").astype(np.int64) + 1970
    if years is not None:
        m &= (y >= years[0]) & (y <= years[1])
    if months is not None:
        mo = t.astype("datetime64[M]").astype(np.int64) % 12 + 1
        m &= _in_range(mo, months)
        if precision is not None:
            m &= np.asarray(precision) >= PRECISION_CODES["month"]
    if hours is not None:
        h = (t - t.astype("datetime64[D]")).astype("timedelta64[h]").astype(np.int64)
        m &= _in_range(h, hours)
        if precision is not None:
            m &= np.asarray(precision) >= PRECISION_CODES["hour"]
    return m
