"""The WMTS tile matrix sets (OGC 17-083r2): ``WorldCRS84Quad`` and ``WorldWebMercatorQuad``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from xcube.core.tilingscheme import (
    EARTH_CIRCUMFERENCE_WGS84,
    GEOGRAPHIC_CRS_NAME,
    WEB_MERCATOR_CRS_NAME,
    TilingScheme,
)

TILE_SIZE = 256

_HALF_WORLD_M = math.pi * 6378137.0  # Web Mercator half extent


@dataclass(frozen=True)
class TileMatrixSetDef:
    """A tile matrix set of OGC 17-083r2 (quad tree of 256 x 256 tiles)."""

    identifier: str
    title: str
    crs_urn: str
    crs_name: str  # as xcube's TilingScheme / compute_rgba_tile name it
    bbox: tuple[float, float, float, float]  # in crs units, x/y order
    level0_tiles: tuple[int, int]  # matrix width, height at level 0
    meters_per_unit: float
    well_known_scale_set: str | None = None

    @property
    def level0_resolution(self) -> float:
        return (self.bbox[2] - self.bbox[0]) / (self.level0_tiles[0] * TILE_SIZE)

    def resolution(self, level: int) -> float:
        return self.level0_resolution / (1 << level)

    def scale_denominator(self, level: int) -> float:
        return self.resolution(level) * self.meters_per_unit / 0.00028

    def matrix_size(self, level: int) -> tuple[int, int]:
        return self.level0_tiles[0] << level, self.level0_tiles[1] << level


WORLD_CRS84_QUAD = TileMatrixSetDef(
    identifier="WorldCRS84Quad",
    title="CRS84 for the World",
    crs_urn="urn:ogc:def:crs:OGC:1.3:CRS84",
    crs_name=GEOGRAPHIC_CRS_NAME,
    bbox=(-180.0, -90.0, 180.0, 90.0),
    level0_tiles=(2, 1),
    meters_per_unit=EARTH_CIRCUMFERENCE_WGS84 / 360.0,
    well_known_scale_set="urn:ogc:def:wkss:OGC:1.0:GoogleCRS84Quad",
)
WORLD_WEB_MERCATOR_QUAD = TileMatrixSetDef(
    identifier="WorldWebMercatorQuad",
    title="Google Maps Compatible for the World",
    crs_urn="urn:ogc:def:crs:EPSG::3857",
    crs_name=WEB_MERCATOR_CRS_NAME,
    bbox=(-_HALF_WORLD_M, -_HALF_WORLD_M, _HALF_WORLD_M, _HALF_WORLD_M),
    level0_tiles=(1, 1),
    meters_per_unit=1.0,
    well_known_scale_set="urn:ogc:def:wkss:OGC:1.0:GoogleMapsCompatible",
)
TILE_MATRIX_SETS: dict[str, TileMatrixSetDef] = {
    t.identifier: t for t in (WORLD_CRS84_QUAD, WORLD_WEB_MERCATOR_QUAD)
}
XCUBE_SCHEMES = {
    WORLD_CRS84_QUAD.identifier: TilingScheme.GEOGRAPHIC,
    WORLD_WEB_MERCATOR_QUAD.identifier: TilingScheme.WEB_MERCATOR,
}
