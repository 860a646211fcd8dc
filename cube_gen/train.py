"""Training workflow: species probes and vision-to-language alignment, tracked in MLflow.

``deepearth train CONFIG.yaml`` or :func:`train` (``train(TrainConfig.load(path))``) runs:

* ``task: probe``: a species classifier (``model.kind``: ``linear`` or ``mlp``) on the
  ``pooled`` 1408-d vectors or on the ``patch`` features of one frame (576 patches x 1408,
  pooled by a learned attention over patches);
* ``task: alignment``: a projection of the vision features into the language-embedding
  space of ``species.zarr`` (7168-d), trained contrastively against every species'
  embedding; scored by zero-shot species retrieval (cosine to each species' language
  embedding: top-1 / top-5) on the test side.

Splits come from :mod:`cube_gen.sampling` (default: the published ``temporal_test``), so
its leakage rules hold. CPU by default; ``train.device: auto`` uses CUDA when present.
Parameters, per-epoch metrics and artefacts (model weights, config, split summary,
predictions) go to MLflow (a local file store under ``tracking.dir`` unless
``tracking.uri`` is given) and TensorBoard; predictions for every embedding are written
as a predictions cube (:mod:`cube_gen.predictions`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from .errors import RecipeError

TASKS = ("probe", "alignment")
FEATURES = ("pooled", "patch")
KINDS = ("linear", "mlp")
BALANCE = ("none", "weights", "cap")

DEFAULTS: dict[str, Any] = {
    "cubes": {"path": None, "storage_options": {}, "version": None},
    "task": "probe",
    "features": "pooled",
    "model": {"kind": "mlp", "hidden": 256, "dropout": 0.1, "temperature": 0.07},
    "split": {"method": "temporal"},
    "sampling": {"balance": "none", "per_species": None},
    "train": {"epochs": 20, "batch_size": 64, "lr": 1e-3, "weight_decay": 1e-4, "seed": 0,
              "device": "cpu", "threads": 2, "frame": 0, "torch_threads": None},
    "tracking": {"uri": None, "experiment": "deepearth", "run_name": None, "dir": "runs",
                 "tensorboard": True, "mlflow": True},
    "predictions": {"write": True, "path": None},
}


def _merge(base: dict, new: dict, where: str, file: str | None) -> dict:
    out = copy.deepcopy(base)
    for k, v in (new or {}).items():
        if k not in base:
            raise RecipeError(f"unknown key {k!r} (expected one of {', '.join(base)})",
                              file=file, path=f"{where}{k}")
        if isinstance(base[k], dict) and k != "storage_options":
            if not isinstance(v, dict):
                raise RecipeError(f"expected a mapping, got {v!r}", file=file, path=f"{where}{k}")
            if k == "split":  # split parameters depend on the method
                out[k] = {**base[k], **v}
            else:
                out[k] = _merge(base[k], v, f"{where}{k}.", file)
        else:
            out[k] = v
    return out


def _set(data: dict, dotted: str, value: str) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = yaml.safe_load(value)


@dataclass
class TrainConfig:
    """A validated training configuration (the YAML file's mapping with defaults filled)."""

    data: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULTS))
    file: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], file: str | None = None) -> TrainConfig:
        data = dict(data or {})
        if isinstance(data.get("cubes"), str):
            data["cubes"] = {"path": data["cubes"]}
        merged = _merge(DEFAULTS, data, "", file)
        cfg = cls(merged, file)
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: dict[str, str] | None = None
             ) -> TrainConfig:
        """Read a YAML config; ``overrides`` like ``{"train.epochs": "3"}`` (values are YAML)."""
        path = str(path)
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise RecipeError("a training config must be a YAML mapping", file=path)
        for k, v in (overrides or {}).items():
            _set(data, k, v)
        base = os.path.dirname(os.path.abspath(path))
        cubes = data.get("cubes")
        rel = cubes if isinstance(cubes, str) else (cubes or {}).get("path")
        if rel and "://" not in str(rel) and not os.path.isabs(str(rel)):
            full = os.path.normpath(os.path.join(base, str(rel)))
            if isinstance(cubes, str):
                data["cubes"] = full
            else:
                data["cubes"]["path"] = full
        return cls.from_dict(data, path)

    def validate(self) -> None:
        d, f = self.data, self.file

        def bad(path: str, msg: str) -> RecipeError:
            return RecipeError(msg, file=f, path=path)

        if not d["cubes"]["path"]:
            raise bad("cubes.path", "the cube set to train on is required (path or s3:// URL)")
        for key, allowed in (("task", TASKS), ("features", FEATURES)):
            if d[key] not in allowed:
                raise bad(key, f"must be one of {', '.join(allowed)}, got {d[key]!r}")
        if d["model"]["kind"] not in KINDS:
            raise bad("model.kind", f"must be one of {', '.join(KINDS)}, got {d['model']['kind']!r}")
        if d["sampling"]["balance"] not in BALANCE:
            raise bad("sampling.balance",
                      f"must be one of {', '.join(BALANCE)}, got {d['sampling']['balance']!r}")
        t = d["train"]
        for key in ("epochs", "batch_size", "threads"):
            if not isinstance(t[key], int) or t[key] < 1:
                raise bad(f"train.{key}", f"must be a positive integer, got {t[key]!r}")
        for key in ("lr", "weight_decay"):
            if not isinstance(t[key], int | float) or t[key] < 0:
                raise bad(f"train.{key}", f"must be a number >= 0, got {t[key]!r}")
        if t["torch_threads"] is not None and (not isinstance(t["torch_threads"], int)
                                               or t["torch_threads"] < 1):
            raise bad("train.torch_threads", f"must be a positive integer or null, got "
                                             f"{t['torch_threads']!r}")
        if str(t["device"]) not in ("cpu", "cuda", "auto") and not str(t["device"]).startswith(
                "cuda:"):
            raise bad("train.device", f"must be cpu, cuda, cuda:N or auto, got {t['device']!r}")
        if not isinstance(d["model"]["hidden"], int) or d["model"]["hidden"] < 1:
            raise bad("model.hidden", f"must be a positive integer, got {d['model']['hidden']!r}")
        if not 0 <= float(d["model"]["dropout"]) < 1:
            raise bad("model.dropout", f"must be in [0, 1), got {d['model']['dropout']!r}")
        if float(d["model"]["temperature"]) <= 0:
            raise bad("model.temperature", "must be > 0")

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def flat(self) -> dict[str, Any]:
        """``{"train.epochs": 20, ...}``: the parameters as MLflow logs them."""
        out = {}

        def walk(node: Any, prefix: str) -> None:
            if isinstance(node, dict) and prefix != "cubes.storage_options.":
                for k, v in node.items():
                    walk(v, f"{prefix}{k}.")
            elif prefix != "cubes.storage_options.":
                out[prefix[:-1]] = node
        walk(self.data, "")
        return out


