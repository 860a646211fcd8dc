"""What every API of the plugin in one server shares: worker pools, response budget, caches.

:class:`Workers` is THE executor path: every computation of every API (DeepEarth, WMTS,
viewer support) runs through :meth:`Workers.run`, off the IO loop, with the ``RequestTimeout``
and the ``MaxQueued`` back-pressure of the ``DeepEarth`` config section. Pools keep kinds
of work from queueing behind each other: ``default`` (``MaxWorkers`` threads), ``heavy``
(one thread for projections), ``tiles`` (map tiles).

:class:`Resources` bundles the pools, the byte budget of large responses and the named
byte-bounded caches; the DeepEarth API's context owns one per server and the other APIs
use it (:func:`resources_of`). :meth:`Resources.clear_caches` empties every cache at once
(a storage fault).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from ..config import DEFAULTS
from .cache import ByteBudget, ByteLRU
from .errors import Unavailable

T = TypeVar("T")
HEAVY_QUEUE = 8  # projections waiting for the heavy worker before requests answer 503
TILE_WORKERS = 4  # threads rendering map tiles
# Bytes of binary responses (tensors, batches) built or being written at once; more wait.
# About nine full 13 MB tensors: enough to keep a fast link busy, and the server's memory
# no longer grows with the number of connections fetching tensors.
RESPONSE_BUFFER_BYTES = 128 * 1024 * 1024


class Workers:
    """Named thread pools with a timeout and a bounded queue each."""

    def __init__(self, settings: Mapping[str, Any] | None = None):
        s = {**DEFAULTS, **(settings or {})}
        self.timeout = float(s["RequestTimeout"])
        queued = int(s["MaxQueued"])
        self.max_workers = int(s["MaxWorkers"])
        self._pools = {
            "default": concurrent.futures.ThreadPoolExecutor(
                self.max_workers, thread_name_prefix="deepearth"),
            "heavy": concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="deepearth-heavy"),
            "tiles": concurrent.futures.ThreadPoolExecutor(
                TILE_WORKERS, thread_name_prefix="deepearth-tiles"),
        }
        self._limits = {"default": queued, "heavy": max(1, min(queued, HEAVY_QUEUE)),
                        "tiles": queued}
        self.counters = {"timeouts": 0, "rejected_busy": 0}

    def queued(self, pool: str = "default") -> int | None:
        queue = getattr(self._pools[pool], "_work_queue", None)
        return queue.qsize() if queue is not None else None

    async def run(self, fn: Callable[..., T], *args: Any, pool: str = "default",
                  **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on a thread of ``pool``; 503 when the pool's queue is full
        or the call takes longer than the timeout (its result is then dropped)."""
        executor = self._pools[pool]
        waiting = self.queued(pool)
        if waiting is not None and waiting >= self._limits[pool]:
            self.counters["rejected_busy"] += 1
            kind = "" if pool == "default" else f"{pool} "
            raise Unavailable(f"the server is busy ({waiting} {kind}computations waiting); "
                              "retry later", None)
        loop = asyncio.get_running_loop()
        # with the caller's context: the request scope (server.common.scope) follows the work
        fut = loop.run_in_executor(executor, contextvars.copy_context().run,
                                   functools.partial(fn, *args, **kwargs))
        try:
            return await asyncio.wait_for(fut, self.timeout)
        except TimeoutError:
            self.counters["timeouts"] += 1
            raise Unavailable(f"the request took longer than {self.timeout:g} s and was "
                              "abandoned; heavy results are cached when they complete, so "
                              "retry later", None) from None

    def shutdown(self) -> None:
        for ex in self._pools.values():
            ex.shutdown(wait=False, cancel_futures=True)


class Resources:
    """Worker pools, the response budget and the named caches of one server."""

    def __init__(self, settings: Mapping[str, Any] | None = None):
        s = {**DEFAULTS, **(settings or {})}
        self.workers = Workers(s)
        self.response_budget = ByteBudget(RESPONSE_BUFFER_BYTES)
        self.cache = ByteLRU(int(s["CacheBytes"]))  # results: tensors, PNGs, projections
        self._caches: dict[str, ByteLRU] = {"results": self.cache}

    def named_cache(self, name: str, capacity: int) -> ByteLRU:
        """The cache ``name`` (created with ``capacity`` bytes on first use)."""
        cache = self._caches.get(name)
        if cache is None:
            cache = self._caches.setdefault(name, ByteLRU(capacity))
        return cache

    def clear_caches(self) -> None:
        """Empty every cache (results computed meanwhile are not kept)."""
        for cache in list(self._caches.values()):
            cache.clear()

    def cache_stats(self) -> dict[str, dict[str, Any]]:
        return {name: cache.stats() for name, cache in self._caches.items()}

    def shutdown(self) -> None:
        self.workers.shutdown()
        self.clear_caches()


def resources_of(api_ctx: Any) -> Resources | None:
    """The shared resources of the server an API context belongs to (those of the DeepEarth
    API's context), or None when that API is not running or not configured."""
    try:
        deepearth = api_ctx.server_ctx.get_api_ctx("deepearth")
    except Exception:  # noqa: BLE001 - not part of this server
        return None
    return getattr(deepearth, "resources", None)
