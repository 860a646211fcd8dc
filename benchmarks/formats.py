"""The embedding stores the benchmarks compare the cube against (baselines).

From ``shared/SOURCE_DATASET.md`` ("The dashboard that used it before"):

* :class:`ParquetSource` - the published parquet files: find the embedding's file and
  row in ``vision_index.parquet``, read that row's row group, decode the list column.
* :class:`RawFloat32Sqlite` - the earlier dashboard's store: one raw float32 file,
  25,952,256 bytes per record and no header, plus a SQLite table gbif_id -> byte offset,
  read through a memory map.
* :class:`Float16Memmap` - the floor: the same bytes as the cube (float16, one record
  per embedding, no header) in one file behind a persistent ``np.memmap``.

Each store is keyed like the cube, by (gbif_id, image_number): an observation can have
several embeddings. ``get`` returns one (8, 24, 24, 1408) array in the store's dtype;
``get_batch`` an (n, 8, 24, 24, 1408) array in the given order; ``data_files`` lists the
files holding embedding bytes (for page-cache eviction); ``unmap`` drops memory maps.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence

import numpy as np
import pyarrow.parquet as pq

from cube_gen import source_layout as L
from cube_gen.reader import SourceDataset

Key = tuple[int, int]  # (gbif_id, image_number)


class ParquetSource:
    """Embeddings read straight from the published parquet layout."""

    name = "parquet source (vision index + row-group decode)"

    def __init__(self, source_dir: str):
        self.source = SourceDataset(source_dir)
        index = self.source.read_vision_index()
        self.where: dict[Key, tuple[int, int]] = {
            (int(g), int(n)): (int(f), int(r)) for g, n, f, r in zip(
                index.gbif_id, index.image_number, index.file_idx, index.row_idx, strict=True)}
        self._files: dict[int, tuple[pq.ParquetFile, np.ndarray]] = {}
        pf, _ = self._file(next(iter(self.where.values()))[0])
        self.dtype = np.dtype(pf.schema_arrow.field("embedding").type.value_type.to_pandas_dtype())

    def keys(self) -> list[Key]:
        return sorted(self.where)

    def _file(self, file_idx: int) -> tuple[pq.ParquetFile, np.ndarray]:
        """The opened file (footer parsed once, as a long-running service would keep it)."""
        if file_idx not in self._files:
            pf = pq.ParquetFile(self.source.path(L.embedding_file_name(file_idx)))
            starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows
                                      for i in range(pf.num_row_groups)])
            self._files[file_idx] = (pf, starts)
        return self._files[file_idx]

    def _decode_rows(self, file_idx: int, rows: Sequence[int], outs: Sequence[np.ndarray]) -> None:
        pf, starts = self._file(file_idx)
        groups: dict[int, list[tuple[int, np.ndarray]]] = {}
        for r, o in zip(rows, outs, strict=True):
            rg = int(np.searchsorted(starts, r, side="right")) - 1
            groups.setdefault(rg, []).append((r - int(starts[rg]), o))
        for rg, items in groups.items():
            col = pf.read_row_group(rg, columns=["embedding"]).column("embedding")
            for r, o in items:
                values = col[r].values.to_numpy(zero_copy_only=False)
                o[...] = values.reshape(L.VISION_SHAPE)

    def get(self, key: Key) -> np.ndarray:
        f, r = self.where[key]
        pf, starts = self._file(f)
        rg = int(np.searchsorted(starts, r, side="right")) - 1
        col = pf.read_row_group(rg, columns=["embedding"]).column("embedding")
        return col[r - int(starts[rg])].values.to_numpy(zero_copy_only=False).reshape(
            L.VISION_SHAPE)

    batch_into = True

    def get_batch(self, keys: Sequence[Key], out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty((len(keys), *L.VISION_SHAPE), self.dtype)
        by_file: dict[int, list[int]] = {}
        for k, key in enumerate(keys):
            by_file.setdefault(self.where[key][0], []).append(k)
        for f, ks in sorted(by_file.items()):
            self._decode_rows(f, [self.where[keys[k]][1] for k in ks], [out[k] for k in ks])
        return out

    def data_files(self) -> list[str]:
        return [self.source.path(L.embedding_file_name(f))
                for f in sorted({f for f, _ in self.where.values()})]

    def unmap(self) -> None:
        pass


class _RawRecords:
    """One headerless file of fixed-size records behind a persistent memory map."""

    dtype_name = "float32"

    def __init__(self, path: str):
        self.path = path
        self.dtype = np.dtype(self.dtype_name)
        self.record = int(np.prod(L.VISION_SHAPE)) * self.dtype.itemsize
        self._mm: np.memmap | None = None

    @property
    def mm(self) -> np.memmap:
        if self._mm is None:
            n = os.path.getsize(self.path) // self.record
            self._mm = np.memmap(self.path, self.dtype, "r", shape=(n, *L.VISION_SHAPE))
        return self._mm

    def unmap(self) -> None:
        self._mm = None

    def data_files(self) -> list[str]:
        return [self.path]

    @classmethod
    def write(cls, source_dir: str, path: str) -> dict[Key, int]:
        """Write every embedding of the source in (gbif_id, image_number) order; key -> record."""
        source = SourceDataset(source_dir)
        index = source.read_vision_index()  # sorted by (gbif_id, image number)
        record_of = {(int(g), int(n)): i for i, (g, n) in
                     enumerate(zip(index.gbif_id, index.image_number, strict=True))}
        key_of = {(int(f), int(r)): (int(g), int(n)) for g, n, f, r in zip(
            index.gbif_id, index.image_number, index.file_idx, index.row_idx, strict=True)}
        dtype = np.dtype(cls.dtype_name)
        record = int(np.prod(L.VISION_SHAPE)) * dtype.itemsize
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as fh:
            fh.truncate(record * len(index))
            for f in sorted(index.file_idx.unique()):
                for row, _gid, feats in source.iter_file_embeddings(int(f), dtype=cls.dtype_name):
                    fh.seek(record * record_of[key_of[(int(f), row)]])
                    fh.write(np.ascontiguousarray(feats, dtype).tobytes())
        os.replace(tmp, path)
        return record_of


class RawFloat32Sqlite(_RawRecords):
    """The earlier dashboard's store: raw float32 records + SQLite offsets, memory-mapped."""

    name = "float32 memmap + SQLite (earlier dashboard)"
    dtype_name = "float32"

    def __init__(self, folder: str):
        super().__init__(os.path.join(folder, "embeddings_f32.bin"))
        self.db = sqlite3.connect(os.path.join(folder, "offsets.sqlite"), check_same_thread=False)

    @classmethod
    def build(cls, source_dir: str, folder: str) -> RawFloat32Sqlite:
        os.makedirs(folder, exist_ok=True)
        record_of = cls.write(source_dir, os.path.join(folder, "embeddings_f32.bin"))
        record = int(np.prod(L.VISION_SHAPE)) * 4
        db_path = os.path.join(folder, "offsets.sqlite")
        if os.path.exists(db_path):
            os.remove(db_path)
        with sqlite3.connect(db_path) as db:
            db.execute("CREATE TABLE embeddings (gbif_id INTEGER NOT NULL, image_number INTEGER "
                       "NOT NULL, byte_offset INTEGER NOT NULL, PRIMARY KEY (gbif_id, image_number))")
            db.executemany("INSERT INTO embeddings VALUES (?, ?, ?)",
                           [(g, n, i * record) for (g, n), i in record_of.items()])
        return cls(folder)

    def keys(self) -> list[Key]:
        return [(int(g), int(n)) for g, n in self.db.execute(
            "SELECT gbif_id, image_number FROM embeddings ORDER BY gbif_id, image_number")]

    def _offset(self, key: Key) -> int:
        row = self.db.execute("SELECT byte_offset FROM embeddings WHERE gbif_id = ? AND "
                              "image_number = ?", key).fetchone()
        if row is None:
            raise KeyError(key)
        return int(row[0])

    def get(self, key: Key) -> np.ndarray:
        return np.array(self.mm[self._offset(key) // self.record])

    batch_into = True

    def get_batch(self, keys: Sequence[Key], out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty((len(keys), *L.VISION_SHAPE), self.dtype)
        mm = self.mm
        for k, key in enumerate(keys):
            out[k] = mm[self._offset(key) // self.record]
        return out


class Float16Memmap(_RawRecords):
    """The floor: the cube's bytes (float16) in one headerless file, one persistent memmap."""

    name = "float16 np.memmap (floor)"
    dtype_name = "float16"

    def __init__(self, path: str, record_of: dict[Key, int]):
        super().__init__(path)
        self.record_of = record_of

    @classmethod
    def build(cls, source_dir: str, path: str) -> Float16Memmap:
        return cls(path, cls.write(source_dir, path))

    @classmethod
    def open(cls, source_dir: str, path: str) -> Float16Memmap:
        index = SourceDataset(source_dir).read_vision_index()
        return cls(path, {(int(g), int(n)): i for i, (g, n) in
                          enumerate(zip(index.gbif_id, index.image_number, strict=True))})

    def keys(self) -> list[Key]:
        return sorted(self.record_of)

    def get(self, key: Key) -> np.ndarray:
        return np.array(self.mm[self.record_of[key]])

    batch_into = True

    def get_batch(self, keys: Sequence[Key], out: np.ndarray | None = None) -> np.ndarray:
        rows = [self.record_of[k] for k in keys]
        if out is None:
            return self.mm[rows]
        for j, r in enumerate(rows):  # (np.take with out= would buffer through a temporary)
            out[j] = self.mm[r]
        return out
