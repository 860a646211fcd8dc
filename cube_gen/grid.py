"""The grid stage: xcube ``.levels`` pyramids of the observations, one per time aggregation.

Every level of every pyramid is computed from the points (richness and diversity cannot be
averaged from finer cells); levels halve the resolution, down to a coarsest level of a few
cells (the whole region in about one tile). The pyramids (:data:`GRID_DATASETS`):

==========================  ======================  =============================================
cube (path)                 time axis               layers
==========================  ======================  =============================================
``grid.levels``             one step per period     the registry's layers + top-species counts
                            (``cubes.grid.period``)
``grid_all_years.levels``   one step, all years     the registry's layers, the embedding composite
``grid_month_of_year.       12 steps: month of      the registry's layers (seasonality); CF
levels``                    year across all years   climatology (times in the first year)
``grid_species.levels``     one step, all years     ``count_<slug>`` for every species
==========================  ======================  =============================================

Layer names, units, colour maps and colour ranges come from the grid-variable registry
(:mod:`cube_gen.grid_variables`); each layer's colour range is fitted here, over all levels
of its pyramid, and written into its attributes (``color_value_min``/``color_value_max``/
``color_norm``/``color_bar_name``), where the server config, the viewer, the WMTS and the
WMS read it.

Incremental rebuilds: the registry marks the layers computed from the embedded images
(``computed_from="vision"``: ``vision_count`` and the embedding composite). They stay in
these pyramids (the server config, WMTS/WMS layer names and the viewer address layers as
pyramid + variable, so moving them to a pyramid of their own would rename public layers);
instead, when only the embeddings changed, the pipeline takes the pyramids from the
previous release without those arrays' chunks and :func:`refresh_vision_layers` recomputes
just them (every other layer, the coordinates and the levels' geometry come from the
observations alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr

from . import derive as D
from . import grid_variables as G
from . import schema as S
from .encode import encoding_for, write_dataset

_MONTH_KNOWN = 1  # time_precision code of "month" (timeparse.PRECISIONS)
FIT_LEVELS = 2  # colour ranges are fitted on this many of the finest levels


@dataclass(frozen=True)
class GridDataset:
    """One pyramid: its cube key, time aggregation, finest resolution and layers."""

    cube: str  # schema cube key, also the xcube dataset identifier
    title: str
    time: str  # "period" | "all" | "month"
    fine: str  # "period" (cubes.grid.resolution) | "all" (cubes.grid.all_years_resolution)
    species: str  # "top" | "all" | "none": per-species count layers
    registry: bool = True  # the registry's layers (counts, diversity, ...)
    rgb: bool = True  # the embedding composite, when enabled


GRID_DATASETS: dict[str, GridDataset] = {d.cube: d for d in (
    GridDataset(S.GRID, "per year", "period", "period", "top"),
    GridDataset(S.GRID_ALL_YEARS, "all years", "all", "all", "none"),
    GridDataset(S.GRID_MONTH_OF_YEAR, "month of year, all years", "month", "period", "none",
                rgb=False),
    GridDataset(S.GRID_SPECIES, "species occurrence, all years", "all", "all", "all",
                registry=False, rgb=False),
)}


def enabled_datasets(cfg: dict) -> list[GridDataset]:
    """The pyramids a recipe builds (all of them: each is a cube of the set)."""
    return list(GRID_DATASETS.values())


# -- time axes -----------------------------------------------------------------------------
@dataclass
class TimeAxis:
    """The time steps of a pyramid and each point's step."""

    values: np.ndarray  # datetime64[ns] step starts
    bounds: np.ndarray  # (n, 2) datetime64[ns]
    climatology: bool = False

    def __len__(self) -> int:
        return len(self.values)


def time_axis(kind: str, times: np.ndarray, period: str) -> TimeAxis:
    """The axis of an aggregation (``period``, ``all`` or ``month``) covering ``times``."""
    t = pd.DatetimeIndex(times)
    first = pd.Timestamp(f"{t.min().year}-01-01")
    end = pd.Timestamp(f"{t.max().year + 1}-01-01")
    if kind == "period":
        bins = D.time_bins(times, period)
        ends = bins + pd.tseries.frequencies.to_offset(period)
        return TimeAxis(bins.values, np.stack([bins.values, ends.values], axis=1))
    if kind == "all":
        return TimeAxis(np.array([first.to_datetime64()], "datetime64[ns]"),
                        np.array([[first.to_datetime64(), end.to_datetime64()]], "datetime64[ns]"))
    months = pd.date_range(first, periods=12, freq="MS")
    last_year = t.max().year
    bounds = np.stack([months.values, np.array(
        [pd.Timestamp(f"{last_year}-{m:02d}-01") + pd.offsets.MonthBegin(1)
         for m in range(1, 13)], "datetime64[ns]")], axis=1)
    return TimeAxis(months.values, bounds, climatology=True)


