"""A synthetic stand-in for the published dataset, in exactly its layout.

``write_synthetic(out, preset)`` writes ``observations.parquet``, ``vision_index.parquet``,
``vision_embeddings/embeddings_{file_idx:06d}.parquet`` and the two descriptive JSON files.
The data has structure worth exploring: species in genera and families, observations in
habitat patches with seasonal and diurnal rhythms, language embeddings clustered by family,
vision features with a per-species signature on an object-shaped patch region.
Deterministic for a seed.
"""

from __future__ import annotations

import calendar
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from . import source_layout as L
from .photos import write_photos


@dataclass(frozen=True)
class Preset:
    n_observations: int
    n_species: int
    n_with_images: int
    n_vision_observations: int
    n_embeddings: int
    embeddings_per_file: int
    n_test: int  # observations in the temporal_test split (year 2025)
    embedding_dtype: str = "float32"  # value type of the embedding list column
    compression: str = "zstd"


PRESETS = {
    # unit tests: a few MB; float16 embeddings, coarse values that compress well
    "tiny": Preset(240, 12, 220, 5, 6, 3, 20, embedding_dtype="float16"),
    # all observations and species, 256 embeddings (about 1.3 GB of coarse float16)
    "demo": Preset(33_665, 232, 31_136, 224, 256, 32, 2_730, embedding_dtype="float16"),
    # the published counts (about 100 GB, float32 lists as published)
    "full": Preset(33_665, 232, 31_136, 7_113, 7_949, 50, 2_730),
}

FAMILIES = {
    "Fagaceae": ["Quercus", "Castanea"],
    "Arecaceae": ["Sabal", "Serenoa", "Rhapidophyllum"],
    "Asteraceae": ["Bidens", "Solidago", "Coreopsis", "Liatris", "Helianthus", "Eupatorium",
                   "Baccharis", "Pityopsis"],
    "Fabaceae": ["Lupinus", "Chamaecrista", "Crotalaria", "Erythrina", "Cercis", "Desmodium"],
    "Ericaceae": ["Vaccinium", "Lyonia", "Rhododendron", "Bejaria"],
    "Lamiaceae": ["Salvia", "Monarda", "Callicarpa", "Conradina"],
    "Myricaceae": ["Morella"],
    "Pinaceae": ["Pinus"],
    "Cupressaceae": ["Taxodium", "Juniperus"],
    "Magnoliaceae": ["Magnolia", "Liriodendron"],
    "Lauraceae": ["Persea"],
    "Sapindaceae": ["Acer"],
    "Vitaceae": ["Vitis", "Parthenocissus", "Ampelopsis"],
    "Apocynaceae": ["Asclepias", "Rhabdadenia"],
    "Convolvulaceae": ["Ipomoea"],
    "Rubiaceae": ["Cephalanthus", "Psychotria", "Richardia"],
    "Orchidaceae": ["Encyclia", "Spiranthes", "Habenaria"],
    "Cyperaceae": ["Rhynchospora", "Cyperus"],
    "Poaceae": ["Andropogon", "Aristida", "Spartina", "Muhlenbergia"],
    "Bromeliaceae": ["Tillandsia"],
    "Passifloraceae": ["Passiflora"],
    "Nymphaeaceae": ["Nymphaea", "Nuphar"],
    "Pontederiaceae": ["Pontederia"],
    "Annonaceae": ["Asimina"],
}
EPITHETS = [
    "virginiana", "palmetto", "repens", "pilosa", "odora", "lanceolata", "laurifolia",
    "grandiflora", "nigra", "rubra", "americana", "floridana", "carolinensis", "elliottii",
    "myrtifolia", "geminata", "chapmanii", "incarnata", "tuberosa", "cerifera", "borbonia",
    "corymbosum", "ferruginea", "humilis", "angustifolia", "tomentosa", "glabra", "serrulata",
    "leptocephala", "cuneifolia", "fasciculata", "herbacea", "canadensis", "rotundifolia",
    "quinquefolia", "arborea", "pumila", "maritima", "stricta", "virgata", "aquatica",
    "distichum", "palustris", "spicata", "racemosa", "umbellata", "occidentalis", "punctata",
    "hirsuta", "minor", "major", "alba", "lutea", "purpurea", "coccinea", "cordata",
    "scoparius", "bakeri", "mariana", "australis", "longifolia", "parviflora", "incana",
    "usneoides", "recurvata", "fistulosa", "verticillata", "trifoliata", "sessilifolia",
]
HABITATS = ("pine flatwoods", "scrub", "hammock", "swamp", "marsh", "sandhill", "urban")


