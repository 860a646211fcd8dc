// DeepEarth Cube: the exploration loop on top of xcube Viewer 1.7.4 (see viewer/README.md).
//
// The bundled viewer is patched at server start (server/viewer_bundle.py) with four
// hooks; this script, loaded before the viewer's module, fills them:
//   window.deepearthOnStore(store)   the viewer's Redux store, once created
//   window.deepearthMapObjects       the viewer's map registry (MAP_OBJECTS: .map is the
//                                    OpenLayers map)
//   window.deepearthHost.get/set     chartlets' host store falls back to these for
//                                    properties the viewer does not know, and calls set()
//                                    for Output("@app", ...) of the panels
//   window.deepearthReduxLog         true: the viewer's Redux logger prints (off by default)
//
// What it does with them:
//   * selection: Output("@app", "selectedPlaceId") of a panel, a click on an observation
//     dot (nearest one within a few pixels, asked from /explore/pick), the URL or the
//     3-D page selects that observation: a one-place user group "Selected observation"
//     (so the map highlights it and every panel sees selectedPlaceId "obs-<gbif_id>"),
//     map centred on it;
//   * filters (species search, months, hours, year): app property "deepearthFilters"
//     (a query string the panels pass on to the API), applied to the dots layer and to the
//     "Observations with photo embeddings" place list (/explore/places); a search naming
//     one species switches the map to that species' layer (count_<slug>), clearing it
//     switches back to the layer shown before;
//   * the dots follow the time slider (tile URLs carry the selected time);
//   * state in the URL: obs, time, dataset, variable, zoom, center and the filters;
//     reload restores it, Back / Forward step through selections and filter changes.
(function () {
  "use strict";

  var SELECTION_GROUP = "deepearth-selection";
  var PLACE_PREFIX = "obs-";
  var FILTER_KEYS = ["taxa", "months", "hours", "year"];
  var HISTORY_KEYS = ["obs", "time", "dataset", "variable"].concat(FILTER_KEYS);
  var DOTS_PATH = "/explore/observations/";
  var VISION_GROUP = "observations-with-embeddings";
  var SPECIES_DATASET = "grid_species";
  var PICK_RADIUS_PX = 8;
  var channel = "BroadcastChannel" in window ? new BroadcastChannel("deepearth") : null;

  var initial = new URLSearchParams(window.location.search);
  var state = {
    store: null,
    filters: pickFilters(initial),
    pending: {
      obs: initial.get("obs"),
      time: initial.get("time"),
      zoom: initial.get("zoom"),
      center: initial.get("center"),
    },
    restored: false,
    applying: false, // true while the URL is applied: no history entries then
    lastHistoryKey: null,
    selectionSeq: 0,
    clickBound: null,
    dotsUrl: null,
    placesWanted: null, // the filters of the place list being fetched
    layerBefore: null, // {dataset, variable, time} before a species layer was switched to
    speciesLayer: null, // {dataset, variable} switched to by the species search
  };
  if (initial.get("reduxLog") === "1") {
    window.deepearthReduxLog = true;
  }

  // -- helpers ----------------------------------------------------------------------------
  function apiBase() {
    var url = new URLSearchParams(window.location.search).get("serverUrl");
    return (url || window.location.origin).replace(/\/+$/, "");
  }

  function gbifOf(placeId) {
    if (placeId === null || placeId === undefined) return null;
    var s = String(placeId);
    if (s.indexOf(PLACE_PREFIX) === 0) s = s.substring(PLACE_PREFIX.length);
    return /^\d+$/.test(s) ? s : null;
  }

  function pickFilters(params) {
    var f = {};
    FILTER_KEYS.forEach(function (k) {
      var v = params.get(k);
      if (v !== null && String(v).trim() !== "") f[k] = String(v).trim();
    });
    return f;
  }

  function filtersString(f) {
    var p = new URLSearchParams();
    FILTER_KEYS.forEach(function (k) {
      if (f[k]) p.set(k, f[k]);
    });
    return p.toString();
  }

  function map() {
    var objects = window.deepearthMapObjects;
    return objects && objects.map ? objects.map : null;
  }

  function lonLatToMercator(lon, lat) {
    var r = 6378137.0;
    var y = Math.max(Math.min(lat, 85.05112878), -85.05112878);
    return [r * (lon * Math.PI / 180), r * Math.log(Math.tan(Math.PI / 4 + (y * Math.PI / 180) / 2))];
  }

  function mercatorToLonLat(x, y) {
    var r = 6378137.0;
    return [x / r * 180 / Math.PI, (2 * Math.atan(Math.exp(y / r)) - Math.PI / 2) * 180 / Math.PI];
  }

  function dispatch(action) {
    if (state.store) state.store.dispatch(action);
  }

  function selectedDataset(st) {
    var id = st.controlState.selectedDatasetId;
    var ds = st.dataState.datasets || [];
    for (var i = 0; i < ds.length; i++) if (ds[i].id === id) return ds[i];
    return null;
  }

  function timeLabels(st) {
    var ds = selectedDataset(st);
    if (!ds || !ds.dimensions) return [];
    for (var i = 0; i < ds.dimensions.length; i++) {
      if (ds.dimensions[i].name === "time") return ds.dimensions[i].labels || [];
    }
    return [];
  }

  // the time steps as the viewer selects them (ms since 1970; labels parsed as a fallback)
  function timeCoordinates(st) {
    var ds = selectedDataset(st);
    var dims = (ds && ds.dimensions) || [];
    for (var i = 0; i < dims.length; i++) {
      if (dims[i].name === "time") {
        if (dims[i].coordinates && dims[i].coordinates.length) return dims[i].coordinates.map(Number);
        return (dims[i].labels || []).map(function (l) { return Date.parse(l); });
      }
    }
    return [];
  }

  function isoTime(ms) {
    return new Date(ms).toISOString().replace(".000Z", "Z");
  }

  // -- selection ----------------------------------------------------------------------------
  function userGroupExists(st) {
    return (st.dataState.userPlaceGroups || []).some(function (g) {
      return g.id === SELECTION_GROUP;
    });
  }

  function clearSelection() {
    var st = state.store.getState();
    if (gbifOf(st.controlState.selectedPlaceId) !== null) {
      dispatch({ type: "SELECT_PLACE", placeId: null, places: [] });
    }
    if (userGroupExists(st)) {
      dispatch({ type: "REMOVE_USER_PLACE_GROUP", placeGroupId: SELECTION_GROUP });
    }
  }

  // Select the observation `gbif` everywhere; `centre`: pan the map to it.
  function selectObservation(gbif, centre) {
    if (!state.store) return Promise.resolve(null);
    gbif = gbifOf(gbif);
    if (gbif === null) {
      clearSelection();
      return Promise.resolve(null);
    }
    var seq = ++state.selectionSeq;
    return fetch(apiBase() + "/deepearth/observations/" + gbif)
      .then(function (r) {
        if (!r.ok) throw new Error("observation " + gbif + ": HTTP " + r.status);
        return r.json();
      })
      .then(function (rec) {
        if (seq !== state.selectionSeq) return null; // a later selection won
        var lon = Number(rec.lon), lat = Number(rec.lat);
        var name = (rec.species && (rec.species.taxon_name || rec.species.name)) || rec.taxon_name || "";
        var date = String(rec.time || "").substring(0, 10);
        var place = {
          type: "Feature",
          id: PLACE_PREFIX + gbif,
          properties: { label: (name ? name + " · " : "") + date, color: "#ff1744" },
          geometry: { type: "Point", coordinates: [lon, lat] },
        };
        var st = state.store.getState();
        if (userGroupExists(st)) {
          dispatch({ type: "REMOVE_USER_PLACE_GROUP", placeGroupId: SELECTION_GROUP });
        }
        dispatch({
          type: "ADD_IMPORTED_USER_PLACES",
          placeGroups: [{
            type: "FeatureCollection", id: SELECTION_GROUP, title: "Selected observation",
            features: [place],
          }],
          mapProjection: st.controlState.mapProjection || "EPSG:3857",
          selected: true,
        });
        dispatch({ type: "SELECT_PLACE", placeId: place.id, places: [place] });
        var m = map();
        if (centre && m) {
          m.getView().animate({ center: lonLatToMercator(lon, lat), duration: 250 });
        }
        if (channel) channel.postMessage({ type: "selection", gbif_id: Number(gbif), from: "viewer" });
        return place;
      })
      .catch(function (err) {
        console.warn("DeepEarth: cannot select observation", gbif, err);
        return null;
      });
  }

  // A click on the map (Select mode, nothing drawn hit): the nearest dot within a few pixels.
  function onMapClick(evt) {
    var st = state.store && state.store.getState();
    if (!st || st.controlState.mapInteraction !== "Select") return;
    var m = evt.map;
    var hit = m.forEachFeatureAtPixel(evt.pixel, function () { return true; }, { hitTolerance: 2 });
    if (hit) return; // a drawn place or the selected one: the viewer handles it
    var ll = mercatorToLonLat(evt.coordinate[0], evt.coordinate[1]);
    var radius = PICK_RADIUS_PX * m.getView().getResolution() * Math.cos(ll[1] * Math.PI / 180);
    var q = new URLSearchParams(dotsQuery(st));
    q.set("lon", ll[0].toFixed(6));
    q.set("lat", ll[1].toFixed(6));
    q.set("radius_m", radius.toFixed(1));
    fetch(apiBase() + "/explore/pick?" + q.toString())
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (res) {
        if (res && res.gbif_id !== null && res.gbif_id !== undefined) {
          selectObservation(res.gbif_id, false);
        }
      })
      .catch(function (err) { console.warn("DeepEarth: pick failed", err); });
  }

  // -- the dots layer: filters and time ----------------------------------------------------
  function dotsTime(st) {
    var t = st.controlState.selectedTime;
    return typeof t === "number" ? isoTime(t) : null;
  }

  // The dots show the selected time step of the dataset shown: a year of the yearly grid,
  // a month of year of the climatology, everything for an all-years dataset.
  function dotsQuery(st) {
    var q = new URLSearchParams(filtersString(state.filters));
    var t = dotsTime(st);
    if (t) {
      q.set("time", t);
      if (st.controlState.selectedDatasetId) q.set("dataset", st.controlState.selectedDatasetId);
    }
    return q.toString();
  }

  function sourceBase(source) {
    var urls = source && source.getUrls ? source.getUrls() : null;
    if (!urls || !urls.length) return null;
    var u = urls[0];
    var at = u.indexOf(DOTS_PATH);
    if (at < 0) return null;
    var end = u.indexOf("?");
    return end < 0 ? u : u.substring(0, end);
  }

  function updateDotsLayer() {
    var m = map();
    if (!m || !state.store) return;
    var q = dotsQuery(state.store.getState());
    m.getLayers().forEach(function visit(layer) {
      if (layer.getLayers) {
        layer.getLayers().forEach(visit);
        return;
      }
      var source = layer.getSource && layer.getSource();
      var base = sourceBase(source);
      if (base && source.setUrl) {
        var want = base + (q ? "?" + q : "");
        if (source.getUrls()[0] !== want) source.setUrl(want);
      }
    });
  }

  // -- filters -------------------------------------------------------------------------------
  function setFilters(f, fromHistory) {
    var next = {};
    FILTER_KEYS.forEach(function (k) { if (f[k]) next[k] = String(f[k]).trim(); });
    if (filtersString(next) === filtersString(state.filters)) return;
    state.filters = next;
    dispatch({ type: "DEEPEARTH_FILTERS_CHANGED" }); // chartlets re-reads its @app inputs
    updateDotsLayer();
    updatePlaces();
    renderBar();
    if (channel) channel.postMessage({ type: "filters", filters: filtersString(next), from: "viewer" });
    if (!fromHistory) syncUrl();
  }

  // -- the place list follows the filters -----------------------------------------------------
  function visionGroupLoaded(st) {
    var ds = st.dataState.datasets || [];
    for (var i = 0; i < ds.length; i++) {
      var groups = ds[i].placeGroups || [];
      for (var j = 0; j < groups.length; j++) {
        if (groups[j].id === VISION_GROUP && groups[j].features) return groups[j];
      }
    }
    return null;
  }

  // Replace the loaded place group's features by those the dot filters keep.
  function updatePlaces() {
    if (!state.store) return;
    var st = state.store.getState();
    var group = visionGroupLoaded(st);
    var key = dotsQuery(st);
    if (!group || group.deepearthFilters === key || state.placesWanted === key) return;
    state.placesWanted = key;
    fetch(apiBase() + "/explore/places" + (key ? "?" + key : ""))
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(function (res) {
        if (state.placesWanted !== key) return; // the filters moved on
        var now = visionGroupLoaded(state.store.getState()) || group;
        var next = Object.assign({}, now, { features: res.features, deepearthFilters: key });
        var dsId = state.store.getState().controlState.selectedDatasetId;
        state.placesWanted = null;
        dispatch({ type: "UPDATE_DATASET_PLACE_GROUP", datasetId: dsId, placeGroup: next });
      })
      .catch(function (err) {
        state.placesWanted = null;
        console.warn("DeepEarth: cannot narrow the place list", err);
      });
  }

  // -- the species layer follows a search naming one species ---------------------------------
  function datasetWith(st, variable) {
    var ds = st.dataState.datasets || [];
    var current = selectedDataset(st);
    var order = [current].concat(ds.filter(function (d) { return d.id === SPECIES_DATASET; }), ds);
    for (var i = 0; i < order.length; i++) {
      var d = order[i];
      if (d && (d.variables || []).some(function (v) { return v.name === variable; })) return d;
    }
    return null;
  }

  function showLayer(datasetId, variable, time) {
    var st = state.store.getState();
    if (st.controlState.selectedDatasetId !== datasetId) {
      dispatch({ type: "SELECT_DATASET", selectedDatasetId: datasetId,
                 datasets: st.dataState.datasets });
    }
    if (state.store.getState().controlState.selectedVariableName !== variable) {
      dispatch({ type: "SELECT_VARIABLE", selectedVariableName: variable });
    }
    if (typeof time === "number") dispatch({ type: "SELECT_TIME", selectedTime: time });
  }

  // `layer`: /explore/count's species layer of the search (null: the search names no
  // single species).
  function followSpeciesLayer(layer) {
    var st = state.store.getState();
    var cs = st.controlState;
    var shown = state.speciesLayer;
    var stillShown = shown && cs.selectedDatasetId === shown.dataset &&
      cs.selectedVariableName === shown.variable;
    if (layer && layer.variable) {
      var ds = datasetWith(st, layer.variable);
      if (!ds) return;
      if (stillShown && shown.variable === layer.variable && shown.dataset === ds.id) return;
      if (!stillShown) {
        state.layerBefore = { dataset: cs.selectedDatasetId, variable: cs.selectedVariableName,
                              time: cs.selectedTime };
      }
      state.speciesLayer = { dataset: ds.id, variable: layer.variable };
      consequently(function () { showLayer(ds.id, layer.variable, null); });
      return;
    }
    if (stillShown && state.layerBefore) { // back to what was shown before the search
      var b = state.layerBefore;
      consequently(function () { showLayer(b.dataset, b.variable, b.time); });
    }
    state.speciesLayer = null;
    state.layerBefore = null;
  }

  // -- the URL ------------------------------------------------------------------------------
  function currentParams(st) {
    var cs = st.controlState;
    var p = new URLSearchParams(window.location.search);
    ["obs", "time", "zoom", "center"].concat(FILTER_KEYS).forEach(function (k) { p.delete(k); });
    var obs = gbifOf(cs.selectedPlaceId);
    if (obs !== null && String(cs.selectedPlaceId).indexOf(PLACE_PREFIX) === 0) p.set("obs", obs);
    if (typeof cs.selectedTime === "number") p.set("time", isoTime(cs.selectedTime));
    if (cs.selectedDatasetId) p.set("dataset", cs.selectedDatasetId);
    if (cs.selectedVariableName) p.set("variable", cs.selectedVariableName);
    FILTER_KEYS.forEach(function (k) { if (state.filters[k]) p.set(k, state.filters[k]); });
    var m = map();
    if (m && m.getView().getCenter()) {
      var c = mercatorToLonLat(m.getView().getCenter()[0], m.getView().getCenter()[1]);
      p.set("zoom", (Math.round(m.getView().getZoom() * 100) / 100).toString());
      p.set("center", c[0].toFixed(5) + "," + c[1].toFixed(5));
    }
    return p;
  }

  // Run `change` (store dispatches) as a consequence of the last history entry: it
  // replaces that entry, unless a write of a new one is still pending (it takes it along).
  function consequently(change) {
    var pending = syncTimer !== null;
    change();
    if (!pending) replaceNext = true;
    syncUrl(true);
  }

  function historyKey(p) {
    return HISTORY_KEYS.map(function (k) { return k + "=" + (p.get(k) || ""); }).join("&");
  }

  var syncTimer = null;
  var replaceNext = false;
  // Write the state into the URL: a new history entry when it moved (selection, time,
  // layer, filters), else the current one replaced. `consequence` (see consequently):
  // the change follows from the last entry (the species layer of a filter).
  function syncUrl(consequence) {
    if (!state.store || !state.restored || (state.applying && consequence !== true)) return;
    if (syncTimer) clearTimeout(syncTimer);
    syncTimer = setTimeout(function () {
      syncTimer = null;
      var replace = replaceNext;
      replaceNext = false;
      if (state.applying && !replace) return;
      var p = currentParams(state.store.getState());
      var url = window.location.pathname + "?" + p.toString() + window.location.hash;
      if (url === window.location.pathname + window.location.search + window.location.hash) return;
      var key = historyKey(p);
      if (!replace && state.lastHistoryKey !== null && key !== state.lastHistoryKey) {
        window.history.pushState({ deepearth: true }, "", url);
      } else {
        window.history.replaceState({ deepearth: true }, "", url);
      }
      state.lastHistoryKey = key;
    }, 120);
  }

  function applyView(zoom, center) {
    var m = map();
    if (!m) return;
    var view = m.getView();
    // a fit of the viewer's that is still animating would move the map away again
    if (view.getAnimating()) view.cancelAnimations();
    if (center) {
      var c = String(center).split(",").map(Number);
      if (c.length === 2 && isFinite(c[0]) && isFinite(c[1])) view.setCenter(lonLatToMercator(c[0], c[1]));
    }
    if (zoom !== null && zoom !== undefined && isFinite(Number(zoom))) view.setZoom(Number(zoom));
  }

  function applyTime(iso) {
    if (!iso) return;
    var ms = Date.parse(iso);
    if (!isFinite(ms)) return;
    var coords = timeCoordinates(state.store.getState());
    var best = ms, bestD = Infinity;
    coords.forEach(function (v) {
      if (isFinite(v) && Math.abs(v - ms) < bestD) { bestD = Math.abs(v - ms); best = v; }
    });
    if (state.store.getState().controlState.selectedTime !== best) {
      dispatch({ type: "SELECT_TIME", selectedTime: best });
    }
  }

  // Apply a URL's state (at start, and on Back / Forward).
  function applyParams(p, centreOnObs) {
    state.applying = true;
    var cs = state.store.getState().controlState;
    var variable = p.get("variable");
    if (variable && variable !== cs.selectedVariableName) {
      var ds = selectedDataset(state.store.getState());
      var known = ds && (ds.variables || []).some(function (v) { return v.name === variable; });
      if (known) dispatch({ type: "SELECT_VARIABLE", selectedVariableName: variable });
    }
    applyTime(p.get("time"));
    setFilters(pickFilters(p), true);
    applyView(p.get("zoom"), p.get("center"));
    var obs = p.get("obs");
    var done = gbifOf(obs) !== gbifOf(cs.selectedPlaceId)
      ? selectObservation(obs, centreOnObs && !p.get("center"))
      : Promise.resolve(null);
    return done.then(function () {
      state.applying = false;
      state.lastHistoryKey = historyKey(currentParams(state.store.getState()));
    });
  }

  window.addEventListener("popstate", function () {
    if (!state.store || !state.restored) return;
    applyParams(new URLSearchParams(window.location.search), true);
  });

  // -- the filter bar -----------------------------------------------------------------------
  // Species search (name, genus, "cluster 3", "unclustered"), month and hour ranges, year.
  var MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

  function el(id) { return document.getElementById(id); }

  function options(select, items) {
    select.innerHTML = "";
    items.forEach(function (it) {
      var o = document.createElement("option");
      o.value = it[0];
      o.textContent = it[1];
      select.appendChild(o);
    });
  }

  function splitRange(v) {
    if (!v) return ["", ""];
    var p = String(v).split("-");
    return [p[0], p.length > 1 ? p[1] : p[0]];
  }

  function joinRange(a, b) {
    if (a === "" && b === "") return "";
    if (a === "") a = b;
    if (b === "") b = a;
    return a === b ? a : a + "-" + b;
  }

  function buildFilterBar() {
    if (el("deepearth-filters")) return;
    var bar = document.createElement("div");
    bar.id = "deepearth-filters";
    bar.setAttribute("role", "search");
    bar.style.cssText = "position:fixed;left:50%;bottom:34px;transform:translateX(-50%);" +
      "z-index:1100;background:rgba(255,255,255,0.96);border-radius:6px;" +
      "box-shadow:0 1px 6px rgba(0,0,0,.35);padding:6px 10px;display:flex;gap:10px;" +
      "align-items:center;white-space:nowrap;font:13px Roboto,Helvetica,Arial,sans-serif;" +
      "color:#222";
    bar.innerHTML =
      '<label>Species <input id="deepearth-taxa" list="deepearth-taxa-list" size="24" ' +
      'placeholder="name, genus or cluster 3" aria-label="Species search"></label>' +
      '<datalist id="deepearth-taxa-list"></datalist>' +
      '<label>Months <select id="deepearth-month-from" aria-label="First month"></select>' +
      '–<select id="deepearth-month-to" aria-label="Last month"></select></label>' +
      '<label>Hours <select id="deepearth-hour-from" aria-label="First hour"></select>' +
      '–<select id="deepearth-hour-to" aria-label="Last hour"></select></label>' +
      '<label>Year <select id="deepearth-year" aria-label="Year"></select></label>' +
      '<button id="deepearth-clear" type="button">Clear</button>' +
      '<span id="deepearth-count" style="color:#555"></span>';
    document.body.appendChild(bar);
    var months = [["", "any"]].concat(MONTHS.map(function (m, i) { return [String(i + 1), m]; }));
    options(el("deepearth-month-from"), months);
    options(el("deepearth-month-to"), months);
    var hours = [["", "any"]];
    for (var h = 0; h < 24; h++) hours.push([String(h), (h < 10 ? "0" : "") + h + ":00"]);
    options(el("deepearth-hour-from"), hours);
    options(el("deepearth-hour-to"), hours);
    var years = [["", "any"]];
    var seen = {};
    timeLabels(state.store.getState()).forEach(function (l) {
      var y = String(l).substring(0, 4);
      if (!seen[y]) { seen[y] = true; years.push([y, y]); }
    });
    options(el("deepearth-year"), years);
    ["deepearth-month-from", "deepearth-month-to", "deepearth-hour-from", "deepearth-hour-to",
      "deepearth-year", "deepearth-taxa"].forEach(function (id) {
      el(id).addEventListener("change", applyBar);
    });
    el("deepearth-taxa").addEventListener("keydown", function (e) {
      if (e.key === "Enter") applyBar();
    });
    el("deepearth-taxa").addEventListener("input", suggest);
    el("deepearth-clear").addEventListener("click", function () {
      setFilters({});
    });
    renderBar();
  }

  var suggestTimer = null;
  function suggest() {
    if (suggestTimer) clearTimeout(suggestTimer);
    suggestTimer = setTimeout(function () {
      var q = el("deepearth-taxa").value;
      fetch(apiBase() + "/explore/taxa?q=" + encodeURIComponent(q))
        .then(function (r) { return r.ok ? r.json() : { suggestions: [] }; })
        .then(function (res) {
          var list = el("deepearth-taxa-list");
          list.innerHTML = "";
          var prefix = q.lastIndexOf(",") >= 0 ? q.substring(0, q.lastIndexOf(",") + 1) + " " : "";
          (res.suggestions || []).forEach(function (s) {
            var o = document.createElement("option");
            o.value = prefix + s.value;
            o.label = s.label;
            list.appendChild(o);
          });
        })
        .catch(function () { /* suggestions are a help only */ });
    }, 150);
  }

  function applyBar() {
    var year = el("deepearth-year").value;
    setFilters({
      taxa: el("deepearth-taxa").value.trim(),
      months: joinRange(el("deepearth-month-from").value, el("deepearth-month-to").value),
      hours: joinRange(el("deepearth-hour-from").value, el("deepearth-hour-to").value),
      year: year,
    });
    if (year) { // the dots follow the time slider: bring it to that year
      var labels = timeLabels(state.store.getState());
      for (var i = 0; i < labels.length; i++) {
        if (String(labels[i]).substring(0, 4) === year) { applyTime(labels[i]); break; }
      }
    }
  }

  function renderBar() {
    if (!el("deepearth-filters")) return;
    var f = state.filters;
    el("deepearth-taxa").value = f.taxa || "";
    var m = splitRange(f.months), h = splitRange(f.hours);
    el("deepearth-month-from").value = m[0];
    el("deepearth-month-to").value = m[1];
    el("deepearth-hour-from").value = h[0];
    el("deepearth-hour-to").value = h[1];
    el("deepearth-year").value = f.year || "";
    updateCount();
  }

  var countSeq = 0;
  function updateCount() {
    var out = el("deepearth-count");
    if (!out || !state.store) return;
    var seq = ++countSeq;
    fetch(apiBase() + "/explore/count?" + dotsQuery(state.store.getState()))
      .then(function (r) { return r.json().then(function (j) { return { ok: r.ok, j: j }; }); })
      .then(function (res) {
        if (seq !== countSeq) return;
        if (!res.ok) {
          out.textContent = (res.j.error && res.j.error.message) || "filter error";
          out.style.color = "#c62828";
          return;
        }
        out.style.color = "#555";
        out.textContent = res.j.observations.toLocaleString("en") + " dots · " +
          res.j.species.toLocaleString("en") + " species";
        out.setAttribute("data-observations", String(res.j.observations));
        followSpeciesLayer(res.j.layer || null);
      })
      .catch(function () { out.textContent = ""; });
  }

  // -- the store ------------------------------------------------------------------------------
  function ready(st) {
    return st.dataState.datasets && st.dataState.datasets.length > 0 &&
      st.controlState.selectedDatasetId && map() !== null;
  }

  function bindMap() {
    var m = map();
    if (!m || state.clickBound === m) return;
    state.clickBound = m;
    m.on("singleclick", onMapClick);
    m.on("moveend", syncUrl);
    // the viewer re-creates its layers now and then (with the configured URL): check the
    // dots layer's URL before every frame (a few string comparisons)
    m.on("precompose", updateDotsLayer);
  }

  function onStoreChange() {
    var st = state.store.getState();
    if (!ready(st)) return;
    bindMap();
    buildFilterBar();
    updateDotsLayer();
    updatePlaces();
    var stepKey = st.controlState.selectedTime + "|" + st.controlState.selectedDatasetId;
    if (stepKey !== state.lastStep) {
      state.lastStep = stepKey;
      updateCount();
    }
    if (!state.restored) {
      state.restored = true;
      // after the viewer's own first fit to the dataset extent
      setTimeout(function () {
        var p = new URLSearchParams();
        Object.keys(state.pending).forEach(function (k) {
          if (state.pending[k]) p.set(k, state.pending[k]);
        });
        FILTER_KEYS.forEach(function (k) { if (state.filters[k]) p.set(k, state.filters[k]); });
        applyParams(p, true).then(syncUrl);
      }, 400);
      return;
    }
    syncUrl();
  }

  window.deepearthOnStore = function (store) {
    state.store = store;
    window.deepearth.store = store;
    // Drawn regions are for the Region statistics panel, not xcube's time-series panel.
    try {
      if (!window.localStorage.getItem("deepearth.settings.v1")) {
        store.dispatch({ type: "UPDATE_SETTINGS", settings: { autoShowTimeSeries: false } });
        window.localStorage.setItem("deepearth.settings.v1", "1");
      }
    } catch (e) { /* private mode: keep the viewer's default */ }
    store.subscribe(onStoreChange);
  };

  window.deepearthHost = {
    get: function (name) {
      if (name === "deepearthFilters") return filtersString(state.filters);
      return undefined;
    },
    set: function (name, value) {
      if (name === "selectedPlaceId" || name === "deepearthSelect") {
        // panels answer None when a click picked nothing: never a deselection
        if (value === null || value === undefined || value === "") return;
        selectObservation(value, true);
      } else if (name === "deepearthFilters") {
        setFilters(pickFilters(new URLSearchParams(value || "")));
      }
    },
  };

  if (channel) {
    channel.onmessage = function (e) {
      var msg = e.data || {};
      if (msg.from === "viewer") return;
      if (msg.type === "selection") selectObservation(msg.gbif_id, true);
      if (msg.type === "hello" && state.store) {
        var cs = state.store.getState().controlState;
        channel.postMessage({ type: "selection", gbif_id: Number(gbifOf(cs.selectedPlaceId)),
          filters: filtersString(state.filters), from: "viewer" });
      }
    };
  }

  window.deepearth = {
    selectObservation: selectObservation,
    setFilters: function (f) { setFilters(f || {}); },
    filters: function () { return Object.assign({}, state.filters); },
    store: null,
  };
})();
