"""THE handler base of every API of the plugin, and the route declaration.

:class:`Handler` runs work on the shared worker pools (:mod:`server.common.resources`:
timeout and back-pressure), holds the response budget while large responses are built and
written, and writes every error in its API's envelope (JSON here; the WMTS overrides
:meth:`Handler.write_problem` with OWS exception reports). No traceback reaches a client.

:func:`endpoint` declares one operation: path, operationId, parameter groups
(:mod:`server.common.params`) and the route function, which gets the handler and the
groups' validated values as keyword arguments::

    @endpoint(api, "/deepearth/species/{species}", "deepearthSpecies", "One species",
              params={"species": SPECIES, "page": PAGING}, responses=json_ok("The species"))
    async def species(h: DeepEarthHandler, species: str, page: PageRequest):
        await h.reply_json(await h.call(controllers.species, species, page))
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np
from xcube.server.api import Api, ApiHandler

from . import params as P
from .errors import ApiProblem, MethodNotAllowed, Unavailable, UriTooLong, problem_of
from .resources import Resources
from .scope import request_scope

# Longest query string (names and values) an endpoint reads: 1000 species names fit.
# Tornado itself closes the connection on request heads over its ``max_header_size``
# (64 KiB unless the server config's ``tornado`` section raises it).
MAX_QUERY_BYTES = 64 * 1024
MAX_BODY_BYTES = 4 * 1024 * 1024


# -- OpenAPI response objects --------------------------------------------------------------
_ERROR = {"$ref": "#/components/schemas/Error"}


def error_response(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


ERRORS = {
    "400": error_response("Bad parameter: the body names the parameter and the allowed "
                          "values"),
    "404": error_response("Unknown id: the body names the parameter"),
    "414": error_response("Query string longer than 64 KiB: the body names the longest "
                          "parameter"),
    "500": error_response("Damaged cube data (the body names the file) or an internal "
                          "error (a reference to the server log; never a traceback)"),
    "503": error_response("Cube set unreadable (moved away, storage down), server busy, "
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
    """Compact JSON; NaN and infinities become null."""
    return json.dumps(_clean(obj), separators=(",", ":"), allow_nan=False).encode()


def npy_header(arr: np.ndarray) -> bytes:
    """The .npy header (format 1.0) of a C-contiguous array; the raw bytes follow it."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
    return buf.getvalue()


async def _flushed(written: Any, timeout: float) -> None:
    """Wait (at most ``timeout`` s) until tornado has handed a response to the socket."""
    if written is None:
        return
    done, _ = await asyncio.wait({asyncio.ensure_future(written)}, timeout=timeout)
    for fut in done:
        fut.exception()  # a client that went away: nothing to do, but retrieve it


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