def _unique_ints(rng: np.random.Generator, lo: int, hi: int, n: int) -> np.ndarray:
    """``n`` distinct random integers in [lo, hi), in random order."""
    out = np.unique(rng.integers(lo, hi, size=int(n * 1.3) + 16))
    while len(out) < n:
        out = np.unique(np.concatenate([out, rng.integers(lo, hi, size=n)]))
    return rng.permutation(out)[:n]


def _species_table(rng: np.random.Generator, n_species: int) -> pd.DataFrame:
    genera = [(fam, gen) for fam, gens in FAMILIES.items() for gen in gens]
    names, fams, gens = set(), [], []
    rows = []
    while len(rows) < n_species:
        fam, gen = genera[len(rows) % len(genera)] if len(rows) < len(genera) else \
            genera[int(rng.integers(len(genera)))]
        epithet = EPITHETS[int(rng.integers(len(EPITHETS)))]
        name = f"{gen} {epithet}"
        if name in names:
            continue
        names.add(name)
        fams.append(fam)
        gens.append(gen)
        rows.append(name)
    taxon_ids = _unique_ints(rng, 2_000_000, 9_999_999, n_species)
    abundance = 1.0 / np.arange(1, n_species + 1) ** 0.9
    abundance = rng.permutation(abundance)
    return pd.DataFrame({
        "taxon_name": rows, "family": fams, "genus": gens,
        "taxon_id": [str(t) for t in taxon_ids],
        "abundance": abundance / abundance.sum(),
        "peak_month": rng.integers(1, 13, size=n_species),
        "habitat": rng.integers(0, len(HABITATS), size=n_species),
    })


def _language_embeddings(rng: np.random.Generator, species: pd.DataFrame) -> np.ndarray:
    """7168-d vectors: family centroid + genus offset + species noise (float32)."""
    fam_codes = {f: i for i, f in enumerate(sorted(set(species.family)))}
    gen_codes = {g: i for i, g in enumerate(sorted(set(species.genus)))}
    fam_centres = rng.normal(0, 1.0, (len(fam_codes), L.LANGUAGE_DIM))
    gen_offsets = rng.normal(0, 0.45, (len(gen_codes), L.LANGUAGE_DIM))
    out = np.empty((len(species), L.LANGUAGE_DIM), np.float32)
    for i, row in enumerate(species.itertuples()):
        out[i] = (fam_centres[fam_codes[row.family]] + gen_offsets[gen_codes[row.genus]]
                  + rng.normal(0, 0.25, L.LANGUAGE_DIM))
    return out


