"""The cube set's layout: which cubes exist, what each holds, and how it is chunked.

This is the one place that names cubes, dimensions and variables. Writers build their
templates from it, readers and the server look names up here, tests check cubes
against it.

A cube set is a folder (or object-store prefix) holding::

    observations.zarr   one row per observation along ``obs``
    species.zarr        one row per species along ``species``
    vision.zarr         one entry per embedding along ``image``
    grid.levels/        xcube multi-resolution pyramid (0.zarr, 1.zarr, ... + .zlevels)
    cubeset.json        manifest, written last: the set is complete when it exists
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import source_layout as L
from .timeparse import PRECISIONS

SCHEMA_VERSION = "1"
MANIFEST = "cubeset.json"

OBSERVATIONS = "observations"
SPECIES = "species"
VISION = "vision"
GRID = "grid"  # per period (year)
GRID_ALL_YEARS = "grid_all_years"
GRID_MONTH_OF_YEAR = "grid_month_of_year"
GRID_SPECIES = "grid_species"
GRID_CUBES = (GRID, GRID_ALL_YEARS, GRID_MONTH_OF_YEAR, GRID_SPECIES)  # .levels pyramids
CUBES = (OBSERVATIONS, SPECIES, VISION, *GRID_CUBES)
CUBE_PATHS = {
    OBSERVATIONS: "observations.zarr",
    SPECIES: "species.zarr",
    VISION: "vision.zarr",
    **{g: f"{g}.levels" for g in GRID_CUBES},
}
PATCHES = "patches"  # optional cube (recipe cubes.patches.enabled): cube_gen/patch_index.py
CUBE_PATHS[PATCHES] = "patches.zarr"

SPLIT_CODES = {name: i for i, name in enumerate(L.SPLITS)}  # train 0, temporal_test 1
ATTENTION_METHODS = ("l2norm", "variance", "entropy", "pca1", "pca2", "pca3", "pca4", "pca5")
ATTENTION_FRAMES = ("mean",) + tuple(str(i) for i in range(L.N_FRAMES))
IMAGE_STATS = {
    "mean_l2norm": "mean over patches of the L2 norm of the frame-mean patch features",
    "mean_entropy": "mean over patches of the entropy of |f| / sum |f| (nats)",
    "mean_patch_variance": "mean over patches of the variance of the patch's 1408 features",
    "frame_variance": "mean over patches and features of the variance across the 8 frames",
}
UMAP_AXES = ("x", "y", "z")
RGB = ("r", "g", "b")


@dataclass(frozen=True)
class Var:
    """One variable (or coordinate): dims, dtype, CF attributes, default chunks."""

    dims: tuple[str, ...]
    dtype: str
    attrs: dict = field(default_factory=dict)
    chunks: tuple[int | None, ...] | None = None  # None entries: whole dim


def _a(long_name: str, units: str | None = None, **extra) -> dict:
    attrs = {"long_name": long_name}
    if units is not None:
        attrs["units"] = units
    attrs.update(extra)
    return attrs


LAT_ATTRS = _a("latitude", "degrees_north", standard_name="latitude")
LON_ATTRS = _a("longitude", "degrees_east", standard_name="longitude")
TIME_ATTRS = _a("observation time (start of its known precision)", standard_name="time")
PRECISION_ATTRS = _a(
    "precision of the observation time", "1",
    flag_values=list(range(len(PRECISIONS))), flag_meanings=" ".join(PRECISIONS),
)
SPLIT_ATTRS = _a(
    "data split", "1", flag_values=list(SPLIT_CODES.values()),
    flag_meanings=" ".join(SPLIT_CODES), comment="train: 2010-2024; temporal_test: all of 2025",
)

# -- observations.zarr ---------------------------------------------------------------------
# Rows are ordered by (year, Hilbert curve position of lat/lon) so that a bounding-box and
# time query touches few chunks; per-chunk extents (obs_chunk) let readers skip the rest,
# and (gbif_id_sorted, gbif_id_order) give O(log n) lookup by gbif_id.
OBSERVATION_VARS: dict[str, Var] = {
    "gbif_id": Var(("obs",), "int64", _a("GBIF occurrence id", "1", cf_role="id")),
    "time": Var(("obs",), "datetime64[ns]", TIME_ATTRS),
    "lat": Var(("obs",), "float64", LAT_ATTRS),
    "lon": Var(("obs",), "float64", LON_ATTRS),
    "species_index": Var(("obs",), "int32", _a("index into species.zarr species dim", "1")),
    "taxon_id": Var(("obs",), "str", _a("GBIF taxon id of the species", "1")),
    "split": Var(("obs",), "int8", SPLIT_ATTRS),
    "has_vision": Var(("obs",), "bool", _a("a vision embedding exists", "1")),
    "num_images": Var(("obs",), "int16", _a("number of images", "1")),
    "num_embeddings": Var(("obs",), "int16", _a("number of vision embeddings", "1")),
    "time_precision": Var(("obs",), "int8", PRECISION_ATTRS),
    "image_urls": Var(("obs", "image_slot"), "str",
                      _a("iNaturalist photo URLs, empty string past num_images", "1")),
    "gbif_id_sorted": Var(("obs_by_id",), "int64", _a("gbif_id in ascending order", "1")),
    "gbif_id_order": Var(("obs_by_id",), "int64",
                         _a("obs position of gbif_id_sorted (gbif_id[order] == sorted)", "1")),
    "chunk_lat_min": Var(("obs_chunk",), "float64", _a("smallest latitude in the obs chunk", "degrees_north")),
    "chunk_lat_max": Var(("obs_chunk",), "float64", _a("largest latitude in the obs chunk", "degrees_north")),
    "chunk_lon_min": Var(("obs_chunk",), "float64", _a("smallest longitude in the obs chunk", "degrees_east")),
    "chunk_lon_max": Var(("obs_chunk",), "float64", _a("largest longitude in the obs chunk", "degrees_east")),
    "chunk_time_min": Var(("obs_chunk",), "datetime64[ns]", _a("earliest time in the obs chunk")),
    "chunk_time_max": Var(("obs_chunk",), "datetime64[ns]", _a("latest time in the obs chunk")),
}
OBSERVATION_COORDS = ("gbif_id", "time", "lat", "lon")

# -- species.zarr --------------------------------------------------------------------------
SPECIES_VARS: dict[str, Var] = {
    "taxon_id": Var(("species",), "str", _a("GBIF taxon id", "1")),
    "taxon_name": Var(("species",), "str", _a("scientific name", "1")),
    "genus": Var(("species",), "str", _a("genus (first word of the scientific name)", "1")),
    "observation_count": Var(("species",), "int32", _a("number of observations", "1")),
    "vision_count": Var(("species",), "int32", _a("number of vision embeddings", "1")),
    "language_embedding": Var(("species", "language_feature"), "float32",
                              _a("DeepSeek-V3 language embedding of the species name", "1")),
    "umap": Var(("species", "umap_axis"), "float32",
                _a("3-D UMAP of the standardised language embeddings", "1")),
    "cluster": Var(("species",), "int32",
                   _a("HDBSCAN cluster of the language embeddings (-1: noise)", "1")),
    "color": Var(("species",), "str", _a("display colour (#rrggbb) from the UMAP position", "1")),
    "cluster_color": Var(("species",), "str", _a("display colour (#rrggbb) of the cluster", "1")),
}

# -- vision.zarr ---------------------------------------------------------------------------
# Entries ordered by (gbif_id, image_number): lookup is a binary search on gbif_id.
VISION_VARS: dict[str, Var] = {
    "gbif_id": Var(("image",), "int64", _a("GBIF occurrence id of the observation", "1")),
    "image_number": Var(("image",), "int16",
                        _a("number of the image within its observation (0-based)", "1")),
    "obs_index": Var(("image",), "int64", _a("position in observations.zarr obs dim", "1")),
    "species_index": Var(("image",), "int32", _a("index into species.zarr species dim", "1")),
    "time": Var(("image",), "datetime64[ns]", TIME_ATTRS),
    "lat": Var(("image",), "float64", LAT_ATTRS),
    "lon": Var(("image",), "float64", LON_ATTRS),
    "split": Var(("image",), "int8", SPLIT_ATTRS),
    "features": Var(
        ("image", "frame", "patch_y", "patch_x", "feature"), "float16",
        _a("V-JEPA 2 ViT-g/384 patch features", "1",
           comment="one still image repeated 16 times, tubelet 2: 8 near-identical frames"),
        chunks=(1, None, None, None, None),
    ),
    "pooled": Var(("image", "feature"), "float32",
                  _a("mean of the features over frames and patches", "1"), chunks=(4096, None)),
    "umap": Var(("image", "umap_axis"), "float32",
                _a("3-D UMAP of the pooled vectors (cosine)", "1")),
    "attention": Var(
        ("image", "attention_method", "attention_frame", "patch_y", "patch_x"), "float32",
        _a("per-patch reduction of the features (not normalised)", "1",
           comment="l2norm: L2 norm; variance: variance over features; entropy: entropy of "
                   "|f|/sum|f|; pcaK: K-th principal component score fitted on the image's 576 "
                   "patches; attention_frame 'mean' uses the frame mean"),
        chunks=(1, None, None, None, None),
    ),
    "umap_rgb": Var(("image", "patch_y", "patch_x", "rgb"), "uint8",
                    _a("3-D UMAP of the frame-mean patches (cosine, 15 neighbours) as RGB", "1"),
                    chunks=(64, None, None, None)),
    **{f"stat_{k}": Var(("image",), "float32", _a(v, "1")) for k, v in IMAGE_STATS.items()},
}
VISION_COORDS = ("gbif_id", "image_number", "time", "lat", "lon")

# -- grid.levels ---------------------------------------------------------------------------
GRID_VARS: dict[str, Var] = {
    "observation_count": Var(("time", "lat", "lon"), "float32",
                             _a("number of observations", "1", color_value_max=50.0)),
    "species_richness": Var(("time", "lat", "lon"), "float32",
                            _a("number of distinct species", "1", color_value_max=20.0)),
    "shannon_diversity": Var(("time", "lat", "lon"), "float32",
                             _a("Shannon diversity index H' of species counts", "1",
                                color_value_max=3.0)),
    "vision_count": Var(("time", "lat", "lon"), "float32",
                        _a("number of vision embeddings", "1", color_value_max=5.0)),
    **{f"embedding_{c}": Var(("time", "lat", "lon"), "float32",
                             _a(f"vision embedding composite, {name} channel: principal "
                                f"component {i + 1} of the pooled vectors, scaled to [0, 1], "
                                "cell mean", "1", color_value_max=1.0))
       for i, (c, name) in enumerate(zip(RGB, ("red", "green", "blue"), strict=True))},
}
TOP_SPECIES_PREFIX = "count_"  # + species slug: occurrence counts of the most frequent species

CUBE_VARS = {
    OBSERVATIONS: OBSERVATION_VARS,
    SPECIES: SPECIES_VARS,
    VISION: VISION_VARS,
    GRID: GRID_VARS,
}


def species_slug(name: str) -> str:
    """``'Quercus virginiana'`` -> ``'quercus_virginiana'`` (a variable-name-safe slug)."""
    out = "".join(ch.lower() if ch.isalnum() else "_" for ch in name)
    while "__" in out:
        out = out.replace("__", "_")
    return out.strip("_")
