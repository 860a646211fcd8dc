"""HTTP routes of the DeepEarth API: thin handlers that parse, call a service, write bytes.

Every handler is ``async`` and does its work on the context's worker threads, so the
tornado IO loop never blocks. Errors are written here as JSON ``{"error": {...}}`` bodies
naming the parameter and what is allowed (never a traceback): xcube's own error path
would put the Python traceback in the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import math
import platform
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
from xcube.constants import LOG
from xcube.server.api import ApiHandler

from cube_gen import schema as S
from cube_gen.errors import NotFoundError

from . import params as P
from . import render
from .api import API_VERSION, URL_PREFIX, api
from .config import DEFAULTS, SECTION
from .context import DeepEarthContext
from .params import ApiProblem, MethodNotAllowed, NotFound, ParamError, Unavailable
from .service import FeatureSlice, Filters

MAX_BODY_BYTES = 4 * 1024 * 1024
# Longest query string (names and values) an endpoint reads: 1000 species names fit.
# Tornado itself closes the connection on request heads over its ``max_header_size``
# (64 KiB unless the server config's ``tornado`` section raises it).
MAX_QUERY_BYTES = 64 * 1024


class UriTooLong(ApiProblem):
    status = 414


def check_query_size(request) -> None:
    """414 naming the longest parameter when the query string (as sent, percent-encoded)
    is longer than ``MAX_QUERY_BYTES``."""
    size = len(request.url.partition("?")[2])
    if size > MAX_QUERY_BYTES:
        sizes = {k: len(k) + sum(len(v) for v in values) for k, values in request.query.items()}
        longest = max(sizes, key=sizes.get) if sizes else "query"
        raise UriTooLong(f"the query string has {size} bytes, more than {MAX_QUERY_BYTES} "
                         f"(the longest parameter is {longest[:64]!r})", longest[:64],
                         f"at most {MAX_QUERY_BYTES} bytes of query string")

# -- OpenAPI response objects --------------------------------------------------------------
_ERROR = {"$ref": "#/components/schemas/Error"}


def _error_response(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


ERRORS = {
    "400": _error_response("Bad parameter: the body names the parameter and the allowed "
                           "values"),
    "404": _error_response("Unknown id: the body names the parameter"),
    "414": _error_response("Query string longer than 64 KiB: the body names the longest "
                           "parameter"),
    "500": _error_response("Damaged cube data (the body names the file) or an internal "
                           "error (a reference to the server log; never a traceback)"),
    "503": _error_response("Cube set unreadable (moved away, storage down), server busy, "
                           "or the request timed out"),
}


def json_ok(description: str, media_type: str = "application/json") -> dict:
    return {"200": {"description": description,
                    "content": {media_type: {"schema": {"type": "object"}}}}, **ERRORS}


def binary_ok(description: str) -> dict:
    headers = {
        "X-DeepEarth-Dtype": {"description": "numpy dtype of the values (little-endian)",
                              "schema": {"type": "string"}},
        "X-DeepEarth-Shape": {"description": "comma-separated array shape",
                              "schema": {"type": "string"}},
    }
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {"200": {"description": description, "headers": headers,
                    "content": {"application/x-npy": binary,
                                "application/octet-stream": binary}}, **ERRORS}


def png_ok(description: str) -> dict:
    return {"200": {"description": description,
                    "content": {"image/png": {"schema": {"type": "string",
                                                         "format": "binary"}}}}, **ERRORS}


# -- output helpers ------------------------------------------------------------------------
def _clean(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_clean(v) for v in o]
    if isinstance(o, np.ndarray):
        return _clean(o.tolist())
    if isinstance(o, np.generic):
        return _clean(o.item())
    return o


def json_bytes(obj: Any) -> bytes:
    return json.dumps(_clean(obj), separators=(",", ":"), allow_nan=False).encode()


async def _flushed(written: Any, timeout: float) -> None:
    """Wait (at most ``timeout`` s) until tornado has handed a response to the socket."""
    if written is None:
        return
    done, _ = await asyncio.wait({asyncio.ensure_future(written)}, timeout=timeout)
    for fut in done:
        fut.exception()  # a client that went away: nothing to do, but retrieve it


def npy_header(arr: np.ndarray) -> bytes:
    """The .npy header (format 1.0) of a C-contiguous array; the raw bytes follow it."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
    return buf.getvalue()


