"""Training / evaluation splits and balanced sampling over a cube set's vision embeddings.

A split assigns each embedding (a position along ``vision.zarr`` ``image``) to ``train``,
``test`` or ``excluded`` (dropped to keep the sides apart). The rules it enforces, and
:func:`check_split` verifies on any split:

1. **Observation groups.** All images of one observation (``gbif_id``) fall on the same
   side: several photos of the same plant are near-duplicates, so one on each side leaks.
2. **Temporal.** :func:`temporal_split` uses the published ``split`` column: ``train``
   (2010-2024) against ``temporal_test`` (all of 2025); every training time precedes
   every test time (checked).
3. **Spatial blocks with a buffer.** :func:`spatial_block_split` cuts the area into square
   blocks of ``block_km``, sends a random ``test_fraction`` of the occupied blocks to test,
   and drops every training embedding closer than ``buffer_km`` to a test block, so no
   training point lies within ``buffer_km`` of a test point (spatial autocorrelation).
4. **Balance on the training side only.** :class:`SpeciesBalancedSampler` reweights or
   caps species within the indices it is given (the train side); it never draws a test
   embedding, and evaluation always sees the test side unresampled.

Splits are plain position arrays, usable as ``CubeDataset(cubes, images=split.train)``
(:func:`split_datasets` does that for both sides). Distances use a local equirectangular
projection (km) about the data's mean latitude: exact enough at the scale of a region.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Sampler

from .errors import DeepEarthError

TRAIN, TEST, EXCLUDED = 0, 1, 2
ROLE_NAMES = ("train", "test", "excluded")
METHODS = ("temporal", "spatial", "random")
KM_PER_DEG_LAT = 110.574
KM_PER_DEG_LON_EQUATOR = 111.320


class LeakageError(DeepEarthError, ValueError):
    """A split breaks one of the leakage rules (the message names the rule and the rows)."""


@dataclass(frozen=True)
class Split:
    """Positions along ``image`` on each side, plus what was dropped and why."""

    method: str
    train: np.ndarray
    test: np.ndarray
    excluded: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    params: dict[str, Any] = field(default_factory=dict)

    def roles(self, n: int) -> np.ndarray:
        """int8 role per image position (0 train, 1 test, 2 excluded or not selected)."""
        out = np.full(n, EXCLUDED, np.int8)
        out[self.train] = TRAIN
        out[self.test] = TEST
        return out

    def summary(self) -> dict[str, Any]:
        return {"method": self.method, "train": len(self.train), "test": len(self.test),
                "excluded": len(self.excluded), **self.params}


def image_table(cubes: Any) -> pd.DataFrame:
    """The image table of a :class:`~cube_gen.access.CubeSet` (or a DataFrame, passed on)."""
    if isinstance(cubes, pd.DataFrame):
        return cubes
    return cubes.image_table()


def _candidates(table: pd.DataFrame, images: Sequence[int] | None) -> np.ndarray:
    if images is None:
        return np.arange(len(table), dtype=np.int64)
    pos = np.unique(np.asarray(images, dtype=np.int64))
    if len(pos) and (pos[0] < 0 or pos[-1] >= len(table)):
        raise ValueError(f"image positions must be in [0, {len(table)}), got {pos[0]}..{pos[-1]}")
    return pos


def _whole_groups(table: pd.DataFrame, pos: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``keep`` widened so that an observation is kept only if all its images are."""
    gid = table.gbif_id.to_numpy()[pos]
    bad = np.unique(gid[~keep])
    return keep & ~np.isin(gid, bad)


def temporal_split(cubes: Any, images: Sequence[int] | None = None) -> Split:
    """The published split: ``train`` (2010-2024) vs ``temporal_test`` (2025)."""
    table = image_table(cubes)
    pos = _candidates(table, images)
    codes = table.split.to_numpy()[pos]
    split = Split("temporal", pos[codes == 0], pos[codes == 1], pos[(codes != 0) & (codes != 1)])
    check_split(table, split)
    return split


