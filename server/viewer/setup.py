"""What the customised xcube viewer needs besides the plugin's API.

* :func:`prepare_viewer_dist`: a copy of the viewer bundled with xcube, with the project's own
  privacy note, imprint, manifest and start script laid over it, made at server start
  into the gitignored ``viewer/.dist/`` (the bundle itself is never committed);
* :func:`viewer_section` and :func:`viewer_static_routes`: the server config entries that
  point xcube at ``viewer/`` (branding), the panels package and that copy;
* map layer styles are not made here: :mod:`server.launch` writes them from the
  grid-variable registry (:mod:`cube_gen.grid_variables`).

The observations' place groups and dot tiles are in :mod:`.places`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

LOG = logging.getLogger("xcube")
REPO_ROOT = Path(__file__).resolve().parents[2]
ENV_VIEWER_PATH = "XCUBE_VIEWER_PATH"
PANELS_EXTENSION = "server.viewer.panels.extension"  # module.attribute of the chartlets Extension
DIST_FOLDER = ".dist"
OVERLAY_FOLDER = "dist-overlay"
INIT_SCRIPT = "deepearth-init.js"
APP_SCRIPT = "deepearth-app.js"  # the exploration loop (needs the bundle hooks, viewer_bundle)
_PATCH_VERSION = "2"  # bump when the index.html or bundle patches change


# -- the server config ---------------------------------------------------------------------
def viewer_section(repo_root: Path = REPO_ROOT) -> dict[str, Any] | None:
    """The ``Viewer`` config section: branding from ``viewer/``, the panels extension."""
    viewer = Path(repo_root) / "viewer"
    if not (viewer / "config.json").is_file():
        return None
    return {
        "Configuration": {"Path": str(viewer)},
        "Augmentation": {"Extensions": [PANELS_EXTENSION]},
    }


def viewer_static_routes(repo_root: Path = REPO_ROOT) -> list[dict[str, Any]]:
    """A ``static_routes`` entry serving the prepared viewer copy at ``/viewer``.

    Config static routes are matched before xcube's own ``/viewer`` route, so the same
    config file works with plain ``xcube serve -c``. Nothing is added when
    ``XCUBE_VIEWER_PATH`` is set (the user chose a viewer build) or when the repository
    has no ``viewer/`` folder or xcube no bundled viewer.
    """
    if os.environ.get(ENV_VIEWER_PATH):
        return []
    viewer = Path(repo_root) / "viewer"
    if not (viewer / "config.json").is_file():
        return []
    try:
        dist = prepare_viewer_dist(viewer)
    except OSError as exc:  # e.g. a read-only checkout: xcube's own viewer still works
        LOG.warning("DeepEarth viewer: cannot prepare %s (%s); serving xcube's bundled "
                    "viewer with its own privacy note", viewer / DIST_FOLDER, exc)
        return []
    if dist is None:
        return []
    return [{"path": "/viewer", "dir_path": str(dist), "default_filename": "index.html"}]


def add_viewer_config(config: dict[str, Any], cubeset: str,
                      storage_options: dict[str, Any] | None = None,
                      repo_root: Path = REPO_ROOT) -> None:
    """The viewer's additions to a ``deepearth serve`` config (in place): the ``/viewer``
    static route to the prepared copy. (Map layer styles come from the grid-variable
    registry, :mod:`cube_gen.grid_variables`, with ranges fitted when the cubes were built:
    :mod:`server.launch` writes them; the viewer shows what the config says.)"""
    routes = viewer_static_routes(repo_root)
    if routes:
        config["static_routes"] = [*config.get("static_routes", []), *routes]


# -- the prepared viewer copy --------------------------------------------------------------
def bundled_viewer_dist() -> Path | None:
    """The viewer build shipped inside xcube (``xcube/webapi/viewer/dist``), if present."""
    try:  # located, not imported (importing it costs seconds, and xcube serve does it)
        spec = importlib.util.find_spec("xcube.webapi.viewer")
    except ImportError:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    dist = Path(list(spec.submodule_search_locations)[0]) / "dist"
    return dist if (dist / "index.html").is_file() else None


def _overlay_files(overlay: Path) -> list[Path]:
    return sorted(p for p in overlay.rglob("*") if p.is_file()) if overlay.is_dir() else []


def _dist_key(bundle: Path, overlay: Path, extra: list[Path]) -> str:
    """Hash of everything the prepared copy is made from (bundle index, overlay, logos)."""
    from .bundle import HOOKS

    h = hashlib.sha256(_PATCH_VERSION.encode())
    h.update(repr(HOOKS).encode())
    h.update((bundle / "index.html").read_bytes())
    h.update(str(sorted(os.listdir(bundle / "assets"))).encode())
    for path in [*_overlay_files(overlay), *extra]:
        h.update(str(path.relative_to(overlay.parent)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def patch_index_html(html: str, title: str = "DeepEarth Cube", app: bool = True) -> str:
    """The bundled ``index.html`` with our title, icon and start scripts (run first;
    ``app``: also the exploration loop, which needs the patched bundle)."""
    if INIT_SCRIPT in html:
        return html
    html = html.replace("<title>xcube Viewer</title>", f"<title>{title}</title>", 1)
    html = html.replace('href="./images/favicon.ico"', 'href="./images/deepearth-logo.png"', 1)
    script = f'<script src="./{INIT_SCRIPT}"></script>'
    if app:
        script += f'\n    <script src="./{APP_SCRIPT}"></script>'
    if "<head>" not in html:
        raise ValueError("the bundled viewer's index.html has no <head> element")
    return html.replace("<head>", f"<head>\n    {script}", 1)


def prepare_viewer_dist(viewer: Path, bundle: Path | None = None) -> Path | None:
    """Copy the bundled viewer into ``viewer/.dist/viewer-<key>`` with our files laid over it.

    ``<key>`` hashes the bundle and the overlay, so an unchanged setup reuses the copy
    and concurrent starts never see a half-written folder (each builds in a temporary
    folder, then renames it). Returns the folder, or None when xcube has no bundled viewer.
    """
    viewer = Path(viewer)
    bundle = bundle or bundled_viewer_dist()
    if bundle is None:
        return None
    overlay = viewer / OVERLAY_FOLDER
    logos = sorted((viewer / "images").glob("deepearth-logo*.png"))
    root = viewer / DIST_FOLDER
    target = root / f"viewer-{_dist_key(bundle, overlay, logos)}"
    if (target / "index.html").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tmp-", dir=root))
    try:
        build = tmp / "viewer"
        shutil.copytree(bundle, build)
        for src in _overlay_files(overlay):
            dst = build / src.relative_to(overlay)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        for logo in logos:
            shutil.copyfile(logo, build / "images" / logo.name)
        from .bundle import BundlePatchError, patch_bundle

        try:
            patch_bundle(build)
            app = True
        except BundlePatchError as exc:
            LOG.warning("DeepEarth viewer: %s; serving the stock viewer (panels work, map "
                        "selection from panels, URL state and filters on the dots do not)", exc)
            app = False
        index = build / "index.html"
        index.write_text(patch_index_html(index.read_text(encoding="utf-8"), app=app),
                         encoding="utf-8")
        try:
            os.rename(build, target)
        except OSError:  # another process finished first: use its copy
            if not (target / "index.html").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune(root, keep=target)
    return target


def _prune(root: Path, keep: Path, newest: int = 3) -> None:
    """Remove all but the ``newest`` prepared copies (best effort: a server still running
    from an older copy keeps its files open, and an unchanged setup never builds anew)."""
    copies = sorted((p for p in root.glob("viewer-*") if p.is_dir() and p != keep),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in copies[newest - 1:]:
        shutil.rmtree(old, ignore_errors=True)
