"""Writes examples/*.ipynb (re-run after editing; the notebooks are committed without outputs)."""
from pathlib import Path

import nbformat as nbf


def nb(cells):
    book = nbf.v4.new_notebook()
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, src, *tags in cells:
        c = nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src)
        if tags:
            c.metadata["tags"] = list(tags)
        book.cells.append(c)
    return book

PARAMS = '''import json
import os

# Parameters (the test suite sets them through the environment)
CUBES = os.environ.get("DEEPEARTH_CUBES", "../data/cubes-demo")       # or "s3://bucket/prefix"
STORAGE_OPTIONS = json.loads(os.environ.get("DEEPEARTH_STORAGE_OPTIONS", "{}"))  # s3fs options
'''

explore = nb([
    ("md", "# Explore a DeepEarth cube set\n\nOpen the cubes (local or S3), select observations "
           "and embeddings by space, time and species, plot them, and open the viewer in this "
           "notebook."),
    ("code", PARAMS + 'SHOW_VIEWER = os.environ.get("DEEPEARTH_SHOW_VIEWER", "1") == "1"\n', "parameters"),
    ("code", '''import matplotlib.pyplot as plt
import numpy as np

from cube_gen.access import CubeSet

cs = CubeSet.open(CUBES, STORAGE_OPTIONS or None)
print(cs.describe())
obs = cs.observations          # an xarray Dataset, lazily read (from S3 too)
obs'''),
    ("md", "## Select by space, time and species"),
    ("code", '''species = cs.species_table()
top = species.sort_values("observation_count", ascending=False).taxon_name.iloc[0]
west, south, east, north = cs.manifest["bbox"]
bbox = (west, south, (west + east) / 2, north)          # the western half
sel = cs.select_observations(bbox=bbox, start="2012-01-01", end="2024-12-31", species=top)
rows = cs.observation_rows(sel)
print(f"{len(sel)} observations of {top} in the western half, 2012-2024")
rows[:2]'''),
    ("code", '''fig, ax = plt.subplots(1, 2, figsize=(11, 4))
ax[0].scatter(obs.lon.values, obs.lat.values, s=2, c="lightgray", label="all")
ax[0].scatter([r["lon"] for r in rows], [r["lat"] for r in rows], s=8, c="crimson", label=top)
ax[0].set(xlabel="lon", ylabel="lat", title="Observations")
ax[0].legend()
years = obs.time.dt.year.values
ax[1].hist(years, bins=np.arange(years.min(), years.max() + 2) - 0.5)
ax[1].set(xlabel="year", ylabel="observations", title="Per year")
plt.tight_layout()'''),
    ("md", "## Vision embeddings\n\nThe mean-pooled 1408-d vectors and one full tensor."),
    ("code", '''images = cs.select_images(split="train")
pooled = cs.pooled(images)
feats = cs.features(int(images[0]), frame=0)          # (24, 24, 1408) float16
print(pooled.shape, feats.shape, feats.dtype)
plt.imshow(np.linalg.norm(feats.astype("float32"), axis=-1), cmap="plasma")
plt.title("L2 norm of the patch features, frame 0")
plt.colorbar()'''),
    ("md", "## The viewer, in this notebook\n\n`Viewer(cubeset).show()` starts the server with "
           "the DeepEarth plugin inside this kernel and shows the customised viewer."),
    ("code", '''from server.notebook import Viewer

viewer = Viewer(CUBES, STORAGE_OPTIONS or None) if SHOW_VIEWER else None
viewer.show(height=600) if viewer else "viewer skipped (DEEPEARTH_SHOW_VIEWER=0)"'''),
    ("md", "## Lexcube\n\nA 3-D (time x lat x lon) view of a grid variable, with the optional "
           "`lexcube` package (`pip install \"deepearth-cube[notebook]\"`)."),
    ("code", '''from server.notebook import lexcube_view

try:
    cube3d = lexcube_view(CUBES, "observation_count", storage_options=STORAGE_OPTIONS or None)
except ImportError as exc:
    cube3d = str(exc)
cube3d'''),
    ("code", '''summary = {"selected": int(len(sel)), "species": top, "images": int(len(images)),
           "pooled_shape": list(pooled.shape), "feature_dtype": str(feats.dtype)}
print(json.dumps(summary))''', "summary"),
])

