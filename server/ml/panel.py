"""Viewer panel "Model predictions": the selected observation's predictions in every run,
and two runs side by side (registered in :mod:`server.viewer.panels`).

No ``from __future__ import annotations`` here: chartlets reads the callbacks' annotations.
"""

from chartlets import Component, Input, Output, State
from chartlets.components import Box, Select
from xcube.webapi.viewer.components import Markdown
from xcube.webapi.viewer.contrib import Panel

from ..viewer.panels.common import COLUMN, ROW, PanelProblem, guarded, md_escape, selected_gbif_id
from . import controllers as C

panel = Panel(__name__, title="Model predictions", icon="model_training", position=8)


def _ml(ctx):
    api_ctx = ctx.get_api_ctx("deepearth-ml") if ctx is not None else None
    if api_ctx is None:
        raise PanelProblem("The DeepEarth ML API is not running in this server.")
    return api_ctx


def _run_options(ctx) -> list:
    runs = C.runs(_ml(ctx))["runs"]
    return [(r["run_id"], f"{r['run_name']} · {r['run_id'][:8]}") for r in reversed(runs)]


def observation_text(ctx, place_id) -> str:
    """Markdown: the selected observation's predictions in each run."""
    gbif_id = selected_gbif_id(place_id)
    if gbif_id is None:
        return "Select an observation on the map (or a point of a *Prediction errors* place group)."
    data = C.observation(_ml(ctx), gbif_id)
    if not data["runs"]:
        return "No training run has written predictions for this cube set (`deepearth train`)."
    lines = [f"**Observation {gbif_id}**", "",
             "| run | model | image | true | predicted | score | side |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in data["runs"]:
        for im in r["images"]:
            mark = "✅" if im["correct"] else "❌"
            lines.append(f"| {md_escape(r['run_name'])} | {r['task']} {r['model']} | "
                         f"{im['image_number']} | *{md_escape(im['species'])}* | {mark} "
                         f"*{md_escape(im['predicted'])}* | {im['score']:.2f} | {im['role']} |")
        if not r["images"]:
            lines.append(f"| {md_escape(r['run_name'])} | {r['task']} {r['model']} | – | "
                         "no embedding | | | |")
    return "\n".join(lines)


def compare_text(ctx, run_a, run_b) -> str:
    """Markdown: two runs compared on the embeddings that are test-side in both."""
    if not run_a or not run_b:
        return "Choose two runs to compare."
    c = C.compare(_ml(ctx), run_a, run_b, "test")

    def pct(v):
        return "–" if v is None else f"{100 * v:.1f} %"
    lines = [f"**A** {md_escape(c['run_a']['run_name'])}: {pct(c['accuracy_a'])} · "
             f"**B** {md_escape(c['run_b']['run_name'])}: {pct(c['accuracy_b'])} top-1 on "
             f"{c['embeddings']} test embeddings", "",
             f"both right {c['both_correct']} · only A {c['only_a']} · only B {c['only_b']} · "
             f"both wrong {c['both_wrong']}"]
    for d in c["disagreements"][:10]:
        lines.append(f"- {d['gbif_id']}/{d['image_number']} *{md_escape(d['species'])}*: "
                     f"A *{md_escape(d['predicted_a'])}*, B *{md_escape(d['predicted_b'])}*")
    return "\n".join(lines)


@panel.layout(State("@app", "selectedPlaceId"))
def render_panel(ctx, place_id: str | None = None) -> Component:
    try:
        options = _run_options(ctx)
    except PanelProblem as exc:
        return Box(children=[Markdown(text=str(exc))])
    a = options[0][0] if options else None
    b = options[1][0] if len(options) > 1 else a
    return Box(style={**COLUMN, "padding": "8px"}, children=[
        Markdown(id="pred_obs", text=update_observation(ctx, place_id)),
        Box(style=ROW, children=[
            Select(id="pred_run_a", label="Run A", value=a, options=options,
                   style={"minWidth": 200}),
            Select(id="pred_run_b", label="Run B", value=b, options=options,
                   style={"minWidth": 200}),
        ]),
        Markdown(id="pred_compare", text=update_compare(ctx, a, b)),
    ])


@panel.callback(Input("@app", "selectedPlaceId"), Output("pred_obs", "text"))
@guarded(lambda text: text)
def update_observation(ctx, place_id: str | None = None) -> str:
    return observation_text(ctx, place_id)


@panel.callback(Input("pred_run_a"), Input("pred_run_b"), Output("pred_compare", "text"))
@guarded(lambda text: text)
def update_compare(ctx, run_a: str | None = None, run_b: str | None = None) -> str:
    return compare_text(ctx, run_a, run_b)
