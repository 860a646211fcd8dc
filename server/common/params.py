"""Request parameters: parsers of single values, and parameter groups declared once.

A parameter group (:class:`Group`) is declared once per concept (paging, filters, an
embedding id, ...): it yields both its OpenAPI parameter objects (:meth:`Group.openapi`) and
its validated value with its defaults (:meth:`Group.read`), so the documentation and the
parsing cannot drift apart. Route declarations (:func:`server.common.handler.endpoint`) take
a mapping of groups and pass their values to the route function as keyword arguments.

Every parser raises :class:`~server.common.errors.ParamError` naming the parameter, the
value received and what is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from cube_gen import schema as S
from cube_gen.query import Query

from .errors import ParamError

# -- parsing -------------------------------------------------------------------------------
QueryArgs = Mapping[str, Sequence[str]]  # name -> values, as tornado parses them


def raw(query: QueryArgs, name: str) -> str | None:
    """The single value of a query parameter (None when absent); repeated values are an error."""
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise ParamError(f"parameter {name!r} is given {len(values)} times; give it once",
                         name, "a single value", list(values))
    return values[0]


def check_known(query: QueryArgs, allowed: Sequence[str]) -> None:
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        raise ParamError(f"unknown parameter {unknown[0]!r}", unknown[0],
                         sorted(allowed) or "no parameters", None)


def integer(query: QueryArgs, name: str, default: int | None = None, minimum: int | None = None,
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


def number(query: QueryArgs, name: str, default: float | None = None,
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


def choice(query: QueryArgs, name: str, options: Sequence[str], default: str | None = None) -> str:
    text = raw(query, name)
    if text is None or text == "":
        return default
    if text not in options:
        raise ParamError(f"parameter {name!r} must be one of {', '.join(options)}; got {text!r}",
                         name, list(options), text)
    return text


def boolean(query: QueryArgs, name: str, default: bool | None = None) -> bool | None:
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


def bbox(query: QueryArgs, name: str = "bbox") -> tuple[float, float, float, float] | None:
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


def time(query: QueryArgs, name: str, end: bool = False) -> pd.Timestamp | None:
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


def slice_param(query: QueryArgs, name: str, size: int) -> slice:
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


def path_int(name: str, value: str, minimum: int = 0, maximum: int = 2**62) -> int:
    """A non-negative integer path segment: ASCII digits only (no sign, spaces, ``_``,
    or other scripts' digits, which ``int`` would accept)."""
    if not (value.isascii() and value.isdigit()) or len(value) > 20:
        allowed = f"an integer in [{minimum}, {maximum}]"
        raise ParamError(f"parameter {name!r} must be {allowed}, got {value[:100]!r}", name,
                         allowed, value[:100])
    return integer({}, name, None, minimum, maximum, value=value)


# -- OpenAPI parameter objects -------------------------------------------------------------
def query_param(name: str, description: str, schema: dict | None = None,
                required: bool = False) -> dict:
    return {"name": name, "in": "query", "description": description,
            "required": required, "schema": schema or {"type": "string"}}


def path_param(name: str, description: str, schema: dict | None = None) -> dict:
    return {"name": name, "in": "path", "description": description, "required": True,
            "schema": schema or {"type": "string"}}


def names(params: Sequence[dict], where: str = "query") -> list[str]:
    return [p["name"] for p in params if p["in"] == where]


# -- parameter groups ----------------------------------------------------------------------
@dataclass(frozen=True)
class Inputs:
    """What a group reads: the query (name -> values), path segments, body, server settings."""

    query: Mapping[str, Sequence[str]]
    path: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    settings: Mapping[str, Any] = field(default_factory=dict)


class Group:
    """A set of request parameters declared once: OpenAPI objects and the validated value."""

    def openapi(self) -> list[dict]:
        raise NotImplementedError

    def read(self, inputs: Inputs) -> Any:
        raise NotImplementedError


def _limit(static: int | None, settings: Mapping[str, Any], key: str | None) -> int | None:
    """A maximum: the server setting ``key`` when given, else the static one."""
    return int(settings[key]) if key and key in settings else static


@dataclass(frozen=True)
class Integer(Group):
    """One integer query parameter; ``max_setting`` names a server setting that bounds it."""

    name: str
    description: str
    default: int | None = None
    minimum: int | None = None
    maximum: int | None = None
    max_setting: str | None = None
    documented_maximum: int | None = None  # written into the OpenAPI schema
    default_setting: str | None = None  # a server setting that is the default when present

    def openapi(self) -> list[dict]:
        schema: dict[str, Any] = {"type": "integer"}
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.documented_maximum is not None:
            schema["maximum"] = self.documented_maximum
        if self.default is not None:
            schema["default"] = self.default
        return [query_param(self.name, self.description, schema)]

    def read(self, inputs: Inputs) -> int | None:
        maximum = _limit(self.maximum, inputs.settings, self.max_setting)
        default = _limit(self.default, inputs.settings, self.default_setting)
        return integer(inputs.query, self.name, default, self.minimum, maximum)


@dataclass(frozen=True)
class Number(Group):
    name: str
    description: str
    default: float | None = None
    minimum: float | None = None
    maximum: float | None = None

    def openapi(self) -> list[dict]:
        schema: dict[str, Any] = {"type": "number"}
        for key in ("minimum", "maximum", "default"):
            if getattr(self, key) is not None:
                schema[key] = getattr(self, key)
        return [query_param(self.name, self.description, schema)]

    def read(self, inputs: Inputs) -> float | None:
        return number(inputs.query, self.name, self.default, self.minimum, self.maximum)


@dataclass(frozen=True)
class Choice(Group):
    """One query parameter from a list of options (``options`` may be a callable)."""

    name: str
    description: str
    options: Sequence[str] | Callable[[], Sequence[str]]
    default: str | None = None
    documented: bool = True  # write the options into the schema as an enum

    def values(self) -> list[str]:
        return list(self.options() if callable(self.options) else self.options)

    def openapi(self) -> list[dict]:
        schema: dict[str, Any] = {"type": "string"}
        if self.documented:
            schema["enum"] = self.values()
        if self.default is not None:
            schema["default"] = self.default
        return [query_param(self.name, self.description, schema)]

    def read(self, inputs: Inputs) -> str | None:
        return choice(inputs.query, self.name, self.values(), self.default)


@dataclass(frozen=True)
class Boolean(Group):
    name: str
    description: str
    default: bool | None = None

    def openapi(self) -> list[dict]:
        schema: dict[str, Any] = {"type": "boolean"}
        if self.default is not None:
            schema["default"] = self.default
        return [query_param(self.name, self.description, schema)]

    def read(self, inputs: Inputs) -> bool | None:
        return boolean(inputs.query, self.name, self.default)


@dataclass(frozen=True)
class PageRequest:
    offset: int
    limit: int


@dataclass(frozen=True)
class Paging(Group):
    """``limit`` (at most the ``MaxPageSize`` setting) and ``offset``."""

    default: int = 100
    documented_maximum: int = 10_000

    def openapi(self) -> list[dict]:
        m = self.documented_maximum
        return [
            query_param("limit", f"page size (at most {m})",
                        {"type": "integer", "minimum": 1, "maximum": m,
                         "default": self.default}),
            query_param("offset", "index of the first result",
                        {"type": "integer", "minimum": 0, "default": 0}),
        ]

    def read(self, inputs: Inputs) -> PageRequest:
        maximum = _limit(self.documented_maximum, inputs.settings, "MaxPageSize")
        limit = integer(inputs.query, "limit", self.default, 1, maximum)
        offset = integer(inputs.query, "offset", 0, 0, 2**62)
        return PageRequest(offset, limit)


MAX_SPECIES_TOKENS = 1000


@dataclass(frozen=True)
class Filters(Group):
    """``bbox``, ``start``, ``end``, ``species``, ``split`` (and ``has_vision``): a
    :class:`cube_gen.access.Query` whose species are still the tokens the client gave
    (the cube set resolves them)."""

    has_vision: bool = False

    def openapi(self) -> list[dict]:
        params = [
            query_param("bbox", "west,south,east,north (degrees, WGS84)",
                        {"type": "string", "example": "-81.5,28.2,-81.0,28.6"}),
            query_param("start", "earliest time (inclusive), " + TIME_ALLOWED,
                        {"type": "string"}),
            query_param("end", "latest time (inclusive; a year, month or day includes all "
                        "of it), " + TIME_ALLOWED, {"type": "string"}),
            query_param("species", "comma-separated taxon ids, scientific names or slugs",
                        {"type": "string"}),
            query_param("split", "data split",
                        {"type": "string", "enum": list(S.SPLIT_CODES)}),
            query_param("taxa", "species search: parts of scientific names, genera, "
                        "'cluster 3' or 'unclustered', comma-separated (any term matches)",
                        {"type": "string", "example": "Quercus, cluster 3"}),
            query_param("months", "months of year a-b (1..12; wraps: 11-2 is Nov..Feb)",
                        {"type": "string", "example": "3-5"}),
            query_param("hours", "hours of day a-b (0..23; wraps; only times known to the "
                        "hour match)", {"type": "string", "example": "6-11"}),
            query_param("year", "year or years a-b", {"type": "string", "example": "2020-2022"}),
            query_param("polygon", "polygon 'lon,lat;lon,lat;...' (WGS84; observations "
                        "inside it, point in polygon)", {"type": "string"}),
        ]
        if self.has_vision:
            params.append(query_param("has_vision", "only observations with (true) or "
                                      "without (false) vision embeddings",
                                      {"type": "boolean"}))
        return params

    def read(self, inputs: Inputs) -> Query:
        query = inputs.query
        start = time(query, "start")
        end = time(query, "end", end=True)
        if start is not None and end is not None and end < start:
            raise ParamError("parameter 'end' is before 'start'", "end",
                             "a time at or after 'start'", raw(query, "end"))
        text = raw(query, "species")
        tokens = None
        if text is not None and text.strip():
            tokens = tuple(t.strip() for t in text.split(",") if t.strip())
            if len(tokens) > MAX_SPECIES_TOKENS:
                raise ParamError(f"parameter 'species' lists more than {MAX_SPECIES_TOKENS} "
                                 "species", "species",
                                 f"at most {MAX_SPECIES_TOKENS} comma-separated species", None)
        extra = {}
        for name, key in (("months", "months"), ("hours", "hours"), ("year", "years"),
                          ("polygon", "polygon")):
            value = raw(query, name)
            if value is not None and value.strip():
                extra[key] = value
        try:
            return Query.make(bbox=bbox(query), start=start, end=end, species=tokens,
                              split=choice(query, "split", list(S.SPLIT_CODES)),
                              has_vision=boolean(query, "has_vision") if self.has_vision
                              else None, taxa=raw(query, "taxa"), **extra)
        except ValueError as exc:  # phenology ranges and polygons name themselves
            param = {"months": "months", "hours": "hours", "years": "year"}.get(
                str(exc).split(" ", 1)[0], "polygon")
            raise ParamError(str(exc), param, None, raw(query, param)) from None


@dataclass(frozen=True)
class PathSegment(Group):
    """A path segment passed as it is (``documented_name``: its OpenAPI name)."""

    name: str
    description: str
    documented_name: str | None = None

    def openapi(self) -> list[dict]:
        return [path_param(self.documented_name or self.name, self.description)]

    def read(self, inputs: Inputs) -> str:
        return inputs.path.get(self.name, "")
