// cleandift explore: the page. Plain JS, no build step. All coordinates sent or shown are
// original-image pixels, (0, 0) the centre of the top-left pixel (cleandift.images).
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const METHOD_ORDER = ["cleandift", "dift", "frozen"];
const POINT_COLORS = ["#ef4444", "#3b82f6", "#22c55e", "#f59e0b", "#a855f7", "#06b6d4", "#ec4899",
  "#84cc16", "#f97316", "#14b8a6"];
// inferno-like colormap anchors (t, r, g, b)
const CMAP = [[0, 0, 0, 4], [0.25, 87, 16, 110], [0.5, 188, 55, 84], [0.75, 249, 142, 9], [1, 252, 255, 164]];

const state = {
  config: null,
  images: [],          // [{id, name, width, height, origin}]
  source: null,        // image id
  targets: [],         // image ids
  points: [],          // [[x, y]] on the source
  mode: "click",
  match: null,         // last /api/match answer
  mutual: null,        // last /api/mutual answer
  seq: 0,              // request counter: answers to stale requests are dropped
  queries: 0,          // answered queries (tests wait on it)
};

// ------------------------------------------------------------------------------------------- helpers
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
  return node;
}
const fmt = (v, d = 1) => Number(v).toFixed(d);
const imageById = (id) => state.images.find((im) => im.id === id);
const pointColor = (i) => POINT_COLORS[i % POINT_COLORS.length];

function colormap(t) {
  t = Math.min(1, Math.max(0, t));
  for (let i = 1; i < CMAP.length; i++) {
    if (t <= CMAP[i][0]) {
      const [t0, r0, g0, b0] = CMAP[i - 1], [t1, r1, g1, b1] = CMAP[i];
      const f = (t - t0) / (t1 - t0);
      return [r0 + f * (r1 - r0), g0 + f * (g1 - g0), b0 + f * (b1 - b0)];
    }
  }
  return CMAP[CMAP.length - 1].slice(1);
}

function setStatus(text, stateName) {
  const s = $("#status");
  s.textContent = text;
  s.dataset.state = stateName;
}

function showMessage(text, from = "query") {
  state.messageFrom = from;  // a query's success clears only a query's error
  $("#message-text").textContent = text;
  $("#message").hidden = false;
  setStatus("error", "error");
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : `${response.status} ${response.statusText}`;
    throw new Error(detail);
  }
  return body;
}
const postJSON = (path, payload) => api(path, {
  method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(payload),
});

// ------------------------------------------------------------------------------------------- settings
function numberOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function enabledMethods() {
  const out = [];
  for (const name of METHOD_ORDER) {
    const box = $(`#m-${name}`);
    if (!box || box.disabled || !box.checked) continue;
    const m = {name, t: numberOrNull(`#${name}-t`)};
    if (name === "dift") m.ensemble = numberOrNull("#dift-ensemble") ?? 8;
    out.push(m);
  }
  return out;
}

function featurePayload() {
  return {methods: enabledMethods(), tap: $("#tap").value, prompt: $("#prompt").value, resize: $("#resize").value};
}

function matcherPayload() {
  return {method: $("#matcher").value, grid: $("#grid").value, window: Number($("#window").value),
    temperature: Number($("#temperature").value)};
}

function methodLabel(name) {
  const m = state.config.methods.find((x) => x.name === name);
  return m ? m.label : name;
}

function methodDetail(name) {
  if (name === "cleandift") {
    const t = numberOrNull("#cleandift-t");
    return t === null ? `t ${fmt(state.config.methods[0].t ?? 261, 0)} (learned)` : `t ${t}`;
  }
  if (name === "dift") return `t ${$("#dift-t").value} · ${$("#dift-ensemble").value} draws`;
  return `t ${$("#frozen-t").value}`;
}

