"""Errors answered to HTTP clients, and THE table from exception type to HTTP status.

Every API of the plugin raises :class:`ApiProblem` subclasses (or lets the read model's
exceptions through); the handler base (:mod:`server.common.handler`) turns any exception into
a problem with :func:`problem_of` and writes it in its API's envelope (JSON for the DeepEarth
API, an OWS ``ExceptionReport`` for the WMTS). No traceback ever reaches a client.

To give a new exception type its own status, add it to :data:`STATUS` (the most specific
class listed in an exception's MRO wins).
"""

from __future__ import annotations

import uuid
from typing import Any

from xcube.constants import LOG

from cube_gen import errors as cube_errors


class ApiProblem(Exception):
    """An error answered with a body naming ``parameter``, ``allowed`` and ``value``.

    The HTTP status comes from :data:`STATUS` unless ``status`` is given.
    """

    def __init__(self, message: str, parameter: str | None = None, allowed: Any = None,
                 value: Any = None, *, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.parameter = parameter
        self.allowed = allowed
        self.value = value
        self._status = status

    @property
    def status(self) -> int:
        return self._status if self._status is not None else status_of(self)

    def body(self) -> dict[str, Any]:
        """The JSON envelope ``{"error": {status_code, message, parameter, allowed, value}}``."""
        err: dict[str, Any] = {"status_code": self.status, "message": self.message}
        if self.parameter is not None:
            err["parameter"] = self.parameter
        if self.allowed is not None:
            err["allowed"] = self.allowed
        if self.value is not None:
            err["value"] = self.value
        return {"error": err}


class ParamError(ApiProblem):
    """A request parameter (query, path or body field) with a value that is not allowed."""


class NotFound(ApiProblem):
    """An id (path parameter) that names nothing in the cube set."""


class MethodNotAllowed(ApiProblem):
    """An HTTP method the path does not offer."""


class PayloadTooLarge(ApiProblem):
    """A request body over the limit."""


class UriTooLong(ApiProblem):
    """A query string over the limit."""


class Unavailable(ApiProblem):
    """The cube set cannot be read now, the server is busy, or the request timed out."""


class NotImplementedProblem(ApiProblem):
    """An operation the service knows of but does not offer (OGC: GetFeatureInfo)."""


# THE exception -> HTTP status table (ApiProblem subclasses and the read model's errors).
STATUS: dict[type[BaseException], int] = {
    ApiProblem: 500,
    ParamError: 400,
    NotFound: 404,
    MethodNotAllowed: 405,
    PayloadTooLarge: 413,
    UriTooLong: 414,
    NotImplementedProblem: 501,
    Unavailable: 503,
    cube_errors.NotFoundError: 404,
    cube_errors.CubeError: 500,  # damaged data: the message names the file or chunk
}
for _name, _status in (("VersionNotFound", 404), ("ChunkError", 500),
                       ("StorageUnavailable", 503)):
    _cls = getattr(cube_errors, _name, None)
    if _cls is not None:
        STATUS[_cls] = _status


def status_of(exc: BaseException) -> int:
    """The HTTP status of an exception: its most specific class in :data:`STATUS`, else 500."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


_PROBLEM_OF_STATUS: dict[int, type[ApiProblem]] = {404: NotFound, 503: Unavailable}


def problem_of(exc: BaseException, where: str = "DeepEarth") -> ApiProblem:
    """Any exception as an :class:`ApiProblem` fit for a client.

    Problems pass through; the read model's errors keep their message (and ``parameter``,
    ``value``, ``allowed`` where they carry them) with the status of :data:`STATUS`;
    anything else is an internal error, logged here with a reference the client gets.
    """
    if isinstance(exc, ApiProblem):
        return exc
    status = status_of(exc)
    if isinstance(exc, cube_errors.DeepEarthError) and status != 500 or \
            isinstance(exc, cube_errors.CubeError):
        cls = _PROBLEM_OF_STATUS.get(status, ApiProblem)
        return cls(str(exc), getattr(exc, "parameter", None), getattr(exc, "allowed", None),
                   getattr(exc, "value", None), status=status)
    ref = uuid.uuid4().hex[:12]
    LOG.error(f"{where}: internal error {ref}", exc_info=exc)
    return ApiProblem(f"internal error (reference {ref}; see the server log)", status=500)
