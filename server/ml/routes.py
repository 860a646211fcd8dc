"""HTTP routes of the ``deepearth-ml`` API (thin: parse, run a controller, write)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..common import params as P
from ..common.errors import ParamError
from ..common.handler import Handler, endpoint, json_ok
from ..deepearth.params import GbifIdPath
from . import controllers as C
from .api import api
from .context import MlContext

STAC_PREFIX = "/deepearth/stac"
PREDICTIONS_PREFIX = "/deepearth/predictions"


@dataclass(frozen=True)
class QueryText(P.Group):
    name: str
    description: str

    def openapi(self) -> list[dict]:
        return [P.query_param(self.name, self.description)]

    def read(self, inputs: P.Inputs) -> str:
        value = P.raw(inputs.query, self.name)
        if not value:
            raise ParamError(f"parameter {self.name!r} is required ({self.description})",
                             self.name)
        return value


@dataclass(frozen=True)
class RunList(P.Group):
    """``runs``: comma-separated run ids (default: every run)."""

    def openapi(self) -> list[dict]:
        return [P.query_param("runs", "comma-separated run ids (default: all runs)")]

    def read(self, inputs: P.Inputs) -> list[str] | None:
        text = P.raw(inputs.query, "runs")
        return [t.strip() for t in text.split(",") if t.strip()] if text else None


class MlHandler(Handler):
    log_name = "DeepEarth ML"
    ctx: MlContext

    @property
    def resources(self):
        return self.ctx.resources

    @property
    def settings(self):
        return self.ctx.settings


_RUN = P.PathSegment("run_id", "a run id, or 'latest'")
_ROLE = P.Choice("role", "side of the split", list(C.ROLES), "test")


def route(path: str, operation_id: str, summary: str, **kwargs: Any):
    return endpoint(api, path, operation_id, summary, base=MlHandler, **kwargs)


@route(PREDICTIONS_PREFIX, "getDeepEarthPredictionRuns", "The training runs with predictions",
       responses=json_ok("runs with task, model, metrics and the cube version trained on"))
async def prediction_runs(h: MlHandler):
    await h.reply_json(await h.run(C.runs, h.ctx))


@route(PREDICTIONS_PREFIX + "/compare", "getDeepEarthPredictionCompare",
       "Two runs side by side: accuracies, agreement, where they differ",
       params={"a": QueryText("a", "first run id"), "b": QueryText("b", "second run id"),
               "role": _ROLE})
async def prediction_compare(h: MlHandler, a: str, b: str, role: str):
    await h.reply_json(await h.run(C.compare, h.ctx, a, b, role))


@route(PREDICTIONS_PREFIX + "/observations/{gbif_id}", "getDeepEarthObservationPredictions",
       "One observation's predictions in every run (or those named by runs=)",
       params={"gbif_id": GbifIdPath(), "runs": RunList()})
async def observation_predictions(h: MlHandler, gbif_id: int, runs: list[str] | None):
    await h.reply_json(await h.run(C.observation, h.ctx, gbif_id, runs))


@route(PREDICTIONS_PREFIX + "/{run_id}", "getDeepEarthPredictionRun",
       "One run: parameters, metrics, accuracy per side", params={"run_id": _RUN})
async def prediction_run(h: MlHandler, run_id: str):
    await h.reply_json(await h.run(C.run, h.ctx, run_id))


@route(PREDICTIONS_PREFIX + "/{run_id}/errors", "getDeepEarthPredictionErrors",
       "A run's error map: one GeoJSON point per observation, coloured right / wrong",
       params={"run_id": _RUN, "role": _ROLE},
       responses=json_ok("GeoJSON FeatureCollection", "application/geo+json"))
async def prediction_errors(h: MlHandler, run_id: str, role: str):
    await h.reply_json(await h.run(C.errors_geojson, h.ctx, run_id, role), "application/geo+json")


@route(STAC_PREFIX, "getDeepEarthStacCatalog", "STAC catalogue of the cube set")
async def stac_catalog(h: MlHandler):
    base = h.request.url_for_path(STAC_PREFIX.lstrip("/"), reverse=True)
    await h.reply_json(await h.run(C.stac_object, h.ctx, base, ""))


@route(STAC_PREFIX + "/{*path}", "getDeepEarthStacObject",
       "A STAC collection (<id>/collection.json) or run item (predictions/<run>/<run>.json)",
       params={"path": P.PathSegment("path", "path of the object below /deepearth/stac", "*path")})
async def stac_object(h: MlHandler, path: str):
    base = h.request.url_for_path(STAC_PREFIX.lstrip("/"), reverse=True)
    await h.reply_json(await h.run(C.stac_object, h.ctx, base, path))