// ------------------------------------------------------------------------------------------- views
// An image with a heatmap canvas and markers on top; markers are placed in % of the image box.
function makeView(entry, role, extra = {}) {
  const img = el("img", {src: `/api/images/${entry.id}`, alt: entry.name, draggable: "false"});
  const heat = el("canvas", {class: "heat", dataset: {ready: "0"}});
  const marks = el("div", {class: "marks"});
  const view = el("div", {class: `view ${role}`, dataset: {image: entry.id, ...extra}}, img, heat, marks);
  view.style.aspectRatio = `${entry.width} / ${entry.height}`;
  view.addEventListener("click", (ev) => onViewClick(ev, view, entry, role));
  return view;
}

function eventToImage(ev, view, entry) {
  const r = view.getBoundingClientRect();
  const x = (ev.clientX - r.left) / r.width * entry.width - 0.5;
  const y = (ev.clientY - r.top) / r.height * entry.height - 0.5;
  const clamp = (v, hi) => Math.round(Math.min(hi - 0.5, Math.max(-0.5, v)) * 100) / 100;
  return [clamp(x, entry.width), clamp(y, entry.height)];
}

function addMarker(view, entry, xy, cls, color, label, data) {
  const m = el("div", {class: `marker ${cls}`, title: `${label} (${fmt(xy[0])}, ${fmt(xy[1])})`,
    dataset: {x: xy[0], y: xy[1], ...data}}, el("span", {}, label));
  m.style.left = `${(xy[0] + 0.5) / entry.width * 100}%`;
  m.style.top = `${(xy[1] + 0.5) / entry.height * 100}%`;
  m.style.setProperty("--c", color);
  $(".marks", view).append(m);
  return m;
}

function drawHeatmap(view, heatmap) {
  const canvas = $("canvas.heat", view);
  if (!heatmap || !$("#show-heatmap").checked) {
    canvas.dataset.ready = "0";
    canvas.style.display = "none";
    return;
  }
  const {width, height, values, min, max} = heatmap;
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(width, height);
  const span = Math.max(1e-6, max - min);
  const focus = Number($("#heat-focus").value);  // gamma: higher shows only the best-matching region
  for (let i = 0; i < values.length; i++) {
    const t = Math.pow((values[i] - min) / span, focus);
    const [r, g, b] = colormap(t);
    image.data.set([r, g, b, 255 * (0.1 + 0.9 * t)], 4 * i);
  }
  ctx.putImageData(image, 0, 0);
  canvas.style.display = "block";
  canvas.style.opacity = $("#heat-opacity").value;
  canvas.dataset.ready = "1";
  canvas.dataset.min = min;
  canvas.dataset.max = max;
}

// ------------------------------------------------------------------------------------------- rendering
function renderGallery() {
  const gallery = $("#gallery");
  gallery.replaceChildren();
  for (const entry of state.images) {
    const isSource = entry.id === state.source;
    const isTarget = state.targets.includes(entry.id);
    const card = el("div", {class: `thumb${isSource ? " is-source" : ""}${isTarget ? " is-target" : ""}`,
      dataset: {id: entry.id}, title: `${entry.name} (${entry.width}×${entry.height})`},
    el("img", {src: `/api/images/${entry.id}`, alt: entry.name, draggable: "false"}),
    el("div", {class: "thumb-bar"},
      el("button", {type: "button", class: "star", title: "make this the source",
        "aria-pressed": isSource ? "true" : "false", onclick: () => setSource(entry.id)}, "★"),
      el("span", {class: "thumb-name"}, entry.name),
      el("button", {type: "button", class: "tick", title: "use as a target",
        "aria-pressed": isTarget ? "true" : "false", onclick: () => toggleTarget(entry.id)}, "✓")));
    gallery.append(card);
  }
}