def time_steps(kind: str, axis: TimeAxis, times: np.ndarray,
               precision: np.ndarray | None) -> np.ndarray:
    """Each point's step on ``axis`` (-1: left out, e.g. an unknown month)."""
    t = pd.DatetimeIndex(times)
    if kind == "period":
        return D.period_index(times, pd.DatetimeIndex(axis.values))
    if kind == "all":
        return np.zeros(len(t), np.int64)
    month = t.month.to_numpy(np.int64) - 1
    if precision is not None:
        month = np.where(np.asarray(precision) >= _MONTH_KNOWN, month, -1)
    return month


# -- levels --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Frame:
    """Level 0's extent, padded so that every level halves it exactly."""

    west: float
    north: float
    resolution: float
    nx: int
    ny: int
    num_levels: int

    def level(self, level: int) -> tuple[float, np.ndarray, np.ndarray]:
        """``(resolution, lat centres (descending), lon centres)`` of a level."""
        r = self.resolution * (1 << level)
        lx, ly = self.nx >> level, self.ny >> level
        lon = np.round(self.west + (np.arange(lx) + 0.5) * r, 10)
        lat = np.round(self.north - (np.arange(ly) + 0.5) * r, 10)
        return r, lat, lon


def make_frame(bbox: tuple[float, float, float, float], resolution: float,
               num_levels: int) -> Frame:
    """The padded level-0 frame: snapped to the coarsest level's cells."""
    coarse = resolution * (1 << (num_levels - 1))
    w, s, e, n = bbox
    w = math.floor(w / coarse + 1e-9) * coarse
    n = math.ceil(n / coarse - 1e-9) * coarse
    s = math.floor(s / coarse + 1e-9) * coarse
    e = math.ceil(e / coarse - 1e-9) * coarse
    m = 1 << (num_levels - 1)
    nx = max(int(round((e - w) / coarse)), 1) * m
    ny = max(int(round((n - s) / coarse)), 1) * m
    return Frame(round(w, 10), round(n, 10), resolution, nx, ny, num_levels)


@dataclass
class Points:
    """The points a pyramid aggregates (observations or images), as plain arrays."""

    lat: np.ndarray
    lon: np.ndarray
    time: np.ndarray
    species: np.ndarray
    precision: np.ndarray | None = None

    @classmethod
    def observations(cls, obs: pd.DataFrame) -> Points:
        return cls(obs.latitude.to_numpy(), obs.longitude.to_numpy(),
                   obs.time.to_numpy("datetime64[ns]"), obs.species_index.to_numpy(),
                   obs.time_precision.to_numpy() if "time_precision" in obs else None)

    @classmethod
    def images(cls, images: pd.DataFrame) -> Points:
        return cls(images.lat.to_numpy(), images.lon.to_numpy(),
                   images.time.to_numpy("datetime64[ns]"), images.species_index.to_numpy())

    @property
    def day(self) -> np.ndarray:
        return np.asarray(self.time, "datetime64[D]").astype(np.int64)


def vision_layers(ds_def: GridDataset, cfg: dict) -> list[str]:
    """The layers of a pyramid computed from the embedded images (registry entries with
    ``computed_from="vision"``): all that a rebuild which only adds or changes embeddings
    recomputes (:func:`refresh_vision_layers`)."""
    if not ds_def.registry:
        return []
    on = set(cfg["variables"])
    return [v.name for v in G.GRID_VARIABLES.values() if v.computed_from == "vision"
            and v.switch in on and (v.composite is None or ds_def.rgb)]


