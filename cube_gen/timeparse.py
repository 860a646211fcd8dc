"""Observation times from year/month/day/hour/minute/second with missing fields.

A missing field makes the time as precise as the fields before it: the time is the
start of the coarsest known period (a missing day gives the first of the month), and
the precision records which field was the last one known.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .source_layout import TIME_FIELDS

# Codes stored in the cube (CF flag_values / flag_meanings).
PRECISIONS = ("year", "month", "day", "hour", "minute", "second")
PRECISION_CODES = {name: i for i, name in enumerate(PRECISIONS)}
_RANGES = {
    "month": (1, 12),
    "day": (1, 31),
    "hour": (0, 23),
    "minute": (0, 59),
    "second": (0, 59),
}


def times_with_precision(df: pd.DataFrame, file: str = "observations.parquet"):
    """Return ``(time datetime64[ns] array, precision int8 array)`` for the rows of ``df``.

    Raises :class:`SourceError` naming the first row with an out-of-range field or an
    impossible date (e.g. 31 February).
    """
    from .errors import SourceError

    n = len(df)
    year = df["year"].to_numpy()
    if pd.isna(year).any():
        row = int(np.flatnonzero(pd.isna(year))[0])
        raise SourceError("year is missing", file=file, row=row, column="year",
                          expected="an integer year")
    parts = {"year": year.astype(np.int64)}
    known = np.ones(n, dtype=bool)
    precision = np.zeros(n, dtype=np.int8)
    for code, field in enumerate(TIME_FIELDS[1:], start=1):
        values = pd.to_numeric(df[field], errors="coerce").to_numpy(dtype=np.float64)
        present = ~np.isnan(values)
        lo, hi = _RANGES[field]
        bad = present & ((values < lo) | (values > hi) | (values != np.round(values)))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise SourceError(
                f"{field} = {float(values[row])!r} is out of range",
                file=file, row=row, column=field, expected=f"an integer in [{lo}, {hi}] or missing",
            )
        known &= present
        precision[known] = code
        default = lo
        parts[field] = np.where(known, np.nan_to_num(values, nan=default), default).astype(np.int64)
    frame = pd.DataFrame(parts)
    time = pd.to_datetime(frame, errors="coerce")
    if time.isna().any():
        row = int(np.flatnonzero(time.isna().to_numpy())[0])
        raise SourceError(
            f"no such date {tuple(int(frame[f].iloc[row]) for f in TIME_FIELDS)}",
            file=file, row=row, column="day", expected="a valid calendar date",
        )
    return time.to_numpy(dtype="datetime64[ns]"), precision