function renderStage() {
  renderGallery();
  const source = imageById(state.source);
  const sourceBox = $("#source-view");
  sourceBox.replaceChildren();
  $("#source-name").textContent = source ? `${source.name} · ${source.width}×${source.height} px` : "";
  if (source) sourceBox.append(makeView(source, "source"));
  const methods = enabledMethods().map((m) => m.name);
  const grid = $("#targets");
  grid.replaceChildren();
  grid.style.setProperty("--cols", Math.max(1, methods.length));
  if (!methods.length) grid.append(el("p", {class: "empty"}, "Enable at least one method."));
  else if (!state.targets.length) grid.append(el("p", {class: "empty"}, "Tick one or more target images above."));
  else {
    grid.append(el("div", {class: "corner"}));
    for (const name of methods) {
      grid.append(el("div", {class: "col-head"}, el("b", {}, methodLabel(name)),
        el("span", {class: "hint"}, methodDetail(name))));
    }
    for (const id of state.targets) {
      const entry = imageById(id);
      if (!entry) continue;
      grid.append(el("div", {class: "row-head", title: entry.name}, entry.name));
      for (const name of methods) {
        const cell = el("div", {class: "cell", dataset: {target: id, method: name}});
        if (state.mode === "mutual") {
          cell.append(el("canvas", {class: "pair", dataset: {target: id, method: name, pairs: "0"}}));
        } else {
          cell.append(makeView(entry, "target", {method: name}));
        }
        cell.append(el("div", {class: "caption"}));
        grid.append(cell);
      }
    }
  }
  drawResults();
}

function drawResults() {
  const source = imageById(state.source);
  $$(".marks").forEach((m) => m.replaceChildren());
  $$("canvas.heat").forEach((c) => { c.dataset.ready = "0"; c.style.display = "none"; });
  $$(".caption").forEach((c) => c.replaceChildren());
  const list = $("#points-list");
  list.replaceChildren();
  const sourceView = $("#source-view .view");
  if (sourceView && state.mode !== "mutual") {
    state.points.forEach((p, i) => {
      addMarker(sourceView, source, p, "src", pointColor(i), String(i + 1), {point: i});
      list.append(el("li", {style: `--c:${pointColor(i)}`}, `(${fmt(p[0])}, ${fmt(p[1])})`));
    });
  }
  if (state.mode === "mutual") drawMutual(); else drawMatches();
  renderTable();
}

function drawMatches() {
  const answer = state.match;
  if (!answer || answer.source !== state.source) return;
  for (const r of answer.results) {
    const cell = $(`.cell[data-target="${r.target}"][data-method="${r.method}"]`);
    if (!cell) continue;
    const view = $(".view", cell);
    const entry = imageById(r.target);
    if (r.heatmap) drawHeatmap(view, r.heatmap);
    r.points.forEach((p, i) => addMarker(view, entry, p, "pred", pointColor(i), String(i + 1),
      {target: r.target, method: r.method, point: i, score: r.scores[i]}));
    const last = r.points.length - 1;
    $(".caption", cell).append(el("span", {}, `(${fmt(r.points[last][0])}, ${fmt(r.points[last][1])})`),
      el("span", {class: "score"}, `cos ${fmt(r.scores[last], 3)}`));
  }
}

function drawMutual() {
  const answer = state.mutual;
  if (!answer || answer.source !== state.source) return;
  const source = imageById(state.source);
  for (const r of answer.results) {
    const cell = $(`.cell[data-target="${r.target}"][data-method="${r.method}"]`);
    if (!cell) continue;
    const canvas = $("canvas.pair", cell);
    drawPair(canvas, source, imageById(r.target), r.pairs);
    canvas.dataset.pairs = r.pairs.length;
    const mean = r.pairs.length ? r.pairs.reduce((s, p) => s + p.confidence, 0) / r.pairs.length : 0;
    $(".caption", cell).append(el("span", {}, `${r.pairs.length} of ${r.mutual_total} mutual`),
      el("span", {class: "score"}, `mean conf ${fmt(mean, 2)}`));
  }
}

