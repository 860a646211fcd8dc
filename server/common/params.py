"""Request parameter parsing and validation, and the matching OpenAPI parameter objects.

Every parser raises :class:`ParamError` naming the parameter, the value received and
what is allowed; handlers turn it into a JSON 400 response.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd


class ApiProblem(Exception):
    """An error answered with a JSON body ``{"error": {...}}`` and an HTTP status."""

    status = 500

    def __init__(self, message: str, parameter: str | None = None, allowed: Any = None,
                 value: Any = None):
        super().__init__(message)
        self.message = message
        self.parameter = parameter
        self.allowed = allowed
        self.value = value

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"status_code": self.status, "message": self.message}
        if self.parameter is not None:
            err["parameter"] = self.parameter
        if self.allowed is not None:
            err["allowed"] = self.allowed
        if self.value is not None:
            err["value"] = self.value
        return {"error": err}


class ParamError(ApiProblem):
    status = 400


class NotFound(ApiProblem):
    status = 404


class PayloadTooLarge(ApiProblem):
    status = 413


class Unavailable(ApiProblem):
    status = 503


class MethodNotAllowed(ApiProblem):
    status = 405


# -- parsing -------------------------------------------------------------------------------
Query = Mapping[str, Sequence[str]]


def raw(query: Query, name: str) -> str | None:
    """The single value of a query parameter (None when absent); repeated values are an error."""
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise ParamError(f"parameter {name!r} is given {len(values)} times; give it once",
                         name, "a single value", list(values))
    return values[0]


def check_known(query: Query, allowed: Sequence[str]) -> None:
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        raise ParamError(f"unknown parameter {unknown[0]!r}", unknown[0],
                         sorted(allowed) or "no parameters", None)


def integer(query: Query, name: str, default: int | None = None, minimum: int | None = None,
            maximum: int | None = None, value: str | None = None) -> int | None:
    text = raw(query, name) if value is None else value
    allowed = _range_text("an integer", minimum, maximum)
    if text is None or text == "":
        return default
    try:
        v = int(text)
    except ValueError:
        raise ParamError(f"parameter {name!r} must be {allowed}, got {text!r}", name, allowed,
                         text) from None
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise ParamError(f"parameter {name!r} must be {allowed}, got {v}", name, allowed, text)
    return v


def number(query: Query, name: str, default: float | None = None,
           minimum: float | None = None, maximum: float | None = None) -> float | None:
    text = raw(query, name)
    allowed = _range_text("a number", minimum, maximum)
    if text is None or text == "":
        return default
    try:
        v = float(text)
    except ValueError:
        raise ParamError(f"parameter {name!r} must be {allowed}, got {text!r}", name, allowed,
                         text) from None
    if not np.isfinite(v) or (minimum is not None and v < minimum) or (
            maximum is not None and v > maximum):
        raise ParamError(f"parameter {name!r} must be {allowed}, got {text!r}", name, allowed,
                         text)
    return v


def choice(query: Query, name: str, options: Sequence[str], default: str | None = None) -> str:
    text = raw(query, name)
    if text is None or text == "":
        return default
    if text not in options:
        raise ParamError(f"parameter {name!r} must be one of {', '.join(options)}; got {text!r}",
                         name, list(options), text)
    return text


def boolean(query: Query, name: str, default: bool | None = None) -> bool | None:
    text = raw(query, name)
    if text is None or text == "":
        return default
    t = text.lower()
    if t in ("true", "1", "yes"):
        return True
    if t in ("false", "0", "no"):
        return False
    raise ParamError(f"parameter {name!r} must be true or false, got {text!r}", name,
                     ["true", "false"], text)


def bbox(query: Query, name: str = "bbox") -> tuple[float, float, float, float] | None:
    text = raw(query, name)
    allowed = "west,south,east,north in degrees (WGS84), west <= east, south <= north"
    if text is None or text == "":
        return None
    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError:
        raise ParamError(f"parameter {name!r} must be {allowed}; got {text!r}", name, allowed,
                         text) from None
    if len(parts) != 4 or not all(np.isfinite(parts)):
        raise ParamError(f"parameter {name!r} must be four numbers {allowed}; got {text!r}",
                         name, allowed, text)
    w, s, e, n = parts
    if not (-180 <= w <= e <= 180 and -90 <= s <= n <= 90):
        raise ParamError(f"parameter {name!r} must be {allowed}; got {text!r}", name, allowed,
                         text)
    return w, s, e, n


_DATE_PRECISION = (
    (re.compile(r"^\d{4}$"), "YS"),
    (re.compile(r"^\d{4}-\d{2}$"), "MS"),
    (re.compile(r"^\d{4}-\d{2}-\d{2}$"), "D"),
)
TIME_ALLOWED = "an ISO 8601 date or time: YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss"


def time(query: Query, name: str, end: bool = False) -> pd.Timestamp | None:
    """A time bound. For ``end`` (inclusive) a year, month or day means its last instant."""
    text = raw(query, name)
    if text is None or text == "":
        return None
    try:
        t = pd.Timestamp(text)
    except (ValueError, TypeError, OverflowError):
        t = None
    if t is None or t is pd.NaT or not (1000 <= t.year <= 3000):
        raise ParamError(f"parameter {name!r} must be {TIME_ALLOWED}; got {text!r}", name,
                         TIME_ALLOWED, text)
    if t.tzinfo is not None:
        t = t.tz_convert("UTC").tz_localize(None)
    if end:
        for pattern, period in _DATE_PRECISION:
            if pattern.match(text):
                offset = (pd.offsets.YearBegin(1) if period == "YS" else
                          pd.offsets.MonthBegin(1) if period == "MS" else pd.Timedelta(days=1))
                t = t + offset - pd.Timedelta(1, "ns")
                break
    return t


def slice_param(query: Query, name: str, size: int) -> slice:
    """``a:b`` (either side optional) or a single index ``k``, within [0, size)."""
    text = raw(query, name)
    allowed = f"an index k or a range a:b with 0 <= a < b <= {size}"
    if text is None or text == "":
        return slice(0, size)
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            start = int(a) if a.strip() else 0
            stop = int(b) if b.strip() else size
        else:
            start = int(text)
            stop = start + 1
    except ValueError:
        raise ParamError(f"parameter {name!r} must be {allowed}; got {text!r}", name, allowed,
                         text) from None
    if not 0 <= start < stop <= size:
        raise ParamError(f"parameter {name!r} must be {allowed}; got {text!r}", name, allowed,
                         text)
    return slice(start, stop)


def _range_text(kind: str, minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f"{kind} in [{minimum}, {maximum}]"
    if minimum is not None:
        return f"{kind} >= {minimum}"
    if maximum is not None:
        return f"{kind} <= {maximum}"
    return kind


# -- OpenAPI parameter objects -------------------------------------------------------------
@dataclass(frozen=True)
class P:
    """Builders of OpenAPI parameter objects."""

    @staticmethod
    def query(name: str, description: str, schema: dict | None = None,
              required: bool = False) -> dict:
        return {"name": name, "in": "query", "description": description,
                "required": required, "schema": schema or {"type": "string"}}

    @staticmethod
    def path(name: str, description: str, schema: dict | None = None) -> dict:
        return {"name": name, "in": "path", "description": description, "required": True,
                "schema": schema or {"type": "string"}}


GBIF_ID = P.path("gbif_id", "GBIF occurrence id of the observation", {"type": "integer"})
IMAGE_NUMBER = P.path("image_number", "number of the image within its observation (0-based)",
                      {"type": "integer", "minimum": 0})
SPECIES_PATH = P.path("species", "taxon id, scientific name or its slug "
                      "(e.g. quercus_virginiana)")
FILTERS = [
    P.query("bbox", "west,south,east,north (degrees, WGS84)",
            {"type": "string", "example": "-81.5,28.2,-81.0,28.6"}),
    P.query("start", "earliest time (inclusive), " + TIME_ALLOWED, {"type": "string"}),
    P.query("end", "latest time (inclusive; a year, month or day includes all of it), "
            + TIME_ALLOWED, {"type": "string"}),
    P.query("species", "comma-separated taxon ids, scientific names or slugs",
            {"type": "string"}),
    P.query("split", "data split", {"type": "string", "enum": ["train", "temporal_test"]}),
]
HAS_VISION = P.query("has_vision", "only observations with (true) or without (false) vision "
                     "embeddings", {"type": "boolean"})


def paging(max_page: int, default: int = 100) -> list[dict]:
    return [
        P.query("limit", f"page size (at most {max_page})",
                {"type": "integer", "minimum": 1, "maximum": max_page, "default": default}),
        P.query("offset", "index of the first result", {"type": "integer", "minimum": 0,
                                                        "default": 0}),
    ]


def names(params: Sequence[dict], where: str = "query") -> list[str]:
    return [p["name"] for p in params if p["in"] == where]