class Handler(ApiHandler[DeepEarthContext]):
    """Base: JSON/binary writers and JSON errors for every method."""

    @property
    def query(self):
        return self.request.query

    def _finish(self, data: bytes, content_type: str, status: int = 200,
                headers: dict[str, str] | None = None):
        """Write the response; returns tornado's future of the write (or None)."""
        self.response.set_status(status)
        self.response.set_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.response.set_header(k, v)
        return self.response.finish(data)

    def send_json(self, obj: Any, content_type: str = "application/json",
                  status: int = 200) -> None:
        self._finish(json_bytes(obj), content_type, status)

    def send_png(self, data: bytes) -> None:
        self._finish(data, "image/png", headers={"Cache-Control": "public, max-age=3600"})

    async def reply_json(self, obj: Any, content_type: str = "application/json") -> None:
        """Serialise on a worker thread (large payloads), then write."""
        self._finish(await self.ctx.run(json_bytes, obj), content_type)

    async def reply_array(self, arr: np.ndarray, fmt: str, name: str) -> None:
        """Encode on a worker thread (tens of MB), then write."""
        headers = {
            "X-DeepEarth-Dtype": arr.dtype.name,
            "X-DeepEarth-Shape": ",".join(str(n) for n in arr.shape),
            "X-DeepEarth-Byte-Order": "little",
            "Access-Control-Expose-Headers": "X-DeepEarth-Dtype, X-DeepEarth-Shape, "
                                             "X-DeepEarth-Byte-Order",
        }
        if fmt == "npy":
            headers["Content-Disposition"] = f'attachment; filename="{name}.npy"'
            # one bytes object built off the loop: tornado sends a single chunk uncopied
            data = await self.ctx.run(lambda: npy_header(arr) + arr.tobytes())
            written = self._finish(data, "application/x-npy", headers=headers)
        else:
            data = await self.ctx.run(np.ascontiguousarray(arr).tobytes)
            headers["Content-Disposition"] = f'attachment; filename="{name}.bin"'
            written = self._finish(data, "application/octet-stream", headers=headers)
        del data
        # the bytes wait in tornado's write buffer until the client has read them
        await _flushed(written, float(self.ctx.settings["RequestTimeout"]))

    @contextlib.asynccontextmanager
    async def response_buffer(self, nbytes: int):
        """Hold ``nbytes`` of the context's response budget while a large response is
        computed, encoded and written (wait for them first), so that the server's memory
        stays bounded however many connections fetch tensors at once."""
        budget = self.ctx.response_budget
        timeout = float(self.ctx.settings["RequestTimeout"])
        try:
            held = await asyncio.wait_for(budget.acquire(nbytes), timeout)
        except TimeoutError:
            raise Unavailable(f"the server is busy sending large responses (waited {timeout:g} "
                              "s); retry later") from None
        try:
            yield
        finally:
            budget.release(held)

    def send_problem(self, problem: ApiProblem) -> None:
        self._finish(json_bytes(problem.body()), "application/json", problem.status)

    def link(self, path: str) -> str:
        return self.request.url_for_path(f"{URL_PREFIX}{path}".lstrip("/"), reverse=True)

    # Methods a route does not define: a JSON 405 instead of xcube's traceback.
    async def _not_allowed(self, *args, **kwargs):
        self.send_problem(MethodNotAllowed("method not allowed on this path", None,
                                           self.defined_methods() or None))

    head = post = put = delete = get = _not_allowed

    def options(self, *args, **kwargs):
        self.response.set_header("Access-Control-Allow-Methods", "GET,POST,OPTIONS")
        self.response.set_status(204)
        self.response.finish()


def endpoint(operation_id: str, summary: str, parameters: list[dict] | None = None,
             responses: dict | None = None, request_body: dict | None = None,
             description: str | None = None) -> Callable:
    """Document a handler method as an OpenAPI operation and give it JSON error handling.

    Query parameters not listed in ``parameters`` are rejected with a 400.
    """
    parameters = list(parameters or [])
    allowed = P.names(parameters, "query")

    def decorator(fn):
        @functools.wraps(fn)
        async def wrapper(self: Handler, *args, **kwargs):
            self.ctx.counters["requests"] += 1
            try:
                check_query_size(self.request)
                P.check_known(self.query, allowed)
                await fn(self, *args, **kwargs)
            except ApiProblem as problem:
                self.ctx.counters["errors"] += 1
                self.send_problem(problem)
            except NotFoundError as exc:
                self.ctx.counters["errors"] += 1
                self.send_problem(NotFound(str(exc)))
            except Exception:  # noqa: BLE001 - logged here, never sent to the client
                self.ctx.counters["errors"] += 1
                ref = uuid.uuid4().hex[:12]
                LOG.exception(f"DeepEarth: internal error {ref} in {operation_id}")
                problem = ApiProblem(f"internal error (reference {ref}; see the server log)")
                self.send_problem(problem)

        return api.operation(operation_id=operation_id, summary=summary,
                             description=description or fn.__doc__, parameters=parameters,
                             responses=responses, request_body=request_body)(wrapper)

    return decorator


