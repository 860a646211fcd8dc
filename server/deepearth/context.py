"""The DeepEarth API's context: configuration, the opened cube set, the storage-fault guard.

It owns the server's shared :class:`~server.common.resources.Resources` (worker pools,
response budget, caches), which the other APIs of the plugin use too. Controllers
(:mod:`.controllers`) are functions over this context: ``ctx.cubeset``, ``ctx.cache``,
``ctx.settings``.

New versions (:mod:`cube_gen.release`) are followed between requests: the first request
after ``VersionCheckSeconds`` reads the root manifest's ``current`` and, when it changed,
opens that version and swaps it in (one reference); every request keeps the version it
started with (:mod:`server.common.scope`), and ``ctx.cache`` is keyed by that version.
xcube's grid datasets read through the ``deepearth`` data store follow too
(:func:`server.common.datasets.follow_version`).
"""

from __future__ import annotations

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
from cube_gen.release import read_root

from ..common.cache import KeyedView
from ..common.datasets import follow_version
from ..common.errors import ApiProblem, Unavailable
from ..common.resources import Resources
from ..common.scope import pinned
from ..config import DEFAULTS, SECTION, plain

T = TypeVar("T")
REOPEN_INTERVAL = 10.0  # seconds between attempts to open an unreachable cube set
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


