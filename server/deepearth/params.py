"""The DeepEarth API's parameter groups and their values, with every default in one place.

Each group yields its OpenAPI parameters and its validated value (see
:mod:`server.common.params`); the values are what the controllers take, so the viewer
panels and notebooks build the same objects (``EmbeddingId(gbif_id, 0)``,
``AttentionStyle()``) without HTTP.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cube_gen import schema as S

from .. import render
from ..common import params as P
from ..common.errors import ParamError
from ..common.handler import MAX_BODY_BYTES
from ..config import DEFAULTS

# -- defaults (the panels and render use these too) ----------------------------------------
ATTENTION_METHOD = "l2norm"
ATTENTION_FRAME = "mean"
COLORMAP = "plasma"
ALPHA = 0.7
IMAGE_SIZE = 384
MIN_IMAGE_SIZE = 8
K = 10
DTYPES = ("float16", "float32")
MAX_IMAGE_NUMBER = 65535


# -- values --------------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbeddingId:
    """One vision embedding: the observation's GBIF id and the image number (0-based)."""

    gbif_id: int
    image_number: int = 0


@dataclass(frozen=True)
class AttentionMap:
    method: str = ATTENTION_METHOD
    frame: str = ATTENTION_FRAME


@dataclass(frozen=True)
class AttentionStyle(AttentionMap):
    """An attention map drawn as PNG: colour map, alpha factor, side in pixels."""

    colormap: str = COLORMAP
    alpha: float = ALPHA
    size: int = IMAGE_SIZE


@dataclass(frozen=True)
class FeatureSlice:
    """``frame`` (all, mean, k or a:b), ``patch_y``, ``patch_x``, ``feature`` as given."""

    frame: str | None = None
    patch_y: str | None = None
    patch_x: str | None = None
    feature: str | None = None

    def resolve(self, shape: Sequence[int]) -> tuple[slice | str, slice, slice, slice]:
        """Slices within a tensor of ``shape`` (frame, patch_y, patch_x, feature); 400 when
        a range does not fit."""
        n_frames, ny, nx, nf = shape
        if self.frame == "mean":
            frame: slice | str = "mean"
        elif self.frame in (None, "", "all"):
            frame = slice(0, n_frames)
        else:
            frame = P.slice_param({"frame": [self.frame]}, "frame", n_frames)
        return (frame, *(P.slice_param({} if v is None else {name: [v]}, name, n)
                         for name, v, n in (("patch_y", self.patch_y, ny),
                                            ("patch_x", self.patch_x, nx),
                                            ("feature", self.feature, nf))))

    def nbytes(self, dtype: str, shape: Sequence[int] = S.L.VISION_SHAPE) -> int:
        """Bytes of the answer (the whole tensor when the slice does not fit ``shape``)."""
        try:
            frame, *rest = self.resolve(shape)
            frames = 1 if frame == "mean" else frame.stop - frame.start
            n = frames * math.prod(x.stop - x.start for x in rest)
        except ParamError:
            n = math.prod(shape)
        return n * np.dtype(dtype).itemsize


@dataclass(frozen=True)
class BatchRequest:
    ids: list[tuple[int, int]]
    kind: str = "pooled"
    dtype: str = "float32"
    format: str = "npy"

    def nbytes(self) -> int:
        item = S.L.N_FEATURES if self.kind == "pooled" else math.prod(S.L.VISION_SHAPE)
        return len(self.ids) * item * np.dtype(self.dtype).itemsize


# -- groups --------------------------------------------------------------------------------
GBIF_ID_DOC = P.path_param("gbif_id", "GBIF occurrence id of the observation",
                           {"type": "integer"})


@dataclass(frozen=True)
class GbifIdPath(P.Group):
    def openapi(self) -> list[dict]:
        return [GBIF_ID_DOC]

    def read(self, inputs: P.Inputs) -> int:
        return P.path_int("gbif_id", inputs.path["gbif_id"])