// Source | target side by side on one canvas, a line per mutual pair coloured by its confidence.
function drawPair(canvas, source, target, pairs) {
  const height = 180, gap = 8;
  const sw = height * source.width / source.height, tw = height * target.width / target.height;
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round((sw + gap + tw) * dpr);
  canvas.height = Math.round(height * dpr);
  canvas.style.aspectRatio = `${sw + gap + tw} / ${height}`;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  const srcImg = new Image(), trgImg = new Image();
  let loaded = 0;
  const draw = () => {
    if (++loaded < 2) return;
    ctx.drawImage(srcImg, 0, 0, sw, height);
    ctx.drawImage(trgImg, sw + gap, 0, tw, height);
    ctx.lineWidth = 1.5;
    for (const p of pairs) {
      const [r, g, b] = colormap(0.35 + 0.65 * p.confidence);
      const ax = (p.source[0] + 0.5) / source.width * sw, ay = (p.source[1] + 0.5) / source.height * height;
      const bx = sw + gap + (p.target[0] + 0.5) / target.width * tw;
      const by = (p.target[1] + 0.5) / target.height * height;
      ctx.strokeStyle = `rgba(${r},${g},${b},0.9)`;
      ctx.beginPath(); ctx.moveTo(ax, ay); ctx.lineTo(bx, by); ctx.stroke();
      for (const [x, y] of [[ax, ay], [bx, by]]) {
        ctx.fillStyle = `rgb(${r},${g},${b})`;
        ctx.beginPath(); ctx.arc(x, y, 3, 0, 2 * Math.PI); ctx.fill();
      }
    }
    canvas.dataset.ready = "1";
  };
  srcImg.onload = draw; trgImg.onload = draw;
  srcImg.src = `/api/images/${source.id}`;
  trgImg.src = `/api/images/${target.id}`;
}

function renderTable() {
  const head = $("#results thead"), body = $("#results tbody");
  body.replaceChildren();
  if (state.mode === "mutual") {
    head.replaceChildren(el("tr", {}, ["target", "method", "source x, y", "target x, y", "cosine", "confidence"]
      .map((h) => el("th", {}, h))));
    const answer = state.mutual;
    if (!answer || answer.source !== state.source) return;
    for (const r of answer.results) {
      for (const p of r.pairs) {
        body.append(el("tr", {dataset: {target: r.target, method: r.method}},
          el("td", {}, imageById(r.target).name), el("td", {}, r.label),
          el("td", {}, `${fmt(p.source[0])}, ${fmt(p.source[1])}`),
          el("td", {}, `${fmt(p.target[0])}, ${fmt(p.target[1])}`),
          el("td", {}, fmt(p.similarity, 3)), el("td", {}, fmt(p.confidence, 3))));
      }
    }
    return;
  }
  head.replaceChildren(el("tr", {}, ["#", "source x, y", "target", "method", "x", "y", "cosine"]
    .map((h) => el("th", {}, h))));
  const answer = state.match;
  if (!answer || answer.source !== state.source) return;
  answer.points.forEach((sp, i) => {
    for (const r of answer.results) {
      const [x, y] = r.points[i];
      body.append(el("tr", {class: "result", dataset: {point: i, target: r.target, method: r.method, x, y,
        score: r.scores[i]}},
      el("td", {}, el("span", {class: "dot", style: `--c:${pointColor(i)}`}, String(i + 1))),
      el("td", {}, `${fmt(sp[0])}, ${fmt(sp[1])}`), el("td", {}, imageById(r.target).name),
      el("td", {}, r.label), el("td", {}, fmt(x)), el("td", {}, fmt(y)), el("td", {}, fmt(r.scores[i], 3))));
    }
  });
}

// ------------------------------------------------------------------------------------------- actions
function setSource(id) {
  if (id === state.source) return;
  state.targets = state.targets.filter((t) => t !== id);
  state.source = id;
  state.points = [];
  state.match = null;
  renderStage();
  if (state.mode === "mutual") query();
}

function toggleTarget(id) {
  state.targets = state.targets.includes(id) ? state.targets.filter((t) => t !== id) : [...state.targets, id];
  renderStage();
  query();
}

function onViewClick(ev, view, entry, role) {
  if (state.mode === "mutual") return;
  const xy = eventToImage(ev, view, entry);
  if (role === "target" && entry.id !== state.source) {
    // the clicked target becomes the source; the old source takes its place among the targets
    const old = state.source;
    state.targets = [...new Set(state.targets.map((t) => (t === entry.id ? old : t)))];
    state.source = entry.id;
    state.points = [xy];
    state.match = null;
    renderStage();
  } else if (state.mode === "template") {
    state.points = [...state.points, xy].slice(-(state.config.limits.max_points));
  } else {
    state.points = [xy];
  }
  drawResults();
  query();
}

