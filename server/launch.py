"""``deepearth serve``: write an xcube server config for a cube set and run ``xcube serve``.

The config holds

* ``Datasets``: the grid pyramid (``grid.levels``), the only gridded cube, with a style per
  variable (value range ``[0, color_value_max]`` from the variable's attributes) and an RGB
  composite of ``embedding_r/g/b``; tables and embeddings are not xcube datasets;
* ``DeepEarth``: the plugin section naming the cube set (see :mod:`server.config`);
* ``Viewer: Configuration: Path``: the repository's ``viewer/`` folder when it exists.

The same file works with plain ``xcube serve -c config.yml``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from cube_gen import schema as S
from cube_gen.errors import DeepEarthError

from .config import DEFAULTS, SECTION

REPO_ROOT = Path(__file__).resolve().parent.parent
DATASET_ID = "grid"
STYLE_ID = "deepearth"

# The grid pyramids as xcube datasets, in the order the viewer lists them: it opens on the
# first dataset's first variable (all-years species richness).
DATASET_ORDER = (S.GRID_ALL_YEARS, S.GRID, S.GRID_MONTH_OF_YEAR, S.GRID_SPECIES)
DATASET_TITLES = {S.GRID_ALL_YEARS: "all years", S.GRID: "per year",
                  S.GRID_MONTH_OF_YEAR: "month of year (all years)",
                  S.GRID_SPECIES: "species occurrence (all years)"}


def _grid_datasets(cubeset: str, storage_options: dict[str, Any] | None):
    """``[(cube, title, [(variable, attrs)])]`` of the grid pyramids in the cube set (level
    0), variables in registry order (per-species layers last)."""
    import xarray as xr

    from cube_gen import grid_variables as G
    from cube_gen.access import CubeSet

    cs = CubeSet.open(cubeset, storage_options)
    base = str(cs.manifest.get("title") or "DeepEarth")
    out = []
    for cube in DATASET_ORDER:
        try:
            ds = xr.open_zarr(cs.zarr_store(cube, "0.zarr"), consolidated=True)
        except Exception:  # noqa: BLE001 - a cube set without this pyramid (older builds)
            if cube == S.GRID:
                raise
            continue
        names = [v for v in G.ORDER if v in ds.data_vars]
        names += sorted(v for v in ds.data_vars if v not in names and ds[v].ndim == 3)
        title = str(ds.attrs.get("title") or f"{base} ({DATASET_TITLES[cube]})")
        out.append((cube, title, [(n, dict(ds[n].attrs)) for n in names]))
    return out


def _style(cube: str, variables: list[tuple[str, dict]]) -> tuple[dict[str, Any], list[dict]]:
    """The dataset's style (colour mappings from the grid-variable registry and the ranges
    fitted at build time) and the custom colour maps it uses."""
    from cube_gen import grid_variables as G

    mappings: dict[str, Any] = {}
    customs: list[dict] = []
    for name, attrs in variables:
        var = G.lookup(name, attrs)
        if var is None:
            mappings[name] = {"ColorBar": str(attrs.get("color_bar_name", "viridis")),
                              "ValueRange": [float(attrs.get("color_value_min", 0.0)),
                                             float(attrs.get("color_value_max", 1.0))]}
            continue
        mapping, custom = G.xcube_color_mapping(var, attrs, cube)
        mappings[name] = mapping
        if custom:
            customs.append(custom)
    if set(G.RGB_COMPOSITE) <= set(mappings):
        mappings["rgb"] = {
            channel: {"Variable": name, "ValueRange": [0.0, 1.0]}
            for channel, name in zip(("Red", "Green", "Blue"), G.RGB_COMPOSITE, strict=True)
        }
    return {"Identifier": f"{STYLE_ID}-{cube}", "ColorMappings": mappings}, customs


def _relocate(dataset: dict[str, Any], cube: str) -> dict[str, Any]:
    """A ``Datasets`` location entry of the grid pointed at another pyramid of the set."""
    grid = S.CUBE_PATHS[S.GRID]
    path = str(dataset["Path"])
    return {**dataset, "Path": path[: -len(grid)] + S.CUBE_PATHS[cube]}


def _version_root(cubeset: str, storage_options: dict[str, Any]) -> str:
    """Where xcube reads the grid pyramids: the cube set itself on local disk (its fixed
    aliases follow the ``current`` link), the current version's prefix on object storage
    (which has no aliases: ``s3://bucket/set/versions/<id>``)."""
    if "://" not in cubeset or cubeset.startswith("file://"):
        return cubeset
    from cube_gen.access import CubeSet

    grid_url = CubeSet.open(cubeset, storage_options or None).cube_url(S.GRID)
    return grid_url[: -len(S.CUBE_PATHS[S.GRID])].rstrip("/")


def _dataset_location(cubeset: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """How xcube finds grid.levels: local path, or S3 path with xcube's own S3 keys.

    Returns ``{"dataset": {...}}`` for a plain ``Datasets`` entry, or ``{"store": {...}}``
    for a ``DataStores`` entry when the storage options need more than xcube's
    ``Anonymous``/``Endpoint``/``Region`` keys (e.g. credentials).
    """
    grid = S.CUBE_PATHS[S.GRID]
    if "://" not in cubeset or cubeset.startswith("file://"):
        root = cubeset[len("file://"):] if cubeset.startswith("file://") else cubeset
        return {"dataset": {"FileSystem": "file",
                            "Path": str(Path(root).resolve() / grid)}}
    protocol, rest = cubeset.split("://", 1)
    if protocol != "s3":
        raise DeepEarthError(f"xcube can serve the grid from local paths and s3:// only, "
                             f"not {protocol}://")
    opts = dict(storage_options)
    client = dict(opts.pop("client_kwargs", {}) or {})
    simple: dict[str, Any] = {}
    if "anon" in opts:
        simple["Anonymous"] = bool(opts.pop("anon"))
    if "endpoint_url" in client:
        simple["Endpoint"] = client.pop("endpoint_url")
    elif "endpoint_url" in opts:
        simple["Endpoint"] = opts.pop("endpoint_url")
    if "region_name" in client:
        simple["Region"] = client.pop("region_name")
    if not opts and not client:
        return {"dataset": {"FileSystem": "s3", "Path": f"{rest.rstrip('/')}/{grid}",
                            **simple}}
    return {"store": {"Identifier": "deepearth", "StoreId": "s3",
                      "StoreParams": {"root": rest.rstrip("/"),
                                      "storage_options": dict(storage_options)},
                      "Datasets": [{"Path": grid}]}}


def viewer_section(repo_root: Path = REPO_ROOT) -> dict[str, Any] | None:
    """The ``Viewer`` config section: branding from the repository's ``viewer/`` folder and
    the panels extension (:mod:`server.viewer.panels`); None without ``viewer/config.json``."""
    from .viewer.setup import viewer_section as section

    return section(repo_root)


def add_viewer_config(config: dict[str, Any], cubeset: str,
                      storage_options: dict[str, Any] | None, repo_root: Path = REPO_ROOT):
    """Viewer additions (in place): ``/viewer`` served from a copy of xcube's viewer with
    our notes (prepared in ``viewer/.dist``), styles fitted to the data
    (:func:`server.viewer.setup.add_viewer_config`)."""
    from .viewer.setup import add_viewer_config as add

    add(config, cubeset, storage_options, repo_root)


def make_config(cubeset: str, port: int = 8080, address: str = "127.0.0.1",
                storage_options: dict[str, Any] | None = None,
                cache_bytes: int | None = None, repo_root: Path = REPO_ROOT,
                plugin: dict[str, Any] | None = None,
                checked_grids: bool | None = None) -> dict[str, Any]:
    """The xcube server config for a cube set (a plain dict, ready for YAML).

    ``checked_grids``: xcube reads the grid pyramids through the release's checked store
    (:mod:`cube_gen.xcube_levels` data store: a lost chunk is an error naming it,
    object-store calls time out; the default), else by plain path (``DEEPEARTH_CHECKED_GRIDS=0``:
    a lost chunk is then drawn as an empty tile).
    """
    if checked_grids is None:
        checked_grids = os.environ.get("DEEPEARTH_CHECKED_GRIDS", "1") not in ("", "0")
    storage_options = dict(storage_options or {})
    if "://" not in cubeset:
        cubeset = str(Path(cubeset).resolve())
    grids = _grid_datasets(cubeset, storage_options or None)
    location = _dataset_location(_version_root(cubeset, storage_options), storage_options)
    section: dict[str, Any] = {"CubeSet": cubeset,
                               "CacheBytes": int(cache_bytes or DEFAULTS["CacheBytes"])}
    if storage_options:
        section["StorageOptions"] = storage_options
    section.update(plugin or {})
    config: dict[str, Any] = {"port": int(port), "address": address}
    # xcube's own /wmts scales colours to [0, 1] and serves the first time step when a
    # client sends none; the plugin's /deepearth/wmts replaces it.
    config["api_spec"] = {"excludes": ["ows.wmts"]}
    # tornado closes the connection without an answer on request heads over 64 KiB; with
    # 4 MiB the plugin can answer over-long query strings with a JSON 414 naming them.
    config["tornado"] = {"max_header_size": 4 * 1024 * 1024}
    entries, styles, customs = [], [], []
    for cube, title, variables in grids:
        style, cmaps = _style(cube, variables)
        styles.append(style)
        customs += cmaps
        entry = {"Identifier": cube, "Title": title, "Style": style["Identifier"],
                 "Variables": [name for name, _ in variables]}
        entries.append((cube, entry))
    if checked_grids:  # read through the release's checked store (cube_gen.xcube_levels)
        from cube_gen.xcube_config import store_config

        config["DataStores"] = [store_config(cubeset, [entry for _, entry in entries],
                                             storage_options or None)]
    elif "dataset" in location:
        config["Datasets"] = [{**entry, **_relocate(location["dataset"], cube)}
                              for cube, entry in entries]
    else:
        store = location["store"]
        store["Datasets"] = [{**store["Datasets"][0], **entry,
                              "Path": S.CUBE_PATHS[cube]} for cube, entry in entries]
        config["DataStores"] = [store]
    config["Styles"] = styles
    config["CustomColorMaps"] = customs
    config[SECTION] = section
    viewer = viewer_section(repo_root)
    if viewer:
        config["Viewer"] = viewer
        add_viewer_config(config, cubeset, storage_options, repo_root)
    return config


def write_config(config: dict[str, Any], path: str | os.PathLike) -> str:
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("# xcube server config written by `deepearth serve`; "
                "run it with `xcube serve -c <this file>`\n")
        yaml.safe_dump(config, f, sort_keys=False, default_flow_style=None)
    return path


def xcube_command() -> list[str]:
    exe = Path(sys.executable).parent / "xcube"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("xcube")
    if found:
        return [found]
    return [sys.executable, "-m", "xcube.cli.main"]


def serve(cubeset: str, port: int = 8080, address: str = "127.0.0.1",
          config_out: str | None = None, storage_options_json: str | None = None,
          dry_run: bool = False) -> int:
    """Write the config and run ``xcube serve -c`` on it (until interrupted)."""
    try:
        storage_options = json.loads(storage_options_json) if storage_options_json else {}
    except ValueError as exc:
        raise DeepEarthError(f"--storage-options is not valid JSON: {exc}") from None
    if not isinstance(storage_options, dict):
        raise DeepEarthError("--storage-options must be a JSON object")
    config = make_config(cubeset, port=port, address=address, storage_options=storage_options)
    if config_out is None:
        config_out = os.path.join(tempfile.mkdtemp(prefix="deepearth-serve-"), "config.yml")
    write_config(config, config_out)
    if dry_run:
        print(f"# {config_out}")
        print(yaml.safe_dump(config, sort_keys=False, default_flow_style=None), end="")
        return 0
    cmd = [*xcube_command(), "serve", "-c", config_out, "--port", str(port),
           "--address", address]
    print(f"config: {config_out}\nserving http://{address}:{port}/deepearth "
          f"(viewer: http://{address}:{port}/viewer/)", flush=True)
    if hasattr(os, "execv"):  # become xcube serve: SIGTERM/SIGINT/SIGHUP reach it directly
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(cmd[0], cmd)
    proc = subprocess.Popen(cmd)  # pragma: no cover - platforms without exec
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


# -- a server in the background (tests, benchmarks, notebooks) -----------------------------
def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@contextlib.contextmanager
def running(config_path: str | os.PathLike, port: int, log_path: str | os.PathLike,
            timeout: float = 300.0, address: str = "127.0.0.1",
            env: dict[str, str] | None = None) -> Iterator[str]:
    """Run ``xcube serve -c config_path`` in the background until the block ends.

    Waits until ``/deepearth/health`` answers, yields the base URL, then stops the
    server's process group (SIGTERM, then SIGKILL after 10 s).
    """
    import requests

    log_path = Path(log_path)
    url = f"http://{address}:{port}"
    cmd = [*xcube_command(), "serve", "-c", str(config_path), "--port", str(port),
           "--address", address]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise DeepEarthError(f"xcube serve exited with {proc.returncode}:\n"
                                     f"{_tail(log_path)}")
            try:
                if requests.get(url + "/deepearth/health", timeout=5).status_code < 600:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise DeepEarthError(f"xcube serve not ready after {timeout} s:\n"
                                     f"{_tail(log_path)}")
            time.sleep(0.25)
        yield url
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@contextlib.contextmanager
def serving(cubeset: str, workdir: str | os.PathLike, plugin: dict[str, Any] | None = None,
            storage_options: dict[str, Any] | None = None,
            timeout: float = 300.0) -> Iterator[str]:
    """Write the config for a cube set into ``workdir`` and run plain ``xcube serve`` on it."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = make_config(str(cubeset), port=port, address="127.0.0.1",
                         storage_options=storage_options, plugin=plugin)
    path = write_config(config, workdir / "config.yml")
    with running(path, port, workdir / "xcube-serve.log", timeout=timeout) as url:
        yield url