@dataclass(frozen=True)
class EmbeddingPath(P.Group):
    """``/{gbif_id}/{image_number}`` -> :class:`EmbeddingId`."""

    def openapi(self) -> list[dict]:
        return [GBIF_ID_DOC, P.path_param(
            "image_number", "number of the image within its observation (0-based)",
            {"type": "integer", "minimum": 0})]

    def read(self, inputs: P.Inputs) -> EmbeddingId:
        return EmbeddingId(P.path_int("gbif_id", inputs.path["gbif_id"]),
                           P.path_int("image_number", inputs.path["image_number"], 0,
                                      MAX_IMAGE_NUMBER))


@dataclass(frozen=True)
class SpeciesPath(P.Group):
    def openapi(self) -> list[dict]:
        return [P.path_param("species", "taxon id, scientific name or its slug "
                             "(e.g. quercus_virginiana)")]

    def read(self, inputs: P.Inputs) -> str:
        return inputs.path["species"]


_METHOD = P.Choice("method", "reduction of the 1408 features per patch",
                   S.ATTENTION_METHODS, ATTENTION_METHOD)
_FRAME = P.Choice("frame", "frame mean or one frame", S.ATTENTION_FRAMES, ATTENTION_FRAME)
_COLORMAP = P.Choice("colormap", "matplotlib colormap name", render.colormap_names,
                     COLORMAP, documented=False)
_ALPHA = P.Number("alpha", "opacity factor: pixel alpha = normalised value x alpha", ALPHA,
                  0.0, 1.0)


def image_size(description: str) -> P.Integer:
    """``size``: PNG side in pixels (at most the ``MaxImageSize`` setting)."""
    return P.Integer("size", description, IMAGE_SIZE, MIN_IMAGE_SIZE,
                     DEFAULTS["MaxImageSize"], "MaxImageSize")


_SIZE = image_size("image side in pixels (bilinear from 24 x 24)")


@dataclass(frozen=True)
class AttentionMapGroup(P.Group):
    """``method`` and ``frame`` -> :class:`AttentionMap`."""

    def openapi(self) -> list[dict]:
        return _METHOD.openapi() + _FRAME.openapi()

    def read(self, inputs: P.Inputs) -> AttentionMap:
        return AttentionMap(_METHOD.read(inputs), _FRAME.read(inputs))


@dataclass(frozen=True)
class AttentionStyleGroup(P.Group):
    """``method``, ``frame``, ``colormap``, ``alpha``, ``size`` -> :class:`AttentionStyle`."""

    def openapi(self) -> list[dict]:
        return [*AttentionMapGroup().openapi(), *_COLORMAP.openapi(), *_ALPHA.openapi(),
                *_SIZE.openapi()]

    def read(self, inputs: P.Inputs) -> AttentionStyle:
        att = AttentionMapGroup().read(inputs)
        return AttentionStyle(att.method, att.frame, _COLORMAP.read(inputs),
                              _ALPHA.read(inputs), _SIZE.read(inputs))


def dtype(default: str) -> P.Choice:
    return P.Choice("dtype", "value type", DTYPES, default)


def array_format(description: str, options: Sequence[str] = ("npy", "raw")) -> P.Choice:
    return P.Choice("format", description, options, "npy")


@dataclass(frozen=True)
class FeatureSliceGroup(P.Group):
    """``frame``, ``patch_y``, ``patch_x``, ``feature`` -> :class:`FeatureSlice`."""

    def openapi(self) -> list[dict]:
        return [
            P.query_param("frame", "all (default), mean (frame mean, kept as a frame axis of "
                          "length 1), an index k or a range a:b", {"type": "string"}),
            P.query_param("patch_y", "patch row index k or range a:b (0..24)",
                          {"type": "string"}),
            P.query_param("patch_x", "patch column index k or range a:b (0..24)",
                          {"type": "string"}),
            P.query_param("feature", "feature index k or range a:b (0..1408)",
                          {"type": "string"}),
        ]

    def read(self, inputs: P.Inputs) -> FeatureSlice:
        q = inputs.query
        return FeatureSlice(*(P.raw(q, n) for n in ("frame", "patch_y", "patch_x", "feature")))