let timer = null;
function query() {
  clearTimeout(timer);
  timer = setTimeout(runQuery, 60);
}

async function runQuery() {
  const seq = ++state.seq;
  const features = featurePayload();
  if (state.source === null || !state.targets.length || !features.methods.length) return;
  if (state.mode !== "mutual" && !state.points.length) {
    setStatus("click a point on the source", "ready");
    return;
  }
  setStatus("computing…", "busy");
  try {
    let answer;
    if (state.mode === "mutual") {
      answer = await postJSON("/api/mutual", {...features, source: state.source, targets: state.targets,
        k: Number($("#mutual-k").value), radius: Number($("#mutual-radius").value),
        temperature: state.config.mutual_temperature});
      if (seq !== state.seq) return;
      state.mutual = answer;
    } else {
      answer = await postJSON("/api/match", {...features, source: state.source, points: state.points,
        targets: state.targets, matcher: matcherPayload(), heatmap_point: -1});
      if (seq !== state.seq) return;
      state.match = answer;
    }
    drawResults();
    if (state.messageFrom === "query") $("#message").hidden = true;
    const t = answer.timing;
    $("#timing").textContent = `features ${fmt(t.features_ms, 0)} ms · matching ${fmt(t.match_ms, 0)} ms`;
    setStatus(`ready · ${fmt(t.features_ms + t.match_ms, 0)} ms`, "ready");
    state.queries += 1;
    document.body.dataset.queries = state.queries;
  } catch (err) {
    if (seq === state.seq) showMessage(err.message);
  }
}

async function exportJSON() {
  if (!state.points.length) { showMessage("place at least one point on the source first"); return; }
  try {
    const doc = await postJSON("/api/export", {...featurePayload(), source: state.source, points: state.points,
      targets: state.targets, matcher: matcherPayload()});
    const text = JSON.stringify(doc, null, 1);
    $("#export-json").textContent = text;
    $("#export-json").dataset.ready = "1";
    $("#export-details").open = true;
    const link = el("a", {href: URL.createObjectURL(new Blob([text], {type: "application/json"})),
      download: `keypoints-${imageById(state.source).name.replace(/\.[^.]+$/, "")}.json`});
    document.body.append(link);
    link.click();
    link.remove();
  } catch (err) {
    showMessage(err.message);
  }
}

async function upload(files) {
  let added = 0;
  for (const file of files) {
    const form = new FormData();
    form.append("file", file, file.name);
    setStatus(`uploading ${file.name}…`, "busy");
    try {
      const entry = await api("/api/images", {method: "POST", body: form});
      state.images.push(entry);
      state.targets.push(entry.id);
      added += 1;
      setStatus("uploaded", "ready");
    } catch (err) {
      showMessage(err.message, "upload");
    }
  }
  if (!added) return;  // nothing new: keep the refusal on screen
  renderStage();
  query();
}

// ------------------------------------------------------------------------------------------- setup
function fillSelect(select, values, chosen, labels = {}) {
  select.replaceChildren(...values.map((v) => el("option", {value: v, selected: v === chosen}, labels[v] || v)));
}