# -- models ---------------------------------------------------------------------------------
class AttentionPool(nn.Module):
    """Learned softmax attention over patches: (B, P, D) -> (B, D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(self.score(x).squeeze(-1), dim=-1)
        return torch.einsum("bp,bpd->bd", w, x)


class Standardise(nn.Module):
    """(x - mean) / std with statistics of the training side, stored with the model."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float().clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _head(in_dim: int, out_dim: int, kind: str, hidden: int, dropout: float) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, out_dim))


class SpeciesModel(nn.Module):
    """Vision features -> species logits, as a probe or through the language space.

    ``patch=True`` takes (B, P, D) patch features and pools them by attention first.
    With ``language`` (S, L) given, the head maps into the language space and the logits
    are cosine similarities to each species' (centred, unit) embedding over ``temperature``:
    retrieval of the species whose language embedding is closest.
    """

    def __init__(self, in_dim: int, n_species: int, kind: str = "mlp", hidden: int = 256,
                 dropout: float = 0.1, patch: bool = False, mean: torch.Tensor | None = None,
                 std: torch.Tensor | None = None, language: torch.Tensor | None = None,
                 temperature: float = 0.07):
        super().__init__()
        self.n_species = n_species
        self.patch = patch
        self.norm = Standardise(mean if mean is not None else torch.zeros(in_dim),
                                std if std is not None else torch.ones(in_dim))
        self.pool = AttentionPool(in_dim) if patch else None
        if language is not None:
            lang = language.float() - language.float().mean(0, keepdim=True)
            self.register_buffer("language", nn.functional.normalize(lang, dim=-1))
            self.head = _head(in_dim, lang.shape[1], kind, hidden, dropout)
            self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        else:
            self.language = None
            self.head = _head(in_dim, n_species, kind, hidden, dropout)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.float())
        if self.pool is not None:
            x = self.pool(x)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.embed(x)
        if self.language is None:
            return z
        z = nn.functional.normalize(z, dim=-1)
        return self.log_scale.exp().clamp(max=100.0) * z @ self.language.T


