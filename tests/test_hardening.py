"""Hardening (issue 8): load, hostile input and storage faults against real ``xcube serve``.

* Load: a second process (``tests/load_client.py``) mixes xcube tiles, WMTS tiles, tensor
  fetches, attention PNGs and similarity queries at 16 and 64 connections for a fixed
  time: no errors, and the server's resident memory stays under a bound made of the
  configured byte budgets (see :func:`memory_bound`).
* Hostile input: path traversal in every path parameter (encoded, double-encoded, raw),
  bad ids, huge k and bounding boxes, 64 KiB and 1 MiB query strings, malformed JSON:
  each gets a clear 4xx naming the parameter, never a traceback, and the server stays
  healthy.
* Faults: the cube set moved away and back, damaged chunk files, the S3 server stopped
  and restarted: clear 503/500 JSON for the requests that need the missing data, health
  says so, and the server recovers without a restart.

Every request has a timeout; nothing may hang. The server serves a copy of ``tiny_cubes``
(the fault tests break and repair it).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import copy_cubes
from load_client import build_plan, find_server_process, rss_bytes, run_load

from cube_gen.access import CubeSet
from server.common.handler import MAX_QUERY_BYTES
from server.common.resources import RESPONSE_BUFFER_BYTES
from server.launch import free_port, make_config, running, write_config
from server.wmts import TILE_CACHE_BYTES

TIMEOUT = 30  # seconds any request may take, faults included
CACHE_BYTES = 48 * 1024 * 1024  # a 13 MB tensor is over a quarter of it: never cached
MAX_WORKERS = 4
MAX_HEADER_BYTES = 4 * 1024 * 1024  # tornado reads request heads up to this size
LOAD_SECONDS = 5.0
PASSWD = "root:x:0:0"


@dataclass
class Served:
    url: str
    port: int
    cubes: Path  # the served copy
    ids: list[tuple[int, int]]  # (gbif_id, image_number) by image position
    species: list[str]  # slugs
    log: Path


@pytest.fixture(scope="module")
def reference(tiny_cubes: Path) -> CubeSet:
    return CubeSet.open(str(tiny_cubes))


@pytest.fixture(scope="module")
def served(tiny_cubes: Path, reference: CubeSet,
           tmp_path_factory: pytest.TempPathFactory) -> Served:
    work = tmp_path_factory.mktemp("hardening")
    cubes = work / "cubes"
    copy_cubes(tiny_cubes, cubes)  # links kept: damage reaches the served version
    port = free_port()
    config = make_config(str(cubes), port=port, cache_bytes=CACHE_BYTES,
                         plugin={"MaxWorkers": MAX_WORKERS, "RequestTimeout": 20})
    config["tornado"] = {"max_header_size": MAX_HEADER_BYTES}
    path = write_config(config, work / "config.yml")
    t = reference.image_table()
    ids = list(zip(t.gbif_id.tolist(), t.image_number.tolist(), strict=True))
    with running(path, port, work / "xcube-serve.log") as url:
        species = [s["slug"] for s in get(url, "/deepearth/species").json()["species"]]
        yield Served(url, port, cubes, ids, species, work / "xcube-serve.log")


def get(base: str, path: str, **params) -> requests.Response:
    return requests.get(base + path, params=params or None, timeout=TIMEOUT)


def raw_get(port: int, path: str) -> tuple[int, str, bytes]:
    """GET ``path`` exactly as written (requests would resolve ``..`` segments)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type") or "", r.read()
    finally:
        conn.close()


def no_leak(body: bytes) -> None:
    text = body.decode("utf-8", "replace")
    assert "Traceback" not in text and 'File "/' not in text, text[:500]
    assert PASSWD not in text, text[:500]


def json_error(status: int, content_type: str, body: bytes, expected_status=None,
               parameter=None) -> dict:
    """The ``error`` object of a JSON error body, checked."""
    no_leak(body)
    assert content_type.startswith("application/json"), (status, content_type, body[:300])
    err = json.loads(body)["error"]
    assert err["status_code"] == status and err["message"], err
    if expected_status is not None:
        assert status == expected_status, err
    if parameter is not None:
        assert err.get("parameter") == parameter, err
    return err


