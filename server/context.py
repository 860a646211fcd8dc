"""The plugin's API context: configuration, the opened cube set, cache and worker pools."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from threadpoolctl import threadpool_limits
from xcube.constants import LOG
from xcube.server.api import ApiContext, Context
from xcube.server.config import resolve_config_path

from cube_gen.access import CubeSet

from .cache import ByteLRU
from .config import DEFAULTS, SECTION
from .params import Unavailable
from .service import DeepEarthService

T = TypeVar("T")
REOPEN_INTERVAL = 10.0  # seconds between attempts to open an unreachable cube set
HEAVY_QUEUE = 8  # projections waiting for the heavy worker before requests answer 503


def _plain(value: Any) -> Any:
    """FrozenDict/FrozenList (xcube's config) -> dict/list."""
    defrost = getattr(value, "defrost", None)
    return defrost() if callable(defrost) else value


class DeepEarthContext(ApiContext):
    """Holds the cube set named by the ``DeepEarth`` config section and runs work off the IO loop.

    Two thread pools: ``MaxWorkers`` threads for ordinary requests and one thread for
    heavy projections (UMAP), so a long computation never holds up the quick endpoints.
    """

    def __init__(self, server_ctx: Context):
        super().__init__(server_ctx)
        self.settings: dict[str, Any] = dict(DEFAULTS)
        self.configured = False
        self.cubeset_url: str | None = None
        self.storage_options: dict[str, Any] = {}
        self.cache = ByteLRU(self.settings["CacheBytes"])
        self._service: DeepEarthService | None = None
        self._open_error: str | None = None
        self._last_attempt = 0.0
        self._open_lock = threading.Lock()
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.heavy_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.started = time.time()
        self.counters = {"requests": 0, "errors": 0, "timeouts": 0, "rejected_busy": 0}

    # -- lifecycle -----------------------------------------------------------------------
    def on_update(self, prev_context: Context | None):
        section = _plain(self.config.get(SECTION))
        if not section:
            LOG.info(f"DeepEarth: no {SECTION!r} section in the config; the API answers 503")
            return
        self.configured = True
        self.settings.update({k: v for k, v in section.items() if k in DEFAULTS})
        url = str(section["CubeSet"])
        if "://" not in url and not os.path.isabs(url):
            url = resolve_config_path(self.config, url)
        self.cubeset_url = url
        self.storage_options = dict(_plain(section.get("StorageOptions")) or {})
        self.cache = ByteLRU(int(self.settings["CacheBytes"]))
        self.executor = concurrent.futures.ThreadPoolExecutor(
            int(self.settings["MaxWorkers"]), thread_name_prefix="deepearth")
        self.heavy_executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="deepearth-heavy")
        # Requests run concurrently on worker threads: one BLAS thread each, or
        # multi-threaded BLAS spin-waits on the busy cores (see cube_gen.embedding_math).
        threadpool_limits(limits=1, user_api="blas")
        self._open()

    def on_dispose(self):
        for ex in (self.executor, self.heavy_executor):
            if ex is not None:
                ex.shutdown(wait=False, cancel_futures=True)
        self.cache.clear()

    def _open(self) -> None:
        with self._open_lock:
            if self._service is not None:
                return
            self._last_attempt = time.monotonic()
            try:
                cs = CubeSet.open(self.cubeset_url, self.storage_options or None)
                self._service = DeepEarthService(cs, self.cache, self.settings)
                self._open_error = None
                LOG.info(f"DeepEarth: serving cube set {self.cubeset_url}")
            except Exception as exc:  # noqa: BLE001 - reported by /deepearth/health
                self._open_error = f"{type(exc).__name__}: {exc}"
                LOG.error(f"DeepEarth: cannot open cube set {self.cubeset_url}: "
                          f"{self._open_error}")

    @property
    def open_error(self) -> str | None:
        return self._open_error

    @property
    def service(self) -> DeepEarthService:
        """The service, opening the cube set if needed (raises Unavailable)."""
        if not self.configured:
            raise Unavailable(f"the server config has no {SECTION!r} section naming a cube set",
                              SECTION)
        if self._service is None and time.monotonic() - self._last_attempt > REOPEN_INTERVAL:
            self._open()
        if self._service is None:
            raise Unavailable(f"the cube set {self.cubeset_url} cannot be opened: "
                              f"{self._open_error}")
        return self._service

    # -- running work --------------------------------------------------------------------
    async def run(self, fn: Callable[..., T], *args: Any, heavy: bool = False,
                  **kwargs: Any) -> T:
        """Run ``fn`` on a worker thread, giving up after ``RequestTimeout`` seconds."""
        if self.executor is None:
            raise Unavailable(f"the server config has no {SECTION!r} section naming a cube set",
                              SECTION)
        executor = self.heavy_executor if heavy else self.executor
        limit = int(self.settings["MaxQueued"])
        if heavy:
            limit = max(1, min(limit, HEAVY_QUEUE))
        queue = getattr(executor, "_work_queue", None)
        if queue is not None and queue.qsize() >= limit:
            self.counters["rejected_busy"] += 1
            raise Unavailable(f"the server is busy ({queue.qsize()} {'heavy ' if heavy else ''}"
                              "computations waiting); retry later", None)
        fut = self.run_in_executor(executor, fn, *args, **kwargs)
        timeout = float(self.settings["RequestTimeout"])
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self.counters["timeouts"] += 1
            raise Unavailable(f"the request took longer than {timeout:g} s and was abandoned; "
                              "heavy results are cached when they complete, so retry later",
                              None) from None

    async def call(self, method: str, *args: Any, heavy: bool = False, **kwargs: Any) -> Any:
        """Run ``service.<method>(*args, **kwargs)`` on a worker thread."""
        def work():
            return getattr(self.service, method)(*args, **kwargs)
        return await self.run(work, heavy=heavy)

    async def call_with(self, fn: Callable[[DeepEarthService], T], heavy: bool = False) -> T:
        """Run ``fn(service)`` on a worker thread."""
        return await self.run(lambda: fn(self.service), heavy=heavy)

    def status(self) -> dict[str, Any]:
        def queued(ex):
            q = getattr(ex, "_work_queue", None)
            return q.qsize() if q is not None else None
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "workers": int(self.settings["MaxWorkers"]),
            "queued": queued(self.executor),
            "heavy_queued": queued(self.heavy_executor),
            **self.counters,
        }