def _observations(rng: np.random.Generator, preset: Preset, species: pd.DataFrame) -> pd.DataFrame:
    n = preset.n_observations
    bbox = L.BBOX
    # habitat patches: centres inside the bounding box, each of one habitat type
    n_patches = 48
    centres = np.column_stack([
        rng.uniform(bbox["south"] + 0.05, bbox["north"] - 0.05, n_patches),
        rng.uniform(bbox["west"] + 0.05, bbox["east"] - 0.05, n_patches),
    ])
    patch_habitat = np.arange(n_patches) % len(HABITATS)
    patch_radius = rng.uniform(0.01, 0.06, n_patches)
    sp = rng.choice(len(species), size=n, p=species.abundance.to_numpy())
    sp[: len(species)] = np.arange(len(species))  # every species observed at least once
    rng.shuffle(sp)
    lat = np.empty(n)
    lon = np.empty(n)
    habitat = species.habitat.to_numpy()
    patches_of = {h: np.flatnonzero(patch_habitat == h) for h in set(habitat)}
    for i, s in enumerate(sp):
        options = patches_of[habitat[s]]
        p = options[int(rng.integers(len(options)))] if rng.random() < 0.85 else \
            int(rng.integers(n_patches))
        lat[i] = centres[p, 0] + rng.normal(0, patch_radius[p])
        lon[i] = centres[p, 1] + rng.normal(0, patch_radius[p])
    lat = np.clip(lat, bbox["south"], bbox["north"])
    lon = np.clip(lon, bbox["west"], bbox["east"])
    # years: growing activity 2010-2024, exactly n_test observations in 2025
    years_train = np.arange(L.YEARS[0], L.TEST_YEAR)
    w = np.exp((years_train - years_train[0]) * 0.28)
    year = rng.choice(years_train, size=n, p=w / w.sum())
    test = rng.choice(n, size=preset.n_test, replace=False)
    year[test] = L.TEST_YEAR
    # season: month around each species' peak; diurnal: daylight hours
    peak = species.peak_month.to_numpy()[sp]
    month = ((peak - 1 + np.round(rng.normal(0, 1.6, n)).astype(int)) % 12) + 1
    month = np.where(year == L.TEST_YEAR, ((month - 1) % 10) + 1, month)  # 2025: Jan-Oct
    days_in = {(y, m): calendar.monthrange(int(y), int(m))[1]
               for y, m in set(zip(year.tolist(), month.tolist(), strict=True))}
    day = np.array([rng.integers(1, days_in[(y, m)] + 1)
                    for y, m in zip(year.tolist(), month.tolist(), strict=True)])
    hour = np.clip(np.round(rng.normal(12.5, 2.6, n)), 6, 20).astype(int)
    minute = rng.integers(0, 60, n)
    second = rng.integers(0, 60, n)
    df = pd.DataFrame({
        "gbif_id": _unique_ints(rng, 1_000_000_000, 5_999_999_999, n),
        "sp": sp, "latitude": lat, "longitude": lon, "year": year,
        "month": month.astype(float), "day": day.astype(float), "hour": hour.astype(float),
        "minute": minute.astype(float), "second": second.astype(float),
    })
    # missing time fields: some without seconds, some without time of day, a few without day
    u = rng.random(n)
    df.loc[u < 0.10, "second"] = np.nan
    df.loc[u < 0.05, ["hour", "minute", "second"]] = np.nan
    df.loc[u < 0.015, ["day", "hour", "minute", "second"]] = np.nan
    df.loc[u < 0.004, ["month", "day", "hour", "minute", "second"]] = np.nan
    df["split"] = np.where(df.year == L.TEST_YEAR, "temporal_test", "train")
    return df


def _image_urls(rng: np.random.Generator, n: int, n_with_images: int):
    num = np.zeros(n, dtype=np.int64)
    with_images = rng.choice(n, size=n_with_images, replace=False)
    num[with_images] = 1 + rng.geometric(0.55, size=n_with_images) - 1
    num = np.minimum(num, 8)
    photo = iter(_unique_ints(rng, 10_000_000, 400_000_000, int(num.sum())))
    size = ["original", "large", "medium"]
    urls = [
        [f"https://inaturalist-open-data.s3.amazonaws.com/photos/{next(photo)}/"
         f"{size[int(rng.integers(3))]}.jpg" for _ in range(k)]
        for k in num
    ]
    return urls, num


def _vision_plan(rng: np.random.Generator, preset: Preset, num_images: np.ndarray):
    """Which observations get embeddings and how many (at most their number of images)."""
    candidates = np.flatnonzero(num_images > 0)
    multi = candidates[num_images[candidates] > 1]
    n_obs = preset.n_vision_observations
    extra = preset.n_embeddings - n_obs
    # prefer observations with several images so the extra embeddings fit
    n_multi = min(len(multi), max(extra, 1), n_obs)
    chosen = list(rng.choice(multi, size=n_multi, replace=False))
    rest = np.setdiff1d(candidates, chosen)
    chosen += list(rng.choice(rest, size=n_obs - n_multi, replace=False))
    chosen = np.array(sorted(chosen))
    count = np.ones(len(chosen), dtype=np.int64)
    room = num_images[chosen] - 1
    i = 0
    while extra > 0:
        j = i % len(chosen)
        if room[j] > 0:
            count[j] += 1
            room[j] -= 1
            extra -= 1
        i += 1
        if i > 100 * len(chosen) and extra > 0:
            raise ValueError("preset asks for more embeddings than images")
    return chosen, count


