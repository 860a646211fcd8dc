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


def tiny_recipe_data(source: Path, target: Path, **cubes) -> dict:
    """A recipe mapping for the tiny source (in-process scheduler, small grid tiles)."""
    data = {
        "version": 1,
        "source": {"path": str(source)},
        "target": {"path": str(target)},
        "cubes": {"grid": {"resolution": 0.01, "tile_size": 64}, **cubes},
        "metadata": {"title": "DeepEarth test cubes"},
        "compute": {"scheduler": "synchronous"},
    }
    return data


def current_dir(cubes: Path) -> Path:
    """The folder of the current version of a local cube set (``versions/<id>``)."""
    import json

    manifest = json.loads((Path(cubes) / "cubeset.json").read_text())
    return Path(cubes) / "versions" / manifest["current"]


def copy_cubes(src: Path, dst: Path) -> Path:
    """A private copy of a local cube set (links to the current version kept as links)."""
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


def reinventory(cubes: Path) -> None:
    """Record a deliberate in-place change of the current version in its release manifest
    (tests that re-encode a cube; anything else changing a release is damage)."""
    import json

    from cube_gen.release import RELEASE, inventory
    from cube_gen.store import Target

    vdir = current_dir(cubes)
    rel = json.loads((vdir / RELEASE).read_text())
    target = Target(str(cubes))
    parts = [p.name for p in vdir.iterdir() if p.is_dir()]
    rel["files"] = inventory(target, str(vdir), parts)
    (vdir / RELEASE).write_text(json.dumps(rel))


@pytest.fixture(scope="session")
def tiny_cubes(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cube set built from ``tiny_source`` by the recipe engine, once per session.

    Returns the cube set folder (cubeset.json, versions/<id>/ with the cubes, and links
    observations.zarr, species.zarr, vision.zarr, grid.levels, ... to the current version).
    Read-only: copy it (:func:`copy_cubes`) before changing anything.
    """
    from cube_gen.pipeline import run_recipe
    from cube_gen.recipe import parse_recipe

    target = tmp_path_factory.mktemp("cubes") / "tiny-cubes"
    run_recipe(parse_recipe(tiny_recipe_data(tiny_source, target)), progress=False)
    return target


@pytest.fixture(scope="session")
def patch_cubes(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_cubes`` built with the patch index stage on (a flat index: 3,456 patches), once
    per session. Read-only, like ``tiny_cubes``."""
    from cube_gen.pipeline import run_recipe
    from cube_gen.recipe import parse_recipe

    target = tmp_path_factory.mktemp("patch-cubes") / "cubes"
    run_recipe(parse_recipe(tiny_recipe_data(tiny_source, target, patches={"enabled": True})),
               progress=False)
    return target


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on a free loopback port for the session (see tests/s3_server.py)."""
    from s3_server import moto_s3

    with moto_s3() as server:
        server.create_bucket("deepearth")
        yield server


@pytest.fixture(scope="session")
def s3_cubes(s3, tiny_source: Path) -> str:
    """The tiny cube set built by a recipe that reads the source from S3 and writes to S3.

    Returns the cube set URL ``s3://deepearth/cubes``; ``s3.storage_options`` opens it.
    """
    import s3fs

    from cube_gen.pipeline import run_recipe
    from cube_gen.recipe import parse_recipe

    fs = s3fs.S3FileSystem(**s3.storage_options)
    fs.put(str(tiny_source), "deepearth/source", recursive=True)
    data = tiny_recipe_data("s3://deepearth/source", "s3://deepearth/cubes")
    data["source"]["storage_options"] = s3.storage_options
    data["target"]["storage_options"] = s3.storage_options
    run_recipe(parse_recipe(data), progress=False)
    return "s3://deepearth/cubes"


@pytest.fixture(scope="session")
def served(tiny_cubes: Path, tmp_path_factory: pytest.TempPathFactory):
    """One ``xcube serve`` over ``tiny_cubes`` for the session (``deepearth serve`` config
    with the small limits of ``server_fixtures.SERVED_PLUGIN``): a
    :class:`server_fixtures.Served` (``.url``, ``.config``, ``.http``). Shared by the HTTP
    test modules: do not change its state (tests that break storage start their own)."""
    import yaml
    from server_fixtures import SERVED_PLUGIN, Served, serve_cubeset

    workdir = tmp_path_factory.mktemp("served")
    with serve_cubeset(tiny_cubes, workdir, plugin=SERVED_PLUGIN) as url:
        yield Served(url, yaml.safe_load((workdir / "config.yml").read_text()))


@pytest.fixture(scope="session")
def http(served):
    """:class:`server_fixtures.Http` for the shared served cube set."""
    return served.http
