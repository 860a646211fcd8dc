"""Shared pytest fixtures.

Fixtures here are used across test modules; keep each one documented and cheap, and
prefer ``scope="session"`` for data that takes seconds to write. Session-scoped data is
shared by every test: treat it as read-only and copy it (``shutil.copytree``) before
changing anything.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cube_gen.synth import write_synthetic


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny`` synthetic source dataset (seed 0), written once per test session.

    Returns the dataset folder (a :class:`pathlib.Path`) in the published layout:
    240 observations, 12 species, 5 observations with 6 vision embeddings in 2 files.
    Read-only: copy it before breaking or editing it.
    """
    path = tmp_path_factory.mktemp("source") / "tiny"
    write_synthetic(str(path), "tiny", seed=0, progress=False)
    return path
