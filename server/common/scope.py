"""Request scope: values fixed for one request from start to end, on every thread it uses.

:func:`endpoint <server.common.handler.endpoint>` runs each request in a
:func:`request_scope`; :class:`~server.common.resources.Workers` runs its work with the
request's context, so a value :func:`pinned` on a worker thread is the one every later step
of the same request gets (the DeepEarth context pins the cube set version this way: no
response mixes versions). Outside a request (start-up, background threads) nothing is
pinned and ``make()`` is called each time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

T = TypeVar("T")
_SCOPE: ContextVar[dict[Hashable, Any] | None] = ContextVar("deepearth_request_scope",
                                                            default=None)


@contextlib.contextmanager
def request_scope() -> Iterator[None]:
    """A new request scope for the block (and the worker calls made from it)."""
    token = _SCOPE.set({})
    try:
        yield
    finally:
        _SCOPE.reset(token)


def pinned(key: Hashable, make: Callable[[], T]) -> T:
    """The value of ``key`` in the current request (``make()`` on first use); outside a
    request, ``make()``."""
    scope = _SCOPE.get()
    if scope is None:
        return make()
    if key in scope:
        return scope[key]
    return scope.setdefault(key, make())  # two threads of one request: the first one wins