def _object_mask(rng: np.random.Generator) -> np.ndarray:
    """A soft ellipse on the 24 x 24 patch grid: the plant in the picture."""
    cy, cx = rng.uniform(7, 17, 2)
    ry, rx = rng.uniform(4, 9, 2)
    angle = rng.uniform(0, np.pi)
    y, x = np.mgrid[0:L.N_PATCH, 0:L.N_PATCH]
    dy, dx = y - cy, x - cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
    return np.clip(1.2 - (u * u + v * v), 0, 1).astype(np.float32)


def _spatial_modes(rng: np.random.Generator) -> np.ndarray:
    """(24, 24, 1408): a few smooth spatial patterns (parts, shading, position) along random
    feature directions with decaying strength, so that principal components 2-5 are
    structure rather than noise, as in real ViT patch features."""
    y, x = np.mgrid[0:L.N_PATCH, 0:L.N_PATCH] / L.N_PATCH
    out = np.zeros((L.N_PATCH, L.N_PATCH, L.N_FEATURES), np.float32)
    for amp in MODE_AMPLITUDES:
        ky, kx = rng.uniform(-1.5, 1.5, 2)
        field = np.cos(2 * np.pi * (ky * y + kx * x) + rng.uniform(0, 2 * np.pi))
        out += (amp * field)[..., None].astype(np.float32) * rng.normal(
            0, 1, L.N_FEATURES).astype(np.float32)[None, None, :]
    return out


MODE_AMPLITUDES = (0.30, 0.22, 0.16, 0.12, 0.09, 0.065)


def synth_embedding(seed: int, signature: np.ndarray, coarse: bool = False) -> np.ndarray:
    """One (8, 24, 24, 1408) float16 embedding: species signature on an object region.

    ``coarse`` quantises values to 1/8 so that files compress well (tiny preset).
    """
    rng = np.random.default_rng(seed)
    mask = _object_mask(rng)
    background = rng.normal(0, 0.35, L.N_FEATURES).astype(np.float32)
    base = (mask[..., None] * (1.6 * signature[None, None, :])
            + (1 - mask[..., None]) * background[None, None, :]
            + rng.normal(0, 0.3, (L.N_PATCH, L.N_PATCH, L.N_FEATURES)).astype(np.float32))
    base += _spatial_modes(rng)
    frames = np.empty(L.VISION_SHAPE, np.float32)
    for f in range(L.N_FRAMES):  # near-copies: the same still image, 8 tubelets
        frames[f] = base + np.float32(0.03) * rng.standard_normal(base.shape, np.float32)
    if coarse:
        frames = np.round(frames * 8) / 8
    return frames.astype(np.float16)


def _write_embedding_file(job) -> list[tuple[int, int, int]]:
    """Write one embedding file (runs in a worker process); returns its vision index rows."""
    path, file_idx, dtype, compression, seed, rows, signatures = job
    schema = L.embeddings_schema(dtype)
    value_type = schema.field("embedding").type.value_type
    out = []
    # the embedding list is neither dictionary-encoded nor given statistics (11.7M values)
    with pq.ParquetWriter(path, schema, compression=compression,
                          use_dictionary=["gbif_id", "original_shape"],
                          write_statistics=["gbif_id"]) as writer:
        for row_idx, ((o, k, gid), signature) in enumerate(zip(rows, signatures, strict=True)):
            emb_seed = int(np.random.SeedSequence([seed, o, k]).generate_state(1)[0])
            feats = synth_embedding(emb_seed, signature, coarse=dtype == "float16")
            values = np.ascontiguousarray(feats.ravel().astype(dtype))
            batch = pa.table({
                "gbif_id": pa.array([gid], pa.int64()),
                "embedding": pa.ListArray.from_arrays(
                    pa.array([0, L.EMBEDDING_LENGTH], pa.int32()),
                    pa.Array.from_buffers(value_type, values.size,
                                          [None, pa.py_buffer(values.view(np.uint8))])),
                "original_shape": pa.array([L.ORIGINAL_SHAPE], pa.string()),
            }, schema=schema)
            writer.write_table(batch)  # one row group per embedding: bounded memory
            out.append((gid, file_idx, row_idx))
    return out


