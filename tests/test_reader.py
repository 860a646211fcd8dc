"""cube_gen.reader: exact round trip of the source layout, and its validation errors."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cube_gen import source_layout as L
from cube_gen.errors import NotFoundError, SourceError
from cube_gen.reader import SourceDataset
from cube_gen.synth import Preset, write_synthetic

INDEX = L.VISION_INDEX_FILE
OBS = L.OBSERVATIONS_FILE
EMB0 = L.embedding_file_name(0)
EMB1 = L.embedding_file_name(1)

# A small dataset with float32 embedding lists (as published), 3 embeddings in 2 files.
FLOAT32_PRESET = Preset(60, 5, 50, 2, 3, 2, 6, embedding_dtype="float32")


# -- helpers ----------------------------------------------------------------------------------
def direct_embeddings(root: Path) -> dict[tuple[int, int], tuple[int, np.ndarray]]:
    """(file_idx, row_idx) -> (gbif_id, flat values) read with pyarrow alone."""
    out = {}
    for path in sorted((root / L.EMBEDDINGS_DIR).glob("embeddings_*.parquet")):
        file_idx = int(path.stem.split("_")[1])
        table = pq.read_table(path)
        ids = table.column("gbif_id").to_pylist()
        emb = table.column("embedding")
        for row in range(table.num_rows):
            out[(file_idx, row)] = (ids[row], emb[row].values.to_numpy(zero_copy_only=False))
    return out


def broken_copy(src: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny dataset to break."""
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    return dst


def rewrite(root: Path, relative: str, change: Callable[[pa.Table], pa.Table]) -> None:
    """Replace ``root/relative`` by ``change(table)``, with row groups of the same size."""
    path = root / relative
    pf = pq.ParquetFile(path)
    table = change(pf.read())
    pq.write_table(table, path, row_group_size=pf.metadata.row_group(0).num_rows)


def set_value(column: str, row: int, value, type_: pa.DataType | None = None):
    """A ``rewrite`` change that sets one cell."""

    def change(table: pa.Table) -> pa.Table:
        values = table.column(column).to_pylist()
        values[row] = value
        idx = table.schema.get_field_index(column)
        return table.set_column(idx, column, pa.array(values, type_ or table.schema.field(idx).type))

    return change


def set_embedding(row: int, values: np.ndarray):
    """A ``rewrite`` change for an embedding file: replace one row's embedding list."""

    def change(table: pa.Table) -> pa.Table:
        emb = table.column("embedding").combine_chunks()
        value_type = emb.type.value_type
        rows = [emb[i].values for i in range(len(emb))]
        rows[row] = pa.array(values.astype(value_type.to_pandas_dtype()), value_type)
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int32)
        new = pa.ListArray.from_arrays(pa.array(offsets), pa.concat_arrays(rows))
        return table.set_column(table.schema.get_field_index("embedding"), "embedding", new)

    return change


def corrupt(path: Path, start: int, length: int) -> None:
    """Overwrite ``length`` bytes of a file from ``start`` with fixed pseudo-random bytes."""
    data = bytearray(path.read_bytes())
    noise = np.random.default_rng(7).integers(0, 256, length, dtype=np.uint8).tobytes()
    data[start:start + length] = noise
    path.write_bytes(bytes(data))


def column_chunk_middle(path: Path, column: str, row_group: int = 0) -> int:
    """A byte offset in the middle of a column chunk's data pages."""
    md = pq.ParquetFile(path).metadata.row_group(row_group)
    for i in range(md.num_columns):
        chunk = md.column(i)
        if chunk.path_in_schema.split(".")[0] == column:
            return chunk.data_page_offset + chunk.total_compressed_size // 3
    raise KeyError(column)


def expect_error(read: Callable[[], object], *, file: str, row: int | None = None,
                 column: str | None = None, contains: tuple[str, ...] = (),
                 expected: str | None = None) -> SourceError:
    """Run ``read`` and check the SourceError names the file, row, column and expectation."""
    with pytest.raises(SourceError) as info:
        read()
    err = info.value
    text = str(err)
    assert err.file is not None and err.file.endswith(file), text
    assert f"file {err.file}" in text
    if row is not None:
        assert err.row == row, text
        assert f"row {row}" in text
    if column is not None:
        assert err.column == column, text
        assert f"column {column!r}" in text
    for part in contains:
        assert part in text, text
    if expected is not None:
        assert err.expected is not None and expected in err.expected, text
        assert f"(expected {err.expected})" in text
    return err


