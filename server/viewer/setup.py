"""What the customised xcube viewer needs besides the plugin's API.

* :func:`prepare_viewer_dist`: a copy of the viewer bundled with xcube, with the project's own
  privacy note, imprint, manifest and start script laid over it, made at server start
  into the gitignored ``viewer/.dist/`` (the bundle itself is never committed);
* :func:`viewer_section` and :func:`viewer_static_routes`: the server config entries that
  point xcube at ``viewer/`` (branding), the panels package and that copy;
* :func:`tune_styles`: colour maps and value ranges of the grid layers fitted to the data
  (zero counts transparent, ranges from the data's upper percentile);
* :func:`observation_place_group`, :func:`vision_place_group`: the observations (all, and
  those with photo embeddings) as GeoJSON point features, place groups of the grid
  dataset (added by :mod:`server.viewer_routes`);
* :class:`PointTiles`: XYZ tiles (Web Mercator) of the observations drawn in their
  species' cluster colours, the viewer's ``observations`` overlay layer (xcube Viewer
  draws dataset places in one fixed colour).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

LOG = logging.getLogger("xcube")
REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_VIEWER_PATH = "XCUBE_VIEWER_PATH"
PANELS_EXTENSION = "server.panels.extension"  # module.attribute of the chartlets Extension
PLACE_GROUP_ID = "observations"
VISION_PLACE_GROUP_ID = "observations-with-embeddings"
PLACE_ID_PREFIX = "obs-"
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
    static route to the prepared copy and map layer styles fitted to the data."""
    routes = viewer_static_routes(repo_root)
    if routes:
        config["static_routes"] = [*config.get("static_routes", []), *routes]
    if config.get("Styles"):
        from cube_gen.access import CubeSet

        try:
            tune_styles(config, CubeSet.open(cubeset, storage_options or None).grid(0))
        except Exception as exc:  # noqa: BLE001 - the schema's ranges still work
            LOG.warning("DeepEarth viewer: map styles not fitted to the data (%s: %s)",
                        type(exc).__name__, exc)


# -- map layer styles ----------------------------------------------------------------------
COUNT_VARIABLES = ("observation_count", "species_richness", "vision_count")
RANGE_PERCENTILE = 99.5  # of the positive values: a few very busy cells do not wash out the rest


def fitted_vmax(values: np.ndarray, integer: bool) -> float | None:
    """Upper end of a colour range: the RANGE_PERCENTILE of the positive finite values."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return None
    top = float(np.percentile(v, RANGE_PERCENTILE))
    if integer:
        return float(max(1, int(np.ceil(top))))
    return float(f"{top:.3g}") if top > 0 else None


def tune_styles(config: dict[str, Any], grid) -> None:
    """Fit the ``Styles`` colour mappings of the config to the grid's level 0 (in place).

    Count layers (observations, species richness, vision count, top-species counts) get
    the colour map's ``_alpha`` variant (zero transparent, so the base map and the
    observation points stay visible) and a value range from 0 to the 99.5th percentile
    of the positive cell values; other scalar layers keep their colour map and get the
    same kind of range. RGB composites are left alone.
    """
    from cube_gen import schema as S

    for style in config.get("Styles", []) or []:
        for name, mapping in (style.get("ColorMappings") or {}).items():
            if ("ColorBar" not in mapping or name not in grid.data_vars
                    or name.startswith("embedding_")  # composites: keep [0, 1]
                    # fitted at build time (cube_gen.grid_variables): keep
                    or str(mapping["ColorBar"]).startswith("deepearth_")):
                continue
            is_count = name in COUNT_VARIABLES or name.startswith(S.TOP_SPECIES_PREFIX)
            vmax = fitted_vmax(grid[name].values, integer=is_count)
            if vmax is not None:
                mapping["ValueRange"] = [0.0, vmax]
            bar = str(mapping["ColorBar"])
            if is_count and not bar.endswith("_alpha"):
                mapping["ColorBar"] = f"{bar}_alpha"


# -- the prepared viewer copy --------------------------------------------------------------
def bundled_viewer_dist() -> Path | None:
    """The viewer build shipped inside xcube (``xcube/webapi/viewer/dist``), if present."""
    try:
        dist = Path(str(importlib.resources.files("xcube.webapi.viewer") / "dist"))
    except (ImportError, TypeError):
        return None
    return dist if (dist / "index.html").is_file() else None


def _overlay_files(overlay: Path) -> list[Path]:
    return sorted(p for p in overlay.rglob("*") if p.is_file()) if overlay.is_dir() else []


def _dist_key(bundle: Path, overlay: Path, extra: list[Path]) -> str:
    """Hash of everything the prepared copy is made from (bundle index, overlay, logos)."""
    from .viewer_bundle import HOOKS

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
        from .viewer_bundle import BundlePatchError, patch_bundle

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


# -- the observations place group ----------------------------------------------------------
def place_id(gbif_id: int) -> str:
    return f"{PLACE_ID_PREFIX}{int(gbif_id)}"


def gbif_id_of_place(place_id_: str | None) -> int | None:
    """The gbif_id of an observation place id (``obs-<gbif_id>``), else None."""
    if not place_id_ or not str(place_id_).startswith(PLACE_ID_PREFIX):
        return None
    try:
        return int(str(place_id_)[len(PLACE_ID_PREFIX):])
    except ValueError:
        return None


def observation_features(cs, positions: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Observations of a :class:`~cube_gen.access.CubeSet` as GeoJSON point features.

    All observations, or those at ``positions`` along ``obs``. Feature ids are
    ``obs-<gbif_id>`` (the panels read the gbif_id back from the selected place id);
    properties: ``label`` (species and date), ``color`` (the species' cluster colour),
    ``gbif_id``, ``species`` and ``date``.
    """
    ds = cs.observations
    if positions is not None:
        ds = ds.isel(obs=np.asarray(positions, dtype=np.int64))
    gbif = ds.gbif_id.values
    lat = np.round(ds.lat.values.astype(np.float64), 6)
    lon = np.round(ds.lon.values.astype(np.float64), 6)
    species = ds.species_index.values.astype(np.int64)
    dates = pd.DatetimeIndex(ds.time.values).strftime("%Y-%m-%d")
    table = cs.species_table()
    names = table.taxon_name.to_numpy().astype(str)
    colors = table.cluster_color.to_numpy().astype(str)
    features = []
    for i in range(len(gbif)):
        s = int(species[i])
        features.append({
            "type": "Feature",
            "id": place_id(gbif[i]),
            "geometry": {"type": "Point", "coordinates": [float(lon[i]), float(lat[i])]},
            "properties": {
                "label": f"{names[s]} · {dates[i]}",
                "color": colors[s],
                "gbif_id": int(gbif[i]),
                "species": names[s],
                "date": dates[i],
            },
        })
    return features


