"""PyTorch datasets over a cube set's vision embeddings (the only module importing torch).

Two views of one selection (bbox, time range, species, split, as ``CubeSet.select_images``):

* :class:`CubeDataset`, map-style: ``DataLoader(ds, batch_size=..., shuffle=...,
  num_workers=..., collate_fn=collate)``; a batch is fetched with one coalesced
  ``features_batch`` read (``__getitems__``) straight into the batch tensor, which
  :func:`collate` passes on without stacking. For distributed training use
  ``ds.sampler(...)`` (a ``DistributedSampler``).
* :class:`CubeIterableDataset`, iterable: shards the (optionally shuffled) selection over
  distributed ranks and DataLoader workers so that every sample is seen exactly once per
  epoch; deterministic for a ``seed`` and ``set_epoch(epoch)``.

Each sample is a dict of tensors::

    features      vision features: "full" (8, 24, 24, 1408), "frame" (24, 24, 1408) of one
                  frame, or "pooled" (1408,); absent when features=None
    language      (7168,) language embedding of the species (language=True)
    species       int64 species index (the label; names in ``ds.species_names``)
    lat, lon      float64 degrees
    time          float64: seconds since 1970-01-01 (time_format="seconds") or decimal
                  year such as 2021.5 (time_format="year")
    gbif_id, image_number, image   int64 ids and the position along vision.zarr ``image``

``ds.version`` is the cube set version read (the current one when the dataset was made,
or the ``version=`` pinned): every worker reads that version, so an experiment can record
and reproduce it. The datasets pickle as (url, storage_options, version, selection); each
process (DataLoader worker, spawned or forked) opens its own zarr/fsspec handles on first
use. ``device``
moves samples to a device in the main process (``"auto"``: CUDA when available, else
CPU); in worker processes samples stay on the CPU and :func:`make_loader` moves whole
batches (with pinned memory for CUDA).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    default_collate,
    get_worker_info,
)
from torch.utils.data.distributed import DistributedSampler

from .access import CubeSet, Query

FEATURE_MODES = ("full", "frame", "pooled")
TIME_FORMATS = ("seconds", "year")
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``"auto"``: CUDA when available, else CPU; None: leave tensors where they are."""
    if device is None:
        return None
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def distributed_rank() -> tuple[int, int]:
    """(rank, world_size) of torch.distributed when initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def to_device(sample: Any, device: torch.device | None, non_blocking: bool = False) -> Any:
    """``sample`` (tensor, or dict / list of them) on ``device``."""
    if device is None:
        return sample
    if isinstance(sample, torch.Tensor):
        return sample.to(device, non_blocking=non_blocking)
    if isinstance(sample, dict):
        return {k: to_device(v, device, non_blocking) for k, v in sample.items()}
    if isinstance(sample, list | tuple):
        return type(sample)(to_device(v, device, non_blocking) for v in sample)
    return sample


def _year_fraction(times: np.ndarray) -> np.ndarray:
    t = pd.DatetimeIndex(times)
    start = pd.to_datetime({"year": t.year, "month": 1, "day": 1}).to_numpy()
    end = pd.to_datetime({"year": t.year + 1, "month": 1, "day": 1}).to_numpy()
    frac = (t.to_numpy() - start) / (end - start)
    return (t.year.to_numpy() + frac).astype(np.float64)


def _new_batch(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor, in shared memory when ``shared`` (as default_collate does).

    Otherwise numpy allocates it: numpy asks for transparent huge pages on large arrays,
    which makes first-touching a 100 MB batch several times cheaper than ``torch.empty``.
    """
    if not shared:
        return torch.from_numpy(np.empty(shape, dtype=str(dtype).removeprefix("torch.")))
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(int(np.prod(shape)))
    return proto.new(storage).resize_(*shape)