# -- the handler base ----------------------------------------------------------------------
class Handler(ApiHandler):
    """Base of every handler: worker pools, response budget, writers, error envelope.

    Subclasses set ``url_prefix`` (for :meth:`link`), ``log_name`` and, for another error
    envelope, override :meth:`write_problem`. ``strict_query`` rejects query parameters an
    operation does not declare (400); ``check_query_size`` answers 414 over
    ``MAX_QUERY_BYTES``.
    """

    url_prefix = ""
    log_name = "DeepEarth"
    strict_query = True
    limit_query_size = True

    # -- shared resources ----------------------------------------------------------------
    @property
    def resources(self) -> Resources:
        """The server's shared resources (the context's ``resources``; 503 without them)."""
        res = getattr(self.ctx, "resources", None)
        if res is None:
            raise Unavailable("the server config has no 'DeepEarth' section naming a cube "
                              "set", "DeepEarth")
        return res

    @property
    def settings(self) -> Mapping[str, Any]:
        return getattr(self.ctx, "settings", {})

    async def run(self, fn: Callable[..., Any], *args: Any, pool: str = "default",
                  **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on a worker thread (timeout, back-pressure)."""
        return await self.resources.workers.run(fn, *args, pool=pool, **kwargs)

    def count(self, name: str) -> None:
        counters = getattr(self.ctx, "counters", None)
        if counters is not None:
            counters[name] = counters.get(name, 0) + 1

    @property
    def query(self):
        return self.request.query

    def inputs(self, path: Mapping[str, str]) -> P.Inputs:
        return P.Inputs(self.request.query, path, self.request.body or b"", self.settings)

    # -- writers -------------------------------------------------------------------------
    def finish_bytes(self, data: bytes, content_type: str, status: int = 200,
                     headers: Mapping[str, str] | None = None):
        """Write the response; returns tornado's future of the write (or None)."""
        self.response.set_status(status)
        self.response.set_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.response.set_header(k, v)
        return self.response.finish(data)

    def send_json(self, obj: Any, content_type: str = "application/json",
                  status: int = 200) -> None:
        self.finish_bytes(json_bytes(obj), content_type, status)

    def send_png(self, data: bytes, max_age: int = 3600,
                 headers: Mapping[str, str] | None = None) -> None:
        self.finish_bytes(data, "image/png",
                          headers={"Cache-Control": f"public, max-age={max_age}",
                                   **(headers or {})})

    async def reply_json(self, obj: Any, content_type: str = "application/json") -> None:
        """Serialise on a worker thread (large payloads), then write."""
        self.finish_bytes(await self.run(json_bytes, obj), content_type)

    async def reply_array(self, arr: np.ndarray, fmt: str, name: str) -> None:
        """Encode on a worker thread (tens of MB), then write (``fmt``: npy or raw)."""
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
            data = await self.run(lambda: npy_header(arr) + arr.tobytes())
            written = self.finish_bytes(data, "application/x-npy", headers=headers)
        else:
            data = await self.run(np.ascontiguousarray(arr).tobytes)
            headers["Content-Disposition"] = f'attachment; filename="{name}.bin"'
            written = self.finish_bytes(data, "application/octet-stream", headers=headers)
        del data
        # the bytes wait in tornado's write buffer until the client has read them
        await _flushed(written, self.resources.workers.timeout)

    @contextlib.asynccontextmanager
    async def response_buffer(self, nbytes: int):
        """Hold ``nbytes`` of the response budget while a large response is computed,
        encoded and written (wait for them first), so that the server's memory stays
        bounded however many connections fetch tensors at once."""
        budget = self.resources.response_budget
        timeout = self.resources.workers.timeout
        try:
            held = await asyncio.wait_for(budget.acquire(nbytes), timeout)
        except TimeoutError:
            raise Unavailable(f"the server is busy sending large responses (waited {timeout:g} "
                              "s); retry later") from None
        try:
            yield
        finally:
            budget.release(held)

    def link(self, path: str) -> str:
        """Absolute URL of ``url_prefix + path`` (reverse URL prefix honoured)."""
        return self.request.url_for_path(f"{self.url_prefix}{path}".lstrip("/"), reverse=True)

    # -- errors --------------------------------------------------------------------------
    def write_problem(self, problem: ApiProblem) -> Any:
        """Write a problem in this API's envelope (JSON ``{"error": {...}}``)."""
        return self.finish_bytes(json_bytes(problem.body()), "application/json",
                                 problem.status)

    def fail(self, exc: BaseException) -> Any:
        """Answer any exception: its problem (status from the one table) in the envelope."""
        self.count("errors")
        return self.write_problem(problem_of(exc, f"{self.log_name} {self.request.url}"))

    # Methods a route does not define: a 405 in the envelope instead of xcube's traceback.
    async def _not_allowed(self, *args, **kwargs):
        self.write_problem(MethodNotAllowed("method not allowed on this path", None,
                                            self.defined_methods() or None))

    head = post = put = delete = get = _not_allowed

    def options(self, *args, **kwargs):
        self.response.set_header("Access-Control-Allow-Methods", "GET,POST,OPTIONS")
        self.response.set_status(204)
        self.response.finish()


RouteFunction = Callable[..., Awaitable[None]]


def _class_name(operation_id: str) -> str:
    name = re.sub(r"[^0-9A-Za-z]", "", operation_id)
    return name[:1].upper() + name[1:] + "Handler"


def endpoint(api: Api, path: str, operation_id: str, summary: str, *,
             method: str = "get", params: Mapping[str, P.Group] | None = None,
             responses: dict | None = None, request_body: dict | None = None,
             description: str | None = None, base: type[Handler] = Handler,
             documented: bool = True) -> Callable[[RouteFunction], RouteFunction]:
    """Declare one operation: a handler class for ``path`` whose ``method`` reads the
    parameter groups and calls the decorated ``async fn(handler, **values)``.

    Routes are matched in declaration order (declare ``{*rest}`` catch-alls last). The
    decorated function is returned unchanged.
    """
    groups = dict(params or {})
    parameters = [p for g in groups.values() for p in g.openapi()]
    allowed = P.names(parameters, "query")

    def decorator(fn: RouteFunction) -> RouteFunction:
        async def handle(self: Handler, *args: str, **path: str):
            self.count("requests")
            with request_scope():  # one cube set version per request (see .scope)
                try:
                    if self.limit_query_size:
                        check_query_size(self.request)
                    if self.strict_query:
                        P.check_known(self.request.query, allowed)
                    inputs = self.inputs(path)
                    values = {name: g.read(inputs) for name, g in groups.items()}
                    await fn(self, **values)
                except Exception as exc:  # noqa: BLE001 - every error in the envelope
                    self.fail(exc)

        handle.__name__ = method
        handle.__doc__ = description or fn.__doc__
        if documented:
            handle = api.operation(operation_id=operation_id, summary=summary,
                                   description=description or fn.__doc__,
                                   parameters=parameters, responses=responses,
                                   request_body=request_body)(handle)
        cls = type(_class_name(operation_id), (base,), {
            method: handle, "__doc__": (fn.__doc__ or summary).strip().split("\n")[0],
            "__module__": fn.__module__, "groups": groups})
        api.route(path)(cls)
        fn.handler_class = cls  # type: ignore[attr-defined]
        return fn

    return decorator