# -- parameter groups ----------------------------------------------------------------------
def path_int(name: str, value: str, minimum: int = 0, maximum: int = 2**62) -> int:
    """A non-negative integer path segment: ASCII digits only (no sign, spaces, ``_``,
    or other scripts' digits, which ``int`` would accept)."""
    if not (value.isascii() and value.isdigit()) or len(value) > 20:
        allowed = f"an integer in [{minimum}, {maximum}]"
        raise ParamError(f"parameter {name!r} must be {allowed}, got {value[:100]!r}", name,
                         allowed, value[:100])
    return P.integer({}, name, None, minimum, maximum, value=value)


def filters(query, with_has_vision: bool = False) -> Filters:
    start = P.time(query, "start")
    end = P.time(query, "end", end=True)
    if start is not None and end is not None and end < start:
        raise ParamError("parameter 'end' is before 'start'", "end",
                         "a time at or after 'start'", P.raw(query, "end"))
    species = P.raw(query, "species")
    tokens = None
    if species is not None and species.strip():
        tokens = tuple(t.strip() for t in species.split(",") if t.strip())
        if len(tokens) > 1000:
            raise ParamError("parameter 'species' lists more than 1000 species", "species",
                             "at most 1000 comma-separated species", None)
    return Filters(
        bbox=P.bbox(query), start=start, end=end, species=tokens,
        split=P.choice(query, "split", list(S.SPLIT_CODES)),
        has_vision=P.boolean(query, "has_vision") if with_has_vision else None,
    )


def paging(ctx: DeepEarthContext, query, default: int = 100) -> tuple[int, int]:
    limit = P.integer(query, "limit", default, 1, int(ctx.settings["MaxPageSize"]))
    offset = P.integer(query, "offset", 0, 0, 2**62)
    return offset, limit


EMBEDDING = [P.GBIF_ID, P.IMAGE_NUMBER]
PAGING = P.paging(DEFAULTS["MaxPageSize"])
DTYPE = {"type": "string", "enum": ["float16", "float32"]}


# -- routes --------------------------------------------------------------------------------
@api.route(URL_PREFIX)
class IndexHandler(Handler):
    """The DeepEarth API: its endpoints."""

    @endpoint("deepearthIndex", "List the DeepEarth API endpoints",
              responses=json_ok("API name, version and endpoints"))
    async def get(self):
        ops = []
        for route in api.routes:
            for method in ("get", "post"):
                op = getattr(getattr(route.handler_cls, method, None), "__openapi__", None)
                if op:
                    ops.append({"method": method.upper(), "path": route.path,
                                "operation_id": op["operationId"],
                                "summary": op.get("summary", "")})
        self.send_json({"api": "deepearth", "version": API_VERSION,
                        "openapi": self.request.url_for_path("openapi.json", reverse=True),
                        "endpoints": ops})