def write_synthetic(out: str, preset: str | Preset = "tiny", seed: int = 0,
                    progress: bool = True, overwrite: bool = False) -> str:
    """Write a synthetic dataset folder at ``out`` and return its path.

    Written into a temporary sibling folder and renamed into place when complete,
    so an interrupted run leaves no half dataset at ``out``.
    """
    p = PRESETS[preset] if isinstance(preset, str) else preset
    if os.path.exists(out):
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synth-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the dataset is for everyone
    try:
        _write(tmp, p, seed, progress)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclass
class Plan:
    """Everything drawn from the seed before any file is written (:func:`plan_dataset`)."""

    species: pd.DataFrame
    language: np.ndarray  # (species, 7168) float32
    obs: pd.DataFrame  # one row per observation, ``sp`` its species row
    urls: list
    num_images: np.ndarray
    vis_obs: np.ndarray  # observations with embeddings
    vis_count: np.ndarray  # and how many each
    signatures: np.ndarray  # (species, 1408) vision signature
    emb_rows: list  # (observation row, image number) of every embedding, by observation
    file_of: list  # embedding file of each entry of emb_rows
    has_vision: np.ndarray
    file_lists: list  # per observation: the embedding files holding its embeddings


def plan_dataset(p: Preset, seed: int = 0) -> Plan:
    """Draw the species, observations, images and embedding plan of a dataset."""
    rng = np.random.default_rng(seed)
    species = _species_table(rng, p.n_species)
    language = _language_embeddings(rng, species)
    obs = _observations(rng, p, species)
    urls, num_images = _image_urls(rng, len(obs), p.n_with_images)
    vis_obs, vis_count = _vision_plan(rng, p, num_images)
    # vision signatures per species: genus direction + species detail, 1408-d
    gen_dirs = {g: rng.normal(0, 1, L.N_FEATURES) for g in sorted(set(species.genus))}
    signatures = np.stack([
        0.7 * gen_dirs[g] + 0.7 * rng.normal(0, 1, L.N_FEATURES) for g in species.genus
    ]).astype(np.float32)

    # embeddings: ordered by observation, spread over files of embeddings_per_file rows
    emb_rows = [(int(o), k) for o, c in zip(vis_obs, vis_count, strict=True) for k in range(c)]
    file_of = [i // p.embeddings_per_file for i in range(len(emb_rows))]
    has_vision = np.zeros(len(obs), dtype=bool)
    has_vision[vis_obs] = True
    file_lists: list[list[int]] = [[] for _ in range(len(obs))]
    for (o, _), f in zip(emb_rows, file_of, strict=True):
        if f not in file_lists[o]:
            file_lists[o].append(f)
    return Plan(species, language, obs, urls, num_images, vis_obs, vis_count, signatures,
                emb_rows, file_of, has_vision, file_lists)


def observation_table(plan: Plan, rows: np.ndarray | None = None) -> pa.Table:
    """``observations.parquet`` rows (all, or the observation rows ``rows`` in that order)."""
    obs, species = plan.obs, plan.species
    idx = np.arange(len(obs)) if rows is None else np.asarray(rows, np.int64)
    sp = obs.sp.to_numpy()[idx]
    return pa.table({
        "gbif_id": pa.array(obs.gbif_id.to_numpy()[idx], pa.int64()),
        "taxon_id": pa.array(species.taxon_id.to_numpy()[sp], pa.string()),
        "taxon_name": pa.array(species.taxon_name.to_numpy()[sp], pa.string()),
        "latitude": pa.array(obs.latitude.to_numpy()[idx], pa.float64()),
        "longitude": pa.array(obs.longitude.to_numpy()[idx], pa.float64()),
        "year": pa.array(obs.year.to_numpy()[idx], pa.int64()),
        # missing time fields as parquet nulls, as pandas writes NaN (read back as NaN)
        **{f: pa.array(obs[f].to_numpy()[idx], pa.float64(), from_pandas=True)
           for f in L.TIME_FIELDS[1:]},
        "image_urls": pa.array([plan.urls[i] for i in idx], pa.list_(pa.string())),
        "num_images": pa.array(plan.num_images[idx], pa.int64()),
        "has_vision": pa.array(plan.has_vision[idx], pa.bool_()),
        "vision_file_indices": pa.array([plan.file_lists[i] for i in idx],
                                        pa.list_(pa.int64())),
        "language_embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(plan.language[sp].ravel(), pa.float32()), L.LANGUAGE_DIM
        ).cast(pa.list_(pa.float32())),
        "split": pa.array(obs.split.to_numpy()[idx], pa.string()),
    }, schema=L.OBSERVATIONS_SCHEMA)


