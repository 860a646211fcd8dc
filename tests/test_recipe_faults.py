"""Recipe runs under faults: SIGKILL at random points, broken sources over a published set."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import tiny_recipe_data
from cubecompare import assert_cubesets_equal, open_cube

from cube_gen import schema as S
from cube_gen.errors import SourceError
from cube_gen.pipeline import run_recipe
from cube_gen.recipe import parse_recipe

TRIALS = 3


def _write_recipe(path: Path, source: Path, target: Path) -> Path:
    data = tiny_recipe_data(source, target, vision={"umap_rgb": False, "batch_size": 1})
    path.write_text(yaml.safe_dump(data))
    return path


def _gen(recipe: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cube_gen.cli", "gen", str(recipe), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def reference(tiny_source, tmp_path_factory):
    """An uninterrupted build and how long it took as a subprocess."""
    work = tmp_path_factory.mktemp("faults")
    target = work / "reference"
    recipe = _write_recipe(work / "reference.yaml", tiny_source, target)
    t = time.monotonic()
    proc = _gen(recipe)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]
    return target, time.monotonic() - t


def _visible_cubes_are_complete(target: Path, reference: Path) -> None:
    """Whatever a killed run left at final paths is complete and right."""
    present = [c for c in S.CUBES if (target / S.CUBE_PATHS[c]).exists()]
    for cube in present:
        a = open_cube(str(reference), cube).load()
        b = open_cube(str(target), cube).load()
        assert set(a.variables) == set(b.variables), cube
    if (target / S.MANIFEST).exists():
        assert len(present) == len(S.CUBES)


@pytest.mark.parametrize("trial", range(TRIALS))
def test_sigkill_at_a_random_point_resumes_to_an_identical_cube(trial, reference, tiny_source,
                                                                tmp_path):
    ref_target, duration = reference
    rng = random.Random(1000 + trial)
    target = tmp_path / "cubes"
    recipe = _write_recipe(tmp_path / "r.yaml", tiny_source, target)
    delay = rng.uniform(0.5, duration * 0.95)
    proc = _gen(recipe)
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _visible_cubes_are_complete(target, ref_target)
    out = subprocess.run([sys.executable, "-m", "cube_gen.cli", "gen", str(recipe), "--quiet"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"killed after {delay:.1f} s: {out.stderr[-3000:]}"
    assert_cubesets_equal(str(ref_target), str(target))
    assert not (target / ".staging").exists()


# -- broken sources over a published cube set -------------------------------------------------
def _break_observations_bytes(src: Path) -> tuple[str, str]:
    f = src / "observations.parquet"
    data = bytearray(f.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = b"\x00" * 4096
    f.write_bytes(bytes(data))
    return "observations.parquet", ""


def _truncate_embedding(src: Path) -> tuple[str, str]:
    f = src / "vision_embeddings" / "embeddings_000001.parquet"
    table = pq.read_table(f)
    emb = table.column("embedding").to_pylist()
    emb[1] = emb[1][:-1408]  # one patch token short
    table = table.set_column(1, "embedding", pa.array(emb, table.schema.field("embedding").type))
    pq.write_table(table, f)
    return "embeddings_000001.parquet", "row 1"


def _duplicate_gbif_id(src: Path) -> tuple[str, str]:
    f = src / "observations.parquet"
    table = pq.read_table(f)
    ids = table.column("gbif_id").to_pylist()
    ids[7] = ids[3]
    table = table.set_column(0, "gbif_id", pa.array(ids, pa.int64()))
    pq.write_table(table, f)
    return "observations.parquet", "row 7"


def _missing_file(src: Path) -> tuple[str, str]:
    os.remove(src / "vision_embeddings" / "embeddings_000000.parquet")
    return "vision_index.parquet", "embeddings_000000.parquet"


@pytest.mark.parametrize("breaker", [_break_observations_bytes, _truncate_embedding,
                                     _duplicate_gbif_id, _missing_file])
def test_broken_source_stops_naming_file_and_row_and_keeps_the_published_set(
        breaker, tiny_cubes, tiny_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_source, src)
    target = tmp_path / "cubes"
    shutil.copytree(tiny_cubes, target)
    before = {p: p.stat().st_mtime_ns for p in target.rglob("*")}
    manifest = (target / S.MANIFEST).read_text()
    file, row = breaker(src)
    data = tiny_recipe_data(src, target, vision={"umap_rgb": False})
    data["metadata"]["title"] = "a changed recipe rebuilds every cube"
    with pytest.raises(SourceError) as err:
        run_recipe(parse_recipe(data), progress=False)
    assert file in str(err.value) and row in str(err.value), str(err.value)
    # the published set is exactly as before (staging aside)
    after = {p: p.stat().st_mtime_ns for p in target.rglob("*") if ".staging" not in p.parts}
    assert after == before
    assert (target / S.MANIFEST).read_text() == manifest
    assert json.loads(manifest)["recipe"] != parse_recipe(data).fingerprint()