function setupControls(cfg) {
  const student = cfg.checkpoint ? `student: ${cfg.checkpoint}` : "no student (--checkpoint)";
  $("#model-info").textContent = `${cfg.model} · ${cfg.family} · ${student} · ${cfg.size} px input`;
  const byName = Object.fromEntries(cfg.methods.map((m) => [m.name, m]));
  const clean = byName.cleandift;
  $("#m-cleandift").disabled = !clean.available;
  $("#m-cleandift").checked = clean.available;
  $("#cleandift-t-hint").textContent = clean.t !== null ? `auto = learned ${fmt(clean.t, 1)}` : "";
  $("#cleandift-note").textContent = clean.available ? "" : "start with --checkpoint to compare a student";
  $("#dift-t").value = byName.dift.t;
  $("#dift-t").max = cfg.t_max;
  $("#dift-ensemble").value = byName.dift.ensemble;
  $("#dift-ensemble").max = cfg.limits.max_ensemble;
  $("#frozen-t").value = byName.frozen.t;
  const tapLabels = Object.fromEntries(cfg.taps.map((t) => [t.name, `${t.name} · ${t.channels} ch · /${t.stride}`]));
  fillSelect($("#tap"), cfg.taps.map((t) => t.name), cfg.default_tap, tapLabels);
  fillSelect($("#resize"), cfg.resize_policies, cfg.default_resize,
    {stretch: "stretch (DIFT)", pad: "pad, keep aspect", crop: "centre crop"});
  fillSelect($("#matcher"), cfg.matchers, cfg.default_matcher.method,
    {"argmax": "argmax", "soft-argmax": "window soft-argmax"});
  fillSelect($("#grid"), cfg.grids, cfg.default_matcher.grid, {pixels: "pixels (upsampled)", cells: "feature cells"});
  $("#window").value = cfg.default_matcher.window;
  $("#temperature").value = cfg.default_matcher.temperature;
  $("#prompt-list").replaceChildren(...cfg.prompt_suggestions.map((p) => el("option", {value: p})));
  const bar = $("#colorbar");
  bar.style.background = `linear-gradient(90deg, ${CMAP.map(([t, r, g, b]) => `rgb(${r},${g},${b}) ${t * 100}%`).join(", ")})`;
  if (cfg.skipped.length) showMessage(`skipped ${cfg.skipped.length} file(s): ${cfg.skipped[0].name}: ${cfg.skipped[0].reason}`);

  const hints = {click: "Click the source (or a target) to match one point.",
    template: "Each click adds a keypoint; all of them are transferred. Export saves them as JSON.",
    mutual: "Top-K mutual nearest neighbours; colour and confidence = soft cycle-consistency."};
  const setMode = (mode) => {
    state.mode = mode;
    document.body.dataset.mode = mode;
    $("#mode-hint").textContent = hints[mode];
    if (mode === "click" && state.points.length > 1) state.points = state.points.slice(-1);
    renderStage();
    query();
  };
  $$("#mode input").forEach((r) => r.addEventListener("change", () => setMode(r.value)));
  setMode("click");
  const rerender = () => { renderStage(); query(); };
  for (const id of ["#m-cleandift", "#m-dift", "#m-frozen", "#tap", "#resize"]) $(id).addEventListener("change", rerender);
  for (const id of ["#cleandift-t", "#dift-t", "#dift-ensemble", "#frozen-t", "#prompt", "#matcher", "#grid",
    "#window", "#temperature", "#mutual-k", "#mutual-radius"]) {
    $(id).addEventListener("change", () => { renderStage(); query(); });
  }
  $("#show-heatmap").addEventListener("change", drawResults);
  $("#heat-focus").addEventListener("input", drawResults);
  $("#heat-opacity").addEventListener("input", () => $$("canvas.heat").forEach((c) => {
    c.style.opacity = $("#heat-opacity").value;
  }));
  $("#clear-points").addEventListener("click", () => { state.points = []; state.match = null; drawResults(); });
  $("#export").addEventListener("click", exportJSON);
  $("#upload").addEventListener("change", (ev) => { upload(Array.from(ev.target.files)); ev.target.value = ""; });
  $("#message-close").addEventListener("click", () => { $("#message").hidden = true; });
}

async function init() {
  try {
    const [cfg, list] = await Promise.all([api("/api/config"), api("/api/images")]);
    state.config = cfg;
    state.images = list.images;
    if (state.images.length) {
      state.source = state.images[0].id;
      state.targets = state.images.slice(1, 4).map((im) => im.id);
    }
    setupControls(cfg);
    setStatus(state.images.length ? "click a point on the source" : "upload images to start", "ready");
    document.body.dataset.ready = "1";
  } catch (err) {
    showMessage(`could not reach the server: ${err.message}`);
  }
}

init();