_BATCH_FIELDS = ("ids", "kind", "dtype", "format")
_BATCH_ALLOWED = 'a JSON object {"ids": [[gbif_id, image_number], ...]}'


@dataclass(frozen=True)
class BatchBody(P.Group):
    """The JSON body ``{"ids": [[gbif_id, image_number], ...], "kind", "dtype", "format"}``
    -> :class:`BatchRequest` (at most ``MaxBatchPooled`` / ``MaxBatchFeatures`` ids)."""

    def openapi(self) -> list[dict]:
        return []

    @staticmethod
    def request_body() -> dict:
        return {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["ids"],
            "properties": {
                "ids": {"type": "array", "description": "[gbif_id, image_number] pairs",
                        "items": {"type": "array", "items": {"type": "integer"},
                                  "minItems": 2, "maxItems": 2}},
                "kind": {"type": "string", "enum": ["pooled", "features"],
                         "default": "pooled"},
                "dtype": {"type": "string", "enum": list(DTYPES),
                          "description": "default: float32 for pooled, float16 for features"},
                "format": {"type": "string", "enum": ["npy", "raw"], "default": "npy"},
            }}}}}

    def read(self, inputs: P.Inputs) -> BatchRequest:
        body = inputs.body
        if len(body) > MAX_BODY_BYTES:
            raise ParamError(f"the body is larger than {MAX_BODY_BYTES} bytes", "body",
                             f"at most {MAX_BODY_BYTES} bytes of JSON")
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: [[[[...
            raise ParamError("the body is not valid JSON", "body", _BATCH_ALLOWED) from None
        if not isinstance(data, dict):
            raise ParamError("the body must be a JSON object", "body", _BATCH_ALLOWED)
        unknown = sorted(set(data) - set(_BATCH_FIELDS))
        if unknown:
            raise ParamError(f"unknown body field {unknown[0]!r}", unknown[0],
                             list(_BATCH_FIELDS))

        def field(name: str, options: Sequence[str], default: str) -> Any:
            v = data.get(name, default)
            if v not in options:
                raise ParamError(f"body field {name!r} must be one of {', '.join(options)}",
                                 name, list(options), v)
            return v

        kind = field("kind", ["pooled", "features"], "pooled")
        dt = field("dtype", list(DTYPES), "float32" if kind == "pooled" else "float16")
        fmt = field("format", ["npy", "raw"], "npy")
        key = "MaxBatchPooled" if kind == "pooled" else "MaxBatchFeatures"
        limit = int(inputs.settings.get(key, DEFAULTS[key]))
        ids = data.get("ids")
        allowed = f"a list of 1 to {limit} [gbif_id, image_number] integer pairs"
        if not isinstance(ids, list) or not 1 <= len(ids) <= limit:
            raise ParamError(f"body field 'ids' must be {allowed}", "ids", allowed,
                             len(ids) if isinstance(ids, list) else None)
        pairs = []
        for item in ids:
            if not (isinstance(item, list) and len(item) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62
                            for v in item)):
                raise ParamError(f"body field 'ids' must be {allowed}; bad item {item!r}",
                                 "ids", allowed, item)
            pairs.append((item[0], item[1]))
        return BatchRequest(pairs, kind, dt, fmt)


# -- the declared groups -------------------------------------------------------------------
EMBEDDING = EmbeddingPath()
GBIF_ID = GbifIdPath()
SPECIES = SpeciesPath()
PAGING = P.Paging(100, DEFAULTS["MaxPageSize"])
FILTERS = P.Filters()
FILTERS_WITH_VISION = P.Filters(has_vision=True)
ATTENTION = AttentionMapGroup()
ATTENTION_STYLE = AttentionStyleGroup()
FEATURE_SLICE = FeatureSliceGroup()
BATCH = BatchBody()


def k_param(description: str = "number of results") -> P.Integer:
    """``k`` nearest neighbours (at most the ``MaxK`` setting)."""
    return P.Integer("k", description, K, 1, DEFAULTS["MaxK"], "MaxK")


def include_self(description: str) -> P.Boolean:
    return P.Boolean("include_self", description, False)
