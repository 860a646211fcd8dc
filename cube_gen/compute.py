"""The build's Dask compute: one client (and LocalCluster) per build, started in the
background while the source is read, shared by every stage that submits tasks."""

from __future__ import annotations

import contextlib
import threading


def _open_client(compute: dict, stack: contextlib.ExitStack):
    """A client of the ``compute`` section (a new LocalCluster for ``local``), closed by
    ``stack``. Not made the default scheduler: stages submit to it explicitly, and any
    other Dask computation of the build stays in-process."""
    from distributed import Client, LocalCluster

    scheduler = compute.get("scheduler") or "local"
    if scheduler == "local":
        cluster = LocalCluster(n_workers=compute["n_workers"],
                               threads_per_worker=compute["threads_per_worker"],
                               memory_limit=compute["memory_limit"], processes=True,
                               dashboard_address=None)
        stack.callback(cluster.close)
        client = Client(cluster, set_as_default=False)
    else:
        client = Client(scheduler, set_as_default=False)
    stack.callback(client.close)
    return client


class BuildCompute:
    """The build's Dask client: started once per build, in the background, and shared by
    every stage that submits tasks.

    :meth:`start` starts the cluster (the recipe's ``compute`` section) on a thread and
    then imports the task modules on every worker (:func:`cube_gen.vision_stage.warm_worker`),
    so both overlap the read stage instead of adding to the first Dask stage; :meth:`client`
    waits for it (None: in-process); :meth:`close` shuts the cluster down (its worker
    processes exit) and is safe to call more than once and before :meth:`start`.
    """

    def __init__(self, compute: dict):
        self.compute = compute
        self._stack = contextlib.ExitStack()
        self._thread: threading.Thread | None = None
        self._client = None
        self._error: BaseException | None = None
        self._closed = False

    @property
    def in_process(self) -> bool:
        return (self.compute.get("scheduler") or "local") in ("synchronous", "threads")

    def start(self) -> BuildCompute:
        if self._thread is None and not self.in_process and not self._closed:
            self._thread = threading.Thread(target=self._start, name="deepearth-dask-start",
                                            daemon=True)
            self._thread.start()
        return self

    def _start(self) -> None:
        try:
            from .vision_stage import warm_worker

            client = _open_client(self.compute, self._stack)
            client.run(warm_worker)  # the task modules' imports, on every worker at once
            self._client = client
        except BaseException as exc:  # noqa: BLE001 - re-raised by client()
            self._error = exc

    def client(self):
        """The started client (waits for :meth:`start`), or None for in-process."""
        if self.in_process:
            return None
        if self._closed:
            raise RuntimeError("the build's Dask cluster is already shut down")
        self.start()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._client

    def close(self) -> None:
        self._closed = True
        if self._thread is not None:
            self._thread.join()
        self._client = None
        self._stack.close()

    def __enter__(self) -> BuildCompute:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