def _place_group(id_: str, title: str, description: str,
                 features: list[dict[str, Any]]) -> dict[str, Any]:
    """A place group in the form xcube's places context keeps (features already loaded)."""
    return {
        "type": "FeatureCollection",
        "id": id_,
        "title": title,
        "description": description,
        "propertyMapping": {"label": "label", "color": "color"},
        "features": features,
        "sourcePaths": [],
        "sourceEncoding": "utf-8",
        "join": None,
    }


def observation_place_group(cs) -> dict[str, Any]:
    """Every observation, as the ``observations`` place group."""
    return _place_group(PLACE_GROUP_ID, "Observations",
                        "Every observation (the map's coloured dots show the language cluster "
                        "of its species)", observation_features(cs))


def vision_place_group(cs) -> dict[str, Any]:
    """The observations with photo embeddings (fewer points: quicker to pick one)."""
    positions = np.flatnonzero(cs.observations.has_vision.values)
    return _place_group(VISION_PLACE_GROUP_ID, "Observations with photo embeddings",
                        "The observations whose photos have V-JEPA 2 embeddings",
                        observation_features(cs, positions))


# -- the observations overlay tiles --------------------------------------------------------
TILE_SIZE = 256
_SUPERSAMPLE = 2  # draw at 2x, then downsample: smooth dots


def _hex_rgb(color: str) -> tuple[int, int, int]:
    c = str(color).lstrip("#")
    try:
        return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)
    except (ValueError, IndexError):
        return 128, 128, 128


def dot_radius(z: int) -> float:
    """Dot radius in pixels at zoom ``z``: small when zoomed out, so the grid layer below
    still shows between the dots of a dense region."""
    return 1.2 if z <= 9 else 1.6 if z <= 10 else 2.5 if z <= 12 else 4.0


class PointTiles:
    """Observations as coloured dots on XYZ Web Mercator tiles (PNG, transparent background).

    Positions are kept as normalised Web Mercator coordinates in [0, 1); a tile selects
    its points with two comparisons per axis, so a request costs only the drawing.
    """

    def __init__(self, lon: np.ndarray, lat: np.ndarray, colors: list[str]):
        lat = np.clip(np.asarray(lat, np.float64), -85.05112878, 85.05112878)
        self.u = (np.asarray(lon, np.float64) + 180.0) / 360.0
        rad = np.radians(lat)
        self.v = (1.0 - np.log(np.tan(rad) + 1.0 / np.cos(rad)) / np.pi) / 2.0
        self.rgb = [_hex_rgb(c) for c in colors]
        self._empty: bytes | None = None

    @classmethod
    def of(cls, cs) -> PointTiles:
        """The observations of a cube set, each in its species' cluster colour."""
        ds = cs.observations
        colors = cs.species_table().cluster_color.to_numpy().astype(str)
        return cls(ds.lon.values, ds.lat.values, list(colors[ds.species_index.values]))

    def points_in(self, z: int, x: int, y: int, margin_px: float = 0.0) -> np.ndarray:
        n = float(1 << z)
        m = margin_px / TILE_SIZE
        px, py = self.u * n - x, self.v * n - y
        return np.flatnonzero((px >= -m) & (px < 1 + m) & (py >= -m) & (py < 1 + m))

    def empty_png(self) -> bytes:
        if self._empty is None:
            from PIL import Image

            self._empty = _png(Image.new("RGBA", (TILE_SIZE, TILE_SIZE), (0, 0, 0, 0)))
        return self._empty

    def png(self, z: int, x: int, y: int, keep: np.ndarray | None = None) -> bytes:
        """The tile (z, x, y) as PNG bytes (``keep``: a mask of the points to draw)."""
        from PIL import Image, ImageDraw

        r = dot_radius(z)
        hits = self.points_in(z, x, y, margin_px=r + 1)
        if keep is not None:
            hits = hits[keep[hits]]
        if len(hits) == 0:
            return self.empty_png()
        k = _SUPERSAMPLE
        size = TILE_SIZE * k
        image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        draw = ImageDraw.Draw(image)
        n = float(1 << z)
        px = (self.u[hits] * n - x) * size
        py = (self.v[hits] * n - y) * size
        rr = r * k
        outline = (33, 33, 33, 230) if z > 10 else None  # dots alone when zoomed out
        for i, cx, cy in zip(hits.tolist(), px.tolist(), py.tolist(), strict=True):
            draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=(*self.rgb[i], 255),
                         outline=outline, width=k if outline else 0)
        return _png(image.resize((TILE_SIZE, TILE_SIZE), Image.Resampling.LANCZOS))


def _png(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()