def ows_error(status: int, content_type: str, body: bytes) -> None:
    no_leak(body)
    assert 400 <= status < 500, (status, body[:300])
    assert content_type.startswith("application/xml") and b"ExceptionReport" in body, body[:300]


def healthy(s: Served) -> None:
    r = get(s.url, "/deepearth/health")
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text[:1000]


# -- hostile input -------------------------------------------------------------------------
TRAVERSALS = {
    "encoded": "..%2F..%2F..%2Fetc%2Fpasswd",
    "double-encoded": "..%252F..%252F..%252Fetc%252Fpasswd",
    "encoded dots": "%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "backslashes": "..%5C..%5C..%5Cetc%5Cpasswd",
    "nul": "passwd%00",
    "raw": "../../../etc/passwd",
}


def test_path_traversal_in_every_path_parameter_is_a_clear_4xx(served: Served):
    s = served
    g, n = s.ids[0]
    wmts = "/deepearth/wmts/1.0.0"
    layer = "grid.observation_count"
    for label, bad in TRAVERSALS.items():
        raw = label == "raw"
        # (path, parameter named by the JSON error; None: a WMTS exception report)
        cases = [
            (f"/deepearth/observations/{bad}", "gbif_id"),
            (f"/deepearth/embeddings/{bad}/{n}/features", "gbif_id"),
            (f"/deepearth/embeddings/{g}/{bad}/features", "image_number"),
            (f"/deepearth/embeddings/{bad}/{n}/pooled", "gbif_id"),
            (f"/deepearth/embeddings/{g}/{bad}/attention.png", "image_number"),
            (f"/deepearth/embeddings/{g}/{bad}/attention.json", "image_number"),
            (f"/deepearth/embeddings/{g}/{bad}/umap_rgb.png", "image_number"),
            (f"/deepearth/embeddings/{g}/{bad}/stats", "image_number"),
            (f"/deepearth/embeddings/{bad}/{n}/similar", "gbif_id"),
            (f"/deepearth/species/{bad}", "species"),
            (f"/deepearth/species/{bad}/similar", "species"),
            (f"/deepearth/no/{bad}", "path"),
            (f"{wmts}/{bad}/default/default/WorldWebMercatorQuad/0/0/0.png", None),
            (f"{wmts}/{layer}/{bad}/default/WorldWebMercatorQuad/0/0/0.png", None),
            (f"{wmts}/{layer}/default/{bad}/WorldWebMercatorQuad/0/0/0.png", None),
            (f"{wmts}/{layer}/default/default/{bad}/0/0/0.png", None),
            (f"{wmts}/{layer}/default/default/WorldWebMercatorQuad/{bad}/0/0.png", None),
            (f"{wmts}/{layer}/default/default/WorldWebMercatorQuad/0/0/{bad}.png", None),
            (f"/deepearth/wmts/kvp?SERVICE=WMTS&REQUEST=GetTile&LAYER={bad}"
             "&TILEMATRIXSET=WorldWebMercatorQuad&TILEMATRIX=0&TILEROW=0&TILECOL=0", None),
            (f"/deepearth/wmts/legend/{bad}.png", None),
            (f"/tiles/grid/{bad}/0/0/0", "xcube"),
            (f"/tiles/{bad}/observation_count/0/0/0", "xcube"),
            (f"/viewer/{bad}", "static"),
        ]
        for path, parameter in cases:
            status, ctype, body = raw_get(s.port, path)
            assert 400 <= status < 500, (label, path, status, body[:300])
            no_leak(body)
            if parameter in ("xcube", "static"):
                continue  # xcube's own 404 / tornado's static-file 403 or 404
            if parameter is None:
                if raw and "/legend/" in path:  # not under the WMTS routes at all
                    json_error(status, ctype, body, 404, "path")
                else:
                    ows_error(status, ctype, body)
                continue
            # raw "../" segments no longer match the route: the catch-all names the path
            expected = "path" if raw and "/" in bad else parameter
            json_error(status, ctype, body, parameter=expected)
    healthy(s)


