"""No Python traceback in any HTTP response of the server process.

xcube's tornado handler writes the full traceback into the JSON body of every error,
including the 405 tornado raises for methods it does not know (``TRACE``) and errors of
xcube's own endpoints. The plugin replaces that error writer with one that keeps the
status, reason and message and logs the traceback on the server side only.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("deepearth.server")
_INSTALLED = False


def _read_model_problem(exc: BaseException | None):
    """The :class:`~server.common.errors.ApiProblem` of the first read-model error
    (:class:`cube_gen.errors.DeepEarthError`) in ``exc``'s chain, else None."""
    from cube_gen.errors import DeepEarthError

    from .errors import problem_of

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DeepEarthError):
            return problem_of(exc, "xcube")
        exc = exc.__cause__ or exc.__context__
    return None


def hide_tracebacks() -> None:
    """Patch xcube's TornadoRequestHandler.write_error once (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    try:
        import tornado.web
        from xcube.server.webservers.tornado import TornadoRequestHandler
    except ImportError:  # no xcube server in this process
        return

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error: dict[str, Any] = {"status_code": status_code}
        exc_info = kwargs.get("exc_info")
        if exc_info:
            exc_type, exc_val, exc_tb = exc_info
            if isinstance(exc_val, tornado.web.HTTPError):
                error["message"] = exc_val.reason or tornado.web.httputil.responses.get(
                    status_code, "error")
                if exc_val.log_message and status_code < 500:
                    error["message"] = exc_val.log_message % exc_val.args \
                        if exc_val.args else exc_val.log_message
            elif (problem := _read_model_problem(exc_val)) is not None:
                # the cube set's errors in xcube's own endpoints (tiles, datasets of the
                # grid pyramids): the status of the STATUS table, the message naming the
                # cube, array and chunk (or the storage that is down)
                status_code = problem.status
                self.set_status(status_code)
                error = problem.body()["error"]
            else:
                message = str(exc_val) if status_code < 500 else "internal server error"
                error["message"] = message or exc_type.__name__
            if status_code >= 500:
                log.error("error %s on %s %s", status_code, self.request.method,
                          self.request.uri, exc_info=exc_info)
        else:
            error["message"] = self._reason
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish({"error": error})

    TornadoRequestHandler.write_error = write_error
    _INSTALLED = True
