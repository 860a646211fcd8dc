"""``deepearth simulate``: a small simulated cube set (scale 0.02) in the real layout, real
tensors where materialised and a clear 404 everywhere else."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import xarray as xr

from cube_gen import schema as S
from cube_gen import source_layout as L
from cube_gen.access import CubeSet
from cube_gen.cli import main
from cube_gen.errors import NotFoundError, NotMaterialised
from cube_gen.simulate import scaled_preset
from cube_gen.synth import plan_dataset, synth_embedding

SCALE = 0.02
K = 3


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("simulate") / "cubes"
    assert main(["simulate", "--scale", str(SCALE), "--out", str(out), "--materialise", str(K),
                 "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def cs(sim):
    return CubeSet.open(str(sim))


def _other(cs):
    done = set(cs.simulated["materialised"])
    return next(i for i in range(len(cs.image_table())) if i not in done)


def test_counts_follow_the_scale(sim, cs):
    p = scaled_preset(SCALE)
    assert cs.manifest["counts"] == {"observations": p.n_observations, "species": p.n_species,
                                     "images": p.n_embeddings}
    src = f"{sim}-source"
    assert pq.ParquetFile(f"{src}/{L.OBSERVATIONS_FILE}").metadata.num_rows == p.n_observations
    assert pq.ParquetFile(f"{src}/{L.VISION_INDEX_FILE}").metadata.num_rows == p.n_embeddings
    info = json.load(open(f"{src}/{L.DATASET_INFO_FILE}"))
    assert info["simulated"] is True and info["scale"] == SCALE
    big = scaled_preset(100)
    assert (big.n_observations, big.n_embeddings, big.n_species) == (3_366_500, 794_900, 232)


def test_manifest_says_simulated(cs):
    sim = cs.simulated
    assert sim["scale"] == SCALE and len(sim["materialised"]) == K
    assert all(0 <= i < cs.manifest["counts"]["images"] for i in sim["materialised"])
    assert cs.manifest["generator"].endswith(" simulate")


def test_layout_opens_as_a_real_set(cs):
    for cube in (S.OBSERVATIONS, S.SPECIES, S.VISION):
        ds = xr.open_zarr(cs.cube_url(cube), consolidated=True)
        assert set(S.CUBE_VARS[cube]) <= set(ds.variables), cube
    vision = xr.open_zarr(cs.cube_url(S.VISION), consolidated=True)
    assert vision.attrs["deepearth_simulated"] is True
    assert vision.sizes["image"] == cs.manifest["counts"]["images"]
    grid = cs.grid(0)
    assert "observation_count" in grid and int(grid.observation_count.sum()) == \
        cs.manifest["counts"]["observations"]
    # the small per-image products are present for every image
    n = vision.sizes["image"]
    assert cs.pooled().shape == (n, L.N_FEATURES) and np.isfinite(cs.pooled()).all()
    assert np.isfinite(vision.umap.values).all()
    other = _other(cs)
    assert cs.umap_rgb(other).shape == (L.N_PATCH, L.N_PATCH, 3)
    assert all(np.isfinite(v) for v in cs.image_stats(other).values())
    assert len(cs.select_observations(bbox=(-81.9, 28.0, -80.9, 29.0))) > 0


def test_materialised_features_are_the_synthetic_embeddings(cs):
    pos = cs.simulated["materialised"][0]
    row = cs.image_table().iloc[pos]
    plan = plan_dataset(scaled_preset(SCALE), 0)
    o = int(np.flatnonzero(plan.obs.gbif_id.to_numpy() == row.gbif_id)[0])
    seed = int(np.random.SeedSequence([0, o, int(row.image_number)]).generate_state(1)[0])
    expected = synth_embedding(seed, plan.signatures[int(plan.obs.sp.iat[o])])
    got = cs.features(pos)
    assert got.shape == L.VISION_SHAPE and np.array_equal(got, expected)
    assert np.array_equal(cs.features_batch([pos])[0], expected)
    pooled = expected.astype(np.float32).mean(axis=(0, 1, 2))
    assert np.allclose(cs.pooled([pos])[0], pooled, atol=1e-3)
    att = cs.attention(pos, "l2norm")
    assert att.shape == (L.N_PATCH, L.N_PATCH) and np.isfinite(att).all() and att.max() > 0


def test_other_images_raise_not_materialised(cs):
    other = _other(cs)
    row = cs.image_table().iloc[other]
    text = (f"features not materialised in this simulated cube (gbif_id {int(row.gbif_id)}, "
            f"image {int(row.image_number)}")
    for call in (lambda: cs.features(other), lambda: cs.features(other, frame=0),
                 lambda: cs.features_batch([cs.simulated["materialised"][0], other])):
        with pytest.raises(NotMaterialised) as err:
            call()
        assert text in str(err.value)
        assert isinstance(err.value, NotFoundError)
    with pytest.raises(NotMaterialised, match="attention not materialised in this simulated"):
        cs.attention(other)


def test_torch_dataset_raises_not_materialised(cs):
    pytest.importorskip("torch")
    from cube_gen.torch_data import CubeDataset

    other = _other(cs)
    full = CubeDataset(cs, features="full", images=[other])
    with pytest.raises(NotMaterialised, match="features not materialised"):
        full[0]
    pooled = CubeDataset(cs, features="pooled", images=[other])  # small products: real
    assert pooled[0]["features"].shape[-1] == L.N_FEATURES


def test_http_answers_404_not_zeros(sim, cs, tmp_path):
    import requests

    from server.launch import serving

    other = _other(cs)
    row = cs.image_table().iloc[other]
    done = cs.image_table().iloc[cs.simulated["materialised"][0]]
    with serving(str(sim), tmp_path) as url:
        base = f"{url}/deepearth/embeddings"
        for suffix in ("features", "attention.png", "attention.json"):
            r = requests.get(f"{base}/{int(row.gbif_id)}/{int(row.image_number)}/{suffix}",
                             timeout=60)
            assert r.status_code == 404, (suffix, r.status_code, r.text[:300])
            assert "not materialised in this simulated cube" in r.json()["error"]["message"]
        ok = requests.get(f"{base}/{int(done.gbif_id)}/{int(done.image_number)}/features",
                          timeout=60)
        assert ok.status_code == 200 and len(ok.content) > 0
        pooled = requests.get(f"{base}/{int(row.gbif_id)}/{int(row.image_number)}/pooled",
                              timeout=60)
        assert pooled.status_code == 200


def test_approximate_projection_above_the_exact_limit(cs):
    from cube_gen.errors import UsageError
    from cube_gen.pca import _pca_scores
    from cube_gen.simulate import vision_projection

    pooled = cs.pooled()
    assert vision_projection(pooled, "auto") is None and vision_projection(pooled, "recipe") is None
    pca = vision_projection(pooled, "pca")[0]
    assert np.allclose(pca, _pca_scores(pooled, 3)[:, :3])
    with pytest.raises(UsageError, match="--projection"):
        vision_projection(pooled, "tsne")
    coords, method = vision_projection(pooled, "approximate")
    assert coords.shape == (len(pooled), 3) and np.isfinite(coords).all()
    assert "approximate" in method
    # images of one species lie closer together than random pairs
    sp = cs.image_table().species_index.to_numpy()
    same = sp[:, None] == sp[None, :]
    d = np.linalg.norm(coords[:, None] - coords[None, :], axis=-1)
    assert d[same & ~np.eye(len(sp), dtype=bool)].mean() < d[~same].mean()