# -- metrics ----------------------------------------------------------------------------------
def topk_accuracy(logits: torch.Tensor, y: torch.Tensor, k: int) -> float:
    """Share of rows whose label is among the ``k`` highest logits."""
    if len(y) == 0:
        return float("nan")
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return float((top == y[:, None]).any(1).float().mean())


def balanced_accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over the species present of the per-species top-1 recall."""
    if len(y) == 0:
        return float("nan")
    recalls = [float((pred[y == s] == s).float().mean()) for s in torch.unique(y)]
    return float(np.mean(recalls))


def chance_levels(train_labels: np.ndarray, test_labels: np.ndarray, n_species: int
                  ) -> dict[str, float]:
    """Top-1 / top-5 of guessing uniformly among all species, and of always guessing the
    most frequent training species (the floors any score should be read against)."""
    out = {"chance_top1_uniform": 1.0 / n_species, "chance_top5_uniform": min(5, n_species) / n_species}
    if len(train_labels) and len(test_labels):
        counts = np.bincount(train_labels, minlength=n_species)
        top = np.argsort(-counts, kind="stable")
        out["chance_top1_majority"] = float(np.mean(test_labels == top[0]))
        out["chance_top5_majority"] = float(np.mean(np.isin(test_labels, top[:5])))
    return out


# -- the workflow -------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What :func:`train` returns: run id, final metrics, the model, where things went."""

    run_id: str
    metrics: dict[str, float]
    history: list[dict[str, float]]
    model: SpeciesModel
    split: Any
    predictions: str | None
    tracking_uri: str | None
    tensorboard_dir: str | None
    cube_version: dict[str, Any]


def cube_version(cs: Any) -> dict[str, Any]:
    """What identifies the cube set trained on: URL, version (releases), recipe, created."""
    m = cs.manifest or {}
    return {"url": cs.url, "version": getattr(cs, "version", None) or m.get("current"),
            "recipe": m.get("recipe"), "created": m.get("created"),
            "schema_version": m.get("schema_version")}


def _features_of(batch: dict[str, torch.Tensor], features: str) -> torch.Tensor:
    x = batch["features"]
    if features == "patch":  # (B, 24, 24, 1408) -> (B, 576, 1408)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
    return x


def _loader(ds: Any, cfg: TrainConfig, sampler: Any = None, shuffle: bool = False,
            generator: torch.Generator | None = None) -> Any:
    from .torch_data import make_loader

    t = cfg["train"]
    return make_loader(ds, batch_size=t["batch_size"], threads=t["threads"], sampler=sampler,
                       shuffle=shuffle if sampler is None else False, generator=generator,
                       device="cpu")


