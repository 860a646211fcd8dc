"""The DeepEarth viewer in a Jupyter notebook: ``Viewer(cubeset).show()``.

Starts an xcube server with the DeepEarth plugin inside the notebook's own process (its
tornado IO loop on a daemon thread), configured exactly as ``deepearth serve`` configures
it (:func:`server.launch.make_config`: grid layers, styles, the plugin's APIs, the
customised viewer), and shows the viewer in the cell as an iframe. Works for local and
``s3://`` cube sets (``storage_options`` as for :class:`cube_gen.access.CubeSet`).

Behind JupyterHub / JupyterLab with ``jupyter-server-proxy``, set ``XCUBE_JUPYTER_LAB_URL``
to the lab's public URL (as for xcube's own notebook viewer): the server then answers
under ``<lab>/proxy/<port>``, which is also the reverse URL prefix it writes into links.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

LAB_URL_ENV = "XCUBE_JUPYTER_LAB_URL"


def _public_url(port: int, address: str) -> tuple[str, str]:
    """(URL the browser uses, the server's reverse URL prefix)."""
    lab = os.environ.get(LAB_URL_ENV)
    if lab:
        prefix = f"/proxy/{port}"
        return lab.rstrip("/") + prefix, prefix
    host = "localhost" if address in ("0.0.0.0", "127.0.0.1", "localhost") else address
    return f"http://{host}:{port}", ""


class Viewer:
    """An xcube server + DeepEarth viewer for a cube set, running in this process.

    ``Viewer("s3://bucket/cubes", storage_options={...}).show()`` in a notebook cell;
    :attr:`server_url` is the HTTP API (``/deepearth/...``, ``/deepearth/stac``, WMTS),
    :meth:`stop` ends the server. ``plugin`` adds settings of the ``DeepEarth`` config
    section (e.g. ``{"MaxK": 50}``).
    """

    def __init__(self, cubeset: str, storage_options: dict[str, Any] | None = None,
                 port: int | None = None, address: str = "127.0.0.1",
                 plugin: dict[str, Any] | None = None, timeout: float = 120.0):
        import tornado.ioloop
        from xcube.server.server import Server
        from xcube.server.webservers.tornado import TornadoFramework

        from .launch import free_port, make_config

        self.cubeset = str(cubeset)
        self.port = int(port or free_port())
        self.address = address
        self._server_url, prefix = _public_url(self.port, address)
        self.config = make_config(self.cubeset, port=self.port, address=address,
                                  storage_options=storage_options, plugin=plugin)
        if prefix:
            self.config["reverse_url_prefix"] = prefix
        self._io_loop = tornado.ioloop.IOLoop()
        self._thread = threading.Thread(target=self._io_loop.start, daemon=True,
                                        name=f"deepearth-viewer-{self.port}")
        self._thread.start()
        self._server = Server(TornadoFramework(io_loop=self._io_loop, shared_io_loop=True),
                              config=self.config)
        self._io_loop.add_callback(self._server.start)
        self._wait(timeout)

    def _wait(self, timeout: float) -> None:
        import requests

        from cube_gen.errors import DeepEarthError

        local = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{local}/deepearth/health", timeout=5).status_code < 500:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.stop()
        raise DeepEarthError(f"the DeepEarth server for {self.cubeset} did not answer on port "
                             f"{self.port} within {timeout} s")

    @property
    def server_url(self) -> str:
        return self._server_url

    @property
    def viewer_url(self) -> str:
        return f"{self._server_url}/viewer/?serverUrl={self._server_url}"

    @property
    def is_running(self) -> bool:
        return self._server is not None

    def show(self, width: int | str = "100%", height: int | str = 800):
        """The viewer in an iframe (an IPython object: the cell displays it)."""
        from IPython.display import IFrame

        if not self.is_running:
            raise RuntimeError("the server is stopped; create a new Viewer")
        return IFrame(f"{self.viewer_url}&compact=0", width=width, height=height)

    def info(self) -> dict[str, str]:
        return {"cubeset": self.cubeset, "server": self.server_url, "viewer": self.viewer_url,
                "stac": f"{self.server_url}/deepearth/stac",
                "api": f"{self.server_url}/openapi.html"}

    def stop(self) -> None:
        """Stop the server and its IO loop (the port is free again)."""
        server, self._server = self._server, None
        if server is not None:
            done = threading.Event()

            def stop_on_loop():
                try:
                    server.stop()
                finally:
                    done.set()
            self._io_loop.add_callback(stop_on_loop)
            done.wait(10)
        self._io_loop.add_callback(self._io_loop.stop)
        self._thread.join(10)

    def __enter__(self) -> Viewer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _repr_html_(self) -> str:
        return self.show()._repr_html_() if self.is_running else "<p>DeepEarth viewer (stopped)</p>"


def lexcube_view(cubeset: str, variable: str = "observation_count", cube: str = "grid",
                 level: int = 0, storage_options: dict[str, Any] | None = None, **kwargs: Any):
    """A Lexcube 3-D view (time x lat x lon) of a grid cube's variable, for a notebook cell.

    Needs the optional ``lexcube`` package (``pip install "deepearth-cube[notebook]"``); its
    widget is built offline from the cube (level ``level`` of the ``cube`` pyramid).
    ``kwargs`` go to ``lexcube.Cube3DWidget`` (cmap, vmin, vmax, ...).
    """
    try:
        import lexcube
    except ImportError as exc:
        raise ImportError("lexcube_view needs the lexcube package: pip install lexcube "
                          "(or the project's 'notebook' extra)") from exc
    import xarray as xr

    from cube_gen import schema as S
    from cube_gen.access import CubeSet

    cs = CubeSet.open(cubeset, storage_options)
    if cube not in S.GRID_CUBES:
        raise ValueError(f"cube must be one of {', '.join(S.GRID_CUBES)}, got {cube!r}")
    url = cs.cube_url(cube) if hasattr(cs, "cube_url") else f"{cs.url}/{S.CUBE_PATHS[cube]}"
    ds = xr.open_zarr(f"{url}/{level}.zarr", consolidated=True,
                      storage_options=cs.storage_options or None)
    if variable not in ds.data_vars:
        raise ValueError(f"{cube} has no variable {variable!r} (variables: "
                         f"{', '.join(sorted(ds.data_vars))})")
    da = ds[variable]
    kwargs.setdefault("cmap", "viridis")
    kwargs.setdefault("vmin", float(da.attrs.get("color_value_min", 0.0)))
    if "color_value_max" in da.attrs:
        kwargs.setdefault("vmax", float(da.attrs["color_value_max"]))
    return lexcube.Cube3DWidget(da, **kwargs)
