"""Synthetic photos for the synthetic source: a picture for every embedded image, offline.

The published dataset links its photos on iNaturalist; the synthetic source keeps such
URLs (same layout) but the demo machine is offline, so :func:`write_photos` also draws a
small JPEG per embedded image into ``photos/{gbif_id}/{image_number}.jpg`` of the source
folder. The picture is consistent with the embedding: the plant occupies exactly the
object region (:func:`cube_gen.synth._object_mask` of the same seed) on which the
embedding carries its species signature, so an attention map drawn over the photo
("photo underneath") lights up on the plant. Colours follow the genus (leaf hue) and the
species (flower hue), so photos of one species look alike.

The cube build copies them (stage ``photos``, only when the source has a ``photos``
folder) into ``photos/`` of the cube set, where the viewer routes serve them
(``/explore/photos/{gbif_id}/{image_number}.jpg``, :func:`read_photo`); real data has no
such folder and keeps its iNaturalist URLs.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

PHOTOS_DIR = "photos"
PHOTO_SIZE = 192  # pixels per side (the embedding's 24 x 24 patches: 8 pixels each)
JPEG_QUALITY = 82


def photo_relpath(gbif_id: int, image_number: int) -> str:
    """Where a photo lies below the source folder."""
    return f"{PHOTOS_DIR}/{int(gbif_id)}/{int(image_number)}.jpg"


def photo_path(root: str | os.PathLike, gbif_id: int, image_number: int) -> Path | None:
    """The photo file of (gbif_id, image_number) below ``root`` (a source folder or its
    ``photos`` folder), or None when there is none."""
    root = Path(root)
    for base in (root, root.parent):
        p = base / photo_relpath(gbif_id, image_number)
        if p.is_file():
            return p
    return None


def _hue(key: str, lo: float = 0.0, hi: float = 1.0) -> float:
    h = int.from_bytes(key.encode()[:8].ljust(8, b"\0"), "little") * 0x9E3779B97F4A7C15
    return lo + (hi - lo) * ((h % 10_007) / 10_007)


def draw_photo(mask: np.ndarray, genus: str, species: str, seed: int,
               size: int = PHOTO_SIZE) -> np.ndarray:
    """(size, size, 3) uint8: a plant on the ``mask`` region (24 x 24 in [0, 1]) over soil
    and grass; leaf colour from the genus, flowers from the species."""
    rng = np.random.default_rng(seed)
    n = mask.shape[0]
    # the mask at pixel resolution, smoothly interpolated (bilinear on patch centres)
    c = (np.arange(size) + 0.5) * n / size - 0.5
    i0 = np.clip(np.floor(c).astype(int), 0, n - 1)
    i1 = np.clip(i0 + 1, 0, n - 1)
    w = np.clip(c - i0, 0, 1)
    rows = mask[i0] * (1 - w)[:, None] + mask[i1] * w[:, None]
    m = rows[:, i0] * (1 - w)[None, :] + rows[:, i1] * w[None, :]
    plant = np.clip((m - 0.15) / 0.5, 0, 1)[..., None]

    y, x = np.mgrid[0:size, 0:size] / size
    soil = np.stack([0.45 + 0.1 * y, 0.38 + 0.12 * y, 0.25 + 0.05 * y], -1)
    grass = np.array(colorsys.hsv_to_rgb(0.22, 0.45, 0.55))
    ground = 0.55 * soil + 0.45 * grass + rng.normal(0, 0.04, (size, size, 3))

    leaf = np.array(colorsys.hsv_to_rgb(_hue(genus, 0.22, 0.40), 0.75, 0.55))
    veins = 0.08 * np.sin(2 * np.pi * (x * 9 + y * 5 + rng.uniform()))[..., None]
    leaves = leaf + veins + rng.normal(0, 0.05, (size, size, 3))
    flower = np.array(colorsys.hsv_to_rgb(_hue(species), 0.8, 0.95))
    dots = (rng.uniform(size=(size // 8, size // 8)) > 0.8).repeat(8, 0).repeat(8, 1)
    flowers = (dots[..., None] * (m[..., None] > 0.6)) * 0.8
    body = leaves * (1 - flowers) + flower * flowers
    img = ground * (1 - plant) + body * plant
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_photos(root: str | os.PathLike, seed: int, emb_rows: Iterable[tuple[int, int]],
                 gbif: np.ndarray, species_of_obs: np.ndarray, taxon_names: np.ndarray,
                 progress: bool = False) -> int:
    """Draw a photo for every embedded image (``emb_rows``: (observation row, image
    number) pairs as synth writes the embeddings) into ``root/photos``; returns how many.

    The object mask uses the embedding's own seed (``SeedSequence([seed, row, k])``), the
    same draw that placed the species signature in the embedding."""
    from PIL import Image
    from tqdm.auto import tqdm

    from .synth import _object_mask

    rows = list(emb_rows)
    count = 0
    for o, k in tqdm(rows, desc="synthetic photos", unit="photo", disable=not progress):
        emb_seed = int(np.random.SeedSequence([seed, o, k]).generate_state(1)[0])
        mask = _object_mask(np.random.default_rng(emb_seed))
        name = str(taxon_names[species_of_obs[o]])
        pixels = draw_photo(mask, name.split(" ")[0], name, emb_seed)
        path = Path(root) / photo_relpath(gbif[o], k)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, format="JPEG", quality=JPEG_QUALITY)
        count += 1
    return count


# -- the cube build stage: copy the photos of the embedded images into the cube set ----------
PHOTOS_INDEX = f"{PHOTOS_DIR}/index.json"


def _source_fs(recipe):
    import fsspec

    src = recipe.source
    return fsspec.core.url_to_fs(str(src["path"]), **(src.get("storage_options") or {}))


def source_has_photos(recipe) -> bool:
    """Whether the recipe's source has a ``photos`` folder (the synthetic source)."""
    try:
        fs, root = _source_fs(recipe)
        return bool(fs.isdir(f"{root.rstrip('/')}/{PHOTOS_DIR}"))
    except Exception:  # noqa: BLE001 - an unreachable source fails in the main stages
        return False