def _evaluate(model: SpeciesModel, loader: Any, features: str, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, labels, image positions) of every sample of ``loader``."""
    model.eval()
    logits, labels, images = [], [], []
    with torch.no_grad():
        for batch in loader:
            x = _features_of(batch, features).to(device)
            logits.append(model(x).float().cpu())
            labels.append(batch["species"])
            images.append(batch["image"])
    if not logits:
        n = model.n_species
        return torch.zeros(0, n), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return torch.cat(logits), torch.cat(labels), torch.cat(images)


def _metrics(prefix: str, logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    if len(y) == 0:
        return {}
    loss = float(nn.functional.cross_entropy(logits, y))
    pred = logits.argmax(1)
    return {f"{prefix}_loss": loss, f"{prefix}_top1": topk_accuracy(logits, y, 1),
            f"{prefix}_top5": topk_accuracy(logits, y, 5),
            f"{prefix}_balanced_top1": balanced_accuracy(pred, y)}


class _Trackers:
    """MLflow and TensorBoard, each optional, behind one small interface."""

    def __init__(self, cfg: TrainConfig, run_name: str):
        tr = cfg["tracking"]
        self.dir = Path(tr["dir"]).absolute()
        self.mlflow = None
        self.uri = None
        self.run_id = f"local-{int(time.time() * 1000):x}"
        if tr["mlflow"]:
            import mlflow

            uri = tr["uri"]
            if uri is None:
                # mlflow-skinny has no SQL store; its file store needs this opt-in
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                uri = (self.dir / "mlruns").as_uri()
            elif str(uri).startswith("file:") or "://" not in str(uri):
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self.uri = str(uri)
            mlflow.set_tracking_uri(self.uri)
            mlflow.set_experiment(tr["experiment"])
            self.active = mlflow.start_run(run_name=run_name)
            self.run_id = self.active.info.run_id
            self.mlflow = mlflow
        self.tb = None
        self.tb_dir = None
        if tr["tensorboard"]:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_dir = str(self.dir / "tensorboard" / f"{run_name}-{self.run_id[:8]}")
            self.tb = SummaryWriter(self.tb_dir)

    def params(self, params: dict[str, Any]) -> None:
        if self.mlflow:
            self.mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        if self.tb:
            self.tb.add_text("params", json.dumps(params, indent=1, default=str))

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
        if self.mlflow:
            self.mlflow.log_metrics(clean, step=step)
        if self.tb:
            for k, v in clean.items():
                self.tb.add_scalar(k.replace("_", "/", 1), v, step)

    def tags(self, tags: dict[str, Any]) -> None:
        if self.mlflow:
            self.mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def artifact(self, path: str, sub: str | None = None) -> None:
        if self.mlflow:
            if os.path.isdir(path):
                self.mlflow.log_artifacts(path, sub)
            else:
                self.mlflow.log_artifact(path, sub)

    def close(self, ok: bool) -> None:
        if self.tb:
            self.tb.close()
        if self.mlflow:
            self.mlflow.end_run("FINISHED" if ok else "FAILED")


def train(config: TrainConfig | dict[str, Any], progress: bool = True) -> TrainResult:
    """Run one training configuration end to end (see the module docstring)."""
    from .access import CubeSet
    from .predictions import write_predictions
    from .sampling import SpeciesBalancedSampler, make_split
    from .torch_data import CubeDataset, resolve_device

    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    c, t, m = cfg["cubes"], cfg["train"], cfg["model"]
    torch.manual_seed(t["seed"])
    if t["torch_threads"]:  # small models on a busy CPU: fewer intra-op threads are faster
        torch.set_num_threads(t["torch_threads"])
    device = resolve_device(t["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError("CUDA is not available here (use train.device: cpu or auto)",
                          file=cfg.file, path="train.device")
    open_kw = {"version": c["version"]} if c["version"] else {}
    cs = CubeSet.open(c["path"], c["storage_options"] or None, **open_kw)
    version = cube_version(cs)
    split_params = {k: v for k, v in cfg["split"].items() if k != "method"}
    split = make_split(cs, cfg["split"]["method"], **split_params)
    if len(split.train) == 0 or len(split.test) == 0:
        raise RecipeError(
            f"the {cfg['split']['method']} split of {cs.url} has {len(split.train)} training and "
            f"{len(split.test)} test embeddings; both sides need at least one (try split.method "
            "spatial or random)", file=cfg.file, path="split.method")
    mode = "pooled" if cfg["features"] == "pooled" else "frame"
    kw = {"features": mode, "frame": t["frame"], "language": False, "dtype": "float32"}
    train_ds = CubeDataset(cs, images=split.train, **kw)
    test_ds = CubeDataset(cs, images=split.test, **kw)
    n_species = len(cs.species_table())
    pooled_train = torch.from_numpy(np.asarray(cs.pooled(split.train), np.float32))
    mean, std = pooled_train.mean(0), pooled_train.std(0, unbiased=False)
    language = (torch.from_numpy(np.asarray(cs.language_embeddings(), np.float32))
                if cfg["task"] == "alignment" else None)
    model = SpeciesModel(pooled_train.shape[1], n_species, m["kind"], m["hidden"],
                         float(m["dropout"]), patch=cfg["features"] == "patch", mean=mean, std=std,
                         language=language, temperature=float(m["temperature"])).to(device)
    bal = cfg["sampling"]["balance"]
    y_train = train_ds._species
    sampler = None
    if bal != "none":
        sampler = SpeciesBalancedSampler(y_train, mode=bal,
                                         per_species=cfg["sampling"]["per_species"],
                                         seed=t["seed"])
    gen = torch.Generator().manual_seed(t["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=float(t["lr"]),
                            weight_decay=float(t["weight_decay"]))
    run_name = cfg["tracking"]["run_name"] or f"{cfg['task']}-{m['kind']}-{cfg['features']}"
    trackers = _Trackers(cfg, run_name)
    history: list[dict[str, float]] = []
    ok = False
    try:
        trackers.params({**cfg.flat(), "split.train": len(split.train),
                         "split.test": len(split.test), "split.excluded": len(split.excluded),
                         "n_species": n_species, "device": str(device),
                         "cube_version": version["version"], "cube_recipe": version["recipe"]})
        chance = chance_levels(y_train, test_ds._species, n_species)
        trackers.tags({"task": cfg["task"], "model": m["kind"], "features": cfg["features"],
                       "cube_url": cs.url, "cube_version": version["version"],
                       **{k: f"{v:.4f}" for k, v in chance.items()}})
        bar = tqdm(range(t["epochs"]), desc=run_name, disable=not progress, unit="epoch")
        for epoch in bar:
            model.train()
            if sampler is not None:
                sampler.set_epoch(epoch)
            seen, loss_sum, t0 = 0, 0.0, time.perf_counter()
            for batch in _loader(train_ds, cfg, sampler, shuffle=True, generator=gen):
                x = _features_of(batch, cfg["features"]).to(device, non_blocking=True)
                y = batch["species"].to(device)
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(y)
                seen += len(y)
            dt = time.perf_counter() - t0
            logits, y_test, _ = _evaluate(model, _loader(test_ds, cfg), cfg["features"], device)
            row = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1),
                   "train_samples_per_s": seen / dt if dt > 0 else float("nan"),
                   **_metrics("test", logits, y_test)}
            history.append(row)
            trackers.metrics({k: v for k, v in row.items() if k != "epoch"}, epoch)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", top1=f"{row.get('test_top1', 0):.3f}")
        # predictions for every embedding of the cube (train, test and excluded)
        all_ds = CubeDataset(cs, **kw)
        logits, labels, images = _evaluate(model, _loader(all_ds, cfg), cfg["features"], device)
        metrics = {**{k: v for k, v in history[-1].items() if k != "epoch"}, **chance}
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(model.state_dict(), os.path.join(tmp, "model.pt"))
            with open(os.path.join(tmp, "config.yaml"), "w") as f:
                yaml.safe_dump(cfg.data | {"cubes": {**c, "storage_options": {}}}, f)
            with open(os.path.join(tmp, "split.json"), "w") as f:
                json.dump(split.summary(), f, indent=1)
            with open(os.path.join(tmp, "metrics.json"), "w") as f:
                json.dump({"final": metrics, "history": history}, f, indent=1)
            for name in ("model.pt", "config.yaml", "split.json", "metrics.json"):
                trackers.artifact(os.path.join(tmp, name))
        pred_url = None
        if cfg["predictions"]["write"]:
            pred_url = write_predictions(
                cs, logits, labels, images, split.roles(len(cs.image_table())),
                run_id=trackers.run_id, run_name=run_name, task=cfg["task"], model=m["kind"],
                features=cfg["features"], metrics=metrics, cube=version,
                root=cfg["predictions"]["path"], storage_options=c["storage_options"] or None,
                tracking_uri=trackers.uri)
            trackers.tags({"predictions": pred_url})
        ok = True
    finally:
        trackers.close(ok)
    return TrainResult(trackers.run_id, metrics, history, model, split, pred_url, trackers.uri,
                       trackers.tb_dir, version)
