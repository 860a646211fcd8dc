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

from cube_gen import schema as S
from cube_gen.access import CubeSet
from cube_gen.errors import CubeError, NotFoundError

from .cache import ByteBudget, ByteLRU
from .config import DEFAULTS, SECTION
from .params import ApiProblem, Unavailable
from .service import DeepEarthService

T = TypeVar("T")
REOPEN_INTERVAL = 10.0  # seconds between attempts to open an unreachable cube set
HEAVY_QUEUE = 8  # projections waiting for the heavy worker before requests answer 503
# Bytes of binary responses (tensors, batches) built or being written at once; more wait.
# About nine full 13 MB tensors: enough to keep a fast link busy, and the server's memory
# no longer grows with the number of connections fetching tensors.
RESPONSE_BUFFER_BYTES = 128 * 1024 * 1024
# Seconds an object-store cube set counts as reachable after its manifest was read; a
# local one is checked (one stat) after every request.
STORAGE_CHECK_INTERVAL = 2.0
_STORAGE_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "gcsfs", "adlfs",
                    "urllib3", "requests")


def _is_storage_error(exc: BaseException) -> bool:
    """An error of the storage layer (file system, network, object store client)."""
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in _STORAGE_MODULES


def _manifest_problem(cs: CubeSet) -> str | None:
    """Why the cube set's manifest cannot be read now, or None."""
    target = cs.target
    path = target.path(S.MANIFEST)
    if target.is_local:
        return None if os.path.isfile(path) else f"{S.MANIFEST} is missing"
    try:
        target.fs.cat_file(path)  # a GET: no listing cache can answer for the store
        return None
    except FileNotFoundError:
        return f"{S.MANIFEST} is missing"
    except Exception as exc:  # noqa: BLE001 - any failure means unreachable
        return f"{type(exc).__name__}: {exc}"


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
        self.response_budget = ByteBudget(RESPONSE_BUFFER_BYTES)
        self._service: DeepEarthService | None = None
        self._open_error: str | None = None
        self._last_attempt = 0.0
        self._open_lock = threading.Lock()
        self._check_lock = threading.Lock()
        self._storage_problem: str | None = None
        self._storage_ok_until = 0.0
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

    async def call(self, method: str, *args: Any, heavy: bool = False, guard: bool = True,
                   **kwargs: Any) -> Any:
        """Run ``service.<method>(*args, **kwargs)`` on a worker thread (see :meth:`guarded`)."""
        def work(svc):
            return getattr(svc, method)(*args, **kwargs)
        if not guard:
            return await self.run(lambda: work(self.service), heavy=heavy)
        return await self.run(self.guarded, work, heavy=heavy)

    async def call_with(self, fn: Callable[[DeepEarthService], T], heavy: bool = False) -> T:
        """Run ``fn(service)`` on a worker thread (see :meth:`guarded`)."""
        return await self.run(self.guarded, fn, heavy=heavy)

    # -- storage faults ------------------------------------------------------------------
    def guarded(self, fn: Callable[[DeepEarthService], T]) -> T:
        """``fn(service)``, answering 503 while the cube set's storage cannot be read.

        zarr reads a chunk that is missing as its fill value, so a cube set that went away
        (a folder moved, an object store restarted empty) would give wrong values with
        HTTP 200; an unreachable store raises client errors that are no 500 of ours. The
        manifest is checked after every call (see :meth:`storage_problem`): while it cannot
        be read the request answers 503 naming the cube set; damaged data (a truncated
        chunk) answers 500 naming the file, and only the requests that read it fail. The
        caches are emptied when the storage fails and when it is back, so nothing computed
        meanwhile outlives the fault; no restart is needed.
        """
        svc = self.service
        try:
            result = fn(svc)
        except (ApiProblem, NotFoundError):
            problem = self.storage_problem()
            if problem is not None:
                raise self._unavailable(problem) from None
            raise
        except Exception as exc:
            problem = self.storage_problem(fresh=True)
            if problem is not None:
                raise self._unavailable(problem) from exc
            if isinstance(exc, CubeError):
                message = self._relative(str(exc))
                LOG.error(f"DeepEarth: damaged data in {self.cubeset_url}: {message}")
                raise ApiProblem(f"the cube set's data is damaged: {message}; other data is "
                                 "still served (see the server log)") from exc
            if _is_storage_error(exc):
                message = self._relative(f"{type(exc).__name__}: {exc}")
                LOG.error(f"DeepEarth: reading {self.cubeset_url} failed: {message}")
                raise Unavailable(f"reading the cube set failed: {message}; retry later") from exc
            raise
        problem = self.storage_problem()
        if problem is not None:
            raise self._unavailable(problem)
        return result

    def storage_problem(self, fresh: bool = False) -> str | None:
        """Why the cube set cannot be read now (None: it can).

        Reads the manifest: one ``stat`` on a local disk, every time; one GET on an object
        store, at most every ``STORAGE_CHECK_INTERVAL`` s while it answers (``fresh``: now).
        While one thread checks, the others take the last answer.
        """
        svc = self._service
        if svc is None:
            return self._open_error
        if not fresh and not svc.cs.target.is_local and \
                time.monotonic() < self._storage_ok_until:
            return None
        if not self._check_lock.acquire(blocking=False):
            return self._storage_problem
        try:
            problem = _manifest_problem(svc.cs)
            self._storage_ok_until = time.monotonic() + STORAGE_CHECK_INTERVAL \
                if problem is None else 0.0
            if problem != self._storage_problem:
                if problem is None:
                    LOG.info(f"DeepEarth: cube set {self.cubeset_url} is readable again")
                else:
                    LOG.error(f"DeepEarth: cube set {self.cubeset_url} cannot be read: "
                              f"{problem}")
                if (problem is None) != (self._storage_problem is None):
                    self._drop_caches(svc)
                self._storage_problem = problem
            return problem
        finally:
            self._check_lock.release()

    def _drop_caches(self, svc: DeepEarthService) -> None:
        """Forget everything read or computed so far (tables, maps, the result cache)."""
        svc.cs.close()
        svc.cache = self.cache = ByteLRU(int(self.settings["CacheBytes"]))

    def _unavailable(self, problem: str) -> Unavailable:
        return Unavailable(f"the cube set {self.cubeset_url} cannot be read: "
                           f"{self._relative(problem)}; retry later (see /deepearth/health)")

    def _relative(self, message: str) -> str:
        """``message`` with the cube set's root left out of file paths."""
        svc = self._service
        for root in filter(None, (self.cubeset_url, svc and svc.cs.target.root)):
            message = message.replace(str(root).rstrip("/") + "/", "")
        return message

    def status(self) -> dict[str, Any]:
        def queued(ex):
            q = getattr(ex, "_work_queue", None)
            return q.qsize() if q is not None else None
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "workers": int(self.settings["MaxWorkers"]),
            "queued": queued(self.executor),
            "heavy_queued": queued(self.heavy_executor),
            "response_buffer": self.response_budget.stats(),
            **self.counters,
        }
