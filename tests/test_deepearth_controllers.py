"""The DeepEarth API's controllers and parameter groups in-process, without HTTP.

As xcube's own webapi tests do, the controllers are called with the API context of an
in-process xcube ``Server`` (the ``deepearth serve`` config of ``tiny_cubes``), and with a
:class:`~server.deepearth.controllers.LocalContext` (notebooks); their answers are compared
with the cubes read by :class:`cube_gen.access.CubeSet`. The parameter groups are checked
against the OpenAPI document: a default written there is the value read when the parameter
is absent.
"""

from __future__ import annotations

import numpy as np
import pytest

from cube_gen import analysis
from cube_gen.access import CubeSet
from cube_gen.errors import NotFoundError
from cube_gen.query import Query
from server.common import params as P
from server.common.errors import STATUS, NotFound, ParamError, problem_of, status_of
from server.deepearth import controllers as C
from server.deepearth import params as D
from server.deepearth.api import api
from server.deepearth.routes import DeepEarthHandler  # noqa: F401 - routes declared
from server.launch import make_config


@pytest.fixture(scope="module")
def ctx(tiny_cubes):
    """The ``deepearth`` API context of an in-process xcube Server."""
    from xcube.server.server import Server
    from xcube.server.webservers.tornado import TornadoFramework

    server = Server(TornadoFramework(), {**make_config(str(tiny_cubes)),
                                         "api_spec": {"includes": ["deepearth"]}})
    yield server.ctx.get_api_ctx("deepearth")
    server.ctx.on_dispose()


@pytest.fixture(scope="module")
def cs(tiny_cubes) -> CubeSet:
    return CubeSet.open(str(tiny_cubes))


def _embedding(cs: CubeSet, i: int = 0) -> D.EmbeddingId:
    t = cs.image_table()
    return D.EmbeddingId(int(t.gbif_id.iat[i]), int(t.image_number.iat[i]))


def test_observations_page_through_the_selection(ctx, cs):
    q = Query.make(split="train")
    want = cs.select_observations(q)
    seen = []
    offset = 0
    while offset is not None:
        page = C.observations(ctx, q, P.PageRequest(offset, 70))
        assert page["total"] == len(want) and page["returned"] == len(page["observations"])
        seen += [r["gbif_id"] for r in page["observations"]]
        offset = page["next_offset"]
    assert seen == cs.observations.gbif_id.values[want].tolist()


def test_species_tokens_resolve_or_name_the_parameter(ctx, cs):
    t = cs.species_table()
    name = str(t.taxon_name.iat[3])
    q = C.resolve(ctx, Query.make(species=(name.lower(), str(t.taxon_id.iat[5]))))
    assert q.species == (3, 5)
    with pytest.raises(ParamError) as e:
        C.resolve(ctx, Query.make(species=("no such plant",)))
    assert e.value.parameter == "species" and e.value.status == 400
    with pytest.raises(NotFound) as e:
        C.species(ctx, "no such plant", P.PageRequest(0, 1))
    assert e.value.status == 404 and e.value.parameter == "species"


def test_embedding_controllers_equal_the_cubes(ctx, cs):
    emb = _embedding(cs, 1)
    pos = cs.image_position(emb.gbif_id, emb.image_number)
    full = C.features(ctx, emb, D.FeatureSlice(), "float16")
    np.testing.assert_array_equal(full, cs.features(pos))
    part = C.features(ctx, emb, D.FeatureSlice("mean", "2:5", "7", None), "float32")
    want = cs.features(pos).astype(np.float32)[:, 2:5, 7:8, :].mean(axis=0, keepdims=True)
    np.testing.assert_allclose(part, want, rtol=1e-6)
    np.testing.assert_allclose(C.pooled(ctx, emb, "float32"), cs.pooled([pos])[0])
    att = C.attention(ctx, emb, D.AttentionMap("variance", "3"))
    np.testing.assert_allclose(att["raw"], cs.attention(pos, "variance", "3"), rtol=1e-6)
    png = C.attention_png(ctx, emb, D.AttentionStyle())
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert C.attention_png(ctx, emb, D.AttentionStyle()) is png  # cached
    batch = C.batch(ctx, D.BatchRequest([(emb.gbif_id, emb.image_number)] * 2, "features",
                                        "float16"))
    assert batch.shape == (2, *full.shape) and (batch[1] == full).all()


def test_lookups_raise_not_found_naming_the_parameter(ctx, cs):
    emb = _embedding(cs)
    with pytest.raises(NotFoundError) as e:
        C.pooled(ctx, D.EmbeddingId(emb.gbif_id, 99), "float32")
    assert e.value.parameter == "image_number" and emb.image_number in e.value.allowed
    problem = problem_of(e.value)
    assert problem.status == 404 and problem.body()["error"]["parameter"] == "image_number"
    with pytest.raises(NotFoundError) as e:
        C.observation(ctx, 1)
    assert e.value.parameter == "gbif_id"


def test_similar_and_region_statistics_are_the_analysis_ones(ctx, cs):
    emb = _embedding(cs)
    pos = cs.image_position(emb.gbif_id, emb.image_number)
    got = C.similar_embeddings(ctx, emb, 3)["results"]
    assert got == analysis.similar_embeddings(cs, pos, 3)
    q = Query.make(bbox=(-82.0, 27.0, -80.0, 29.0), split="train")
    assert C.region_stats(ctx, q) == analysis.region_statistics(cs, q)


def test_local_context_serves_notebooks(tiny_cubes, cs):
    local = C.LocalContext.open(str(tiny_cubes))
    emb = _embedding(cs, 2)
    assert C.observation(local, emb.gbif_id)["gbif_id"] == emb.gbif_id
    assert C.species_list(local)["count"] == len(cs.species_table())


def test_exception_status_table():
    assert STATUS[ParamError] == 400 and status_of(NotFoundError("x")) == 404
    assert status_of(KeyError("x")) == 500
    problem = problem_of(RuntimeError("secret path /etc/x"))
    assert problem.status == 500 and "/etc/x" not in problem.message
    assert "reference" in problem.message


def test_every_documented_default_is_the_value_read_when_absent():
    """Parameter groups: the OpenAPI default and the parsed default are one declaration."""
    inputs = P.Inputs({}, {"gbif_id": "1", "image_number": "0", "species": "x"}, b"",
                      dict(D.DEFAULTS))
    checked = 0
    for route in api.routes:
        groups = getattr(route.handler_cls, "groups", {})
        for group in groups.values():
            documented = {p["name"]: p["schema"]["default"] for p in group.openapi()
                          if p["in"] == "query" and "default" in p.get("schema", {})}
            if not documented:
                continue
            value = group.read(inputs)
            for name, default in documented.items():
                got = getattr(value, name) if hasattr(value, "__dataclass_fields__") else value
                assert got == default, (route.path, name, got, default)
                checked += 1
    assert checked >= 20