def build_photos(ctx) -> int:
    """Stage ``photos``: copy the source photo of every embedded image into staging
    ``photos/`` plus ``photos/index.json`` ({"photos": [[gbif_id, image_number], ...]})."""
    import json

    fs, root = _source_fs(ctx.recipe)
    images = ctx.tables["images"]
    listed = []
    for gbif, n in zip(images.gbif_id.to_numpy(), images.image_number.to_numpy(), strict=True):
        rel = photo_relpath(int(gbif), int(n))
        src = f"{root.rstrip('/')}/{rel}"
        if not fs.exists(src):
            continue
        with fs.open(src, "rb") as fh:
            data = fh.read()
        out = ctx.staging_path(rel)
        ctx.target.fs.makedirs(out.rsplit("/", 1)[0], exist_ok=True)
        with ctx.target.fs.open(out, "wb") as fh:
            fh.write(data)
        listed.append([int(gbif), int(n)])
    with ctx.target.fs.open(ctx.staging_path(PHOTOS_INDEX), "w") as fh:
        json.dump({"photos": listed}, fh)
    return len(listed)


def read_photo(cs, gbif_id: int, image_number: int) -> bytes | None:
    """The JPEG bytes of a photo in the cube set ``cs``, or None when it has none."""
    path = cs.target.path(*cs.prefix, photo_relpath(gbif_id, image_number))
    try:
        with cs.target.fs.open(path, "rb") as fh:
            return fh.read()
    except (FileNotFoundError, OSError):
        return None


def photo_index(cs) -> set[tuple[int, int]]:
    """The (gbif_id, image_number) pairs with a photo in the cube set (empty: none)."""
    import json

    path = cs.target.path(*cs.prefix, PHOTOS_INDEX)
    try:
        with cs.target.fs.open(path, "r") as fh:
            return {(int(g), int(n)) for g, n in json.load(fh)["photos"]}
    except (FileNotFoundError, OSError, ValueError, KeyError):
        return set()


def register() -> None:
    """Register the ``photos`` stage with the cube build (after ``vision``)."""
    from .pipeline import Stage, register_stage

    register_stage(Stage("photos", (PHOTOS_DIR,), build_photos, enabled=source_has_photos,
                         inputs=stage_inputs), after="vision")


def stage_inputs(ctx) -> dict[str, str]:
    """What the ``photos`` stage reads: the source's photo files and the embedded images."""
    from .incremental import content_digest

    files = ctx.tables["source_files"]
    photos = {k: v[2] for k, v in files.items() if k.startswith(f"{PHOTOS_DIR}/")}
    images = ctx.tables["images"]
    return {"photos": content_digest(photos),
            "images": content_digest(images.gbif_id.to_numpy(), images.image_number.to_numpy())}
