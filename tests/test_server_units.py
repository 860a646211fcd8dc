"""Server parts without HTTP: byte-bounded cache, parameter parsing, shared analysis
functions, the generated xcube config, and the plugin context inside an in-process
xcube ``Server`` (config validation, on-demand UMAP-RGB, worker threads, timeouts)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from cube_gen import analysis
from cube_gen import schema as S
from cube_gen.access import CubeSet, Query
from cube_gen.embedding_math import umap_rgb
from server.common import params as P
from server.common.cache import ByteLRU
from server.common.errors import ParamError, Unavailable
from server.deepearth import controllers as C
from server.deepearth.params import EmbeddingId
from server.launch import _dataset_location, make_config, serve

# -- cache --------------------------------------------------------------------------------


def test_byte_lru_evicts_by_bytes_in_lru_order():
    c = ByteLRU(1000, max_item_fraction=0.5)
    for k in "abcd":
        assert c.put(k, b"", nbytes=300)
    assert c.bytes == 900 and len(c) == 3 and "a" not in c  # a evicted on d
    assert c.get("b") == b""  # b is now most recent
    c.put("e", b"", nbytes=300)
    assert "c" not in c and "b" in c and c.bytes <= 1000
    assert not c.put("huge", b"", nbytes=600)  # over half the capacity: not kept
    s = c.stats()
    assert s["evictions"] == 2 and s["rejected"] == 1 and s["hits"] == 1
    assert s["items"] == 3 and s["bytes"] == 900 and s["capacity_bytes"] == 1000


def test_byte_lru_sizes_arrays_and_computes_once():
    c = ByteLRU(10_000_000)
    calls = []

    def compute():
        calls.append(1)
        time.sleep(0.2)
        return np.zeros(1000, np.float64)

    out = []
    threads = [threading.Thread(target=lambda: out.append(c.get_or_compute("k", compute)))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(out) == 6 and all(o is out[0] for o in out)
    assert 8000 <= c.bytes <= 8200
    with pytest.raises(ZeroDivisionError):
        c.get_or_compute("bad", lambda: 1 / 0)
    assert "bad" not in c and c.stats()["in_flight"] == 0


# -- parameters ---------------------------------------------------------------------------
def q(**kw):
    return {k: [v] for k, v in kw.items()}


def test_time_bounds_cover_whole_periods():
    assert str(P.time(q(end="2020"), "end", end=True)) == "2020-12-31 23:59:59.999999999"
    assert str(P.time(q(end="2020-02"), "end", end=True)) == "2020-02-29 23:59:59.999999999"
    assert str(P.time(q(end="2020-02-03"), "end", end=True)) == "2020-02-03 23:59:59.999999999"
    assert str(P.time(q(end="2020-02-03T10:00"), "end", end=True)) == "2020-02-03 10:00:00"
    assert str(P.time(q(start="2020"), "start")) == "2020-01-01 00:00:00"
    assert str(P.time(q(start="2020-01-01T12:00:00+02:00"), "start")) == "2020-01-01 10:00:00"
    for bad in ("soon", "2020-13", "99999", "0001-01-01"):
        with pytest.raises(ParamError) as e:
            P.time(q(start=bad), "start")
        assert e.value.parameter == "start" and e.value.allowed


def test_slices_bboxes_and_repeats():
    assert P.slice_param(q(f="3"), "f", 8) == slice(3, 4)
    assert P.slice_param(q(f=":2"), "f", 8) == slice(0, 2)
    assert P.slice_param(q(f="5:"), "f", 8) == slice(5, 8)
    assert P.slice_param({}, "f", 8) == slice(0, 8)
    for bad in ("8", "2:2", "-1:3", "x"):
        with pytest.raises(ParamError):
            P.slice_param(q(f=bad), "f", 8)
    assert P.bbox(q(bbox="-82,28,-81,29")) == (-82, 28, -81, 29)
    for bad in ("-82,28,-81", "0,0,1,nan", "0,95,1,96", "1,0,0,1"):
        with pytest.raises(ParamError):
            P.bbox(q(bbox=bad))
    with pytest.raises(ParamError) as e:
        P.integer({"k": ["1", "2"]}, "k")
    assert e.value.parameter == "k"
    with pytest.raises(ParamError) as e:
        P.check_known({"limit": ["1"], "colour": ["x"]}, ["limit"])
    assert e.value.parameter == "colour" and e.value.allowed == ["limit"]


# -- analysis -----------------------------------------------------------------------------
def test_top_k_cosine_is_exact_and_deterministic():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 16)).astype(np.float32)
    x[10] = x[20] = x[30]  # ties
    unit = analysis.unit_rows(x)
    rows, scores = analysis.top_k_cosine(unit, x[30], 5)
    assert rows[:3].tolist() == [10, 20, 30] and np.allclose(scores[:3], 1.0)
    brute = unit @ unit[30]
    order = sorted(range(200), key=lambda i: (-brute[i], i))
    assert rows.tolist() == order[:5]
    rows, _ = analysis.top_k_cosine(unit, x[30], 5, candidates=np.arange(100, 200),
                                    exclude=np.array([order[5]]))
    assert all(r >= 100 for r in rows)
    assert rows.tolist() == [i for i in order if i >= 100 and i != order[5]][:5]
    rows, _ = analysis.top_k_cosine(unit, x[0], 1000)
    assert len(rows) == 200


def test_diversity_known_values():
    d = analysis.diversity(np.array([5, 5, 0, 0]))
    assert d["richness"] == 2 and d["shannon"] == pytest.approx(np.log(2))
    assert d["simpson_dominance"] == pytest.approx(0.5)
    assert d["gini_simpson"] == pytest.approx(0.5) and d["inverse_simpson"] == pytest.approx(2)
    assert d["evenness"] == pytest.approx(1.0)
    one = analysis.diversity(np.array([7]))
    assert one["shannon"] == 0 and one["evenness"] is None
    assert analysis.diversity(np.zeros(3))["shannon"] is None


def test_resolve_species(tiny_cubes):
    cs = CubeSet.open(str(tiny_cubes))
    t = cs.species_table()
    for i in (0, 5, 11):
        name = t.taxon_name.iat[i]
        assert analysis.resolve_species(cs, t.taxon_id.iat[i]) == i
        assert analysis.resolve_species(cs, name.upper()) == i
        assert analysis.resolve_species(cs, S.species_slug(name)) == i
    with pytest.raises(KeyError):
        analysis.resolve_species(cs, "../../etc")


def test_region_statistics_whole_set(tiny_cubes):
    cs = CubeSet.open(str(tiny_cubes))
    stats = analysis.region_statistics(cs, Query())
    assert stats["observations"] == 240
    assert sum(r["count"] for r in stats["species"]) == 240
    assert sum(r["count"] for r in stats["by_year"]) == 240
    assert sum(r["count"] for r in stats["by_month"]) + stats["month_unknown"] == 240
    assert stats["by_split"] == {"train": 220, "temporal_test": 20}


# -- config -------------------------------------------------------------------------------
def test_make_config(tiny_cubes, tmp_path):
    # without a viewer/ folder: the plugin's own styles (value ranges from color_value_max)
    cfg = make_config(str(tiny_cubes), port=9999, address="0.0.0.0", repo_root=tmp_path)
    assert cfg["port"] == 9999 and cfg["address"] == "0.0.0.0"
    # xcube reads the grid pyramids through the plugin's checked data store (a lost chunk is
    # an error naming it, cube_gen.xcube_levels) ...
    assert "Datasets" not in cfg
    (store,) = cfg["DataStores"]
    assert store["StoreId"] == "deepearth"
    assert store["StoreParams"]["url"] == str(Path(tiny_cubes).resolve())
    # one dataset per grid pyramid, all years first (the viewer opens on it)
    datasets = store["Datasets"]
    assert [d["Identifier"] for d in datasets] == \
        [S.GRID_ALL_YEARS, S.GRID, S.GRID_MONTH_OF_YEAR, S.GRID_SPECIES]
    ds = datasets[1]
    assert ds["Path"] == S.GRID and ds["Style"] == "deepearth-grid"
    # ... or by plain path
    plain = make_config(str(tiny_cubes), repo_root=tmp_path, checked_grids=False)
    assert plain["Datasets"][1]["FileSystem"] == "file"
    assert Path(plain["Datasets"][1]["Path"]).name == "grid.levels"
    assert {"observation_count", "species_richness", "embedding_r"} <= set(ds["Variables"])
    assert any(v.startswith(S.TOP_SPECIES_PREFIX) for v in ds["Variables"])
    assert datasets[0]["Variables"][0] == "species_richness"
    style = cfg["Styles"][1]
    m = style["ColorMappings"]
    customs = {c["Identifier"]: c for c in cfg["CustomColorMaps"]}
    import xarray as xr
    g0 = xr.open_zarr(Path(tiny_cubes) / "grid.levels" / "0.zarr")
    for name in ("observation_count", "species_richness", "shannon_diversity"):
        # colour ranges fitted at build time (grid-variable registry), custom colour maps
        colors = customs[m[name]["ColorBar"]]["Colors"]
        assert m[name]["ValueRange"] == [colors[0][0], colors[-1][0]]
        assert colors[-1][0] == g0[name].attrs["color_value_max"]
    assert m["rgb"]["Red"] == {"Variable": "embedding_r", "ValueRange": [0.0, 1.0]}
    assert cfg["DeepEarth"]["CubeSet"] == str(Path(tiny_cubes).resolve())
    assert "Viewer" not in cfg
    # with the repository's viewer/ folder: the viewer hook
    cfg = make_config(str(tiny_cubes))
    assert cfg["Viewer"]["Configuration"]["Path"].endswith("viewer")
    assert cfg["DataStores"][0]["Datasets"][1]["Identifier"] == "grid" and "DeepEarth" in cfg


def test_dataset_location_for_s3():
    loc = _dataset_location("s3://bucket/cubes", {"anon": True, "client_kwargs": {
        "endpoint_url": "http://localhost:9000", "region_name": "eu-central-1"}})
    assert loc == {"dataset": {"FileSystem": "s3", "Path": "bucket/cubes/grid.levels",
                               "Anonymous": True, "Endpoint": "http://localhost:9000",
                               "Region": "eu-central-1"}}
    loc = _dataset_location("s3://bucket/cubes/", {"key": "k", "secret": "s"})
    assert loc["store"]["StoreId"] == "s3"
    assert loc["store"]["StoreParams"] == {"root": "bucket/cubes",
                                           "storage_options": {"key": "k", "secret": "s"}}


def test_serve_dry_run_prints_config(tiny_cubes, tmp_path, capsys):
    out = tmp_path / "cfg" / "config.yml"
    assert serve(str(tiny_cubes), port=8123, config_out=str(out), dry_run=True,
                 storage_options_json=None) == 0
    printed = capsys.readouterr().out
    cfg = yaml.safe_load(printed)
    assert cfg == yaml.safe_load(out.read_text())
    assert cfg["port"] == 8123 and "DeepEarth" in cfg
    assert "grid" in [d["Identifier"] for d in cfg["DataStores"][0]["Datasets"]]
    with pytest.raises(Exception, match="storage-options"):
        serve(str(tiny_cubes), storage_options_json="{bad", dry_run=True)


# -- the context inside an in-process xcube Server -----------------------------------------
def _server(config: dict):
    from xcube.server.server import Server
    from xcube.server.webservers.tornado import TornadoFramework

    # only this API (and none of the others in the environment): isolated from their state
    return Server(TornadoFramework(), {**config, "api_spec": {"includes": ["deepearth"]}})


def _without_umap_rgb(source: Path, dst: Path) -> Path:
    """A cube set built with ``cubes.vision.umap_rgb: false`` (no precomputed UMAP-RGB)."""
    from conftest import tiny_recipe_data

    from cube_gen.pipeline import run_recipe
    from cube_gen.recipe import parse_recipe

    data = tiny_recipe_data(source, dst, vision={"umap_rgb": False})
    run_recipe(parse_recipe(data), progress=False)
    return dst


def test_context_in_xcube_server_computes_umap_rgb_on_demand(tiny_source, tmp_path):
    cubes = _without_umap_rgb(Path(tiny_source), tmp_path / "cubes")
    cfg = make_config(str(cubes))
    cfg["DeepEarth"]["CacheBytes"] = 50_000_000
    server = _server(cfg)  # validates the DeepEarth section against its schema
    ctx = server.ctx.get_api_ctx("deepearth")
    cs = ctx.cubeset
    gid, num = int(cs.image_table().gbif_id[2]), int(cs.image_table().image_number[2])
    pos, rgb = C.umap_rgb_precomputed(ctx, EmbeddingId(gid, num))
    assert pos == 2 and rgb is None
    computed = C.umap_rgb_computed(ctx, pos)
    np.testing.assert_array_equal(computed, umap_rgb(cs.features(2)))
    hits = ctx.cache.stats()["hits"]
    assert C.umap_rgb_computed(ctx, pos) is computed and ctx.cache.stats()["hits"] == hits + 1


def test_context_runs_work_off_the_loop_with_timeouts(tiny_cubes):
    cfg = make_config(str(tiny_cubes))
    cfg["DeepEarth"].update(RequestTimeout=0.5, MaxWorkers=2)
    ctx = _server(cfg).ctx.get_api_ctx("deepearth")
    order = []

    async def main():
        loop_thread = threading.get_ident()

        def slow():
            assert threading.get_ident() != loop_thread
            time.sleep(0.3)
            order.append("slow")

        def quick():
            order.append("quick")
            return threading.get_ident()

        slow_task = asyncio.ensure_future(ctx.run(slow))
        await asyncio.sleep(0.05)
        tid = await ctx.run(quick)
        assert tid != loop_thread
        await slow_task
        with pytest.raises(Unavailable):
            await ctx.run(time.sleep, 2)

    asyncio.run(main())
    assert order == ["quick", "slow"]
    assert ctx.status()["timeouts"] == 1


def test_context_rejects_work_when_the_queue_is_full(tiny_cubes):
    cfg = make_config(str(tiny_cubes))
    cfg["DeepEarth"].update(MaxWorkers=1, MaxQueued=1)
    ctx = _server(cfg).ctx.get_api_ctx("deepearth")

    async def main():
        first = asyncio.ensure_future(ctx.run(time.sleep, 0.4))
        await asyncio.sleep(0.05)  # running
        second = asyncio.ensure_future(ctx.run(time.sleep, 0.01))
        await asyncio.sleep(0.05)  # queued
        with pytest.raises(Unavailable, match="busy"):
            await ctx.run(time.sleep, 0.01)
        await asyncio.gather(first, second)
        await ctx.run(time.sleep, 0.01)  # accepted again

    asyncio.run(main())
    assert ctx.status()["rejected_busy"] == 1


def test_context_without_section_answers_unavailable():
    ctx = _server({}).ctx.get_api_ctx("deepearth")
    assert not ctx.configured
    with pytest.raises(Unavailable) as e:
        ctx.cubeset  # noqa: B018
    assert e.value.status == 503 and e.value.parameter == "DeepEarth"


def test_context_reports_unreachable_cubeset(tmp_path):
    cfg = {"DeepEarth": {"CubeSet": str(tmp_path / "missing")}}
    ctx = _server(cfg).ctx.get_api_ctx("deepearth")
    assert ctx.configured and "cubeset.json is missing" in ctx.open_error
    with pytest.raises(Unavailable):
        ctx.cubeset  # noqa: B018