# -- round trip -------------------------------------------------------------------------------
def test_observations_round_trip(tiny_source):
    df = SourceDataset(str(tiny_source)).read_observations(with_language=True)
    direct = pq.read_table(tiny_source / OBS).to_pandas()
    assert len(df) == len(direct) == 240
    assert list(df.columns) == list(L.OBSERVATION_COLUMN_TYPES) + ["time", "time_precision"]
    for col in direct.columns:
        if col in ("image_urls", "vision_file_indices", "language_embedding"):
            for a, b in zip(df[col], direct[col], strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        else:
            pd.testing.assert_series_equal(df[col], direct[col], check_names=True)
    assert df["gbif_id"].dtype == np.int64
    assert df["language_embedding"].iloc[0].dtype == np.float32


def test_observations_without_language_by_default(tiny_source):
    df = SourceDataset(str(tiny_source)).read_observations()
    assert "language_embedding" not in df.columns
    assert len(df) == 240


def test_missing_time_fields_as_null_or_nan(tiny_source, tmp_path):
    """Missing fields may be parquet nulls (as pandas writes them) or float NaN values."""
    direct = pq.read_table(tiny_source / OBS)
    assert direct.column("second").null_count > 0
    root = broken_copy(tiny_source, tmp_path)

    def as_nan(table: pa.Table) -> pa.Table:
        for field in L.TIME_FIELDS[1:]:
            values = table.column(field).to_numpy(zero_copy_only=False)  # nulls -> NaN
            table = table.set_column(table.schema.get_field_index(field), field,
                                     pa.array(values, pa.float64(), from_pandas=False))
        return table

    rewrite(root, OBS, as_nan)
    assert pq.read_table(root / OBS).column("second").null_count == 0
    a = SourceDataset(str(tiny_source)).read_observations()
    b = SourceDataset(str(root)).read_observations()
    pd.testing.assert_frame_equal(a.drop(columns=["image_urls", "vision_file_indices"]),
                                  b.drop(columns=["image_urls", "vision_file_indices"]))


def test_species_language_one_vector_per_species(tiny_source):
    species = SourceDataset(str(tiny_source)).read_species_language()
    direct = pq.read_table(tiny_source / OBS, columns=["taxon_id", "taxon_name",
                                                        "language_embedding"]).to_pandas()
    assert len(species) == direct.taxon_id.nunique() == 12
    for row in species.itertuples():
        first = direct[direct.taxon_id == row.taxon_id].iloc[0]
        assert row.taxon_name == first.taxon_name
        assert row.language_embedding.shape == (L.LANGUAGE_DIM,)
        np.testing.assert_array_equal(row.language_embedding, first.language_embedding)


def test_vision_index_round_trip_and_image_numbers(tiny_source):
    ds = SourceDataset(str(tiny_source))
    obs = ds.read_observations()
    index = ds.read_vision_index(obs)
    direct = pq.read_table(tiny_source / INDEX).to_pandas()
    assert len(index) == len(direct) == 6
    key = ["gbif_id", "file_idx", "row_idx"]
    assert sorted(map(tuple, index[key].to_numpy().tolist())) == \
        sorted(map(tuple, direct[key].to_numpy().tolist()))
    # image_number counts 0, 1, ... per observation in (file_idx, row_idx) order
    for _, group in index.groupby("gbif_id"):
        ordered = group.sort_values(["file_idx", "row_idx"])
        assert ordered.image_number.tolist() == list(range(len(group)))
    assert index.groupby("gbif_id").size().max() >= 2, "tiny has an observation with 2 images"
    assert not index.duplicated(["gbif_id", "image_number"]).any()
    # observations agree with the index
    with_vision = set(obs.gbif_id[obs.has_vision])
    assert with_vision == set(index.gbif_id)
    assert ds.embedding_file_indices() == [0, 1]


def test_embeddings_round_trip_exactly(tiny_source):
    ds = SourceDataset(str(tiny_source))
    direct = direct_embeddings(tiny_source)
    records = list(ds.iter_embeddings())
    assert len(records) == len(direct) == 6
    assert {(r.file_idx, r.row_idx) for r in records} == set(direct)
    index = ds.read_vision_index()
    for rec in records:
        gbif_id, flat = direct[(rec.file_idx, rec.row_idx)]
        assert rec.gbif_id == gbif_id
        assert rec.features.shape == L.VISION_SHAPE == (8, 24, 24, 1408)
        assert rec.features.dtype == np.float16
        np.testing.assert_array_equal(rec.features, flat.reshape(L.VISION_SHAPE))
        # the (4608, 1408) -> (8, 576, 1408) -> (8, 24, 24, 1408) reshape
        np.testing.assert_array_equal(rec.features[3, 5, 7], flat.reshape(4608, 1408)[3 * 576 + 5 * 24 + 7])
        hit = index[(index.gbif_id == rec.gbif_id) & (index.image_number == rec.image_number)]
        assert (int(hit.file_idx.iloc[0]), int(hit.row_idx.iloc[0])) == (rec.file_idx, rec.row_idx)


def test_read_embedding_by_gbif_id_and_image_number(tiny_source):
    ds = SourceDataset(str(tiny_source))
    index = ds.read_vision_index()
    multi = index[index.image_number == 1].iloc[0]
    second = ds.read_embedding(int(multi.gbif_id), 1)
    first = ds.read_embedding(int(multi.gbif_id), 0)
    _, flat = direct_embeddings(tiny_source)[(int(multi.file_idx), int(multi.row_idx))]
    np.testing.assert_array_equal(second, flat.reshape(L.VISION_SHAPE))
    assert not np.array_equal(first, second), "two images of one observation differ"
    assert ds.read_embedding(int(multi.gbif_id), 1, dtype="float32").dtype == np.float32
    with pytest.raises(NotFoundError, match="image 9"):
        ds.read_embedding(int(multi.gbif_id), 9)
    with pytest.raises(KeyError):  # NotFoundError is a KeyError
        ds.read_embedding(42, 0)


def test_float16_and_float32_embedding_columns(tiny_source, tmp_path):
    assert pq.read_schema(tiny_source / EMB0).field("embedding").type.value_type == pa.float16()
    root = tmp_path / "f32"
    write_synthetic(str(root), FLOAT32_PRESET, seed=3, progress=False)
    assert pq.read_schema(root / EMB0).field("embedding").type.value_type == pa.float32()
    ds = SourceDataset(str(root))
    direct = direct_embeddings(root)
    assert len(direct) == 3
    assert len(ds.read_vision_index(ds.read_observations())) == 3
    for dtype in ("float32", "float16"):
        records = list(ds.iter_embeddings(dtype=dtype))
        assert len(records) == 3
        for rec in records:
            gbif_id, flat = direct[(rec.file_idx, rec.row_idx)]
            assert flat.dtype == np.float32 and rec.gbif_id == gbif_id
            assert rec.features.dtype == np.dtype(dtype)
            # the synthetic values are float16-exact, so both precisions round trip exactly
            np.testing.assert_array_equal(rec.features.astype(np.float32),
                                          flat.reshape(L.VISION_SHAPE))


def test_reads_through_fsspec_urls(tiny_source):
    ds = SourceDataset("file://" + str(tiny_source))
    assert len(ds.read_observations()) == 240
    assert len(ds.read_vision_index()) == 6
    mem = fsspec.filesystem("memory")
    name = f"/tiny-{uuid.uuid4().hex}"
    mem.put(str(tiny_source), name, recursive=True)
    try:
        ds = SourceDataset("memory:/" + name)
        obs = ds.read_observations()
        assert len(obs) == 240
        index = ds.read_vision_index(obs)
        direct = direct_embeddings(tiny_source)
        records = list(ds.iter_embeddings())
        assert len(records) == len(index) == 6
        for rec in records:
            np.testing.assert_array_equal(
                rec.features, direct[(rec.file_idx, rec.row_idx)][1].reshape(L.VISION_SHAPE))
        with pytest.raises(SourceError, match="not found"):
            SourceDataset("memory://no-such-dataset")
    finally:
        mem.rm(name, recursive=True)


def test_optional_json(tiny_source):
    ds = SourceDataset(str(tiny_source))
    assert ds.read_json(L.DATASET_INFO_FILE)["num_observations"] == 240
    assert ds.read_json("no-such.json") is None


# -- validation errors ------------------------------------------------------------------------
def test_missing_column(tiny_source, tmp_path):
    root = broken_copy(tiny_source, tmp_path)
    rewrite(root, OBS, lambda t: t.drop_columns(["split"]))
    expect_error(SourceDataset(str(root)).read_observations, file=OBS, column="split",
                 contains=("missing column",), expected="string")


def test_mistyped_column(tiny_source, tmp_path):
    root = broken_copy(tiny_source, tmp_path)
    rewrite(root, OBS, lambda t: t.set_column(
        t.schema.get_field_index("latitude"), "latitude", pc.cast(t["latitude"], pa.string())))
    expect_error(SourceDataset(str(root)).read_observations, file=OBS, column="latitude",
                 contains=("type string",), expected="float64")


def test_mistyped_embedding_column(tiny_source, tmp_path):
    root = broken_copy(tiny_source, tmp_path)
    rewrite(root, EMB1, lambda t: t.set_column(
        t.schema.get_field_index("gbif_id"), "gbif_id", pc.cast(t["gbif_id"], pa.string())))
    expect_error(SourceDataset(str(root)).read_vision_index, file=EMB1, column="gbif_id",
                 contains=("type string",), expected="int64")


def test_embedding_of_wrong_length(tiny_source, tmp_path):
    root = broken_copy(tiny_source, tmp_path)
    short = np.zeros(L.EMBEDDING_LENGTH - 1408, np.float16)
    rewrite(root, EMB0, set_embedding(1, short))
    ds = SourceDataset(str(root))
    expect_error(lambda: list(ds.iter_embeddings()), file=EMB0, row=1, column="embedding",
                 contains=(f"{L.EMBEDDING_LENGTH - 1408} values",),
                 expected=f"{L.EMBEDDING_LENGTH} values")


def test_original_shape_wrong(tiny_source, tmp_path):
    root = broken_copy(tiny_source, tmp_path)
    rewrite(root, EMB1, set_value("original_shape", 2, "[4608, 1024]"))
    ds = SourceDataset(str(root))
    expect_error(lambda: list(ds.iter_embeddings()), file=EMB1, row=2, column="original_shape",
                 contains=("'[4608, 1024]'",), expected="'[4608, 1408]'")


def test_index_row_pointing_at_missing_file(tiny_source, tmp_path):
    root = broken_copy(tiny_source, tmp_path)
    rewrite(root, INDEX, set_value("file_idx", 4, 7))
    expect_error(SourceDataset(str(root)).read_vision_index, file=INDEX, row=4,
                 column="file_idx", contains=("embeddings_000007.parquet",),
                 expected="an existing vision_embeddings file")


def test_index_row_beyond_file_rows(tiny_source, tmp_path):
    root = broken_copy(tiny_source, tmp_path)
    rewrite(root, INDEX, set_value("row_idx", 2, 9))
    expect_error(SourceDataset(str(root)).read_vision_index, file=INDEX, row=2,
                 column="row_idx", contains=("row_idx 9 is beyond", "embeddings_000000.parquet",
                                             "(3 rows)"),
                 expected="a row in [0, 2]")


def test_index_gbif_id_not_in_observations(tiny_source, tmp_path):
    root = broken_copy(tiny_source, tmp_path)
    rewrite(root, INDEX, set_value("gbif_id", 1, 123))
    ds = SourceDataset(str(root))
    expect_error(lambda: ds.read_vision_index(ds.read_observations()), file=INDEX, row=1,
                 column="gbif_id", contains=("gbif_id 123 is not in observations.parquet",),
                 expected="a gbif_id of an observation")


def test_index_gbif_id_mismatching_file_row(tiny_source, tmp_path):
    root = broken_copy(tiny_source, tmp_path)
    obs = pq.read_table(tiny_source / OBS, columns=["gbif_id", "has_vision"]).to_pandas()
    other = int(obs.gbif_id[~obs.has_vision].iloc[0])  # a real observation, no embedding
    held = pq.read_table(tiny_source / INDEX).column("gbif_id")[3].as_py()
    rewrite(root, INDEX, set_value("gbif_id", 3, other))
    index = pq.read_table(root / INDEX).to_pandas()
    file_idx, row_idx = int(index.file_idx[3]), int(index.row_idx[3])
    ds = SourceDataset(str(root))
    expect_error(lambda: ds.read_vision_index(ds.read_observations()), file=INDEX, row=3,
                 column="gbif_id",
                 contains=(f"gbif_id {other} but", L.embedding_file_name(file_idx),
                           f"row {row_idx} holds gbif_id {held}"),
                 expected="the gbif_id stored at that row")


def test_duplicated_gbif_id_in_observations(tiny_source, tmp_path):
    root = broken_copy(tiny_source, tmp_path)
    first = pq.read_table(tiny_source / OBS, columns=["gbif_id"]).column("gbif_id")[3].as_py()
    rewrite(root, OBS, set_value("gbif_id", 7, first))
    expect_error(SourceDataset(str(root)).read_observations, file=OBS, row=7, column="gbif_id",
                 contains=(f"gbif_id {first} is duplicated (first at row 3)",),
                 expected="unique gbif_id values")


@pytest.mark.parametrize(
    "column, row, value, expected",
    [("latitude", 10, 95.0, "a value in [-90, 90]"),
     ("longitude", 11, -200.0, "a value in [-180, 180]")],
)
def test_coordinates_out_of_range(tiny_source, tmp_path, column, row, value, expected):
    root = broken_copy(tiny_source, tmp_path)
    rewrite(root, OBS, set_value(column, row, value))
    expect_error(SourceDataset(str(root)).read_observations, file=OBS, row=row, column=column,
                 contains=(f"{column} = {value!r} is out of range",), expected=expected)


def test_bad_split_value(tiny_source, tmp_path):
    root = broken_copy(tiny_source, tmp_path)
    rewrite(root, OBS, set_value("split", 12, "validation"))
    expect_error(SourceDataset(str(root)).read_observations, file=OBS, row=12, column="split",
                 contains=("split = 'validation'",), expected="'train' or 'temporal_test'")


def test_month_13(tiny_source, tmp_path):
    root = broken_copy(tiny_source, tmp_path)
    rewrite(root, OBS, set_value("month", 13, 13.0))
    expect_error(SourceDataset(str(root)).read_observations, file=OBS, row=13, column="month",
                 contains=("month = 13.0 is out of range",),
                 expected="an integer in [1, 12] or missing")


def test_february_31(tiny_source, tmp_path):
    root = broken_copy(tiny_source, tmp_path)
    for column, value in (("year", 2023), ("month", 2.0), ("day", 31.0)):
        rewrite(root, OBS, set_value(column, 14, value))
    expect_error(SourceDataset(str(root)).read_observations, file=OBS, row=14, column="day",
                 contains=("no such date (2023, 2, 31",), expected="a valid calendar date")


def test_unreadable_parquet_garbage(tiny_source, tmp_path):
    root = broken_copy(tiny_source, tmp_path)
    (root / OBS).write_bytes(b"this is not a parquet file\n" * 100)
    expect_error(SourceDataset(str(root)).read_observations, file=OBS,
                 contains=("not a readable parquet file",))


def test_unreadable_parquet_truncated(tiny_source, tmp_path):
    root = broken_copy(tiny_source, tmp_path)
    data = (root / INDEX).read_bytes()
    (root / INDEX).write_bytes(data[: len(data) // 2])
    expect_error(SourceDataset(str(root)).read_vision_index, file=INDEX,
                 contains=("not a readable parquet file",))


def test_unreadable_parquet_corrupt_pages(tiny_source, tmp_path):
    """Corrupted data pages (footer intact) fail when decoded, naming the file (and row group)."""
    root = broken_copy(tiny_source, tmp_path)
    path = root / OBS
    corrupt(path, column_chunk_middle(path, "language_embedding"), 64 * 1024)
    ds = SourceDataset(str(root))
    assert len(ds.read_observations()) == 240  # the corrupt column is not read here
    expect_error(ds.read_species_language, file=OBS, contains=("cannot decode",))
    expect_error(lambda: ds.read_observations(with_language=True), file=OBS,
                 contains=("cannot decode",))

    path = root / EMB0
    corrupt(path, column_chunk_middle(path, "embedding", row_group=1), 64 * 1024)
    expect_error(lambda: list(ds.iter_embeddings()), file=EMB0, row=1,
                 contains=("cannot decode row group 1",))


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(SourceError, match="source dataset folder not found"):
        SourceDataset(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    expect_error(SourceDataset(str(tmp_path / "empty")).read_observations, file=OBS,
                 contains=("file not found",))
