"""The patch set laid on xcube's bundled viewer build (xcube Viewer 1.7.4 in xcube-core 1.14).

Four small hooks, applied to the copy in ``viewer/.dist`` at server start, give
``viewer/dist-overlay/deepearth-app.js`` what chartlets panels cannot reach in the
stock build (see viewer/README.md, "Why a patched bundle"):

====================  ==========================================================================
``store``             ``window.deepearthOnStore(store)`` is called with the Redux store once
                      it is created (``src/index.tsx``)
``logger``            the Redux logger prints only when ``window.deepearthReduxLog`` is true
                      (stock: ~500 console lines at start)
``map-objects``       the map registry (``MAP_OBJECTS`` of ``src/states/controlState.ts``) is
                      also ``window.deepearthMapObjects`` (``.map``: the OpenLayers map)
``host-store``        chartlets' host store (``src/ext/store.ts``) gets ``set()``, so a panel's
                      ``Output("@app", ...)`` reaches ``window.deepearthHost.set``, and
                      ``get()`` falls back to ``window.deepearthHost.get`` for properties the
                      viewer does not know (``deepearthFilters``)
====================  ==========================================================================

Each hook is a regular expression over the minified bundle that must match exactly once;
identifiers are captured, never assumed. When any does not match (another xcube release),
:func:`patch_bundle` raises :class:`BundlePatchError` and the caller serves the stock
viewer with a warning: the panels still work, the exploration loop does not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

BUNDLE_GLOB = "assets/main-*.js"
MARKER = "/*deepearth-patched*/"


class BundlePatchError(RuntimeError):
    """The bundle does not have the shape a hook expects (names the hook and the file)."""


@dataclass(frozen=True)
class Hook:
    name: str
    pattern: str
    replacement: str  # re.sub template


HOOKS: tuple[Hook, ...] = (
    Hook("store",
         r"let (\w+)=(\w+)\((\w+),(\w+)\),(\w+)=\1\.dispatch;",
         r"let \1=\2(\3,\4),\5=\1.dispatch;window.deepearthOnStore&&window.deepearthOnStore(\1);"),
    Hook("logger",
         r"predicate:\((\w+),(\w+)\)=>\2\.type!==`UPDATE_VARIABLE_SPLIT_POS`",
         r"predicate:(\1,\2)=>window.deepearthReduxLog===!0&&\2.type!==`UPDATE_VARIABLE_SPLIT_POS`"),
    Hook("map-objects",
         r"var (\w+)=\{\},(\w+)=/\^#\(\[A-Fa-f0-9\]\{8\}",
         r"var \1=window.deepearthMapObjects={},\2=/^#([A-Fa-f0-9]{8}"),
    Hook("host-store",
         r"function (\w+)\((\w+)\)\{return\{subscribe\((\w+)\)\{return \2\.subscribe\(\3\)\},"
         r"get\((\w+)\)\{let (\w+)=(\w+)\[\4\];if\(\5\)return \5\.selector\(\2\.getState\(\)\)\}\}\}",
         r"function \1(\2){return{subscribe(\3){return \2.subscribe(\3)},"
         r"get(\4){let \5=\6[\4];if(\5)return \5.selector(\2.getState());"
         r"return window.deepearthHost?window.deepearthHost.get(\4):void 0},"
         r"set(\4,\5){window.deepearthHost&&window.deepearthHost.set(\4,\5)}}}"),
)


def patch_source(js: str, where: str = "the bundle") -> str:
    """``js`` with every hook applied (idempotent: a patched bundle is returned unchanged)."""
    if js.startswith(MARKER):
        return js
    for hook in HOOKS:
        new, n = re.subn(hook.pattern, hook.replacement, js)
        if n != 1:
            raise BundlePatchError(f"viewer hook {hook.name!r}: expected 1 match in {where}, "
                                   f"found {n} (not the xcube Viewer 1.7.4 build?)")
        js = new
    return MARKER + js


def bundle_file(dist: Path) -> Path:
    """The viewer's main script in a build folder (exactly one ``assets/main-*.js``)."""
    files = sorted(Path(dist).glob(BUNDLE_GLOB))
    if len(files) != 1:
        raise BundlePatchError(f"expected one {BUNDLE_GLOB} in {dist}, found {len(files)}")
    return files[0]


def patch_bundle(dist: Path) -> Path:
    """Apply :data:`HOOKS` to the main script of the build in ``dist`` (in place)."""
    path = bundle_file(dist)
    js = path.read_text(encoding="utf-8")
    patched = patch_source(js, str(path))
    if patched != js:
        path.write_text(patched, encoding="utf-8")
    return path
