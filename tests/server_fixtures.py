"""Served cube sets and the one HTTP helper of the server tests.

* ``serve_cubeset(cubeset, workdir, plugin=...)`` (:func:`server.launch.serving`): writes the
  ``deepearth serve`` config for a cube set, starts plain ``xcube serve -c`` on a free
  loopback port, waits until ``/deepearth/health`` answers, yields the base URL and stops
  the process group afterwards;
* :class:`Served`: what the session fixture ``served`` (tests/conftest.py) yields: the URL,
  the config it runs and an :class:`Http` helper;
* :class:`Http`: requests against one server with the checks every test repeats (200 with a
  JSON body; an error envelope with its status and no traceback).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import requests

from server.launch import free_port, running, serving

serve_cubeset = serving
TIMEOUT = 60
# Limits of the shared served cube set (small, so tests reach them with tiny data).
SERVED_PLUGIN = {"MaxBatchFeatures": 3, "MaxK": 50, "MaxPageSize": 100, "MaxUmapPoints": 100,
                 "RequestTimeout": 60}


class Http:
    """HTTP requests against one base URL."""

    def __init__(self, base: str, timeout: float = TIMEOUT):
        self.base = base.rstrip("/")
        self.timeout = timeout

    def get(self, path: str, **params: Any) -> requests.Response:
        return requests.get(self.base + path, params=params or None, timeout=self.timeout)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(self.base + path, timeout=self.timeout, **kwargs)

    def json(self, path: str, **params: Any) -> Any:
        """The JSON body of a 200 answer."""
        r = self.get(path, **params)
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"].startswith("application/")
        return r.json()

    def npy(self, path: str, **params: Any) -> np.ndarray:
        r = self.get(path, **params)
        assert r.status_code == 200, r.text
        return load_npy(r.content)

    def problem(self, path: str, status: int, **params: Any) -> dict[str, Any]:
        """The ``error`` object of a JSON error answer with ``status`` (no traceback)."""
        return problem_of(self.get(path, **params), status)


def load_npy(content: bytes) -> np.ndarray:
    return np.load(io.BytesIO(content), allow_pickle=False)


def problem_of(r: requests.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert "Traceback" not in r.text
    err = r.json()["error"]
    assert err["status_code"] == status and err["message"], err
    return err


@dataclass
class Served:
    """A running ``xcube serve`` over a cube set."""

    url: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def http(self) -> Http:
        return Http(self.url)


__all__ = ["free_port", "running", "serve_cubeset", "Http", "Served", "SERVED_PLUGIN",
           "load_npy", "problem_of"]