def test_bad_ids_huge_k_and_huge_bounding_boxes_are_clear_400s(served: Served):
    s = served
    g, n = s.ids[0]
    sp = s.species[0]
    cases = []
    for bad in ("-1", "abc", "1.5", "1e3", "%201", "1_000", "0x10", "%D9%A1", "%2B5",
                "%2C5", "9" * 30, "-" + "9" * 30):
        cases += [(f"/deepearth/observations/{bad}", "gbif_id"),
                   (f"/deepearth/embeddings/{bad}/{n}/features", "gbif_id"),
                   (f"/deepearth/embeddings/{g}/{bad}/pooled", "image_number")]
    for path in ("/deepearth/observations/+5", "/deepearth/observations/1,2",
                 f"/deepearth/embeddings/{g}/1;2/pooled", f"/deepearth/embeddings/1:2/{n}/stats"):
        # xcube's route patterns leave out ;:@&=+$, in a segment: no route, a 404
        status, ctype, body = raw_get(s.port, path)
        json_error(status, ctype, body, 404, "path")
    for k in ("1000000000", "10" + "0" * 30, "-1", "abc", "1.5"):
        cases += [(f"/deepearth/embeddings/{g}/{n}/similar?k={k}", "k"),
                  (f"/deepearth/species/{sp}/similar?k={k}", "k")]
    for bbox in ("-1e308,-1e308,1e308,1e308", "-1e999,0,0,0", "-181,-90,180,90",
                 "-180,-91,180,90", "nan,0,1,1", "0,0,1", "0,0,1,1,2", "a,b,c,d",
                 ",".join(["1"] * 1000)):
        for path in ("/deepearth/observations", "/deepearth/stats/region",
                     "/deepearth/umap/vision", f"/deepearth/embeddings/{g}/{n}/similar"):
            cases.append((f"{path}?bbox={bbox}", "bbox"))
    for path, parameter in cases:
        status, ctype, body = raw_get(s.port, path)
        json_error(status, ctype, body, 400, parameter)
    # the whole world is a valid bounding box
    r = get(s.url, "/deepearth/stats/region", bbox="-180,-90,180,90")
    assert r.status_code == 200 and r.json()["observations"] == 240
    # WMTS: far outside the tile matrix, negative, non-numeric
    kvp = ("/deepearth/wmts/kvp?SERVICE=WMTS&REQUEST=GetTile&LAYER=grid.observation_count"
           "&TILEMATRIXSET=WorldWebMercatorQuad")
    for z, y, x in (("1000000000", "0", "0"), ("0", "1000000000", "0"), ("0", "0", "-1"),
                    ("x", "0", "0"), ("9" * 5000, "0", "0")):
        status, ctype, body = raw_get(s.port, f"{kvp}&TILEMATRIX={z}&TILEROW={y}&TILECOL={x}")
        ows_error(status, ctype, body)
    healthy(s)


