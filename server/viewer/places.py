"""The observations for the viewer: place groups (GeoJSON points) and the dots overlay tiles.

* :func:`observation_place_group`, :func:`vision_place_group`: the observations (all, and
  those with photo embeddings) as GeoJSON point features, place groups of the grid
  dataset (added by :class:`server.viewer.context.ViewerSupportContext`; the viewer
  replaces the group's features by ``/explore/places`` when its filters change);
* :class:`PointTiles`: XYZ tiles (Web Mercator) of the observations drawn in their
  species' cluster colours, the viewer's ``observations`` overlay layer (xcube Viewer
  draws dataset places in one fixed colour).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..render import png_bytes

PLACE_GROUP_ID = "observations"
VISION_PLACE_GROUP_ID = "observations-with-embeddings"
PLACE_ID_PREFIX = "obs-"


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


def vision_place_group(cs, keep: np.ndarray | None = None) -> dict[str, Any]:
    """The observations with photo embeddings (fewer points: quicker to pick one); ``keep``:
    a mask along ``obs`` narrowing them (the viewer's filters)."""
    has_vision = cs.observations.has_vision.values.astype(bool)
    positions = np.flatnonzero(has_vision if keep is None else has_vision & keep)
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

            self._empty = png_bytes(np.zeros((TILE_SIZE, TILE_SIZE, 4), np.uint8))
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
        return png_bytes(np.asarray(image.resize((TILE_SIZE, TILE_SIZE),
                                                 Image.Resampling.LANCZOS)))
