"""cube_gen.synth: the synthetic stand-in has the published layout, counts and structure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from cube_gen import source_layout as L
from cube_gen.reader import SourceDataset
from cube_gen.synth import PRESETS, write_synthetic
from cube_gen.timeparse import PRECISION_CODES, PRECISIONS, times_with_precision


def parquet_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.parquet"))


@pytest.fixture(scope="module")
def tiny_obs(tiny_source) -> pd.DataFrame:
    return SourceDataset(str(tiny_source)).read_observations(with_language=True)


# -- layout and counts ------------------------------------------------------------------------
def test_tiny_layout_and_schemas(tiny_source):
    assert parquet_files(tiny_source) == sorted(
        [L.OBSERVATIONS_FILE, L.VISION_INDEX_FILE, L.embedding_file_name(0),
         L.embedding_file_name(1)])
    assert pq.read_schema(tiny_source / L.OBSERVATIONS_FILE).remove_metadata() == \
        L.OBSERVATIONS_SCHEMA
    assert pq.read_schema(tiny_source / L.VISION_INDEX_FILE).remove_metadata() == \
        L.VISION_INDEX_SCHEMA
    for f in (0, 1):
        schema = pq.read_schema(tiny_source / L.embedding_file_name(f)).remove_metadata()
        assert schema == L.embeddings_schema("float16")
        shapes = pq.read_table(tiny_source / L.embedding_file_name(f),
                               columns=["original_shape"]).column(0).to_pylist()
        assert shapes == ["[4608, 1408]"] * len(shapes)
    info = json.loads((tiny_source / L.DATASET_INFO_FILE).read_text())
    assert info["synthetic"] is True and info["seed"] == 0
    meta = json.loads((tiny_source / L.VISION_METADATA_FILE).read_text())
    assert meta["num_embeddings"] == 6 and meta["num_files"] == 2


def test_tiny_counts_exact(tiny_source, tiny_obs):
    p = PRESETS["tiny"]
    obs = tiny_obs
    index = pq.read_table(tiny_source / L.VISION_INDEX_FILE).to_pandas()
    assert len(obs) == p.n_observations == 240
    assert obs.taxon_id.nunique() == obs.taxon_name.nunique() == p.n_species == 12
    assert (obs.num_images > 0).sum() == p.n_with_images == 220
    assert obs.has_vision.sum() == p.n_vision_observations == 5
    assert len(index) == p.n_embeddings == 6
    assert index.gbif_id.nunique() == 5
    assert (obs.split == "temporal_test").sum() == p.n_test == 20
    assert (obs.split == "train").sum() == 220
    per_file = index.groupby("file_idx").size()
    assert per_file.tolist() == [3, 3] and per_file.max() <= p.embeddings_per_file


def test_full_preset_has_the_published_counts():
    """Not generated (100 GB): the preset's numbers are the published ones."""
    full = PRESETS["full"]
    assert full.n_observations == 33_665
    assert full.n_species == 232
    assert full.n_with_images == 31_136
    assert full.n_vision_observations == 7_113
    assert full.n_embeddings == 7_949
    assert full.n_test == 2_730 and full.n_observations - full.n_test == 30_935
    assert -(-full.n_embeddings // full.embeddings_per_file) == 159  # embedding files
    demo = PRESETS["demo"]
    assert (demo.n_observations, demo.n_species, demo.n_with_images, demo.n_test) == \
        (full.n_observations, full.n_species, full.n_with_images, full.n_test)
    for preset in PRESETS.values():
        assert preset.n_vision_observations <= preset.n_embeddings
        assert preset.n_vision_observations <= preset.n_with_images <= preset.n_observations
        assert preset.embedding_dtype in ("float16", "float32")


def test_one_embedding_is_the_published_size():
    assert L.EMBEDDING_LENGTH == 6_488_064
    assert L.EMBEDDING_LENGTH * 2 == 12_976_128  # bytes in float16
    assert L.EMBEDDING_LENGTH * 4 == 25_952_256  # bytes in float32


# -- determinism ------------------------------------------------------------------------------
def test_deterministic_for_a_seed_and_differs_for_another(tiny_source, tmp_path):
    again = Path(write_synthetic(str(tmp_path / "again"), "tiny", seed=0, progress=False))
    assert parquet_files(again) == parquet_files(tiny_source)
    for rel in parquet_files(tiny_source):
        assert pq.read_table(again / rel).equals(pq.read_table(tiny_source / rel)), rel
    for rel in (L.DATASET_INFO_FILE, L.VISION_METADATA_FILE):
        assert (again / rel).read_text() == (tiny_source / rel).read_text()

    other = Path(write_synthetic(str(tmp_path / "other"), "tiny", seed=1, progress=False))
    a = pq.read_table(tiny_source / L.OBSERVATIONS_FILE).to_pandas()
    b = pq.read_table(other / L.OBSERVATIONS_FILE).to_pandas()
    assert len(a) == len(b)  # same preset, same counts ...
    assert not a.gbif_id.equals(b.gbif_id)  # ... different data
    assert not np.allclose(a.latitude, b.latitude)
    e0 = pq.read_table(tiny_source / L.embedding_file_name(0)).column("embedding")[0]
    e1 = pq.read_table(other / L.embedding_file_name(0)).column("embedding")[0]
    assert not np.array_equal(e0.values.to_numpy(), e1.values.to_numpy())


def test_existing_folder_is_not_overwritten(tiny_source):
    before = (tiny_source / L.OBSERVATIONS_FILE).stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="overwrite"):
        write_synthetic(str(tiny_source), "tiny", seed=5, progress=False)
    assert (tiny_source / L.OBSERVATIONS_FILE).stat().st_mtime_ns == before
    assert not [p for p in tiny_source.parent.iterdir() if p.name.startswith(".synth-")]