def _one_batch(rows: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The tensor whose rows ``rows`` are, in order and complete, else None."""
    first = rows[0]
    storage = first.untyped_storage()
    per = first.numel()
    if storage.nbytes() != len(rows) * per * first.element_size():
        return None
    for j, t in enumerate(rows):
        if (t.untyped_storage().data_ptr() != storage.data_ptr() or t.storage_offset() != j * per
                or t.shape != first.shape or t.dtype != first.dtype or not t.is_contiguous()):
            return None
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(
        storage, 0, (len(rows), *first.shape))


def collate(samples: list[dict[str, torch.Tensor]] | dict) -> dict[str, torch.Tensor]:
    """``default_collate``, except that features read as one batch are passed on uncopied.

    Pass it as ``DataLoader(..., collate_fn=collate)`` (:func:`make_loader` does): full
    (8, 24, 24, 1408) tensors are 13 MB each, and stacking them costs more than reading.
    """
    if isinstance(samples, dict):  # already a batch (an iterable dataset's, batch_size=None)
        return samples
    if samples and isinstance(samples[0], dict) and "features" in samples[0]:
        batch = _one_batch([s["features"] for s in samples])
        if batch is not None:
            out = default_collate([{k: v for k, v in s.items() if k != "features"}
                                   for s in samples])
            out["features"] = batch
            return out
    return default_collate(samples)


class _CubeSamples:
    """Selection, sample assembly and per-process handles shared by both datasets."""

    def __init__(self, cubes: str | os.PathLike | CubeSet, *,
                 storage_options: dict[str, Any] | None = None, version: str | None = None,
                 bbox: Sequence[float] | None = None, start: Any = None, end: Any = None,
                 species: Any = None, split: str | None = None,
                 images: Sequence[int] | None = None,
                 features: str | None = "pooled", frame: int = 0, dtype: str = "float32",
                 language: bool = True, time_format: str = "seconds",
                 device: str | torch.device | None = None):
        if features is not None and features not in FEATURE_MODES:
            raise ValueError(f"features must be one of {', '.join(FEATURE_MODES)} or None, "
                             f"got {features!r}")
        if time_format not in TIME_FORMATS:
            raise ValueError(f"time_format must be one of {', '.join(TIME_FORMATS)}, "
                             f"got {time_format!r}")
        key = str(dtype).removeprefix("torch.")
        if key not in DTYPES:
            raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
        if isinstance(cubes, CubeSet):
            self.url, self.storage_options = cubes.url, dict(cubes.storage_options)
            self._cubes: CubeSet | None = cubes
        else:
            self.url, self.storage_options = str(cubes), dict(storage_options or {})
            self._cubes = CubeSet.open(self.url, self.storage_options, version=version)
        # the cube set version read (resolved once: every worker reads this one)
        self.version: str | None = self._cubes.version
        self._pid = os.getpid()
        self.features = features
        self.dtype = key
        self.language = bool(language)
        self.time_format = time_format
        self.device = resolve_device(device)
        cs = self.cubes
        n_frames = cs.features_array().shape[1]
        if features == "frame" and not 0 <= int(frame) < n_frames:
            raise ValueError(f"frame must be in [0, {n_frames}), got {frame}")
        self.frame = int(frame)
        query = Query.make(bbox=bbox, start=start, end=end, species=species, split=split)
        selected = cs.select_images(query)
        if images is not None:
            images = np.asarray(images, dtype=np.int64).reshape(-1)
            cs.check_images(images, len(cs.image_table()))
            selected = images[np.isin(images, selected)]
        self.positions = selected.astype(np.int64)
        table = cs.image_table().iloc[self.positions]
        self._gbif_id = table.gbif_id.to_numpy(np.int64)
        self._image_number = table.image_number.to_numpy(np.int64)
        self._species = table.species_index.to_numpy(np.int64)
        self._lat = table.lat.to_numpy(np.float64)
        self._lon = table.lon.to_numpy(np.float64)
        times = table.time.to_numpy("datetime64[ns]")
        self._time = (times.astype(np.int64) / 1e9 if time_format == "seconds"
                      else _year_fraction(times))
        self.species_names = list(cs.species_table().taxon_name)
        self._language: torch.Tensor | None = None

    # -- per-process state ---------------------------------------------------------------
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cubes"] = None  # reopened by whichever process unpickles this
        state["_language"] = None
        return state

    @property
    def cubes(self) -> CubeSet:
        """The cube set, opened in (and for) the current process."""
        if self._cubes is None or self._pid != os.getpid():
            self._cubes = CubeSet.open(self.url, self.storage_options, version=self.version)
            self._pid = os.getpid()
            self._language = None
        return self._cubes

    @property
    def num_species(self) -> int:
        return len(self.species_names)

    def _language_table(self) -> torch.Tensor:
        cubes = self.cubes  # (re)opens, and drops a table from another process
        if self._language is None:
            lang = np.asarray(cubes.language_embeddings(), dtype=np.float32)
            self._language = torch.from_numpy(lang).to(DTYPES[self.dtype])
        return self._language

    # -- samples -------------------------------------------------------------------------
    def _read(self, ks: np.ndarray) -> torch.Tensor | None:
        """Vision features of the samples ``ks`` (indices into the selection) as one tensor.

        Read straight into the batch tensor, which in a DataLoader worker lives in shared
        memory: with :func:`collate` it travels to the main process without a copy.
        """
        if self.features is None:
            return None
        pos = self.positions[ks]
        cs = self.cubes
        if self.features == "pooled":
            shape = (len(pos), cs.features_array().shape[-1])
        elif self.features == "frame":
            shape = (len(pos), *cs.features_array().shape[2:])
        else:
            shape = (len(pos), *cs.features_array().shape[1:])
        batch = _new_batch(shape, DTYPES[self.dtype], shared=get_worker_info() is not None)
        if self.features == "pooled":
            batch.numpy()[...] = cs.pooled(pos)
        else:
            frame = self.frame if self.features == "frame" else None
            cs.features_batch(pos, self.dtype, frame=frame, out=batch.numpy())
        return batch

    def _samples(self, ks: np.ndarray) -> list[dict[str, torch.Tensor]]:
        ks = np.asarray(ks, dtype=np.int64)
        batch = self._read(ks)
        lang = self._language_table() if self.language else None
        device = self.device if get_worker_info() is None else None
        if batch is not None and device is not None:
            batch = batch.to(device)  # one copy for the batch: its rows stay one storage
        out = []
        for j, k in enumerate(ks.tolist()):
            s = {
                "species": torch.tensor(self._species[k]),
                "lat": torch.tensor(self._lat[k]),
                "lon": torch.tensor(self._lon[k]),
                "time": torch.tensor(self._time[k]),
                "gbif_id": torch.tensor(self._gbif_id[k]),
                "image_number": torch.tensor(self._image_number[k]),
                "image": torch.tensor(self.positions[k]),
            }
            if lang is not None:
                s["language"] = lang[self._species[k]].clone()
            if device is not None:
                s = to_device(s, device)
            if batch is not None:
                s["features"] = batch[j]  # a row view: collate() hands the batch on uncopied
            out.append(s)
        return out

    def __len__(self) -> int:
        return len(self.positions)


class CubeDataset(_CubeSamples, Dataset):
    """Map-style dataset of the selected embeddings (see the module docstring).

    ``CubeDataset(url_or_cubeset, bbox=..., start=..., end=..., species=..., split=...,
    features="pooled" | "full" | "frame" | None, frame=0, dtype="float32" | "float16",
    language=True, time_format="seconds" | "year", device=None | "auto" | "cuda" | "cpu",
    storage_options=None, images=None)``.
    """

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self.positions)
        if not -n <= int(i) < n:
            raise IndexError(f"sample {i} is out of range [0, {n})")
        return self._samples(np.asarray([int(i) % n]))[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """A whole batch with one coalesced read (used by DataLoader's batched fetch)."""
        ks = np.asarray(indices, dtype=np.int64)
        n = len(self.positions)
        if len(ks) and not ((ks >= -n) & (ks < n)).all():
            raise IndexError(f"a sample index is out of range [0, {n})")
        return self._samples(ks % n if n else ks)

    def sampler(self, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                world_size: int | None = None, drop_last: bool = False) -> DistributedSampler:
        """A ``DistributedSampler`` (call its ``set_epoch``) for this rank's share."""
        r, w = distributed_rank()
        return DistributedSampler(self, num_replicas=w if world_size is None else world_size,
                                  rank=r if rank is None else rank, shuffle=shuffle, seed=seed,
                                  drop_last=drop_last)


class CubeIterableDataset(_CubeSamples, IterableDataset):
    """Iterable dataset of the selected embeddings, sharded over ranks and workers.

    Extra arguments: ``shuffle`` (default False) with ``seed`` (and :meth:`set_epoch`),
    ``rank``/``world_size`` (default: torch.distributed's when initialised, else 0/1),
    ``drop_last`` (give every rank the same number of samples by dropping the remainder),
    ``block_size`` (samples per coalesced read), ``batch_size`` (yield collated batches of
    this size instead of samples: use with ``DataLoader(ds, batch_size=None)``).
    """

    def __init__(self, cubes: str | os.PathLike | CubeSet, *, shuffle: bool = False,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 drop_last: bool = False, block_size: int = 8, batch_size: int | None = None,
                 **kwargs):
        super().__init__(cubes, **kwargs)
        r, w = distributed_rank()
        self.rank = r if rank is None else int(rank)
        self.world_size = w if world_size is None else int(world_size)
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {self.rank}, "
                             f"world_size {self.world_size}")
        if block_size < 1 or (batch_size is not None and batch_size < 1):
            raise ValueError(f"block_size and batch_size must be positive, got {block_size}, "
                             f"{batch_size}")
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.block_size = int(batch_size or block_size)
        self.batch_size = batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (set it on the dataset before iterating each epoch)."""
        self.epoch = int(epoch)

    def order(self) -> np.ndarray:
        """This rank's sample indices (into the selection) for the current epoch."""
        n = len(self.positions)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        else:
            order = np.arange(n)
        if self.drop_last:
            order = order[: n - n % self.world_size]
        return order[self.rank::self.world_size]

    def __len__(self) -> int:
        return len(self.order())

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        mine = self.order()
        info = get_worker_info()
        if info is not None:
            mine = mine[info.id::info.num_workers]
        for b in range(0, len(mine), self.block_size):
            samples = self._samples(mine[b:b + self.block_size])
            if self.batch_size:
                yield collate(samples)
            else:
                yield from samples


class ThreadedLoader:
    """Batches of a map-style dataset read on threads of this process, ``threads`` at a time.

    Reads release the GIL (``preadv``, memcpy from mapped files), so a few threads keep
    up with several worker processes without their cost: no pickling, no shared-memory
    batches (whose 4 KiB page faults dominate for full tensors). Batches are collated
    with :func:`collate` and placed on ``device``; iteration order is the sampler's.
    """

    def __init__(self, dataset: CubeDataset, batch_size: int = 32, shuffle: bool = False,
                 sampler: Any = None, drop_last: bool = False,
                 generator: torch.Generator | None = None, threads: int = 2,
                 prefetch: int | None = None, device: str | torch.device | None = None):
        if threads < 1:
            raise ValueError(f"threads must be positive, got {threads}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.sampler = sampler
        self.drop_last = drop_last
        self.generator = generator
        self.threads = threads
        self.prefetch = prefetch or 2 * threads
        self.device = resolve_device(device) if device is not None else dataset.device

    def _batches(self) -> BatchSampler:
        from torch.utils.data import RandomSampler, SequentialSampler

        sampler = self.sampler
        if sampler is None:
            sampler = (RandomSampler(self.dataset, generator=self.generator) if self.shuffle
                       else SequentialSampler(self.dataset))
        return BatchSampler(sampler, self.batch_size, self.drop_last)

    def __len__(self) -> int:
        return len(self._batches())

    def _fetch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate(self.dataset.__getitems__(indices))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batches = iter(self._batches())
        non_blocking = self.device is not None and self.device.type == "cuda"
        with ThreadPoolExecutor(self.threads) as pool:
            pending = deque(pool.submit(self._fetch, b) for b in islice(batches, self.prefetch))
            while pending:
                batch = pending.popleft().result()
                nxt = next(batches, None)
                if nxt is not None:
                    pending.append(pool.submit(self._fetch, nxt))
                yield to_device(batch, self.device, non_blocking)


class DeviceLoader:
    """A DataLoader whose batches arrive on ``device`` (moved in the main process)."""

    def __init__(self, loader: DataLoader, device: torch.device | None):
        self.loader = loader
        self.device = device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        non_blocking = self.device is not None and self.device.type == "cuda"
        for batch in self.loader:
            yield to_device(batch, self.device, non_blocking)


def make_loader(dataset: _CubeSamples, batch_size: int = 32, num_workers: int = 0,
                device: str | torch.device | None = None, threads: int = 0,
                **kwargs) -> DeviceLoader | ThreadedLoader:
    """A loader over ``dataset`` with batches on ``device`` (default: the dataset's).

    ``threads > 0`` (map-style datasets, no worker processes): a :class:`ThreadedLoader`,
    the fastest way to stream full tensors on one machine. Otherwise a DataLoader with
    :func:`collate`: workers keep samples on the CPU and batches are moved here, from
    pinned memory on CUDA. ``kwargs`` go to ``DataLoader`` / ``ThreadedLoader`` (shuffle,
    sampler, generator, drop_last, persistent_workers, ...).
    """
    dev = resolve_device(device) if device is not None else dataset.device
    if threads:
        if num_workers or not isinstance(dataset, CubeDataset):
            raise ValueError("threads need a map-style CubeDataset and num_workers=0")
        return ThreadedLoader(dataset, batch_size, threads=threads, device=dev, **kwargs)
    # samples from workers are on the CPU: pin them for a fast copy to the GPU (with no
    # workers the dataset has already placed them on its device)
    kwargs.setdefault("pin_memory", num_workers > 0 and dev is not None and dev.type == "cuda")
    if isinstance(dataset, CubeIterableDataset) and dataset.batch_size:
        batch_size = None  # the dataset yields batches
    else:
        kwargs.setdefault("collate_fn", collate)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, **kwargs)
    return DeviceLoader(loader, dev)