class DeepEarthContext(ApiContext):
    """Holds the cube set named by the ``DeepEarth`` config section and the shared resources."""

    def __init__(self, server_ctx: Context):
        super().__init__(server_ctx)
        self.settings: dict[str, Any] = dict(DEFAULTS)
        self.configured = False
        self.cubeset_url: str | None = None
        self.storage_options: dict[str, Any] = {}
        self.resources: Resources | None = None
        self._cubeset: CubeSet | None = None
        self._open_error: str | None = None
        self._last_attempt = 0.0
        self._open_lock = threading.Lock()
        self._check_lock = threading.Lock()
        self._storage_problem: str | None = None
        self._storage_ok_until = 0.0
        self._version_lock = threading.Lock()
        self._next_version_check = 0.0
        self.started = time.time()
        self.counters = {"requests": 0, "errors": 0}

    # -- lifecycle -----------------------------------------------------------------------
    def on_update(self, prev_context: Context | None):
        section = plain(self.config.get(SECTION))
        if not section:
            LOG.info(f"DeepEarth: no {SECTION!r} section in the config; the API answers 503")
            return
        self.configured = True
        self.settings.update({k: v for k, v in section.items() if k in DEFAULTS})
        url = str(section["CubeSet"])
        if "://" not in url and not os.path.isabs(url):
            url = resolve_config_path(self.config, url)
        self.cubeset_url = url
        self.storage_options = dict(plain(section.get("StorageOptions")) or {})
        self.resources = Resources(self.settings)
        # Requests run concurrently on worker threads: one BLAS thread each, or
        # multi-threaded BLAS spin-waits on the busy cores (see cube_gen.pca.single_threaded_blas).
        threadpool_limits(limits=1, user_api="blas")
        self._open()

    def on_dispose(self):
        if self.resources is not None:
            self.resources.shutdown()

    def _open(self) -> None:
        with self._open_lock:
            if self._cubeset is not None:
                return
            self._last_attempt = time.monotonic()
            try:
                self._cubeset = CubeSet.open(self.cubeset_url, self.storage_options or None)
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
    def cubeset(self) -> CubeSet:
        """The cube set version of this request (raises Unavailable).

        The first use in a request opens the cube set if needed and follows a new current
        version (:meth:`follow_version`); later uses in the same request, on any thread,
        get the same version.
        """
        return pinned("deepearth.cubeset", self._current)

    def _current(self) -> CubeSet:
        if not self.configured:
            raise Unavailable(f"the server config has no {SECTION!r} section naming a cube set",
                              SECTION)
        if self._cubeset is None and time.monotonic() - self._last_attempt > REOPEN_INTERVAL:
            self._open()
        if self._cubeset is None:
            raise Unavailable(f"the cube set {self.cubeset_url} cannot be opened: "
                              f"{self._open_error}")
        self.follow_version()
        return self._cubeset

    def follow_version(self) -> str | None:
        """Swap in the root manifest's current version when it changed; returns the new
        version id, or None. Reads the root manifest at most every ``VersionCheckSeconds``
        (0: never); while one thread checks, the others go on with the version they have.
        A failure keeps the version served (logged; the storage guard reports outages).
        """
        interval = float(self.settings["VersionCheckSeconds"])
        old = self._cubeset
        if old is None or interval <= 0 or time.monotonic() < self._next_version_check:
            return None
        if not self._version_lock.acquire(blocking=False):
            return None
        try:
            self._next_version_check = time.monotonic() + interval
            root = read_root(old.target) or {}
            current = root.get("current")
            if current is None or current == old.version:
                return None
            new = CubeSet.open(self.cubeset_url, self.storage_options or None,
                               version=str(current))
            self._cubeset = new  # requests that started before keep the old one
            self._follow_in_xcube(new)
            if self.resources is not None:
                # results are keyed by version; tiles and slices of the grids are not: a
                # computation in flight across the clear is answered but not kept
                self.resources.clear_caches()
            LOG.info(f"DeepEarth: serving version {new.version} of {self.cubeset_url} "
                     f"(was {old.version})")
            return new.version
        except Exception as exc:  # noqa: BLE001 - keep serving the version we have
            LOG.warning(f"DeepEarth: checking {self.cubeset_url} for a new version failed: "
                        f"{type(exc).__name__}: {exc}")
            return None
        finally:
            self._version_lock.release()

    def _follow_in_xcube(self, cubeset: CubeSet) -> None:
        """xcube's grid pyramids (read through the ``deepearth`` data store) and the layers
        of the map APIs follow ``cubeset``; a failure leaves them on their version (logged)."""
        try:
            datasets = self.server_ctx.get_api_ctx("datasets")
            ids = follow_version(datasets, cubeset) if datasets is not None else []
            for name in ("deepearth-wmts", "deepearth-wms"):
                reset = getattr(self.server_ctx.get_api_ctx(name), "version_changed", None)
                if reset is not None:
                    reset()
        except Exception as exc:  # noqa: BLE001 - the DeepEarth API itself has switched
            LOG.warning(f"DeepEarth: xcube's grid datasets stay on their version: "
                        f"{type(exc).__name__}: {exc}")
            return
        if ids:
            LOG.info(f"DeepEarth: xcube datasets {', '.join(ids)} read version {cubeset.version}")

    @property
    def cache(self) -> KeyedView:
        """The results cache (tensors, PNGs, projections) of the shared resources, keyed by
        the version of this request's cube set."""
        if self.resources is None:
            raise Unavailable(f"the server config has no {SECTION!r} section naming a cube set",
                              SECTION)
        return KeyedView(self.resources.cache, self.cubeset.version)

    # -- running work --------------------------------------------------------------------
    async def run(self, fn: Callable[..., T], *args: Any, pool: str = "default",
                  **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on a worker thread of the shared pools (timeout, 503 busy)."""
        if self.resources is None:
            raise Unavailable(f"the server config has no {SECTION!r} section naming a cube set",
                              SECTION)
        return await self.resources.workers.run(fn, *args, pool=pool, **kwargs)

    async def call(self, controller: Callable[..., T], *args: Any, pool: str = "default",
                   guard: bool = True, **kwargs: Any) -> T:
        """``controller(self, *args, **kwargs)`` on a worker thread, storage-guarded."""
        if not guard:
            return await self.run(controller, self, *args, pool=pool, **kwargs)
        return await self.run(self.guarded, controller, *args, pool=pool, **kwargs)

    # -- storage faults ------------------------------------------------------------------
    def guarded(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(self, *args, **kwargs)``, answering 503 while the cube set's storage cannot be read.

        zarr reads a chunk that is missing as its fill value, so a cube set that went away
        (a folder moved, an object store restarted empty) would give wrong values with
        HTTP 200; an unreachable store raises client errors that are no 500 of ours. The
        manifest is checked after every call (see :meth:`storage_problem`): while it cannot
        be read the request answers 503 naming the cube set; damaged data (a truncated
        chunk) answers 500 naming the file, and only the requests that read it fail. The
        caches are emptied when the storage fails and when it is back, so nothing computed
        meanwhile outlives the fault; no restart is needed.
        """
        _ = self.cubeset  # opened, or Unavailable
        try:
            result = fn(self, *args, **kwargs)
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
        cs = self._cubeset
        if cs is None:
            return self._open_error
        if not fresh and not cs.target.is_local and \
                time.monotonic() < self._storage_ok_until:
            return None
        if not self._check_lock.acquire(blocking=False):
            return self._storage_problem
        try:
            problem = _manifest_problem(cs)
            self._storage_ok_until = time.monotonic() + STORAGE_CHECK_INTERVAL \
                if problem is None else 0.0
            if problem != self._storage_problem:
                if problem is None:
                    LOG.info(f"DeepEarth: cube set {self.cubeset_url} is readable again")
                else:
                    LOG.error(f"DeepEarth: cube set {self.cubeset_url} cannot be read: "
                              f"{problem}")
                if (problem is None) != (self._storage_problem is None):
                    self.drop_caches()
                self._storage_problem = problem
            return problem
        finally:
            self._check_lock.release()

    def drop_caches(self) -> None:
        """Forget everything read or computed so far: the cube set's tables, maps and memos,
        and every cache of the shared resources (results, tiles)."""
        if self._cubeset is not None:
            clear = getattr(self._cubeset, "clear_caches", None) or self._cubeset.close
            clear()
        if self.resources is not None:
            self.resources.clear_caches()

    def _unavailable(self, problem: str) -> Unavailable:
        return Unavailable(f"the cube set {self.cubeset_url} cannot be read: "
                           f"{self._relative(problem)}; retry later (see /deepearth/health)")

    def _relative(self, message: str) -> str:
        """``message`` with the cube set's root left out of file paths."""
        cs = self._cubeset
        for root in filter(None, (self.cubeset_url, cs and cs.target.root)):
            message = message.replace(str(root).rstrip("/") + "/", "")
        return message

    def status(self) -> dict[str, Any]:
        res = self.resources
        workers = res.workers if res is not None else None
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "workers": int(self.settings["MaxWorkers"]),
            "queued": workers.queued("default") if workers else None,
            "heavy_queued": workers.queued("heavy") if workers else None,
            "tiles_queued": workers.queued("tiles") if workers else None,
            "response_buffer": res.response_budget.stats() if res else None,
            **self.counters,
            **(workers.counters if workers else {"timeouts": 0, "rejected_busy": 0}),
        }