def project_km(lat: np.ndarray, lon: np.ndarray, lat0: float) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) in km of a local equirectangular projection about latitude ``lat0``."""
    x = np.asarray(lon, np.float64) * KM_PER_DEG_LON_EQUATOR * math.cos(math.radians(lat0))
    y = np.asarray(lat, np.float64) * KM_PER_DEG_LAT
    return x, y


def spatial_block_split(cubes: Any, block_km: float = 10.0, buffer_km: float = 2.0,
                        test_fraction: float = 0.2, seed: int = 0,
                        images: Sequence[int] | None = None) -> Split:
    """Random square blocks to test, training points within ``buffer_km`` of them dropped.

    Blocks of ``block_km`` are laid from the south-west corner of the selection; a
    ``test_fraction`` of the occupied blocks (at least one, and at least one left for
    training) is drawn with ``seed``. An embedding's observation lies in one block, so
    rule 1 holds by construction (and is checked).
    """
    if block_km <= 0 or buffer_km < 0:
        raise ValueError(f"block_km must be > 0 and buffer_km >= 0, got {block_km}, {buffer_km}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    table = image_table(cubes)
    pos = _candidates(table, images)
    params = {"block_km": float(block_km), "buffer_km": float(buffer_km),
              "test_fraction": float(test_fraction), "seed": int(seed)}
    if len(pos) == 0:
        return Split("spatial", pos, pos, pos, params)
    lat = table.lat.to_numpy()[pos]
    lon = table.lon.to_numpy()[pos]
    lat0 = float(np.mean(table.lat.to_numpy()))
    x, y = project_km(lat, lon, lat0)
    x0, y0 = float(x.min()), float(y.min())
    bi = np.floor((x - x0) / block_km).astype(np.int64)
    bj = np.floor((y - y0) / block_km).astype(np.int64)
    blocks = np.unique(np.stack([bi, bj], axis=1), axis=0)
    if len(blocks) < 2:
        raise ValueError(f"all {len(pos)} embeddings lie in one {block_km} km block: use a "
                         "smaller block_km")
    n_test = min(max(1, round(test_fraction * len(blocks))), len(blocks) - 1)
    rng = np.random.default_rng(seed)
    test_blocks = blocks[rng.choice(len(blocks), n_test, replace=False)]
    test_set = {(int(i), int(j)) for i, j in test_blocks}
    in_test = np.array([(int(i), int(j)) in test_set for i, j in zip(bi, bj, strict=True)])
    # distance of each remaining point to the nearest test block (rectangle) within reach
    reach = int(math.ceil(buffer_km / block_km))
    near = np.full(len(pos), np.inf)
    for di in range(-reach, reach + 1):
        for dj in range(-reach, reach + 1):
            ni, nj = bi + di, bj + dj
            hit = np.array([(int(i), int(j)) in test_set for i, j in zip(ni, nj, strict=True)])
            if not hit.any():
                continue
            lx, ly = x0 + ni * block_km, y0 + nj * block_km
            dx = np.maximum(np.maximum(lx - x, x - (lx + block_km)), 0.0)
            dy = np.maximum(np.maximum(ly - y, y - (ly + block_km)), 0.0)
            near = np.where(hit, np.minimum(near, np.hypot(dx, dy)), near)
    in_buffer = ~in_test & (near < buffer_km)
    test = _whole_groups(table, pos, in_test)
    train = _whole_groups(table, pos, ~in_test & ~in_buffer)
    split = Split("spatial", pos[train], pos[test], pos[~train & ~test],
                  {**params, "blocks": int(len(blocks)), "test_blocks": int(n_test)})
    check_split(table, split, buffer_km=buffer_km)
    return split


def random_split(cubes: Any, test_fraction: float = 0.2, seed: int = 0,
                 images: Sequence[int] | None = None) -> Split:
    """Random observations (all their images together) to test: no spatial or time buffer."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    table = image_table(cubes)
    pos = _candidates(table, images)
    gid = table.gbif_id.to_numpy()[pos]
    groups = np.unique(gid)
    rng = np.random.default_rng(seed)
    n_test = min(max(1, round(test_fraction * len(groups))), max(len(groups) - 1, 0))
    test_groups = rng.choice(groups, n_test, replace=False) if len(groups) > 1 else groups[:0]
    is_test = np.isin(gid, test_groups)
    split = Split("random", pos[~is_test], pos[is_test], np.zeros(0, np.int64),
                  {"test_fraction": float(test_fraction), "seed": int(seed)})
    check_split(table, split)
    return split


def make_split(cubes: Any, method: str = "temporal", images: Sequence[int] | None = None,
               **params: Any) -> Split:
    """``temporal`` | ``spatial`` (block_km, buffer_km, test_fraction, seed) | ``random``."""
    if method == "temporal":
        if params:
            raise ValueError(f"the temporal split takes no parameters, got {sorted(params)}")
        return temporal_split(cubes, images)
    if method == "spatial":
        return spatial_block_split(cubes, images=images, **params)
    if method == "random":
        return random_split(cubes, images=images, **params)
    raise ValueError(f"split method must be one of {', '.join(METHODS)}, got {method!r}")


def min_distance_km(table: pd.DataFrame, a: np.ndarray, b: np.ndarray,
                    block: int = 4096) -> float:
    """Smallest distance (km) between an embedding in ``a`` and one in ``b`` (brute force)."""
    if len(a) == 0 or len(b) == 0:
        return math.inf
    lat0 = float(np.mean(table.lat.to_numpy()))
    xa, ya = project_km(table.lat.to_numpy()[a], table.lon.to_numpy()[a], lat0)
    xb, yb = project_km(table.lat.to_numpy()[b], table.lon.to_numpy()[b], lat0)
    best = math.inf
    for s in range(0, len(a), block):
        d = np.hypot(xa[s:s + block, None] - xb[None], ya[s:s + block, None] - yb[None])
        best = min(best, float(d.min()))
    return best


