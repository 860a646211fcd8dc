"""The published source dataset's layout (Central Florida Native Plants v0.2.0).

Facts from ``shared/SOURCE_DATASET.md``; the reader validates against them and the
synthetic generator writes them.
"""

from __future__ import annotations

import pyarrow as pa

OBSERVATIONS_FILE = "observations.parquet"
VISION_INDEX_FILE = "vision_index.parquet"
EMBEDDINGS_DIR = "vision_embeddings"
VISION_METADATA_FILE = "vision_metadata.json"
DATASET_INFO_FILE = "dataset_info.json"

N_FRAMES = 8
N_PATCH = 24
N_FEATURES = 1408
N_TOKENS = N_FRAMES * N_PATCH * N_PATCH  # 4608
EMBEDDING_LENGTH = N_TOKENS * N_FEATURES  # 6,488,064
ORIGINAL_SHAPE = f"[{N_TOKENS}, {N_FEATURES}]"
VISION_SHAPE = (N_FRAMES, N_PATCH, N_PATCH, N_FEATURES)
LANGUAGE_DIM = 7168

SPLITS = ("train", "temporal_test")
TIME_FIELDS = ("year", "month", "day", "hour", "minute", "second")

# Bounding box and years of the published dataset.
BBOX = {"north": 28.978, "south": 28.033, "east": -80.902, "west": -81.934}
YEARS = (2010, 2025)
TEST_YEAR = 2025


def embedding_file_name(file_idx: int) -> str:
    """Relative path of an embedding file, e.g. ``vision_embeddings/embeddings_000007.parquet``."""
    return f"{EMBEDDINGS_DIR}/embeddings_{int(file_idx):06d}.parquet"


# Arrow schema of observations.parquet as published.
OBSERVATIONS_SCHEMA = pa.schema(
    [
        ("gbif_id", pa.int64()),
        ("taxon_id", pa.string()),
        ("taxon_name", pa.string()),
        ("latitude", pa.float64()),
        ("longitude", pa.float64()),
        ("year", pa.int64()),
        ("month", pa.float64()),
        ("day", pa.float64()),
        ("hour", pa.float64()),
        ("minute", pa.float64()),
        ("second", pa.float64()),
        ("image_urls", pa.list_(pa.string())),
        ("num_images", pa.int64()),
        ("has_vision", pa.bool_()),
        ("vision_file_indices", pa.list_(pa.int64())),
        ("language_embedding", pa.list_(pa.float32())),
        ("split", pa.string()),
    ]
)

VISION_INDEX_SCHEMA = pa.schema(
    [("gbif_id", pa.int64()), ("file_idx", pa.int64()), ("row_idx", pa.int64())]
)


def embeddings_schema(dtype: str = "float32") -> pa.Schema:
    """Arrow schema of one ``vision_embeddings/*.parquet`` file."""
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema(
        [
            ("gbif_id", pa.int64()),
            ("embedding", pa.list_(value_type)),
            ("original_shape", pa.string()),
        ]
    )


# Which Arrow types the reader accepts for each column (the published files and
# equivalent encodings another writer could produce).
def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def _is_float(t: pa.DataType) -> bool:
    return pa.types.is_floating(t)


def _is_num(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)


def _is_str(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_list_of(pred):
    def check(t: pa.DataType) -> bool:
        return (
            pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
        ) and pred(t.value_type)

    return check


OBSERVATION_COLUMN_TYPES = {
    "gbif_id": (_is_int, "int64"),
    "taxon_id": (lambda t: _is_str(t) or _is_int(t), "string"),
    "taxon_name": (_is_str, "string"),
    "latitude": (_is_float, "float64"),
    "longitude": (_is_float, "float64"),
    "year": (_is_num, "int"),
    "month": (_is_num, "int or float (nullable)"),
    "day": (_is_num, "int or float (nullable)"),
    "hour": (_is_num, "int or float (nullable)"),
    "minute": (_is_num, "int or float (nullable)"),
    "second": (_is_num, "int or float (nullable)"),
    "image_urls": (_is_list_of(_is_str), "list<string>"),
    "num_images": (_is_int, "int"),
    "has_vision": (pa.types.is_boolean, "bool"),
    "vision_file_indices": (_is_list_of(_is_int), "list<int>"),
    "language_embedding": (_is_list_of(_is_float), "list<float32>"),
    "split": (_is_str, "string"),
}

VISION_INDEX_COLUMN_TYPES = {
    "gbif_id": (_is_int, "int64"),
    "file_idx": (_is_int, "int"),
    "row_idx": (_is_int, "int"),
}

EMBEDDING_COLUMN_TYPES = {
    "gbif_id": (_is_int, "int64"),
    "embedding": (
        _is_list_of(lambda t: pa.types.is_float16(t) or pa.types.is_float32(t)),
        "list<float16> or list<float32>",
    ),
    "original_shape": (_is_str, "string"),
}