@api.route(URL_PREFIX + "/health")
class HealthHandler(Handler):
    """Health of the service: cube set reachable, versions, cache statistics."""

    @endpoint("deepearthHealth", "Service health: cube set reachable, versions, caches",
              responses={**json_ok("Healthy"),
                         "503": _error_response("Not configured or cube set unreachable")})
    async def get(self):
        ctx = self.ctx
        body: dict[str, Any] = {
            "status": "ok", "api_version": API_VERSION, "versions": _versions(),
            "configured": ctx.configured, "cubeset": ctx.cubeset_url,
            "settings": ctx.settings, "server": ctx.status(), "cache": ctx.cache.stats(),
        }
        try:
            body["cubeset_status"] = await ctx.call("health", guard=False)
        except ApiProblem as problem:
            body["cubeset_status"] = {"reachable": False, "error": problem.message}
        if not body["cubeset_status"].get("reachable"):
            body["status"] = "unavailable"
        self.send_json(body, status=200 if body["status"] == "ok" else 503)


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "schema": S.SCHEMA_VERSION}
    for dist in ("deepearth-cube", "xcube-core", "xarray", "zarr", "numpy", "tornado"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "unknown"
    return out


@api.route(URL_PREFIX + "/observations")
class ObservationsHandler(Handler):
    """Observations selected by bounding box, time range, species, split and vision."""

    @endpoint("deepearthObservations", "Query observations (JSON or GeoJSON, paged)",
              parameters=[*P.FILTERS, P.HAS_VISION, *PAGING,
                          P.P.query("format", "response format",
                                    {"type": "string", "enum": ["json", "geojson"],
                                     "default": "json"})],
              responses={**json_ok("A page of observations"),
                         "200": {"description": "A page of observations",
                                 "content": {"application/json": {"schema": {"type": "object"}},
                                             "application/geo+json": {
                                                 "schema": {"type": "object"}}}}})
    async def get(self):
        """Observations in cube order (year, then space-filling curve). ``total`` counts
        all matches; page with ``offset`` and ``limit`` (``next_offset`` is null on the last
        page). ``format=geojson`` answers a FeatureCollection of points."""
        q = self.query
        f = filters(q, with_has_vision=True)
        offset, limit = paging(self.ctx, q)
        fmt = P.choice(q, "format", ["json", "geojson"], "json")
        page = await self.ctx.call("observations", f, offset, limit)
        if fmt == "json":
            await self.reply_json(page)
            return
        await self.reply_json(await self.ctx.run(_feature_collection, page),
                              content_type="application/geo+json")


def _feature_collection(page: dict[str, Any]) -> dict[str, Any]:
    features = [{"type": "Feature", "id": r["gbif_id"],
                 "geometry": {"type": "Point", "coordinates": [r["lon"], r["lat"]]},
                 "properties": r} for r in page["observations"]]
    return {"type": "FeatureCollection", "numberMatched": page["total"],
            "numberReturned": page["returned"], "offset": page["offset"],
            "limit": page["limit"], "next_offset": page["next_offset"],
            "query": page["query"], "features": features}


@api.route(URL_PREFIX + "/observations/{gbif_id}")
class ObservationHandler(Handler):
    """One observation."""

    @endpoint("deepearthObservation", "One observation with all fields and its images",
              parameters=[P.GBIF_ID], responses=json_ok("The observation"))
    async def get(self, gbif_id: str):
        """All fields of the observation, its species, its photo URLs and its vision
        embeddings (image number, photo, statistics and links to the tensor endpoints)."""
        gid = path_int("gbif_id", gbif_id)
        rec = await self.ctx.call("observation", gid)
        for e in rec["embeddings"]:
            base = f"/embeddings/{gid}/{e['image_number']}"
            e["links"] = {k: self.link(base + suffix) for k, suffix in (
                ("features", "/features"), ("pooled", "/pooled"),
                ("attention", "/attention.png"), ("attention_values", "/attention.json"),
                ("umap_rgb", "/umap_rgb.png"), ("stats", "/stats"), ("similar", "/similar"))}
        await self.reply_json(rec)


@api.route(URL_PREFIX + "/species")
class SpeciesListHandler(Handler):
    """All species."""

    @endpoint("deepearthSpeciesList", "Species: names, counts, colours, clusters",
              responses=json_ok("All species in species.zarr order"))
    async def get(self):
        await self.reply_json(await self.ctx.call("species_list"))


@api.route(URL_PREFIX + "/species/{species}")
class SpeciesHandler(Handler):
    """One species."""

    @endpoint("deepearthSpecies", "One species with its observations (paged) and embeddings",
              parameters=[P.SPECIES_PATH, *PAGING], responses=json_ok("The species"))
    async def get(self, species: str):
        offset, limit = paging(self.ctx, self.query)
        await self.reply_json(await self.ctx.call("species", species, offset, limit))


@api.route(URL_PREFIX + "/species/{species}/similar")
class SimilarSpeciesHandler(Handler):
    """Species similar to one species."""

    @endpoint("deepearthSimilarSpecies",
              "k most similar species (cosine of the language embeddings, exact)",
              parameters=[P.SPECIES_PATH,
                          P.P.query("k", "number of results",
                                    {"type": "integer", "minimum": 1, "default": 10}),
                          P.P.query("include_self", "include the species itself",
                                    {"type": "boolean", "default": False})],
              responses=json_ok("Ranked species with scores"))
    async def get(self, species: str):
        k = P.integer(self.query, "k", 10, 1, int(self.ctx.settings["MaxK"]))
        include_self = P.boolean(self.query, "include_self", False)
        await self.reply_json(await self.ctx.call("similar_species", species, k, include_self))


@api.route(URL_PREFIX + "/embeddings")
class EmbeddingsHandler(Handler):
    """Vision embeddings selected by bounding box, time range, species and split."""

    @endpoint("deepearthEmbeddings", "List vision embeddings (paged)",
              parameters=[*P.FILTERS, *PAGING],
              responses=json_ok("A page of (gbif_id, image_number) records"))
    async def get(self):
        f = filters(self.query)
        offset, limit = paging(self.ctx, self.query)
        await self.reply_json(await self.ctx.call("embeddings", f, offset, limit))


@api.route(URL_PREFIX + "/embeddings/batch")
class BatchHandler(Handler):
    """Many embeddings in one binary response."""

    @endpoint(
        "deepearthEmbeddingsBatch", "Batch retrieval of pooled vectors or full tensors",
        request_body={"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["ids"],
            "properties": {
                "ids": {"type": "array", "description": "[gbif_id, image_number] pairs",
                        "items": {"type": "array", "items": {"type": "integer"},
                                  "minItems": 2, "maxItems": 2}},
                "kind": {"type": "string", "enum": ["pooled", "features"],
                         "default": "pooled"},
                "dtype": {**DTYPE, "description": "default: float32 for pooled, float16 for "
                          "features"},
                "format": {"type": "string", "enum": ["npy", "raw"], "default": "npy"},
            }}}}},
        responses=binary_ok("(n, feature) pooled vectors or (n, frame, patch_y, patch_x, "
                            "feature) tensors in the order requested"))
    async def post(self):
        """POST a JSON body ``{"ids": [[gbif_id, image_number], ...], "kind": "pooled" |
        "features", "dtype": "float16" | "float32", "format": "npy" | "raw"}``. At most
        ``MaxBatchPooled`` pooled vectors or ``MaxBatchFeatures`` tensors per request."""
        body = self.request.body or b""
        if len(body) > MAX_BODY_BYTES:
            raise ParamError(f"the body is larger than {MAX_BODY_BYTES} bytes", "body",
                             f"at most {MAX_BODY_BYTES} bytes of JSON")
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: [[[[...
            raise ParamError("the body is not valid JSON", "body",
                             'a JSON object {"ids": [[gbif_id, image_number], ...]}') from None
        if not isinstance(data, dict):
            raise ParamError("the body must be a JSON object", "body",
                             'a JSON object {"ids": [[gbif_id, image_number], ...]}')
        unknown = sorted(set(data) - {"ids", "kind", "dtype", "format"})
        if unknown:
            raise ParamError(f"unknown body field {unknown[0]!r}", unknown[0],
                             ["ids", "kind", "dtype", "format"])

        def field(name, options, default):
            v = data.get(name, default)
            if v not in options:
                raise ParamError(f"body field {name!r} must be one of {', '.join(options)}",
                                 name, list(options), v)
            return v

        kind = field("kind", ["pooled", "features"], "pooled")
        dtype = field("dtype", ["float16", "float32"],
                      "float32" if kind == "pooled" else "float16")
        fmt = field("format", ["npy", "raw"], "npy")
        limit = int(self.ctx.settings["MaxBatchPooled" if kind == "pooled"
                                       else "MaxBatchFeatures"])
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
        item = S.L.N_FEATURES if kind == "pooled" else math.prod(S.L.VISION_SHAPE)
        # the array, then its encoded bytes
        async with self.response_buffer(2 * len(pairs) * item * np.dtype(dtype).itemsize):
            arr = await self.ctx.call("batch", pairs, kind, dtype)
            await self.reply_array(arr, fmt, f"batch-{kind}")


def _feature_slice(query, shape: tuple[int, ...]) -> FeatureSlice:
    n_frames, ny, nx, nf = shape
    frame_text = P.raw(query, "frame")
    if frame_text == "mean":
        frame: slice | str = "mean"
    elif frame_text in (None, "", "all"):
        frame = slice(0, n_frames)
    else:
        frame = P.slice_param(query, "frame", n_frames)
    return FeatureSlice(frame, P.slice_param(query, "patch_y", ny),
                        P.slice_param(query, "patch_x", nx),
                        P.slice_param(query, "feature", nf))


def _features_nbytes(query, dtype: str) -> int:
    """Bytes of a features answer, for the response budget (the published tensor shape;
    the whole tensor when the slice does not fit it: the service then judges it)."""
    try:
        sl = _feature_slice(query, S.L.VISION_SHAPE)
        frames = 1 if sl.frame == "mean" else sl.frame.stop - sl.frame.start
        n = frames * math.prod(x.stop - x.start for x in (sl.patch_y, sl.patch_x, sl.feature))
    except ParamError:
        n = math.prod(S.L.VISION_SHAPE)
    return n * np.dtype(dtype).itemsize


@api.route(URL_PREFIX + "/embeddings/{gbif_id}/{image_number}/features")
class FeaturesHandler(Handler):
    """The V-JEPA 2 patch features of one embedding."""

    @endpoint(
        "deepearthFeatures", "Vision features of one embedding as binary (.npy or raw)",
        parameters=[
            *EMBEDDING,
            P.P.query("dtype", "value type", {**DTYPE, "default": "float16"}),
            P.P.query("format", "npy: a .npy file; raw: little-endian values, dtype and shape "
                      "in the X-DeepEarth-Dtype / X-DeepEarth-Shape headers",
                      {"type": "string", "enum": ["npy", "raw"], "default": "npy"}),
            P.P.query("frame", "all (default), mean (frame mean, kept as a frame axis of "
                      "length 1), an index k or a range a:b", {"type": "string"}),
            P.P.query("patch_y", "patch row index k or range a:b (0..24)", {"type": "string"}),
            P.P.query("patch_x", "patch column index k or range a:b (0..24)",
                      {"type": "string"}),
            P.P.query("feature", "feature index k or range a:b (0..1408)", {"type": "string"}),
        ],
        responses=binary_ok("(frame, patch_y, patch_x, feature) array; slicing keeps all "
                            "four axes"))
    async def get(self, gbif_id: str, image_number: str):
        """The full (8, 24, 24, 1408) tensor by default (float16, the native precision)."""
        gid = path_int("gbif_id", gbif_id)
        num = path_int("image_number", image_number, 0, 65535)
        q = self.query
        dtype = P.choice(q, "dtype", ["float16", "float32"], "float16")
        fmt = P.choice(q, "format", ["npy", "raw"], "npy")

        def work(svc):
            return svc.features(gid, num, _feature_slice(q, svc.feature_shape()), dtype)
        nbytes = _features_nbytes(q, dtype)
        async with self.response_buffer(2 * nbytes):  # the array, then its encoded bytes
            arr = await self.ctx.call_with(work)
            await self.reply_array(arr, fmt, f"features-{gid}-{num}")


@api.route(URL_PREFIX + "/embeddings/{gbif_id}/{image_number}/pooled")
class PooledHandler(Handler):
    """The mean-pooled vector of one embedding."""

    @endpoint("deepearthPooled", "Mean-pooled 1408-d vector of one embedding",
              parameters=[*EMBEDDING,
                          P.P.query("dtype", "value type", {**DTYPE, "default": "float32"}),
                          P.P.query("format", "npy, raw or json",
                                    {"type": "string", "enum": ["npy", "raw", "json"],
                                     "default": "npy"})],
              responses=binary_ok("(feature,) vector (or JSON with format=json)"))
    async def get(self, gbif_id: str, image_number: str):
        gid = path_int("gbif_id", gbif_id)
        num = path_int("image_number", image_number, 0, 65535)
        dtype = P.choice(self.query, "dtype", ["float16", "float32"], "float32")
        fmt = P.choice(self.query, "format", ["npy", "raw", "json"], "npy")
        arr = await self.ctx.call("pooled", gid, num, dtype)
        if fmt == "json":
            await self.reply_json({"gbif_id": gid, "image_number": num, "dtype": dtype,
                            "pooled": arr.astype(np.float64).tolist()})
        else:
            await self.reply_array(arr, fmt, f"pooled-{gid}-{num}")


ATTENTION_PARAMS = [
    P.P.query("method", "reduction of the 1408 features per patch",
              {"type": "string", "enum": list(S.ATTENTION_METHODS), "default": "l2norm"}),
    P.P.query("frame", "frame mean or one frame",
              {"type": "string", "enum": list(S.ATTENTION_FRAMES), "default": "mean"}),
]


def _attention_args(query) -> tuple[str, str]:
    return (P.choice(query, "method", list(S.ATTENTION_METHODS), "l2norm"),
            P.choice(query, "frame", list(S.ATTENTION_FRAMES), "mean"))


@api.route(URL_PREFIX + "/embeddings/{gbif_id}/{image_number}/attention.png")
class AttentionPngHandler(Handler):
    """Attention map of one embedding as a PNG overlay."""

    @endpoint(
        "deepearthAttentionPng", "Attention map as PNG (colormap, alpha, size)",
        parameters=[
            *EMBEDDING, *ATTENTION_PARAMS,
            P.P.query("colormap", "matplotlib colormap name",
                      {"type": "string", "default": "plasma"}),
            P.P.query("alpha", "opacity factor: pixel alpha = normalised value x alpha",
                      {"type": "number", "minimum": 0, "maximum": 1, "default": 0.7}),
            P.P.query("size", "image side in pixels (bilinear from 24 x 24)",
                      {"type": "integer", "minimum": 8, "default": 384}),
        ],
        responses=png_ok("RGBA PNG"))
    async def get(self, gbif_id: str, image_number: str):
        """The precomputed 24 x 24 map, min-max normalised, resized bilinearly to
        ``size``, coloured with ``colormap``, alpha = value x ``alpha``."""
        gid = path_int("gbif_id", gbif_id)
        num = path_int("image_number", image_number, 0, 65535)
        q = self.query
        method, frame = _attention_args(q)
        colormap = P.choice(q, "colormap", render.colormap_names(), "plasma")
        alpha = P.number(q, "alpha", 0.7, 0.0, 1.0)
        size = P.integer(q, "size", 384, 8, int(self.ctx.settings["MaxImageSize"]))
        png = await self.ctx.call("attention_png", gid, num, method, frame, colormap, alpha,
                                  size)
        self.send_png(png)


@api.route(URL_PREFIX + "/embeddings/{gbif_id}/{image_number}/attention.json")
class AttentionJsonHandler(Handler):
    """Attention map values of one embedding."""

    @endpoint("deepearthAttentionJson", "Attention map values (24 x 24 raw and normalised)",
              parameters=[*EMBEDDING, *ATTENTION_PARAMS],
              responses=json_ok("raw and min-max normalised values, row-major"))
    async def get(self, gbif_id: str, image_number: str):
        gid = path_int("gbif_id", gbif_id)
        num = path_int("image_number", image_number, 0, 65535)
        method, frame = _attention_args(self.query)
        await self.reply_json(await self.ctx.call("attention", gid, num, method, frame))


@api.route(URL_PREFIX + "/embeddings/{gbif_id}/{image_number}/umap_rgb.png")
class UmapRgbHandler(Handler):
    """UMAP-RGB image of one embedding."""

    @endpoint("deepearthUmapRgb",
              "UMAP-RGB of the patches as PNG (precomputed, or computed once and cached)",
              parameters=[*EMBEDDING,
                          P.P.query("size", "image side in pixels",
                                    {"type": "integer", "minimum": 8, "default": 384}),
                          P.P.query("resample", "resampling from 24 x 24",
                                    {"type": "string", "enum": ["nearest", "bilinear"],
                                     "default": "nearest"})],
              responses=png_ok("RGB PNG"))
    async def get(self, gbif_id: str, image_number: str):
        """The 24 x 24 RGB image of the 3-D UMAP (cosine, 15 neighbours) of the frame-mean
        patches. The ``X-DeepEarth-Source`` header says ``precomputed`` or ``computed``."""
        gid = path_int("gbif_id", gbif_id)
        num = path_int("image_number", image_number, 0, 65535)
        size = P.integer(self.query, "size", 384, 8, int(self.ctx.settings["MaxImageSize"]))
        resample = P.choice(self.query, "resample", ["nearest", "bilinear"], "nearest")
        pos, rgb = await self.ctx.call("umap_rgb_precomputed", gid, num)
        source = "precomputed"
        if rgb is None:
            rgb = await self.ctx.call("umap_rgb_computed", pos, heavy=True)
            source = "computed"
        png = await self.ctx.run(render.rgb_png, rgb, size, resample)
        self.response.set_header("X-DeepEarth-Source", source)
        self.send_png(png)


@api.route(URL_PREFIX + "/embeddings/{gbif_id}/{image_number}/stats")
class ImageStatsHandler(Handler):
    """Statistics of one embedding."""

    @endpoint("deepearthEmbeddingStats", "Per-embedding statistics",
              parameters=EMBEDDING, responses=json_ok("statistics with descriptions"))
    async def get(self, gbif_id: str, image_number: str):
        gid = path_int("gbif_id", gbif_id)
        num = path_int("image_number", image_number, 0, 65535)
        await self.reply_json(await self.ctx.call("image_stats", gid, num))


@api.route(URL_PREFIX + "/embeddings/{gbif_id}/{image_number}/similar")
class SimilarEmbeddingsHandler(Handler):
    """Embeddings similar to one embedding."""

    @endpoint("deepearthSimilarEmbeddings",
              "k nearest embeddings (cosine of pooled vectors, exact), optionally filtered",
              parameters=[*EMBEDDING,
                          P.P.query("k", "number of results",
                                    {"type": "integer", "minimum": 1, "default": 10}),
                          *P.FILTERS,
                          P.P.query("include_self", "include the query embedding",
                                    {"type": "boolean", "default": False})],
              responses=json_ok("Ranked embeddings with cosine scores"))
    async def get(self, gbif_id: str, image_number: str):
        gid = path_int("gbif_id", gbif_id)
        num = path_int("image_number", image_number, 0, 65535)
        k = P.integer(self.query, "k", 10, 1, int(self.ctx.settings["MaxK"]))
        f = filters(self.query)
        include_self = P.boolean(self.query, "include_self", False)
        await self.reply_json(await self.ctx.call("similar_embeddings", gid, num, k, f,
                                                  include_self))


@api.route(URL_PREFIX + "/umap/species")
class SpeciesUmapHandler(Handler):
    """Language UMAP of the species."""

    @endpoint("deepearthSpeciesUmap", "Language UMAP of the species: 3-D coordinates, "
              "clusters, colours", responses=json_ok("species with x, y, z and clusters"))
    async def get(self):
        await self.reply_json(await self.ctx.call("species_umap"))


@api.route(URL_PREFIX + "/umap/vision")
class VisionUmapHandler(Handler):
    """Vision UMAP of the pooled vectors."""

    @endpoint("deepearthVisionUmap",
              "Vision UMAP of pooled vectors: whole set (precomputed) or filtered "
              "(recomputed, bounded, cached)",
              parameters=[*P.FILTERS,
                          P.P.query("max_points", "most embeddings projected when filtering "
                                    "(a seeded random subset when more match)",
                                    {"type": "integer", "minimum": 1,
                                     "default": DEFAULTS["MaxUmapPoints"]})],
              responses=json_ok("points with gbif_id, image_number, species, x, y, z"))
    async def get(self):
        """Without filters: the precomputed ``umap`` variable of vision.zarr. With filters:
        the matching embeddings projected again (UMAP, cosine; PCA below 8 points)."""
        cap = int(self.ctx.settings["MaxUmapPoints"])
        f = filters(self.query)
        max_points = P.integer(self.query, "max_points", cap, 1, cap)
        result = await self.ctx.call("vision_umap_cached", f, max_points)
        if result is None:
            result = await self.ctx.call("vision_umap", f, max_points, heavy=True)
        await self.reply_json(result)


@api.route(URL_PREFIX + "/stats/region")
class RegionStatsHandler(Handler):
    """Statistics of a region and time range."""

    @endpoint("deepearthRegionStats",
              "Region statistics: species composition, yearly and monthly counts, diversity",
              parameters=P.FILTERS,
              responses=json_ok("counts and diversity indices (richness, Shannon, Simpson)"))
    async def get(self):
        """Statistics of the observations in ``bbox`` and [``start``, ``end``] (all when
        omitted): species composition, counts per year and per month of year, richness,
        Shannon H' (natural log), Simpson dominance sum(p^2), Gini-Simpson 1 - sum(p^2),
        inverse Simpson and Pielou evenness."""
        await self.reply_json(await self.ctx.call("region_stats", filters(self.query)))


@api.route(URL_PREFIX + "/{*rest}")
class NotFoundHandler(Handler):
    """Any other path under /deepearth answers a JSON 404 (no operations)."""

    async def get(self, rest: str = ""):
        self.send_problem(NotFound(f"no endpoint {URL_PREFIX}/{rest}; see {URL_PREFIX} for "
                                   "the list", "path", None, f"{URL_PREFIX}/{rest}"))


__all__ = ["api", "SECTION"]