def check_split(cubes: Any, split: Split, buffer_km: float | None = None) -> None:
    """Raise :class:`LeakageError` if ``split`` breaks a rule of the module docstring."""
    table = image_table(cubes)
    both = np.intersect1d(split.train, split.test)
    if len(both):
        raise LeakageError(f"image positions {both[:5].tolist()} are on both sides")
    gid = table.gbif_id.to_numpy()
    shared = np.intersect1d(gid[split.train], gid[split.test])
    if len(shared):
        raise LeakageError(f"observations (gbif_id) {shared[:5].tolist()} have images on both "
                           f"sides ({len(shared)} in all); all images of an observation must "
                           "be on one side")
    if split.method == "temporal" and len(split.train) and len(split.test):
        t = table.time.to_numpy()
        latest, earliest = t[split.train].max(), t[split.test].min()
        if latest >= earliest:
            raise LeakageError(f"temporal split: a training embedding ({pd.Timestamp(latest)}) is "
                               f"not earlier than the first test one ({pd.Timestamp(earliest)})")
    if buffer_km:
        d = min_distance_km(table, split.train, split.test)
        if d < buffer_km:
            raise LeakageError(f"spatial split: a training embedding lies {d:.3f} km from a "
                               f"test one, within the {buffer_km} km buffer")


class SpeciesBalancedSampler(Sampler[int]):
    """Indices (into ``labels``) that balance species, for ``DataLoader(sampler=...)``.

    ``mode="weights"``: ``num_samples`` draws with replacement, each species equally likely
    (weight 1 / its count). ``mode="cap"``: every species contributes ``per_species``
    samples per epoch, without replacement where it has that many (with replacement only
    for rarer species when ``replacement=True``, else all it has). Deterministic for a
    ``seed`` and :meth:`set_epoch`. Give it the training side's labels only.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray | torch.Tensor, mode: str = "weights",
                 num_samples: int | None = None, per_species: int | None = None,
                 replacement: bool = True, seed: int = 0):
        lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels,
                         dtype=np.int64).reshape(-1)
        if mode not in ("weights", "cap"):
            raise ValueError(f"mode must be 'weights' or 'cap', got {mode!r}")
        if len(lab) == 0:
            raise ValueError("SpeciesBalancedSampler needs at least one label")
        self.labels = lab
        self.mode = mode
        self.species, counts = np.unique(lab, return_counts=True)
        self.counts = dict(zip(self.species.tolist(), counts.tolist(), strict=True))
        self.num_samples = int(num_samples or len(lab))
        self.per_species = int(per_species or max(1, round(len(lab) / len(self.species))))
        self.replacement = bool(replacement)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def weights(self) -> np.ndarray:
        """Per-sample draw probabilities of ``mode="weights"`` (sum 1)."""
        w = 1.0 / np.array([self.counts[v] for v in self.labels.tolist()], np.float64)
        return w / w.sum()

    def _indices(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.mode == "weights":
            return rng.choice(len(self.labels), self.num_samples, replace=True, p=self.weights())
        out = []
        for s in self.species:
            idx = np.flatnonzero(self.labels == s)
            k = self.per_species
            if len(idx) >= k:
                out.append(rng.choice(idx, k, replace=False))
            elif self.replacement:
                out.append(np.concatenate([rng.permutation(idx),
                                           rng.choice(idx, k - len(idx), replace=True)]))
            else:
                out.append(idx)
        return rng.permutation(np.concatenate(out))

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices().tolist())

    def __len__(self) -> int:
        if self.mode == "weights":
            return self.num_samples
        if self.replacement:
            return self.per_species * len(self.species)
        return int(sum(min(c, self.per_species) for c in self.counts.values()))


def split_datasets(cubes: Any, method: str = "temporal", split_params: dict | None = None,
                   **dataset_kwargs: Any) -> tuple[Any, Any, Split]:
    """(train, test) :class:`~cube_gen.torch_data.CubeDataset` of a split, and the split.

    ``dataset_kwargs`` (features, dtype, bbox, species, ...) go to both datasets; a
    selection (bbox, time, species) narrows the candidates before splitting.
    """
    from .access import CubeSet, Query
    from .torch_data import CubeDataset

    cs = cubes if isinstance(cubes, CubeSet) else CubeSet.open(
        str(cubes), dataset_kwargs.pop("storage_options", None))
    sel_keys = ("bbox", "start", "end", "species")
    sel = {k: dataset_kwargs.pop(k) for k in sel_keys if k in dataset_kwargs}
    if "split" in dataset_kwargs:
        raise ValueError("pass the split method as method=..., not split=")
    images = cs.select_images(Query.make(**sel)) if sel else None
    split = make_split(cs, method, images=images, **(split_params or {}))
    train = CubeDataset(cs, images=split.train, **dataset_kwargs)
    test = CubeDataset(cs, images=split.test, **dataset_kwargs)
    return train, test, split
