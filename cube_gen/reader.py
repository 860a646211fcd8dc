"""Reader of the published source dataset layout, local or through any fsspec URL.

The observations table and the vision index are small and read whole; embeddings are
streamed one record batch at a time, so peak memory does not depend on how many
embeddings the dataset holds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import source_layout as L
from .errors import NotFoundError, SourceError
from .timeparse import times_with_precision


@dataclass(frozen=True)
class EmbeddingRecord:
    """One vision embedding, identified by (gbif_id, image_number)."""

    gbif_id: int
    image_number: int
    file_idx: int
    row_idx: int
    features: np.ndarray  # (frame 8, patch_y 24, patch_x 24, feature 1408)


def _check_columns(schema: pa.Schema, expected: dict, file: str) -> None:
    for name, (accepts, type_text) in expected.items():
        idx = schema.get_field_index(name)
        if idx < 0:
            raise SourceError("missing column", file=file, column=name, expected=type_text)
        field_type = schema.field(idx).type
        if not accepts(field_type):
            raise SourceError(
                f"column has type {field_type}", file=file, column=name, expected=type_text
            )


def _read_columns(pf: pq.ParquetFile, columns: list[str], file: str) -> pa.Table:
    """Read ``columns`` whole, turning decode failures (corrupt pages) into SourceError."""
    try:
        return pf.read(columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SourceError(f"cannot decode ({exc})", file=file) from exc


class SourceDataset:
    """The dataset folder of ``shared/SOURCE_DATASET.md`` at ``url`` (path or fsspec URL)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = str(url).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        if not self.fs.isdir(self.root):
            raise SourceError("source dataset folder not found", file=self.url,
                              expected="a folder holding observations.parquet")
        self._vision_index: pd.DataFrame | None = None

    # -- paths ---------------------------------------------------------------------------
    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def display(self, relative: str) -> str:
        """A path for error messages, as the user gave the source."""
        return f"{self.url}/{relative}"

    def _open_parquet(self, relative: str) -> pq.ParquetFile:
        path = self.path(relative)
        if not self.fs.exists(path):
            raise SourceError("file not found", file=self.display(relative))
        try:
            return pq.ParquetFile(self.fs.open(path, "rb"))
        except (pa.ArrowInvalid, OSError) as exc:
            raise SourceError(f"not a readable parquet file ({exc})",
                              file=self.display(relative)) from exc

    def read_json(self, relative: str) -> dict | None:
        """Optional descriptive JSON (``vision_metadata.json``, ``dataset_info.json``)."""
        path = self.path(relative)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "r") as f:
            return json.load(f)

    # -- observations --------------------------------------------------------------------
    def observations_schema(self) -> pa.Schema:
        return self._open_parquet(L.OBSERVATIONS_FILE).schema_arrow

    def read_observations(self, with_language: bool = False) -> pd.DataFrame:
        """The validated observations table, one row per observation in file order.

        Adds ``time`` (datetime64[ns]) and ``time_precision`` (code into
        :data:`cube_gen.timeparse.PRECISIONS`). ``language_embedding`` is dropped unless
        ``with_language``; use :meth:`read_species_language` for one vector per species.
        """
        file = self.display(L.OBSERVATIONS_FILE)
        pf = self._open_parquet(L.OBSERVATIONS_FILE)
        _check_columns(pf.schema_arrow, L.OBSERVATION_COLUMN_TYPES, file)
        columns = [c for c in L.OBSERVATION_COLUMN_TYPES if with_language or c != "language_embedding"]
        df = _read_columns(pf, columns, file).to_pandas()
        df["taxon_id"] = df["taxon_id"].astype(str)
        self._validate_observations(df, file)
        df["time"], df["time_precision"] = times_with_precision(df, file)
        return df

    @staticmethod
    def _validate_observations(df: pd.DataFrame, file: str) -> None:
        for col in ("gbif_id", "latitude", "longitude", "taxon_name", "split", "has_vision"):
            missing = df[col].isna().to_numpy()
            if missing.any():
                raise SourceError("value is missing", file=file, row=int(np.flatnonzero(missing)[0]),
                                  column=col, expected="a value on every row")
        dup = df["gbif_id"].duplicated(keep="first").to_numpy()
        if dup.any():
            row = int(np.flatnonzero(dup)[0])
            first = int(np.flatnonzero(df["gbif_id"].to_numpy() == df["gbif_id"].iloc[row])[0])
            raise SourceError(
                f"gbif_id {int(df['gbif_id'].iloc[row])} is duplicated (first at row {first})",
                file=file, row=row, column="gbif_id", expected="unique gbif_id values",
            )
        for col, limit in (("latitude", 90.0), ("longitude", 180.0)):
            values = df[col].to_numpy(dtype=np.float64)
            bad = ~np.isfinite(values) | (np.abs(values) > limit)
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise SourceError(f"{col} = {float(values[row])!r} is out of range", file=file, row=row,
                                  column=col, expected=f"a value in [-{limit:g}, {limit:g}]")
        bad = ~df["split"].isin(L.SPLITS).to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise SourceError(f"split = {df['split'].iloc[row]!r}", file=file, row=row,
                              column="split", expected=" or ".join(repr(s) for s in L.SPLITS))

    def read_species_language(self) -> pd.DataFrame:
        """One row per species (``taxon_id``, ``taxon_name``, ``language_embedding`` float32).

        Streams the observations file by row group, so the 7168-d vectors of all
        observations are never held at once.
        """
        file = self.display(L.OBSERVATIONS_FILE)
        pf = self._open_parquet(L.OBSERVATIONS_FILE)
        _check_columns(pf.schema_arrow, L.OBSERVATION_COLUMN_TYPES, file)
        seen: dict[str, tuple[str, np.ndarray]] = {}
        offset = 0
        batches = pf.iter_batches(batch_size=4096,
                                  columns=["taxon_id", "taxon_name", "language_embedding"])
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowInvalid, OSError) as exc:
                raise SourceError(f"cannot decode ({exc})", file=file, row=offset) from exc
            if batch is None:
                break
            taxon_ids = batch.column("taxon_id").cast(pa.string()).to_pylist()
            names = batch.column("taxon_name").to_pylist()
            emb = batch.column("language_embedding")
            for i, tid in enumerate(taxon_ids):
                if tid in seen:
                    continue
                vec = emb[i].values.to_numpy(zero_copy_only=False) if emb[i].is_valid else None
                if vec is None or len(vec) != L.LANGUAGE_DIM:
                    raise SourceError(
                        f"language_embedding has length {0 if vec is None else len(vec)}",
                        file=file, row=offset + i, column="language_embedding",
                        expected=f"length {L.LANGUAGE_DIM}",
                    )
                seen[tid] = (names[i], vec.astype(np.float32))
            offset += batch.num_rows
        rows = [(tid, name, vec) for tid, (name, vec) in seen.items()]
        return pd.DataFrame(rows, columns=["taxon_id", "taxon_name", "language_embedding"])

    # -- vision index --------------------------------------------------------------------
    def read_vision_index(self, observations: pd.DataFrame | None = None,
                          check_files: bool = True) -> pd.DataFrame:
        """The validated vision index with ``image_number`` added.

        ``image_number`` numbers the embeddings of one observation 0, 1, ... in
        (file_idx, row_idx) order; (gbif_id, image_number) identifies an embedding.
        Checks that every row points at an existing file and row holding that gbif_id
        (unless ``check_files`` is false: a simulated source without embedding files),
        and (given ``observations``) at a known observation.
        """
        if self._vision_index is not None and observations is None:
            return self._vision_index
        file = self.display(L.VISION_INDEX_FILE)
        pf = self._open_parquet(L.VISION_INDEX_FILE)
        _check_columns(pf.schema_arrow, L.VISION_INDEX_COLUMN_TYPES, file)
        df = _read_columns(pf, list(L.VISION_INDEX_COLUMN_TYPES), file).to_pandas()
        for col in df.columns:
            if df[col].isna().any():
                row = int(np.flatnonzero(df[col].isna().to_numpy())[0])
                raise SourceError("value is missing", file=file, row=row, column=col,
                                  expected="an integer")
        df = df.astype({"gbif_id": np.int64, "file_idx": np.int64, "row_idx": np.int64})
        dup = df.duplicated(["file_idx", "row_idx"]).to_numpy()
        if dup.any():
            row = int(np.flatnonzero(dup)[0])
            raise SourceError("two index rows point at the same embedding", file=file, row=row,
                              expected="one index row per (file_idx, row_idx)")
        if observations is not None:
            known = df["gbif_id"].isin(observations["gbif_id"]).to_numpy()
            if not known.all():
                row = int(np.flatnonzero(~known)[0])
                raise SourceError(
                    f"gbif_id {int(df['gbif_id'].iloc[row])} is not in observations.parquet",
                    file=file, row=row, column="gbif_id", expected="a gbif_id of an observation",
                )
        # check every referenced file and row against the embedding files' own gbif_id column
        for file_idx, group in df.groupby("file_idx", sort=True) if check_files else ():
            rel = L.embedding_file_name(file_idx)
            if not self.fs.exists(self.path(rel)):
                row = int(group.index[0])
                raise SourceError(f"points at missing file {self.display(rel)}", file=file,
                                  row=row, column="file_idx",
                                  expected="an existing vision_embeddings file")
            ids = self._embedding_file_ids(int(file_idx))
            rows = group["row_idx"].to_numpy()
            out = (rows < 0) | (rows >= len(ids))
            if out.any():
                row = int(group.index[np.flatnonzero(out)[0]])
                raise SourceError(
                    f"row_idx {int(df['row_idx'].iloc[row])} is beyond {self.display(rel)} "
                    f"({len(ids)} rows)", file=file, row=row, column="row_idx",
                    expected=f"a row in [0, {len(ids) - 1}]",
                )
            mismatch = ids[rows] != group["gbif_id"].to_numpy()
            if mismatch.any():
                k = int(np.flatnonzero(mismatch)[0])
                row = int(group.index[k])
                raise SourceError(
                    f"gbif_id {int(df['gbif_id'].iloc[row])} but {self.display(rel)} row "
                    f"{int(rows[k])} holds gbif_id {int(ids[rows[k]])}",
                    file=file, row=row, column="gbif_id", expected="the gbif_id stored at that row",
                )
        df = df.sort_values(["gbif_id", "file_idx", "row_idx"], kind="stable").reset_index(drop=True)
        df["image_number"] = df.groupby("gbif_id").cumcount().astype(np.int64)
        if observations is None:
            self._vision_index = df
        return df

    def embedding_file_indices(self) -> list[int]:
        """The file indices of the ``vision_embeddings/embeddings_*.parquet`` files present."""
        names = self.fs.glob(self.path(f"{L.EMBEDDINGS_DIR}/embeddings_*.parquet"))
        out = []
        for name in names:
            stem = name.rsplit("/", 1)[-1][len("embeddings_"):-len(".parquet")]
            if stem.isdigit():
                out.append(int(stem))
        return sorted(out)

    def _embedding_file_ids(self, file_idx: int) -> np.ndarray:
        rel = L.embedding_file_name(file_idx)
        pf = self._open_parquet(rel)
        _check_columns(pf.schema_arrow, L.EMBEDDING_COLUMN_TYPES, self.display(rel))
        table = _read_columns(pf, ["gbif_id"], self.display(rel))
        return table.column("gbif_id").to_numpy().astype(np.int64)

    # -- embeddings ----------------------------------------------------------------------
    def iter_file_embeddings(
        self, file_idx: int, rows: set[int] | None = None, dtype: str = "float16",
        batch_size: int = 2,
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(row_idx, gbif_id, features)`` from one embedding file, streamed.

        ``features`` has shape (8, 24, 24, 1408) in ``dtype``. Only ``rows`` (if given)
        are decoded. Raises :class:`SourceError` naming the file and row for an
        embedding of the wrong length or a wrong ``original_shape``.
        """
        rel = L.embedding_file_name(file_idx)
        file = self.display(rel)
        pf = self._open_parquet(rel)
        _check_columns(pf.schema_arrow, L.EMBEDDING_COLUMN_TYPES, file)
        row0 = 0
        for rg in range(pf.num_row_groups):
            n_rg = pf.metadata.row_group(rg).num_rows
            if rows is not None and not any(row0 <= r < row0 + n_rg for r in rows):
                row0 += n_rg
                continue
            try:
                batches = pf.iter_batches(batch_size=batch_size, row_groups=[rg],
                                          columns=["gbif_id", "embedding", "original_shape"])
                for batch in batches:
                    yield from self._decode_batch(batch, row0, rows, dtype, file)
                    row0 += batch.num_rows
            except (pa.ArrowInvalid, OSError) as exc:
                raise SourceError(f"cannot decode row group {rg} ({exc})", file=file,
                                  row=row0) from exc

    @staticmethod
    def _decode_batch(batch, row0, rows, dtype, file):
        ids = batch.column("gbif_id").to_numpy(zero_copy_only=False)
        shapes = batch.column("original_shape").to_pylist()
        emb = batch.column("embedding")
        offsets = emb.offsets.to_numpy() if hasattr(emb, "offsets") else None
        values = emb.values
        for i in range(batch.num_rows):
            row = row0 + i
            if rows is not None and row not in rows:
                continue
            if not emb[i].is_valid:
                raise SourceError("embedding is null", file=file, row=row, column="embedding",
                                  expected=f"{L.EMBEDDING_LENGTH} values")
            if offsets is not None:
                start, stop = int(offsets[i]), int(offsets[i + 1])
            else:
                size = emb.type.list_size  # .values ignores the array's offset
                start, stop = (emb.offset + i) * size, (emb.offset + i + 1) * size
            if stop - start != L.EMBEDDING_LENGTH:
                raise SourceError(
                    f"embedding has {stop - start} values", file=file, row=row,
                    column="embedding", expected=f"{L.EMBEDDING_LENGTH} values = {L.ORIGINAL_SHAPE}",
                )
            shape = shapes[i]
            if shape is not None and shape.replace(" ", "") != L.ORIGINAL_SHAPE.replace(" ", ""):
                raise SourceError(f"original_shape is {shape!r}", file=file, row=row,
                                  column="original_shape", expected=repr(L.ORIGINAL_SHAPE))
            flat = values.slice(start, stop - start).to_numpy(zero_copy_only=False)
            yield row, int(ids[i]), flat.astype(dtype, copy=False).reshape(L.VISION_SHAPE)

    def iter_embeddings(self, dtype: str = "float16") -> Iterator[EmbeddingRecord]:
        """Every embedding listed in the vision index, streamed file by file."""
        index = self.read_vision_index()
        for file_idx, group in index.groupby("file_idx", sort=True):
            by_row = {int(r.row_idx): r for r in group.itertuples()}
            for row, gid, feats in self.iter_file_embeddings(int(file_idx), set(by_row), dtype):
                rec = by_row[row]
                yield EmbeddingRecord(int(gid), int(rec.image_number), int(file_idx), row, feats)

    def read_embedding(self, gbif_id: int, image_number: int = 0,
                       dtype: str = "float16") -> np.ndarray:
        """One embedding by (gbif_id, image_number), as (8, 24, 24, 1408)."""
        index = self.read_vision_index()
        hit = index[(index.gbif_id == gbif_id) & (index.image_number == image_number)]
        if hit.empty:
            raise NotFoundError(f"no embedding for gbif_id {gbif_id} image {image_number}")
        rec = hit.iloc[0]
        for _, _, feats in self.iter_file_embeddings(int(rec.file_idx), {int(rec.row_idx)}, dtype):
            return feats
        raise SourceError("row not found", file=self.display(L.embedding_file_name(rec.file_idx)),
                          row=int(rec.row_idx))