def _write(root: str, p: Preset, seed: int, progress: bool) -> None:
    plan = plan_dataset(p, seed)
    species, obs, emb_rows, file_of = plan.species, plan.obs, plan.emb_rows, plan.file_of
    signatures = plan.signatures
    n_files = -(-len(emb_rows) // p.embeddings_per_file)
    sp = obs.sp.to_numpy()

    def tables_and_photos() -> None:  # everything but the embedding files
        table = observation_table(plan)
        pq.write_table(table, f"{root}/{L.OBSERVATIONS_FILE}", compression=p.compression,
                       row_group_size=4096)
        del table
        write_photos(root, seed, emb_rows, gbif, sp, species.taxon_name.to_numpy(), progress)

    gbif = obs.gbif_id.to_numpy()
    index_rows = []
    os.makedirs(f"{root}/{L.EMBEDDINGS_DIR}")
    bar = tqdm(total=len(emb_rows), desc="synthetic embeddings", unit="emb", disable=not progress)
    jobs = []
    for f in range(n_files):
        rows = [r for r, fi in zip(emb_rows, file_of, strict=True) if fi == f]
        jobs.append((f"{root}/{L.embedding_file_name(f)}", f, p.embedding_dtype, p.compression,
                     seed, [(o, k, int(gbif[o])) for o, k in rows],
                     signatures[[sp[o] for o, _ in rows]]))
    workers = min(os.cpu_count() or 1, 4, len(jobs)) if len(emb_rows) >= 32 else 1
    if workers > 1:  # files are independent and each embedding depends only on its seed
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(_write_embedding_file, job) for job in jobs]
            tables_and_photos()  # meanwhile, here (it would otherwise run before or after)
            for fut in as_completed(futures):
                rows_done = fut.result()
                index_rows.extend(rows_done)
                bar.update(len(rows_done))
        index_rows.sort(key=lambda r: (r[1], r[2]))
    else:
        tables_and_photos()
        for job in jobs:
            rows_done = _write_embedding_file(job)
            index_rows.extend(rows_done)
            bar.update(len(rows_done))
    bar.close()
    index = pd.DataFrame(index_rows, columns=["gbif_id", "file_idx", "row_idx"])
    pq.write_table(pa.Table.from_pandas(index, schema=L.VISION_INDEX_SCHEMA, preserve_index=False),
                   f"{root}/{L.VISION_INDEX_FILE}")

    with open(f"{root}/{L.VISION_METADATA_FILE}", "w") as fh:
        json.dump({"model": "V-JEPA 2 ViT-g/384 (synthetic stand-in)",
                   "original_shape": [L.N_TOKENS, L.N_FEATURES],
                   "reshape": [L.N_FRAMES, L.N_PATCH, L.N_PATCH, L.N_FEATURES],
                   "num_embeddings": len(emb_rows), "num_files": n_files}, fh, indent=2)
    with open(f"{root}/{L.DATASET_INFO_FILE}", "w") as fh:
        json.dump({"name": "central_florida_native_plants (synthetic)", "version": "0.2.0",
                   "synthetic": True, "seed": seed,
                   "num_observations": len(obs), "num_species": int(p.n_species),
                   "bbox": L.BBOX}, fh, indent=2)