def level_layers(ds_def: GridDataset, cfg: dict, frame: Frame, level: int, axis: TimeAxis,
                 obs: Points, images: Points, rgb: np.ndarray | None,
                 species_names: list[str], top: list[int],
                 vision_only: bool = False) -> dict[str, np.ndarray]:
    """Every layer of one level, (time, lat, lon) float32 arrays (``vision_only``: only
    the :func:`vision_layers`).

    A registry layer is taken from the statistics of the points its entry is
    ``computed_from``, so the registry alone says which layers depend on the embeddings.
    """
    r, lat, lon = frame.level(level)
    nt, ny, nx = len(axis), len(lat), len(lon)
    size, shape = nt * ny * nx, (nt, ny, nx)
    switches = set(cfg["variables"])
    layers: dict[str, np.ndarray] = {}
    ok = cell = None
    if not vision_only:
        ok, cell = D.point_cells(obs.lat, obs.lon, time_steps(ds_def.time, axis, obs.time,
                                                              obs.precision),
                                 nt, frame.north, frame.west, r, ny, nx)
    if ds_def.registry:
        stats = {"observations": {} if vision_only else
                 _observation_stats(obs, ok, cell, lat, r, size, shape, cfg),
                 "vision": _vision_stats(ds_def, frame, r, axis, images, rgb, size, ny, nx)}
        for var in G.GRID_VARIABLES.values():
            values = stats[var.computed_from].get(var.name)
            if var.switch in switches and values is not None:
                layers[var.name] = values.reshape(shape)
    wanted = [] if vision_only else list(range(len(species_names))) \
        if ds_def.species == "all" else top if ds_def.species == "top" else []
    if wanted:
        n_sp = len(species_names)
        per = np.bincount(obs.species[ok].astype(np.int64) * size + cell,
                          minlength=n_sp * size).reshape(n_sp, size)
        for s_idx in wanted:
            name = G.SPECIES_FAMILY.prefix + S.species_slug(species_names[s_idx])
            layers[name] = per[s_idx].astype(np.float32).reshape(shape)
    return layers


def _observation_stats(obs: Points, ok: np.ndarray, cell: np.ndarray, lat: np.ndarray,
                       r: float, size: int, shape: tuple[int, int, int], cfg: dict
                       ) -> dict[str, np.ndarray]:
    """The registry layers computed from the observations, flat (one level)."""
    stats = D.cell_statistics(cell, obs.species[ok], size, cfg["min_observations"],
                              visit=obs.day[ok])
    area = np.broadcast_to(D.cell_area_km2(lat, r)[None, :, None], shape).ravel()
    counts = stats["observation_count"]
    density = np.full(size, np.nan, np.float32)
    density[counts > 0] = counts[counts > 0] / area[counts > 0]
    stats["observation_density"] = density
    return stats


def _vision_stats(ds_def: GridDataset, frame: Frame, r: float, axis: TimeAxis,
                  images: Points, rgb: np.ndarray | None, size: int, ny: int, nx: int
                  ) -> dict[str, np.ndarray]:
    """The registry layers computed from the embedded images, flat (one level)."""
    vok, vcell = D.point_cells(images.lat, images.lon,
                               time_steps(ds_def.time, axis, images.time, None),
                               len(axis), frame.north, frame.west, r, ny, nx)
    stats = {"vision_count": np.bincount(vcell, minlength=size).astype(np.float32)}
    if rgb is not None and ds_def.rgb:
        for i, name in enumerate(G.RGB_COMPOSITE):
            stats[name] = D.grid_mean(vok, vcell, rgb[:, i], size)
    return stats


def _attrs_of(name: str, species_names: dict[str, str]) -> G.GridVariable:
    var = G.GRID_VARIABLES.get(name)
    if var is not None:
        return var
    slug = name[len(G.SPECIES_FAMILY.prefix):]
    return G.SPECIES_FAMILY.variable(slug, species_names[slug])