def test_long_query_strings_answer_414_naming_the_parameter(served: Served):
    s = served
    g, n = s.ids[0]
    for size in (64 * 1024, 1024 * 1024):
        for path, name, query in (
                ("/deepearth/observations", "species", "species=" + "a" * size),
                ("/deepearth/observations", "x" * 64, "x" * size + "=1"),
                (f"/deepearth/embeddings/{g}/{n}/similar", "bbox", "bbox=" + "1," * (size // 2)),
                ("/deepearth/species", "padding", "padding=" + "%41" * (size // 3))):
            status, ctype, body = raw_get(s.port, f"{path}?{query}")
            err = json_error(status, ctype, body, 414, name)
            assert str(MAX_QUERY_BYTES) in err["message"]
    # just under the limit: the parameter is read (and rejected for what it says)
    status, ctype, body = raw_get(s.port, "/deepearth/observations?species="
                                  + "a" * (MAX_QUERY_BYTES - 100))
    json_error(status, ctype, body, 400, "species")
    healthy(s)


def test_request_heads_over_tornados_limit_close_only_that_connection(served: Served):
    """Beyond the server config's ``tornado: max_header_size`` tornado answers nothing and
    closes the connection; the server is unharmed."""
    with pytest.raises(requests.ConnectionError):
        get(served.url, "/deepearth/observations", x="a" * (MAX_HEADER_BYTES + 1024))
    healthy(served)


def test_malformed_json_bodies_are_400s_naming_the_field(served: Served):
    s = served
    url = s.url + "/deepearth/embeddings/batch"
    g, n = s.ids[0]
    cases = [
        (b"", "body"),
        (b"{", "body"),
        (b'{"ids": [[1, 0]]', "body"),
        (b"\xff\xfe\x00{", "body"),
        (b"[" * 200_000 + b"]" * 200_000, "body"),  # deeper than the JSON parser goes
        (b'{"ids": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "body"),
        (b"null", "body"),
        (b'"ids"', "body"),
        (b"12", "body"),
        (b'{"ids": {"a": 1}}', "ids"),
        (b'{"ids": "1,0"}', "ids"),
        (b'{"ids": [[NaN, 0]]}', "ids"),
        (b'{"ids": [[Infinity, 0]]}', "ids"),
        (b'{"ids": [[1e400, 0]]}', "ids"),
        (b'{"ids": [[' + b"9" * 5000 + b", 0]]}", "body"),  # longer than int() reads
        (b'{"ids": [[-1, 0]]}', "ids"),
        (b'{"ids": [[1, 0]], "kind": {"$ne": 1}}', "kind"),
        (b'{"ids": [[1, 0]], "../../etc/passwd": 1}', "../../etc/passwd"),
        (json.dumps({"ids": [[g, n]] * 10001}).encode(), "ids"),
    ]
    for body, parameter in cases:
        r = requests.post(url, data=body, timeout=TIMEOUT,
                          headers={"Content-Type": "application/json"})
        json_error(r.status_code, r.headers.get("Content-Type", ""), r.content, 400, parameter)
    healthy(s)


# -- load ----------------------------------------------------------------------------------
def test_response_budget_bounds_bytes_in_flight():
    """The byte budget of large responses (server.common.cache.ByteBudget) never lets more than
    its capacity through, serves large ones in order, lets small ones pass while they fit,
    and forgets waiters that gave up."""
    import asyncio
    import random

    from server.common.cache import ByteBudget

    async def scenario():
        budget = ByteBudget(100)
        in_flight = []

        async def job(n: int) -> None:
            got = await budget.acquire(n)
            in_flight.append(budget.used)
            await asyncio.sleep(random.random() / 200)
            budget.release(got)

        rng = random.Random(0)
        await asyncio.gather(*(job(rng.choice([1, 30, 60, 150])) for _ in range(300)))
        assert max(in_flight) <= 100 and budget.used == 0 and budget.stats()["waiting"] == 0
        held = await budget.acquire(90)
        large = asyncio.create_task(budget.acquire(50))
        await asyncio.sleep(0)
        assert not large.done()
        assert await asyncio.wait_for(budget.acquire(1), 1) == 1  # small: passes the queue
        budget.release(1)
        with pytest.raises(TimeoutError):  # a waiter that gives up leaves the queue
            await asyncio.wait_for(budget.acquire(60), 0.01)
        budget.release(held)
        assert await large == 50 and budget.used == 50
        budget.release(50)
        assert budget.used == 0 and budget.stats()["waiting"] == 0

    asyncio.run(scenario())


def memory_bound(rss_warm: int, tensor_bytes: int) -> int:
    """The most the server's RSS may reach under load, in bytes.

    After a warm-up pass (every code path imported, feature files mapped, caches filled)
    load may only add what the byte budgets allow: the result cache (``CacheBytes``, also
    partly filled already), binary responses in flight (``RESPONSE_BUFFER_BYTES``), the
    WMTS tile cache (``TILE_CACHE_BYTES``), one tensor plus its encoded copy per worker
    thread, and 128 MiB for the allocator's slack. Nothing in it grows with the number
    of connections.
    """
    return (rss_warm + CACHE_BYTES + RESPONSE_BUFFER_BYTES + TILE_CACHE_BYTES
            + MAX_WORKERS * 2 * tensor_bytes + 128 * 1024 * 1024)


def test_load_mix_at_16_and_64_connections(served: Served, reference: CubeSet, tmp_path):
    s = served
    plan = build_plan(s.url)
    assert {p["kind"] for p in plan} == {"tile", "wmts", "features", "features_slice",
                                        "attention", "similar"}
    server = find_server_process(s.port)
    assert server is not None
    with requests.Session() as session:  # warm-up: every request once
        for item in plan:
            r = session.get(s.url + item["path"], timeout=TIMEOUT)
            assert r.status_code == 200, (item, r.text[:300])
    rss_warm = rss_bytes(server)
    tensor_bytes = reference.features(0).nbytes
    bound = memory_bound(rss_warm, tensor_bytes)
    rows = []
    for connections in (16, 64):
        result = run_load(s.url, plan, connections, LOAD_SECONDS, tmp_path, timeout=TIMEOUT,
                          server=server)
        rows.append(result)
        assert result["errors"] == 0, result["error_samples"]
        assert result["requests"] >= connections, result
        assert set(result["by_kind"]) == {p["kind"] for p in plan}, result["by_kind"]
        assert result["peak_rss"] < bound, (
            f"peak RSS {result['peak_rss'] >> 20} MiB over the bound {bound >> 20} MiB "
            f"(warm {rss_warm >> 20} MiB)")
    print(f"\nwarm RSS {rss_warm >> 20} MiB, bound {bound >> 20} MiB")
    for r in rows:
        print(f"{r['connections']:>3} connections: {r['requests']} requests, {r['errors']} "
              f"errors, {r['rps']} req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
              f"peak RSS {r['peak_rss'] >> 20} MiB")
    health = get(s.url, "/deepearth/health").json()
    assert health["status"] == "ok"
    assert health["cache"]["bytes"] <= CACHE_BYTES
    buffers = health["server"]["response_buffer"]
    assert buffers["bytes"] == 0 and buffers["peak_bytes"] <= RESPONSE_BUFFER_BYTES


# -- faults: local disk --------------------------------------------------------------------
def npy(r: requests.Response) -> np.ndarray:
    assert r.status_code == 200, r.text[:500]
    return np.load(io.BytesIO(r.content), allow_pickle=False)


def test_cube_set_moved_away_answers_503_and_recovers_without_restart(
        served: Served, reference: CubeSet):
    s = served
    g, n = s.ids[4]
    e = f"/deepearth/embeddings/{g}/{n}"
    affected = [f"{e}/features", f"{e}/attention.json", f"{e}/attention.png?size=77",
                f"{e}/pooled", f"{e}/similar?k=3", f"{e}/stats", "/deepearth/species",
                f"/deepearth/species/{s.species[1]}", "/deepearth/umap/species",
                "/deepearth/observations?bbox=-81.3,28.4,-81.0,28.9&limit=3",
                "/deepearth/stats/region?start=2019"]
    for path in affected:  # all fine before
        assert get(s.url, path).status_code == 200, path
    away = s.cubes.with_name(s.cubes.name + ".away")
    os.rename(s.cubes, away)
    try:
        for path in affected:
            t0 = time.monotonic()
            r = get(s.url, path)
            assert time.monotonic() - t0 < TIMEOUT
            err = json_error(r.status_code, r.headers["Content-Type"], r.content, 503)
            assert "cannot be read" in err["message"] and "cubeset.json" in err["message"]
        r = get(s.url, "/deepearth/health")
        assert r.status_code == 503 and r.json()["status"] == "unavailable"
        assert r.json()["cubeset_status"]["reachable"] is False
        # what does not read the cube set is unaffected
        assert get(s.url, "/deepearth").status_code == 200
        assert get(s.url, "/openapi.json").status_code == 200
        # xcube's tiles: an answer (an error, or what xcube still holds), in time
        no_leak(get(s.url, "/tiles/grid/observation_count/6/27/17").content)
    finally:
        os.rename(away, s.cubes)
    for path in affected:
        r = get(s.url, path)
        assert r.status_code == 200, (path, r.text[:300])
    np.testing.assert_array_equal(npy(get(s.url, f"{e}/features")), reference.features(4))
    assert get(s.url, "/tiles/grid/observation_count/6/26/17").status_code == 200
    healthy(s)


def test_damaged_chunks_fail_only_their_embedding(served: Served, reference: CubeSet,
                                                 tmp_path: Path):
    s = served
    for g, n in s.ids:  # read (and memory-map) every chunk first
        npy(get(s.url, f"/deepearth/embeddings/{g}/{n}/features"))
    chunk = s.cubes / "vision.zarr" / "features" / "c"
    truncated = chunk / "0" / "0" / "0" / "0" / "0"
    garbage = chunk / "2" / "0" / "0" / "0" / "0"
    for f in (truncated, garbage):
        shutil.copy2(f, tmp_path / f"{f.parts[-5]}.bak")
    try:
        with open(truncated, "r+b") as f:  # in place: the server's map of it now ends early
            f.truncate(f.seek(0, 2) // 2)
        garbage.write_bytes(os.urandom(garbage.stat().st_size + 4096))
        for pos, (g, n) in enumerate(s.ids):
            r = get(s.url, f"/deepearth/embeddings/{g}/{n}/features")
            if pos in (0, 2):
                err = json_error(r.status_code, r.headers["Content-Type"], r.content, 500)
                assert "damaged" in err["message"], err
                assert f"vision.zarr/features/c/{pos}/0/0/0/0" in err["message"], err
                assert str(s.cubes) not in err["message"]  # no server paths
            else:
                np.testing.assert_array_equal(npy(r), reference.features(pos))
        g, n = s.ids[0]
        # the embedding's other data is intact
        assert get(s.url, f"/deepearth/embeddings/{g}/{n}/attention.png").status_code == 200
        assert get(s.url, f"/deepearth/embeddings/{g}/{n}/pooled").status_code == 200
        healthy(s)
    finally:
        for f in (truncated, garbage):
            shutil.copy2(tmp_path / f"{f.parts[-5]}.bak", f)
    for pos in (0, 2):  # repaired files are read anew
        g, n = s.ids[pos]
        np.testing.assert_array_equal(
            npy(get(s.url, f"/deepearth/embeddings/{g}/{n}/features")), reference.features(pos))


def _tile_with_data(cubes: Path, cube: str, var: str, z: int) -> tuple[int, int]:
    """(y, x) of the web-mercator tile at zoom ``z`` over the grid cell with most ``var``."""
    import math

    import xarray as xr

    v = xr.open_zarr(cubes / f"{cube}.levels" / "0.zarr")[var].squeeze()
    i, j = np.unravel_index(int(np.nanargmax(v.values)), v.shape)
    lat, lon = float(v.lat[i]), float(v.lon[j])
    n = 2 ** z
    y = (1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * n
    return int(y), int((lon + 180) / 360 * n)


def test_lost_grid_chunks_are_errors_in_xcubes_tiles_and_served_again_when_restored(
        served: Served, tmp_path: Path):
    s = served
    cube, var = "grid_all_years", "observation_count"
    y, x = _tile_with_data(s.cubes, cube, var, 10)
    tile = f"/tiles/{cube}/{var}/10/{y}/{x}"
    before = get(s.url, tile, crs="EPSG:3857")
    assert before.status_code == 200 and before.headers["Content-Type"] == "image/png"
    levels = s.cubes / f"{cube}.levels"
    moved = []
    for chunk in sorted(levels.glob(f"*.zarr/{var}/*")):
        if not chunk.name.startswith(".") and chunk.name != "zarr.json":
            dst = tmp_path / chunk.relative_to(levels)
            dst.parent.mkdir(parents=True, exist_ok=True)
            chunk.rename(dst)
            moved.append((dst, chunk))
    assert moved
    try:
        r = get(s.url, tile, crs="EPSG:3857")
        err = json_error(r.status_code, r.headers["Content-Type"], r.content, 500)
        # names the pyramid, level, array and chunk; never an empty tile passed off as data
        assert re.search(rf"chunk {cube}\.levels/\d+\.zarr/{var}/\S+ is missing",
                         err["message"]), err
        assert str(s.cubes) not in err["message"]
        # the other arrays of the pyramid are intact
        other = get(s.url, f"/tiles/{cube}/sampling_effort/10/{y}/{x}", crs="EPSG:3857")
        assert other.status_code == 200, other.text[:300]
    finally:
        for dst, chunk in moved:
            dst.rename(chunk)
    after = get(s.url, tile, crs="EPSG:3857")  # not cached: read again
    assert after.status_code == 200 and after.content == before.content


# -- faults: S3 ----------------------------------------------------------------------------
def test_s3_stopping_and_restarting_answers_503_and_recovers(
        tiny_cubes: Path, reference: CubeSet, tmp_path: Path):
    from s3_server import MotoS3

    moto = MotoS3(free_port())  # restarted on the same port below
    moto.start()
    try:
        _s3_outage(moto, tiny_cubes, reference, tmp_path)
    finally:
        moto.stop()


def _upload(moto, tiny_cubes: Path) -> None:
    import s3fs

    moto.create_bucket("deepearth")
    fs = s3fs.S3FileSystem(**moto.storage_options, skip_instance_cache=True)
    fs.put(str(tiny_cubes), "deepearth/cubes", recursive=True)


def _s3_outage(moto, tiny_cubes: Path, reference: CubeSet, tmp_path: Path) -> None:
    _upload(moto, tiny_cubes)
    t = reference.image_table()
    ids = list(zip(t.gbif_id.tolist(), t.image_number.tolist(), strict=True))
    plugin = {"CacheBytes": CACHE_BYTES, "RequestTimeout": 25, "MaxWorkers": 8}
    # botocore's default policy retries a refused connection for ~10 s per read; a server
    # is better off failing fast (the request timeout would cap it at 25 s anyway)
    env = {"AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "2"}
    port = free_port()
    config = make_config("s3://deepearth/cubes", port=port, storage_options=moto.storage_options,
                         cache_bytes=CACHE_BYTES, plugin=plugin)
    config_path = write_config(config, tmp_path / "config.yml")
    wmts = ("/deepearth/wmts/kvp?SERVICE=WMTS&REQUEST=GetTile&LAYER=grid.species_richness"
            "&TILEMATRIXSET=WorldWebMercatorQuad&TILEMATRIX={z}&TILEROW={y}&TILECOL={x}")
    with running(config_path, port, tmp_path / "xcube-serve.log", env=env) as url:
        g, n = ids[0]
        np.testing.assert_array_equal(npy(get(url, f"/deepearth/embeddings/{g}/{n}/features")),
                                      reference.features(0))
        assert get(url, wmts.format(z=5, y=13, x=8)).status_code == 200
        assert get(url, "/tiles/grid/observation_count/5/13/8").status_code == 200

        moto.stop()
        g, n = ids[3]
        # requests that must read the store (tensors are never cached here)
        affected = [f"/deepearth/embeddings/{g}/{n}/features",
                    f"/deepearth/embeddings/{g}/{n}/attention.json",
                    "/deepearth/observations?bbox=-81.3,28.4,-81.0,28.9&limit=3"]
        others = ["/tiles/grid/observation_count/6/26/17", wmts.format(z=6, y=26, x=17)]

        def timed(path):
            t0 = time.monotonic()
            r = get(url, path)
            return path, r, time.monotonic() - t0

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(timed, [*affected, *others, "/deepearth/health"]))
        print("\nS3 stopped:", [(p[:40], r.status_code, round(t, 1)) for p, r, t in results])
        for path, r, seconds in results:
            assert seconds < TIMEOUT, (path, seconds)
            no_leak(r.content)
            if path in affected:
                err = json_error(r.status_code, r.headers["Content-Type"], r.content, 503)
                assert "cube set" in err["message"], err
            if path == "/deepearth/health":
                assert r.status_code == 503 and r.json()["status"] == "unavailable"
            if path == others[0] and r.status_code != 200:  # xcube's own tiles read the
                # grid through the checked store (200 only from data already in memory,
                # compared with the tile after the recovery below)
                err = json_error(r.status_code, r.headers["Content-Type"], r.content, 503)
                assert "storage is unavailable" in err["message"], err

        moto.start()  # same port, empty: moto keeps its data in memory
        moto.create_bucket("deepearth")
        # an empty store must not read as missing chunks (fill values) with HTTP 200
        r = get(url, affected[0])
        err = json_error(r.status_code, r.headers["Content-Type"], r.content, 503)
        assert "cubeset.json is missing" in err["message"], err
        _upload(moto, tiny_cubes)
        deadline = time.monotonic() + TIMEOUT
        while get(url, "/deepearth/health").status_code != 200:
            assert time.monotonic() < deadline, "no recovery after the data came back"
            time.sleep(0.5)
        np.testing.assert_array_equal(npy(get(url, affected[0])), reference.features(3))
        for path in [*affected, *others]:
            r = get(url, path)
            assert r.status_code == 200, (path, r.text[:300])
            if path == others[0] and results[len(affected)][1].status_code == 200:
                assert r.content == results[len(affected)][1].content, "a tile changed"
