"""The grid-variable registry: every layer of the grid pyramids, described once.

Each :class:`GridVariable` says what a grid layer is (name, long name, units), how it is
computed from the points (``aggregation``), which recipe switch turns it on
(``cubes.grid.variables``), and how it is shown (colour map and the rule that fits its colour
range to the data). The recipe (allowed switches), the grid stage (attributes, ``.zlevels``
aggregation methods), the server config (styles, colour bars) and the viewer read it, so a new
grid variable is one entry in :data:`GRID_VARIABLES` (plus its computation in
:mod:`cube_gen.grid`).

Per-species layers are a family (:data:`SPECIES_FAMILY`): one variable per species, named
``<prefix><species slug>``; :func:`lookup` resolves both.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ColorRange:
    """How a layer's colour range is chosen.

    ``kind="fixed"``: always ``[vmin, vmax]``. ``kind="fit"``: ``vmin`` fixed, ``vmax`` fitted
    to the data so that at most ``top_fraction`` of the coloured (finite, positive) cells reach
    the top colour; integer layers get an integer ``vmax``. ``norm`` is ``lin`` or ``log``
    (xcube's colour-mapping norms); ``transparent_zero`` draws zero cells transparent.
    """

    kind: str = "fit"
    vmin: float = 0.0
    vmax: float = 1.0  # fixed maximum, or the fallback when there is no data to fit
    top_fraction: float = 0.015
    integer: bool = False
    norm: str = "lin"
    transparent_zero: bool = False
    fit_vmin: bool = False  # also fit vmin (the low quantile of the positive values)

    def fit(self, values: np.ndarray | Iterable[np.ndarray]) -> tuple[float, float]:
        """``(vmin, vmax)`` for the data (one array, or several, e.g. one per level: then
        the largest fitted maximum, so no level saturates)."""
        if self.kind == "fixed":
            return float(self.vmin), float(self.vmax)
        arrays = [values] if isinstance(values, np.ndarray) else list(values)
        tops = [t for t in (self._fit_one(a) for a in arrays) if t is not None]
        vmax = max(tops) if tops else float(self.vmax)
        vmin = float(self.vmin)
        if self.fit_vmin:
            lows = [float(np.quantile(p, self.top_fraction * 0.5))
                    for p in (_positive(a) for a in arrays) if p.size]
            if lows:
                vmin = float(f"{min(lows):.3g}")
        if vmax <= vmin:
            vmax = vmin * 10 if self.norm == "log" and vmin > 0 else vmin + 1.0
        return vmin, float(vmax)

    def _fit_one(self, values: np.ndarray) -> float | None:
        v = _positive(values)
        if v.size == 0:
            return None
        if self.integer:
            # smallest integer k with at most top_fraction of the cells >= k
            k = np.sort(np.ceil(v - 1e-9))
            n = k.size
            allowed = int(np.floor(self.top_fraction * n))
            # the value of the (allowed)-th largest cell, plus one when more cells share it
            cand = k[n - allowed - 1] + 1 if allowed < n else k[0]
            return float(max(cand, 1.0))
        top = float(np.quantile(v, 1.0 - self.top_fraction * 0.5))
        return float(f"{top:.3g}") if top > 0 else None


def _positive(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).ravel()
    return v[np.isfinite(v) & (v > 0)]


@dataclass(frozen=True)
class GridVariable:
    """One grid layer (see the module docstring)."""

    name: str
    long_name: str
    units: str
    color_bar: str
    color_range: ColorRange
    switch: str  # entry of the recipe's cubes.grid.variables that turns it on
    aggregation: str  # how a cell's value is computed from its points
    comment: str = ""
    composite: str | None = None  # "rgb" for the channels of the embedding composite
    extra_attrs: dict = field(default_factory=dict)
    # the points it is computed from: "observations", or "vision" (the embedded images and
    # their pooled vectors: a rebuild that adds embeddings recomputes only these layers)
    computed_from: str = "observations"

    @property
    def attrs(self) -> dict:
        """CF attributes written on the variable (colour hints included for xcube)."""
        lo, hi = self.color_range.vmin, self.color_range.vmax
        attrs = {"long_name": self.long_name, "units": self.units,
                 "cell_methods": self.aggregation,
                 "color_bar_name": self.color_bar, "color_value_min": lo,
                 "color_value_max": hi,
                 # xcube reads color_norm; the log spacing is in the colour stops
                 # (color_stops), so xcube maps linearly over them
                 "color_norm": "lin", "color_scale": self.color_range.norm}
        if self.comment:
            attrs["comment"] = self.comment
        attrs.update(self.extra_attrs)
        return attrs

    @property
    def legend_title(self) -> str:
        """Title for a colour bar: long name and units (``1`` spelled out as a count)."""
        if self.units in ("", "1"):
            units = " (count per cell)" if self.color_range.integer else " (dimensionless)"
        else:
            units = f" ({self.units.replace('km-2', 'per km²')})"
        return f"{self.long_name}{units}"


# counts: log colour scale from 1 (zero cells transparent: log of 0 is no colour), so one
# range reads at every level of the pyramid; the top fitted on the busiest level
_COUNT = ColorRange(vmin=1.0, integer=True, norm="log", transparent_zero=True)
_DENSITY = ColorRange(vmin=0.1, norm="log", fit_vmin=True)
_RGB = ColorRange(kind="fixed", vmin=0.0, vmax=1.0)
_MIN_OBS = ("NaN where the cell has fewer than cubes.grid.min_observations observations "
            "(see the grid's min_observations attribute)")

GRID_VARIABLES: dict[str, GridVariable] = {v.name: v for v in (
    GridVariable("species_richness", "number of distinct species", "1", "plasma", _COUNT,
                 "species_richness", "area: count of distinct species", _MIN_OBS),
    GridVariable("observation_count", "number of observations", "1", "viridis", _COUNT,
                 "observation_count", "area: sum (observations in the cell)"),
    GridVariable("observation_density", "observations per km2", "km-2", "viridis", _DENSITY,
                 "observation_density", "area: sum (observations) / cell area",
                 "NaN where the cell has no observation; comparable across pyramid levels"),
    GridVariable("sampling_effort", "sampling effort: distinct observation days", "1",
                 "cividis", _COUNT, "sampling_effort",
                 "area: count of distinct days with observations",
                 "an observation without a known day counts the start of its known period"),
    GridVariable("shannon_diversity", "Shannon diversity index H' of species counts", "1",
                 "magma", ColorRange(), "shannon_diversity",
                 "area: -sum p_i ln p_i over the species of the cell", _MIN_OBS),
    GridVariable("simpson_diversity", "Gini-Simpson diversity index 1 - sum p_i^2", "1",
                 "inferno", ColorRange(), "simpson_diversity",
                 "area: 1 - sum p_i^2 over the species of the cell", _MIN_OBS),
    GridVariable("vision_count", "number of vision embeddings", "1", "cividis", _COUNT,
                 "vision_count", "area: sum (vision embeddings in the cell)",
                 computed_from="vision"),
    *(GridVariable(f"embedding_{c}",
                   f"vision embedding composite, {colour} channel: principal component "
                   f"{i + 1} of the pooled vectors, scaled to [0, 1], cell mean", "1",
                   bar, _RGB, "embedding_rgb", "area: mean (of the images in the cell)",
                   composite="rgb", computed_from="vision")
      for i, (c, colour, bar) in enumerate((("r", "red", "Reds"), ("g", "green", "Greens"),
                                            ("b", "blue", "Blues")))),
)}


@dataclass(frozen=True)
class VariableFamily:
    """Variables made per item (e.g. per species): ``<prefix><slug>``."""

    prefix: str
    long_name: str  # with {name}
    units: str
    color_bar: str
    color_range: ColorRange
    switch: str
    aggregation: str

    def variable(self, slug: str, name: str) -> GridVariable:
        return GridVariable(f"{self.prefix}{slug}", self.long_name.format(name=name),
                            self.units, self.color_bar, self.color_range, self.switch,
                            self.aggregation, extra_attrs={"taxon_name": name})


SPECIES_FAMILY = VariableFamily(
    prefix="count_", long_name="observations of {name}", units="1", color_bar="YlOrRd",
    color_range=_COUNT, switch="top_species", aggregation="area: sum (observations of the "
    "species in the cell)")

RGB_COMPOSITE = ("embedding_r", "embedding_g", "embedding_b")
ORDER = tuple(GRID_VARIABLES)  # the order layers are listed in (server config, viewer)


# -- colour maps for xcube (viewer, WMTS) and the WMS -------------------------------------
CUSTOM_CMAP_PREFIX = "deepearth_"
_TRANSPARENT = "#00000000"


def color_stops(var: GridVariable, vmin: float, vmax: float, n: int = 11,
                ) -> list[tuple[float, str]]:
    """``[(value, '#rrggbbaa'), ...]`` in data units: the layer's colour map sampled at ``n``
    values from ``vmin`` to ``vmax`` (geometric spacing for ``log`` layers), preceded by
    transparent stops below ``vmin`` for layers whose zero cells are not drawn.

    This is the one definition of a layer's colours: the server config turns it into an
    xcube custom colour map (:func:`xcube_color_mapping`), the WMS into a matplotlib one
    (:func:`colormap`).
    """
    import matplotlib

    cmap = matplotlib.colormaps[var.color_bar]
    if var.color_range.norm == "log" and vmin > 0:
        values = np.geomspace(vmin, vmax, n)
    else:
        values = np.linspace(vmin, vmax, n)
    stops = [(float(f"{v:.6g}"), matplotlib.colors.to_hex(cmap(i / (n - 1)), keep_alpha=True))
             for i, v in enumerate(values)]
    if var.color_range.transparent_zero and vmin > 0:
        # Colour maps are 256-entry tables over [0, vmax]: entry 0 (zero) transparent, the
        # first colour reached at entry 1, so values >= vmin (with vmax <= 255 vmin) are
        # opaque however the table is sampled (xcube and matplotlib sample it alike).
        edge = min(float(vmax) / 255, float(vmin) * 0.999)
        stops = [(0.0, _TRANSPARENT), (float(f"{edge:.6g}"), stops[0][1]), *stops]
    return stops


def xcube_color_mapping(var: GridVariable, attrs: dict, dataset_id: str,
                        ) -> tuple[dict, dict | None]:
    """``(ColorMappings entry, CustomColorMaps entry or None)`` of a layer for the xcube
    server config, from the colour range fitted at build time (the variable's attributes)."""
    vmin = float(attrs.get("color_value_min", var.color_range.vmin))
    vmax = float(attrs.get("color_value_max", var.color_range.vmax))
    if var.color_range.kind == "fixed" or var.composite:
        return {"ColorBar": var.color_bar, "ValueRange": [vmin, vmax]}, None
    stops = color_stops(var, vmin, vmax)
    ident = f"{CUSTOM_CMAP_PREFIX}{dataset_id}_{var.name}"
    custom = {"Identifier": ident, "Type": "continuous",
              "Colors": [[v, c] for v, c in stops]}
    # the stops carry the (log) spacing: the mapping itself is linear over them
    return {"ColorBar": ident, "ValueRange": [stops[0][0], stops[-1][0]]}, custom


def colormap(stops: list[tuple[float, str]]):
    """``(matplotlib colormap, Normalize)`` of colour stops, as xcube builds a custom map."""
    import matplotlib

    lo, hi = stops[0][0], stops[-1][0]
    span = (hi - lo) or 1.0
    items = [((v - lo) / span, c) for v, c in stops]
    cmap = matplotlib.colors.LinearSegmentedColormap.from_list("deepearth", items)
    cmap.set_bad((0, 0, 0, 0))
    return cmap, matplotlib.colors.Normalize(lo, hi, clip=True)


def switches() -> list[str]:
    """The recipe's allowed ``cubes.grid.variables`` entries, in registry order."""
    out: list[str] = []
    for v in GRID_VARIABLES.values():
        if v.switch not in out:
            out.append(v.switch)
    return out


def enabled(switches_on: Iterable[str]) -> list[GridVariable]:
    """The registry entries that the recipe's ``cubes.grid.variables`` turn on."""
    on = set(switches_on)
    return [v for v in GRID_VARIABLES.values() if v.switch in on]


def lookup(name: str, attrs: dict | None = None) -> GridVariable | None:
    """The registry entry of a grid variable name (per-species names included), else None."""
    if name in GRID_VARIABLES:
        return GRID_VARIABLES[name]
    if name.startswith(SPECIES_FAMILY.prefix):
        slug = name[len(SPECIES_FAMILY.prefix):]
        taxon = (attrs or {}).get("taxon_name") or slug.replace("_", " ").capitalize()
        return SPECIES_FAMILY.variable(slug, str(taxon))
    return None


__all__ = ["ColorRange", "GridVariable", "VariableFamily", "GRID_VARIABLES", "SPECIES_FAMILY",
           "RGB_COMPOSITE", "ORDER", "switches", "enabled", "lookup", "color_stops",
           "xcube_color_mapping", "colormap"]
