"""Run a real ``xcube serve`` subprocess for tests (see :func:`server.launch.serving`).

``serve_cubeset(cubeset, workdir)`` writes the ``deepearth serve`` config for a cube set,
starts plain ``xcube serve -c`` on a free loopback port, waits until
``/deepearth/health`` answers, yields the base URL and stops the process group afterwards.
"""

from __future__ import annotations

from server.launch import free_port, running, serving

serve_cubeset = serving

__all__ = ["free_port", "running", "serve_cubeset"]