def build_pyramid(ds_def: GridDataset, cfg: dict, bbox: tuple[float, float, float, float],
                  obs: Points, images: Points, rgb: np.ndarray | None,
                  species_names: list[str], top: list[int],
                  attrs: dict) -> list[xr.Dataset]:
    """The levels of one pyramid as datasets (attributes and fitted colour ranges set)."""
    frame, axis = _frame_and_axis(ds_def, cfg, bbox, obs)
    res = frame.resolution
    levels = [level_layers(ds_def, cfg, frame, lv, axis, obs, images, rgb, species_names, top)
              for lv in range(frame.num_levels)]
    slugs = {S.species_slug(n): n for n in species_names}
    out = []
    fitted = _fit_ranges(levels, slugs)
    for lv, layers in enumerate(levels):
        r, lat, lon = frame.level(lv)
        ds = xr.Dataset({k: (("time", "lat", "lon"), v) for k, v in layers.items()},
                        coords={"time": axis.values, "lat": lat, "lon": lon})
        for name in ds.data_vars:
            var = _attrs_of(name, slugs)
            ds[name].attrs.update(var.attrs)
            ds[name].attrs["color_value_min"], ds[name].attrs["color_value_max"] = fitted[name]
            if name in G.GRID_VARIABLES and "NaN where the cell has fewer" in var.comment:
                ds[name].attrs["min_observations"] = int(cfg["min_observations"])
        ds["lat"].attrs.update(S.LAT_ATTRS)
        ds["lon"].attrs.update(S.LON_ATTRS)
        ds = _with_bounds(ds, r, axis)
        ds.attrs.update(attrs)
        ds.attrs.update({
            "title": f"{attrs.get('title', 'DeepEarth')} ({ds_def.title})",
            "deepearth_cube": ds_def.cube, "time_aggregation": ds_def.time,
            "level": lv, "num_levels": frame.num_levels, "spatial_res": r,
            "time_period": cfg["period"] if ds_def.time == "period" else ds_def.time,
            "min_observations": int(cfg["min_observations"]),
            "data_bbox": [float(v) for v in bbox],  # the data's extent; the grid is padded
            "geospatial_lon_min": frame.west,
            "geospatial_lon_max": round(frame.west + frame.nx * res, 10),
            "geospatial_lat_min": round(frame.north - frame.ny * res, 10),
            "geospatial_lat_max": frame.north,
            "top_species": [species_names[s] for s in top] if ds_def.species == "top" else [],
        })
        out.append(ds)
    return out


def _frame_and_axis(ds_def: GridDataset, cfg: dict, bbox: tuple[float, float, float, float],
                    obs: Points) -> tuple[Frame, TimeAxis]:
    res = float(cfg["resolution"]) if ds_def.fine == "period" else float(
        cfg["all_years_resolution"] or cfg["resolution"] / 2)
    return make_frame(bbox, res, cfg["num_levels"]), time_axis(ds_def.time, obs.time,
                                                               cfg["period"])


def _fit_ranges(levels: list[dict[str, np.ndarray]], slugs: dict[str, str]
                ) -> dict[str, tuple[float, float]]:
    """Each layer's colour range, from the two finest levels: the ones a map of the region
    shows (at 256 px for the region a pixel is finer than level 0's cells); coarser
    levels, seen only in thumbnails, may reach the top colour more often."""
    return {name: _attrs_of(name, slugs).color_range.fit([lv[name] for lv in levels[:FIT_LEVELS]])
            for name in levels[0]}


def _with_bounds(ds: xr.Dataset, res: float, axis: TimeAxis) -> xr.Dataset:
    lat, lon = ds.lat.values, ds.lon.values
    name = "climatology_bnds" if axis.climatology else "time_bnds"
    ds = ds.assign_coords(
        lat_bnds=(("lat", "bnds"), np.stack([lat + res / 2, lat - res / 2], axis=1)),
        lon_bnds=(("lon", "bnds"), np.stack([lon - res / 2, lon + res / 2], axis=1)),
        **{name: (("time", "bnds"), axis.bounds)},
    )
    ds["lat"].attrs["bounds"] = "lat_bnds"
    ds["lon"].attrs["bounds"] = "lon_bnds"
    ds["time"].attrs.update({"long_name": "start of period", "standard_name": "time"})
    if axis.climatology:
        ds["time"].attrs.update({"climatology": name, "long_name":
                                 "month of year (climatology over all years; the dates are "
                                 "the months of the first year)"})
    else:
        ds["time"].attrs["bounds"] = name
    return ds


def write_pyramid(levels: list[xr.Dataset], url_of, write_json, cfg: dict,
                  storage_options: dict | None) -> None:
    """Write a pyramid: ``url_of(sub)`` names a level's URL, ``write_json`` the .zlevels."""
    tile = int(cfg["tile_size"])
    write_json({"version": "1.0", "num_levels": len(levels), "tile_size": [tile, tile],
                "agg_methods": {k: "first" for k in levels[0].data_vars}})
    for lv, ds in enumerate(levels):
        chunks = {k: (1, min(tile, ds.sizes["lat"]), min(tile, ds.sizes["lon"]))
                  for k in ds.data_vars}
        enc = encoding_for(ds, {}, cfg, chunks)
        write_dataset(ds, url_of(f"{lv}.zarr"), storage_options, enc, cfg["zarr_format"])


def grid_bbox(cfg: dict, obs: pd.DataFrame) -> tuple[float, float, float, float]:
    if cfg["bbox"]:
        return tuple(float(v) for v in cfg["bbox"])  # type: ignore[return-value]
    return (float(obs.longitude.min()), float(obs.latitude.min()),
            float(obs.longitude.max()), float(obs.latitude.max()))