# -- content ----------------------------------------------------------------------------------
def test_split_by_year(tiny_obs):
    test = tiny_obs.split == "temporal_test"
    assert (tiny_obs.year[test] == L.TEST_YEAR).all()
    assert (tiny_obs.year[~test] < L.TEST_YEAR).all()
    assert tiny_obs.year.between(*L.YEARS).all()
    assert set(tiny_obs.split) == set(L.SPLITS)


def test_within_the_published_bounding_box(tiny_obs):
    b = L.BBOX
    assert tiny_obs.latitude.between(b["south"], b["north"]).all()
    assert tiny_obs.longitude.between(b["west"], b["east"]).all()
    # spread over the area, not a single point
    assert tiny_obs.latitude.max() - tiny_obs.latitude.min() > 0.2
    assert tiny_obs.longitude.max() - tiny_obs.longitude.min() > 0.2


def test_some_time_fields_missing(tiny_obs):
    assert tiny_obs.year.notna().all()
    for field in ("second", "hour", "day"):
        assert tiny_obs[field].isna().any(), f"no observation without {field}"
    assert tiny_obs.second.notna().mean() > 0.8  # most are complete
    # missing fields nest: a missing field leaves every finer field missing
    fields = list(L.TIME_FIELDS)
    for coarse, fine in zip(fields[1:], fields[2:], strict=False):
        assert tiny_obs[fine][tiny_obs[coarse].isna()].isna().all(), (coarse, fine)


def test_time_precision_codes(tiny_obs):
    fields = list(L.TIME_FIELDS)
    for row in tiny_obs.itertuples():
        known = 0
        for code, field in enumerate(fields[1:], start=1):
            if pd.isna(getattr(row, field)):
                break
            known = code
        assert row.time_precision == known
        parts = [int(getattr(row, f)) if i <= known else (1 if i <= 2 else 0)
                 for i, f in enumerate(fields)]
        assert row.time == pd.Timestamp(*parts)
    assert {0, 1, 2, 4, 5} <= set(tiny_obs.time_precision)  # synth drops h:m:s together
    assert PRECISIONS[5] == "second" and PRECISION_CODES["day"] == 2


def test_times_with_precision_rules():
    df = pd.DataFrame({
        "year": [2020, 2021, 2022, 2023, 2024, 2019],
        "month": [3, 4, 5, np.nan, 7, 8],
        "day": [9, 10, np.nan, np.nan, 11, 12],
        "hour": [13, np.nan, 14, np.nan, 15, 16],
        "minute": [30, np.nan, np.nan, np.nan, 45, 17],
        "second": [59, np.nan, np.nan, np.nan, np.nan, 18],
    })
    time, precision = times_with_precision(df)
    assert precision.tolist() == [5, 2, 1, 0, 4, 5]
    assert precision.dtype == np.int8 and time.dtype == np.dtype("datetime64[ns]")
    assert list(pd.to_datetime(time)) == [
        pd.Timestamp(2020, 3, 9, 13, 30, 59),
        pd.Timestamp(2021, 4, 10),
        pd.Timestamp(2022, 5, 1),  # a missing day ignores the hour after it
        pd.Timestamp(2023, 1, 1),
        pd.Timestamp(2024, 7, 11, 15, 45),
        pd.Timestamp(2019, 8, 12, 16, 17, 18),
    ]


def test_images_and_vision_links(tiny_source, tiny_obs):
    obs = tiny_obs
    assert (obs.image_urls.map(len) == obs.num_images).all()
    urls = [u for lst in obs.image_urls for u in lst]
    assert all(u.startswith("https://") and u.rsplit("/", 1)[1].split(".")[0] in
               ("original", "large", "medium", "small") for u in urls)
    assert (obs.num_images[obs.has_vision] > 0).all()
    index = pq.read_table(tiny_source / L.VISION_INDEX_FILE).to_pandas()
    per_obs = index.groupby("gbif_id").size()
    for row in obs.itertuples():
        files = sorted(index.file_idx[index.gbif_id == row.gbif_id].unique().tolist())
        assert list(row.vision_file_indices) == files
        if row.has_vision:
            assert per_obs[row.gbif_id] <= row.num_images


def test_language_embedding_identical_within_a_species(tiny_obs):
    for _, group in tiny_obs.groupby("taxon_id"):
        first = group.language_embedding.iloc[0]
        assert first.shape == (L.LANGUAGE_DIM,) and np.isfinite(first).all()
        for vec in group.language_embedding:
            np.testing.assert_array_equal(vec, first)
    assert tiny_obs.groupby("taxon_id").taxon_name.nunique().eq(1).all()


def test_vision_frames_are_near_copies(tiny_source):
    rec = next(iter(SourceDataset(str(tiny_source)).iter_embeddings(dtype="float32")))
    f = rec.features
    assert np.isfinite(f).all()
    frame_spread = np.abs(f - f.mean(axis=0)).mean()
    assert frame_spread < 0.1 * np.abs(f).mean()