train = nb([
    ("md", "# Train on the cubes\n\nSplit without leakage, train a species probe and a "
           "vision-to-language alignment model, tracked in MLflow and TensorBoard."),
    ("code", PARAMS + '''SPLIT = os.environ.get("DEEPEARTH_SPLIT", "temporal")      # temporal | spatial | random
EPOCHS = int(os.environ.get("DEEPEARTH_EPOCHS", "30"))
RUNS = os.environ.get("DEEPEARTH_RUNS", "../runs")
''', "parameters"),
    ("code", '''import matplotlib.pyplot as plt
import numpy as np

from cube_gen.access import CubeSet
from cube_gen.sampling import min_distance_km, spatial_block_split

cs = CubeSet.open(CUBES, STORAGE_OPTIONS or None)
table = cs.image_table()
split = spatial_block_split(table, block_km=10, buffer_km=1, test_fraction=0.3, seed=0)
print(split.summary())
print(f"closest train/test pair: {min_distance_km(table, split.train, split.test):.2f} km")
colors = np.array(["tab:blue", "tab:orange", "lightgray"])[split.roles(len(table))]
plt.scatter(table.lon, table.lat, c=colors, s=12)
plt.title("spatial blocks: train (blue), test (orange), buffer (gray)")'''),
    ("code", '''from cube_gen.train import train

common = {"cubes": {"path": CUBES, "storage_options": STORAGE_OPTIONS},
          "split": {"method": SPLIT},
          "train": {"epochs": EPOCHS, "batch_size": 16, "lr": 0.003, "threads": 1,
                    "torch_threads": 1},
          "tracking": {"dir": RUNS, "experiment": "notebook"}}
probe = train({**common, "task": "probe", "model": {"kind": "mlp", "hidden": 128}},
              progress=False)
align = train({**common, "task": "alignment", "model": {"kind": "linear"}}, progress=False)
for r in (probe, align):
    print(r.run_id, {k: round(v, 3) for k, v in r.metrics.items() if k.startswith(("test", "chance"))})'''),
    ("code", '''fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
for r, name in ((probe, "probe"), (align, "alignment")):
    ax[0].plot([h["train_loss"] for h in r.history], label=name)
    ax[1].plot([h.get("test_top1", np.nan) for h in r.history], label=name)
ax[0].set(title="training loss", xlabel="epoch")
ax[1].set(title="test top-1", xlabel="epoch")
ax[1].axhline(probe.metrics["chance_top1_uniform"], color="gray", ls=":", label="chance")
ax[1].legend()'''),
    ("md", "MLflow: `mlflow ui --backend-store-uri RUNS/mlruns` (needs the full `mlflow` package); "
           "TensorBoard: `tensorboard --logdir RUNS/tensorboard`."),
    ("code", '''summary = {"runs": [probe.run_id, align.run_id], "epochs": len(probe.history),
           "predictions": [probe.predictions, align.predictions],
           "test_top1": probe.metrics.get("test_top1"), "split": split.summary()}
print(json.dumps(summary))''', "summary"),
])

compare = nb([
    ("md", "# Compare two runs\n\nThe predictions cubes of two training runs, side by side, "
           "and where they go wrong on the map."),
    ("code", PARAMS, "parameters"),
    ("code", '''import matplotlib.pyplot as plt

from cube_gen.predictions import Predictions

store = Predictions.of(CUBES, STORAGE_OPTIONS or None)
runs = store.runs()
for r in runs:
    print(r["run_id"], r["run_name"], r["task"], r["model"], round(r["metrics"].get("test_top1", float("nan")), 3))
a, b = runs[-2]["run_id"], runs[-1]["run_id"]
cmp = store.compare(a, b, role="test")
cmp'''),
    ("code", '''fig, ax = plt.subplots(1, 2, figsize=(10, 4), sharex=True, sharey=True)
for axis, rid in zip(ax, (a, b), strict=True):
    t = store.table(rid)
    test = t[t.role == "test"]
    axis.scatter(t.lon, t.lat, s=4, c="lightgray")
    axis.scatter(test.lon, test.lat, s=18, c=test.correct.map({True: "green", False: "red"}))
    axis.set_title(f"{store.run(rid)['run_name']}: {test.correct.mean():.0%} right")'''),
    ("code", '''summary = {"a": a, "b": b, "n": cmp["n"], "accuracy_a": cmp["accuracy_a"],
           "accuracy_b": cmp["accuracy_b"]}
print(json.dumps(summary))''', "summary"),
])

for name, book in (("explore", explore), ("train", train), ("compare", compare)):
    nbf.write(book, Path(__file__).parent / f"{name}.ipynb")
print("ok")
