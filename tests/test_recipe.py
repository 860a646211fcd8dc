"""Recipe validation: every wrong key or value is named with its path in the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cube_gen.errors import RecipeError
from cube_gen.recipe import load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[1]


def _base() -> dict:
    return {"source": {"path": "/data/src"}, "target": {"path": "/data/cubes"}}


def test_defaults_are_filled_in():
    r = parse_recipe(_base())
    assert r.cubes["vision"]["dtype"] == "float16"
    assert r.cubes["vision"]["compressor"] is None
    assert r.cubes["observations"]["chunk_size"] == 4096
    assert r.cubes["grid"]["period"] == "1YS"
    assert r["compute"]["scheduler"] == "local"
    assert r.source["storage_options"] == {}


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path):
    f = tmp_path / "sub" / "r.yaml"
    f.parent.mkdir()
    f.write_text(yaml.safe_dump({"source": {"path": "../src"}, "target": {"path": "s3://b/c"}}))
    r = load_recipe(str(f))
    assert r.source["path"] == str(tmp_path / "src")
    assert r.target["path"] == "s3://b/c"


def test_fingerprint_ignores_compute_but_not_encodings():
    a = parse_recipe(_base())
    b = parse_recipe({**_base(), "compute": {"scheduler": "synchronous"}})
    c = parse_recipe({**_base(), "cubes": {"vision": {"dtype": "float32"}}})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


@pytest.mark.parametrize("data, path, words", [
    ({"target": {"path": "/x"}}, "source.path", "missing required key"),
    ({**_base(), "sorce": {}}, "sorce", "unknown key 'sorce'"),
    ({**_base(), "cubes": {"vision": {"dtype": "int8"}}}, "cubes.vision.dtype",
     "expected float16 or float32"),
    ({**_base(), "cubes": {"vision": {"compressor": {"name": "brotli"}}}},
     "cubes.vision.compressor", "name must be one of"),
    ({**_base(), "cubes": {"observations": {"chunk_size": 0}}},
     "cubes.observations.chunk_size", "positive integer"),
    ({**_base(), "cubes": {"observations": {"chunk_size": "big"}}},
     "cubes.observations.chunk_size", "expected int"),
    ({**_base(), "cubes": {"grid": {"resolution": 5}}}, "cubes.grid.resolution",
     "cell size in degrees"),
    ({**_base(), "cubes": {"grid": {"period": "fortnightly"}}}, "cubes.grid.period",
     "pandas period alias"),
    ({**_base(), "cubes": {"grid": {"bbox": [1, 2, 0, 3]}}}, "cubes.grid.bbox", "west < east"),
    ({**_base(), "cubes": {"grid": {"variables": ["richness"]}}}, "cubes.grid.variables",
     "unknown variable(s) ['richness']"),
    ({**_base(), "cubes": {"mosaic": {}}}, "cubes.mosaic", "allowed: observations, species"),
    ({**_base(), "compute": {"scheduler": "cluster"}}, "compute.scheduler",
     "tcp://host:8786"),
    ({**_base(), "cubes": {"vision": {"umap_rgb": "yes"}}}, "cubes.vision.umap_rgb",
     "expected bool"),
    ({**_base(), "cubes": {"grid": {"zarr_format": 4}}}, "cubes.grid.zarr_format",
     "expected 2 or 3"),
    ({**_base(), "version": 2}, "version", "expected 1"),
])
def test_each_error_names_its_path(data, path, words):
    with pytest.raises(RecipeError) as err:
        parse_recipe(data, file="recipe.yaml")
    msg = str(err.value)
    assert msg.startswith(f"recipe.yaml: {path}: "), msg
    assert words in msg, msg


def test_yaml_syntax_error_names_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("source:\n  path: [unclosed\ntarget: {}\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: not valid YAML at line \d+"):
        load_recipe(str(f))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(str(tmp_path / "nope.yaml"))


def test_top_level_must_be_mapping():
    with pytest.raises(RecipeError, match="a recipe must be a YAML mapping"):
        parse_recipe(["a", "b"], file="r.yaml")


def test_overrides_apply_before_validation():
    r = parse_recipe(_base(), overrides={"cubes.vision.dtype": "float32",
                                         "compute.n_workers": "3"})
    assert r.cubes["vision"]["dtype"] == "float32"
    assert r["compute"]["n_workers"] == 3
    with pytest.raises(RecipeError, match="cubes.vision.dtype"):
        parse_recipe(_base(), overrides={"cubes.vision.dtype": "float64"})


@pytest.mark.parametrize("name", ["demo.yaml", "central_florida_native_plants.yaml", "tiny.yaml"])
def test_shipped_recipes_are_valid(name):
    r = load_recipe(str(REPO / "recipes" / name))
    assert r.fingerprint()


def test_recipes_readme_documents_every_key():
    from cube_gen.recipe import RECIPE_SCHEMA

    text = (REPO / "recipes" / "README.md").read_text()

    def walk(schema, prefix=""):
        for key, spec in schema.items():
            path = f"{prefix}.{key}" if prefix else key
            if isinstance(spec, dict):
                yield from walk(spec, path)
            else:
                yield path

    missing = [p for p in walk(RECIPE_SCHEMA) if f"`{p}`" not in text]
    assert not missing, f"recipes/README.md does not document {missing}"
