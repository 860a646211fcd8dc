"""Index step: order and key the rows of each cube (pure functions on tables)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .schema import SPLIT_CODES


def hilbert_index(lat: np.ndarray, lon: np.ndarray, bbox: tuple[float, float, float, float],
                  order: int = 16) -> np.ndarray:
    """Position of each point on a Hilbert curve of ``2**order`` cells over ``bbox``.

    ``bbox`` is (west, south, east, north). Nearby points get nearby positions, so rows
    sorted by it form spatially compact chunks.
    """
    w, s, e, n = bbox
    size = 1 << order
    x = np.clip(((np.asarray(lon) - w) / max(e - w, 1e-12) * (size - 1)), 0, size - 1).astype(np.int64)
    y = np.clip(((np.asarray(lat) - s) / max(n - s, 1e-12) * (size - 1)), 0, size - 1).astype(np.int64)
    d = np.zeros_like(x)
    sbit = size >> 1
    while sbit > 0:
        rx = ((x & sbit) > 0).astype(np.int64)
        ry = ((y & sbit) > 0).astype(np.int64)
        d += sbit * sbit * ((3 * rx) ^ ry)
        # rotate the quadrant
        flip = ry == 0
        swap_and_mirror = flip & (rx == 1)
        x = np.where(swap_and_mirror, size - 1 - x, x)
        y = np.where(swap_and_mirror, size - 1 - y, y)
        x, y = np.where(flip, y, x), np.where(flip, x, y)
        sbit >>= 1
    return d


def species_table(observations: pd.DataFrame, language: pd.DataFrame) -> pd.DataFrame:
    """One row per species, sorted by scientific name; ``species_index`` is the row number."""
    counts = observations.groupby("taxon_id").size()
    table = language.copy()
    table["taxon_id"] = table["taxon_id"].astype(str)
    missing = set(counts.index) - set(table.taxon_id)
    if missing:
        raise ValueError(f"species without a language embedding: {sorted(missing)[:5]}")
    table = table.sort_values(["taxon_name", "taxon_id"], kind="stable").reset_index(drop=True)
    table["genus"] = table.taxon_name.str.split().str[0].fillna("")
    table["observation_count"] = table.taxon_id.map(counts).fillna(0).astype(np.int32)
    return table


def order_observations(obs: pd.DataFrame, species: pd.DataFrame,
                       bbox: tuple[float, float, float, float]) -> pd.DataFrame:
    """Observations sorted by (year, Hilbert position), with derived index columns."""
    df = obs.copy()
    sp_index = pd.Series(np.arange(len(species), dtype=np.int32), index=species.taxon_id)
    df["species_index"] = df.taxon_id.map(sp_index).astype(np.int32)
    df["split_code"] = df.split.map(SPLIT_CODES).astype(np.int8)
    df["hilbert"] = hilbert_index(df.latitude.to_numpy(), df.longitude.to_numpy(), bbox)
    df["year_key"] = df.time.dt.year
    df = df.sort_values(["year_key", "hilbert", "gbif_id"], kind="stable").reset_index(drop=True)
    return df.drop(columns=["year_key"])


def chunk_extents(df: pd.DataFrame, chunk_size: int) -> dict[str, np.ndarray]:
    """Per-chunk bounding box and time range of the ordered observations."""
    n = len(df)
    starts = np.arange(0, n, chunk_size)
    out = {k: [] for k in ("lat_min", "lat_max", "lon_min", "lon_max", "time_min", "time_max")}
    lat, lon, t = df.latitude.to_numpy(), df.longitude.to_numpy(), df.time.to_numpy()
    for s in starts:
        sl = slice(s, min(s + chunk_size, n))
        out["lat_min"].append(lat[sl].min())
        out["lat_max"].append(lat[sl].max())
        out["lon_min"].append(lon[sl].min())
        out["lon_max"].append(lon[sl].max())
        out["time_min"].append(t[sl].min())
        out["time_max"].append(t[sl].max())
    return {k: np.asarray(v) for k, v in out.items()}


def order_images(index: pd.DataFrame, obs: pd.DataFrame) -> pd.DataFrame:
    """Vision entries sorted by (gbif_id, image_number) with observation fields attached."""
    pos = pd.Series(np.arange(len(obs), dtype=np.int64), index=obs.gbif_id.to_numpy())
    df = index.sort_values(["gbif_id", "image_number"], kind="stable").reset_index(drop=True)
    df["obs_index"] = df.gbif_id.map(pos).astype(np.int64)
    o = obs.iloc[df.obs_index.to_numpy()]
    for src, dst in (("species_index", "species_index"), ("time", "time"),
                     ("latitude", "lat"), ("longitude", "lon"), ("split_code", "split")):
        df[dst] = o[src].to_numpy()
    return df