def build_grids(cfg: dict, obs: pd.DataFrame, images: pd.DataFrame, pooled: np.ndarray,
                species: pd.DataFrame, attrs: dict, target, progress_note=None) -> dict[str, int]:
    """Build and stage every enabled pyramid (``target``: the pipeline's
    :class:`~cube_gen.store.Target`); returns ``{cube: num_levels}``.

    A plain function for the pipeline's grid stage: staging, done markers and
    publishing stay with the pipeline.
    """
    bbox = grid_bbox(cfg, obs)
    points = Points.observations(obs)
    image_points = Points.images(images)
    rgb = _rgb(cfg, pooled)
    counts = obs.groupby("species_index").size().sort_values(ascending=False, kind="stable")
    top = [int(i) for i in counts.index[: cfg["top_species"]]]
    names = list(species.taxon_name.astype(str))
    done = {}
    for ds_def in enabled_datasets(cfg):
        levels = build_pyramid(ds_def, cfg, bbox, points, image_points, rgb, names, top,
                               attrs)
        name = S.CUBE_PATHS[ds_def.cube]
        staged = target.staging(name)
        target.remove(staged)
        target.fs.mkdirs(staged, exist_ok=True)
        write_pyramid(levels, lambda sub, name=name: target.staging_url(name, sub),
                      lambda doc, staged=staged: target.write_json(f"{staged}/.zlevels", doc),
                      cfg, target.storage_options)
        done[ds_def.cube] = len(levels)
        if progress_note:
            progress_note(f"{ds_def.cube}: {len(levels)} levels, "
                          f"{levels[0].sizes['lon']} x {levels[0].sizes['lat']} cells at "
                          f"{levels[0].attrs['spatial_res']:g} deg, {levels[0].sizes['time']} "
                          f"time steps, {len(levels[0].data_vars)} layers")
    return done


def _rgb(cfg: dict, pooled: np.ndarray) -> np.ndarray | None:
    return D.rgb_components(pooled) if "embedding_rgb" in cfg["variables"] else None


def refresh_vision_layers(cfg: dict, obs: pd.DataFrame, images: pd.DataFrame,
                          pooled: np.ndarray, target) -> list[str]:
    """Recompute only the :func:`vision_layers` of every pyramid into staged pyramids that
    hold the previous release's other layers (the pipeline's grid refresh, used when the
    observations, species and recipe are unchanged and only the embeddings differ; the
    runner takes the rest with those arrays' chunks left out). Returns the arrays written.

    The other layers, the coordinates and the level geometry depend on the observations
    alone, so the result equals a full build.
    """
    from .encode import rewrite_arrays

    bbox, points, image_points = grid_bbox(cfg, obs), Points.observations(obs), \
        Points.images(images)
    rgb = _rgb(cfg, pooled)
    written = []
    for ds_def in enabled_datasets(cfg):
        if not vision_layers(ds_def, cfg):
            continue
        frame, axis = _frame_and_axis(ds_def, cfg, bbox, points)
        levels = [level_layers(ds_def, cfg, frame, lv, axis, points, image_points, rgb, [], [],
                               vision_only=True) for lv in range(frame.num_levels)]
        fitted = _fit_ranges(levels, {})
        name = S.CUBE_PATHS[ds_def.cube]
        for lv, layers in enumerate(levels):
            rewrite_arrays(target.staging_url(name, f"{lv}.zarr"), target.storage_options,
                           layers, {k: dict(zip(("color_value_min", "color_value_max"),
                                                fitted[k], strict=True)) for k in layers})
            written += [f"{name}/{lv}.zarr/{k}" for k in layers]
    return written


def vision_arrays(cfg: dict) -> dict[str, tuple[str, ...]]:
    """``{pyramid path: arrays inside it}`` that :func:`refresh_vision_layers` rewrites."""
    return {S.CUBE_PATHS[d.cube]: tuple(f"{lv}.zarr/{k}" for lv in range(cfg["num_levels"])
                                        for k in vision_layers(d, cfg))
            for d in enabled_datasets(cfg)}


__all__ = ["GRID_DATASETS", "GridDataset", "build_grids", "build_pyramid", "enabled_datasets",
           "make_frame", "refresh_vision_layers", "time_axis", "time_steps", "vision_arrays",
           "vision_layers"]
