// celltally web page: send images one request at a time, show each result as it arrives.
// Plain JavaScript, no build step. Server strings only ever go into textContent.
"use strict";

const state = {
  info: null,
  results: [], // {name, ok, count, std, low, high, level, metadata, warning, error}
  queue: [],
  running: 0,
  total: 0,
  done: 0,
  failed: 0,
  generation: 0, // bumped by Clear: answers of earlier files are then ignored
  plate: null, // the plate the map shows when the results span several
  inflight: new Set(), // AbortControllers of the requests being answered (Clear aborts them)
};
const CONCURRENCY = 2;
const $ = (id) => document.getElementById(id);

// One decimal, two below 1 (so a near-empty image's 0.00–0.04 does not read "0.0–0.0").
// A level as a percentage keeping its digits, as celltally.calibration.level_text:
// 0.95 -> "95%", 0.975 -> "97.5%" (rounding to a whole percent read 98%).
function levelText(level) {
  return `${parseFloat((Number(level) * 100).toFixed(8))}%`;
}

function fmt(x, digits) {
  if (x === null || x === undefined || Number.isNaN(x)) return "";
  const n = Number(x);
  return n.toFixed(digits ?? (Math.abs(n) < 1 && n !== 0 ? 2 : 1));
}

async function loadInfo() {
  try {
    const response = await fetch("/api/info");
    if (!response.ok) throw new Error(`${response.status}`);
    state.info = await response.json();
    $("model-name").textContent = state.info.model;
    $("model").replaceChildren(...(state.info.models || [state.info.model])
      .map((name) => new Option(name, name)));
    showModelUse();
    $("limit-mb").textContent = String(Math.round(state.info.limits.max_mb * 10) / 10);
    $("level").value = String(state.info.level);
    $("saliency").checked = Boolean(state.info.saliency);
  } catch (err) {
    $("model-name").textContent = "(server unreachable)";
  }
}

// What the chosen model is for (shipped models), under the options.
// The model picked, in the header too; the Diameter and Pixel size fields only for a
// model that records the diameter or pixel size it was trained at (else every file fails).
function showModelUse() {
  const info = state.info || {};
  const name = $("model").value;
  const uses = info.model_uses || {};
  $("model-use").textContent = uses[name] ? `${name}: for ${onPage(uses[name])}.` : "";
  if (name) $("model-name").textContent = name;
  for (const [id, key, unit] of [["diameter", "diameters", "px"],
                                 ["pixel-size", "pixel_sizes", "µm"]]) {
    const trained = (info[key] || {})[name];
    $(`${id}-field`).hidden = trained === undefined;
    if (trained === undefined) $(id).value = ""; // not sent to a model without one
    $(id).placeholder = trained === undefined ? unit : `${unit} (model: ${trained})`;
  }
  oneScale();
}

// A line written for the command line (a model's use), with this page's field names
// instead of its options: "--diameter" is the Diameter field here.
function onPage(text) {
  return text.replace(/--diameter\b/g, "set Diameter")
    .replace(/--pixel-size\b/g, "set Pixel size")
    .replace(/--rescale\b/g, "set Rescale")
    .replace(/\brescale by\b/g, "Rescale by");
}

// Rescale, Diameter and Pixel size each set the resize factor: two at once is a
// contradiction, said at the later field
const SCALE_FIELDS = ["rescale", "diameter", "pixel-size"];
function oneScale() {
  let seen = false;
  for (const id of SCALE_FIELDS) {
    const twice = seen && $(id).value !== "";
    $(id).setCustomValidity(twice ? "Give only one of Rescale, Diameter and Pixel size" : "");
    seen = seen || $(id).value !== "";
  }
}

// -- queue -----------------------------------------------------------------
function addFiles(fileList) {
  const files = Array.from(fileList);
  if (!files.length) return;
  // a channel or factor the browser cannot read would reach the server empty (the
  // model's defaults) without a word: say so at the field instead, and count nothing
  if (!["channel", ...SCALE_FIELDS].every((id) => $(id).reportValidity())) return;
  // The options as they are now: changing them later does not change queued files.
  const settings = {
    model: $("model").value,
    level: $("level").value,
    saliency: $("saliency").checked ? "true" : "false",
    channel: $("channel").value,
    rescale: $("rescale").value,
    diameter: $("diameter").value,
    pixel_size: $("pixel-size").value,
    epistemic: $("epistemic").checked ? "true" : "false",
  };
  for (const file of files) {
    const card = makeCard(file.name);
    const row = makeRow(file.name);
    state.queue.push({ file, card, row, index: state.results.length, settings,
                       generation: state.generation });
    state.results.push(null); // filled in when this file's answer arrives
  }
  state.total += files.length;
  updateProgress();
  pump();
}

function pump() {
  while (state.running < CONCURRENCY && state.queue.length) {
    const job = state.queue.shift();
    state.running += 1;
    send(job).finally(() => {
      state.running -= 1;
      if (job.generation === state.generation) state.done += 1;
      updateProgress();
      pump();
    });
  }
}

function updateProgress() {
  const box = $("progress-box");
  box.hidden = state.total === 0;
  $("progress").max = Math.max(1, state.total);
  $("progress").value = state.done;
  const busy = state.done < state.total;
  let text = `${state.done} of ${state.total} image${state.total === 1 ? "" : "s"} done`;
  if (state.failed) text += ` (${state.failed} failed)`;
  $("progress-text").textContent = busy ? `${text}…` : text;
  document.body.dataset.busy = busy ? "yes" : "no";
}

async function send({ file, card, row, index, settings }) {
  card.dataset.state = "running";
  card.querySelector(".count").textContent = "counting…";
  const maxBytes = state.info ? state.info.limits.max_bytes : Infinity;
  let result;
  if (file.size > maxBytes) {
    result = {
      name: file.name, ok: false, status: 413, model: settings.model,
      error: `${file.name}: file is larger than the limit of ${state.info.limits.max_mb} MB`,
    };
  } else {
    const form = new FormData();
    form.append("files", file, file.name);
    form.append("model", settings.model);
    form.append("level", settings.level);
    form.append("saliency", settings.saliency);
    form.append("channel", settings.channel);
    form.append("rescale", settings.rescale);
    form.append("diameter", settings.diameter);
    form.append("pixel_size", settings.pixel_size);
    form.append("epistemic", settings.epistemic);
    const controller = new AbortController();
    state.inflight.add(controller);
    try {
      // Clear aborts it: the server then skips the file instead of counting it for nobody
      const response = await fetch("/api/count",
        { method: "POST", body: form, signal: controller.signal });
      // an answer that is not JSON (a proxy's error page) still says what went wrong
      const body = await response.json()
        .catch(() => ({ detail: `${response.status} ${response.statusText}` }));
      if (body.results && body.results.length) {
        // which model counted it, and that model's within-well correlation (well totals)
        // 'setting': the model as it counted (ensemble, resize factor); totals group by it
        // and the channel read: two stains of one file are two results, never summed
        const channel = body.channel === null || body.channel === undefined ? null
          : body.channel;
        const setting = body.model + (body.epistemic ? " ensemble" : "") +
          (body.rescale ? ` ×${+body.rescale.toPrecision(4)}` : "") +
          (body.diameter ? ` (⌀ ${body.diameter} px)` : "") +
          (body.pixel_size ? ` (${body.pixel_size} µm pixels)` : "") +
          (channel === null ? "" : ` · channel ${channel}`);
        result = { ...body.results[0], model: body.model, setting, channel,
                   rescale: body.rescale, diameter: body.diameter, pixel_size: body.pixel_size,
                   epistemic: body.epistemic,
                   well_correlation: body.well_correlation, level_note: body.level_note };
      } else {
        result = { name: file.name, ok: false, status: response.status, model: settings.model,
                   error: `${file.name}: ${body.detail || response.statusText}` };
      }
    } catch (err) {
      // fetch rejects only when no answer came (the server stopped, the network is down)
      const why = err.name === "AbortError" ? "cancelled"
        : "cannot reach the celltally server (is it still running?); add the file again";
      result = { name: file.name, ok: false, status: 0, model: settings.model,
                 error: `${file.name}: ${why}` };
    } finally {
      state.inflight.delete(controller);
    }
  }
  if (!card.isConnected) return; // cleared while this file was being counted
  if (!result.ok && !result.metadata) { // not sent (too large) or no answer: its well, if any
    try {
      const named = await fetch(`/api/name?file=${encodeURIComponent(file.name)}`);
      if (named.ok) result.metadata = await named.json();
    } catch (err) { /* the server is gone: the well cannot be known */ }
  }
  if (!card.isConnected) return;
  state.results[index] = result;
  // as `celltally wells` reads a results CSV: a failure of a file counted elsewhere in
  // the batch (before or after it) does not stand
  if (result.ok) supersede(result.name, index);
  else if (state.results.some((r) => r && r.ok && r.name === result.name)) result.superseded = true;
  else state.failed += 1;
  fillCard(card, result);
  if (result.superseded) markSuperseded(card, row);
  fillRow(row, result);
  drawPlate();
  drawWellTotals();
}

// A file that failed and was also counted (added again): the failure no longer stands
// (its well is no longer "not counted", its row leaves the CSV); its card says so.
function supersede(name, index) {
  state.results.forEach((r, i) => {
    if (!r || r.ok || r.superseded || r.name !== name || i === index) return;
    r.superseded = true;
    state.failed -= 1;
    markSuperseded([...document.querySelectorAll("#cards .card")][i],
      [...document.querySelectorAll("#table tbody tr")][i]);
  });
}

function markSuperseded(card, row) {
  if (card) {
    card.dataset.state = "superseded";
    card.querySelector(".count").textContent = "counted in another card";
  }
  if (row) row.classList.add("superseded");
}

// -- cards -----------------------------------------------------------------
function makeCard(name) {
  const node = $("card-template").content.firstElementChild.cloneNode(true);
  node.querySelector(".name").textContent = name;
  node.dataset.name = name;
  // a labelled group of toggle buttons (aria-pressed), not tabs: the maps they pick are
  // not panels of their own ("all" shows four); each group says whose maps it shows
  node.querySelector(".tabs").setAttribute("aria-label", `maps of ${name} to show`);
  for (const button of node.querySelectorAll(".tabs button")) {
    button.setAttribute("aria-pressed", "false");
    button.addEventListener("click", () => setView(node, button.dataset.view));
  }
  for (const img of node.querySelectorAll(".maps img")) {
    img.alt = `${img.alt} of ${name}`; // each card's images say whose they are
  }
  $("cards").appendChild(node);
  return node;
}

function setView(card, view) {
  card.querySelector(".maps").dataset.view = view;
  for (const button of card.querySelectorAll(".tabs button")) {
    button.setAttribute("aria-pressed", String(button.dataset.view === view));
  }
}

function fillCard(card, r) {
  card.dataset.state = r.ok ? "done" : "failed";
  if (!r.ok) {
    card.querySelector(".count").textContent = "not counted";
    const error = card.querySelector(".error");
    error.textContent = r.error || "failed";
    error.hidden = false;
    return;
  }
  card.querySelector(".count").textContent = countText(r.count, r.low, r.high);
  const interval = card.querySelector(".interval");
  interval.textContent =
    `cells · ${levelText(r.level)} interval ${fmt(r.low)}–${fmt(r.high)}` +
    ` · model ${r.setting || r.model || "?"}`;
  if (r.level_note) { // above what the model's calibration can guarantee
    interval.textContent += " (extrapolated)";
    interval.title = r.level_note;
  }
  const held = ((state.info && state.info.ensemble_coverage) || {})[r.model];
  if (r.epistemic && held !== undefined) { // how far the ensemble's intervals can be trusted
    interval.textContent += ` · its ensemble's 95% intervals held ${Math.round(held * 100)}%` +
      " of held-out truths";
  }
  const flags = flagsOf(r);
  if (flags.length) {
    // each flag on a line of its own, named by what it is: a frame that may hold no
    // cells is not "unlike the calibration" (its interval, down to 0, holds), and the
    // advice (invert it, rescale it) leads its line instead of ending a generic one
    const badge = card.querySelector(".badge.warn");
    // short, beside the name: the flags below say the rest
    badge.textContent = flags[0].kind === "empty" ? "⚠ may hold no cells" : "⚠ unusual input";
    badge.title = r.warning || flags[0].text;
    badge.hidden = false;
    const list = card.querySelector(".flags");
    list.replaceChildren(...flags.map((f) => {
      const item = document.createElement("li");
      item.dataset.kind = f.kind;
      const title = document.createElement("strong");
      title.textContent = `${f.title[0].toUpperCase()}${f.title.slice(1)}: `;
      item.append(title, f.text);
      return item;
    }));
    list.hidden = false;
  }
  const images = r.images || {};
  for (const key of ["input", "mask", "uncertainty", "saliency"]) {
    const img = card.querySelector(`.${key}-img`);
    const figure = img.closest("figure");
    if (images[key]) {
      img.src = images[key];
      img.width = images.width;
      img.height = images.height;
    } else {
      figure.classList.add("absent");
      figure.querySelector("figcaption").textContent =
        key === "saliency" && r.note ? r.note : `${key}: off`;
    }
  }
  const scale = images.uncertainty_scale;
  if (scale !== undefined) {
    card.querySelector('[data-map="uncertainty"] figcaption').textContent =
      `uncertainty (mask std, 0–${fmt(scale, 2)})`;
  }
  card.querySelector(".tabs").hidden = false;
  card.querySelector(".maps").hidden = false;
  setView(card, $("view").value);
}

// A count as its interval allows: "12.3 ± 2.1" when the interval is the count ± that
// half-width; the count alone when it is not (its low end set to 0: a frame that may
// hold no cells, or a count near 0), the interval beside it saying the rest.
function countText(count, low, high) {
  const half = high - count;
  const symmetric = Math.abs(count - low - half) <= 1e-6 * Math.max(1, Math.abs(high));
  return symmetric ? `${fmt(count)} ± ${fmt(half)}` : fmt(count);
}

// A result's flags (the server splits its warning); an answer without them: one flag.
function flagsOf(r) {
  if (r.flags && r.flags.length) return r.flags;
  return r.warning ? [{ kind: "other", title: "unusual input", text: r.warning }] : [];
}

// Whether a result is unlike the model's calibration images (its interval may not hold),
// and whether it may hold no cells (low contrast: its interval reaches 0 and holds).
const isUnusual = (r) => flagsOf(r).some((f) => f.kind !== "empty");
const mayBeEmpty = (r) => flagsOf(r).some((f) => f.kind === "empty");

// The model and interval level a result was counted with: "bbbc005 · 95%".
function madeWith(model, level) {
  return `${model || ""} · ${levelText(level)}`;
}

// -- table, CSV ------------------------------------------------------------
function makeRow(name) {
  $("summary").hidden = false;
  const tr = document.createElement("tr");
  const td = document.createElement("td");
  td.textContent = name;
  td.className = "file";
  td.title = name;
  const wait = document.createElement("td");
  wait.colSpan = 6;
  wait.textContent = "waiting…";
  tr.append(td, wait);
  $("table").querySelector("tbody").appendChild(tr);
  return tr;
}

function fillRow(tr, r) {
  tr.replaceChildren();
  if (!r.ok) tr.className = "failed";
  const meta = r.metadata || {};
  const made = r.ok ? madeWith(r.setting || r.model, r.level) : "";
  const note = flagsOf(r).map((f) => f.title).join("; ");
  const cells = r.ok
    ? [r.name, fmt(r.count), `${fmt(r.low)}–${fmt(r.high)}`, made, meta.well || "",
       meta.site ?? "", note]
    : [r.name, "", "", "", meta.well || "", meta.site ?? "", r.error || "failed"];
  cells.forEach((text, i) => {
    const td = document.createElement("td");
    td.textContent = String(text);
    if (i === 0) { td.className = "file"; td.title = String(text); } // wraps; whole name
    if (i === 1 || i === 2) td.className = "num";
    if (i === 6) { td.className = "note"; td.title = r.ok ? r.warning || "" : String(text); }
    tr.appendChild(td);
  });
}

// The columns of `celltally count`'s results CSV (so `celltally wells` reads this file),
// then 'problem': why an image could not be counted (its count is then empty), and the
// settings `count` records in its manifest: the resize factor (given, or set by the
// diameter or pixel size), the ensemble flag, the diameter, the pixel size and the
// channel (as its counter_options name it; empty: the file's only one, the model's, or
// the colour mean).
const CSV_COLUMNS = ["file", "count", "std", "low", "high", "level", "model", "plate", "well",
  "site", "blur", "stain", "true_count", "error", "warning", "problem", "rescale", "epistemic",
  "diameter", "pixel_size", "channel"];

function csvCell(value) {
  if (value === null || value === undefined) return "";
  let text = String(value);
  // Keep spreadsheet programs from evaluating a file name as a formula (a number such
  // as a negative error stays a number).
  if (/^[=+\-@]/.test(text) && !/^-?\d+(\.\d+)?$/.test(text)) text = `'${text}`;
  return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

function toCSV() {
  const lines = [CSV_COLUMNS.join(",")];
  for (const r of state.results) {
    if (!r || r.superseded) continue; // a failure counted again since
    const m = r.metadata || {};
    const truth = r.ok && m.count !== null && m.count !== undefined ? m.count : null;
    const row = [r.name, fmt(r.count, 3), fmt(r.std, 4), fmt(r.low, 3), fmt(r.high, 3),
      r.level ?? "", r.model || "", m.plate, m.well, m.site, m.blur, m.stain, m.count,
      truth === null ? "" : (r.count - truth).toFixed(2), r.warning, r.ok ? "" : r.error,
      r.rescale ? +r.rescale.toPrecision(6) : "", r.ok ? String(Boolean(r.epistemic)) : "",
      r.diameter ?? "", r.pixel_size ?? "", r.channel ?? ""];
    lines.push(row.map(csvCell).join(","));
  }
  return lines.join("\r\n") + "\r\n";
}

// Hand ``text`` to the browser as a CSV file called ``name``.
function saveCSV(text, name) {
  const blob = new Blob([text], { type: "text/csv" });
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function downloadCSV() {
  const pending = state.total - state.done;
  if (pending > 0 && !window.confirm(`${pending} image(s) are still being counted and will ` +
      `not be in the file. Download the ${state.done} done so far?`)) return;
  saveCSV(toCSV(), "celltally-results.csv");
}

// The plate as per-well totals group it, as celltally.naming.plate_label: its name and,
// in a time lapse, the time point ("Plate1 t02"), so frames are not summed over time.
function plateLabel(m) {
  const time = m.time === null || m.time === undefined ? "" : `t${String(m.time).padStart(2, "0")}`;
  return [m.plate || "", time].filter(Boolean).join(" ");
}

// -- plate heat map --------------------------------------------------------
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

function viridis(t) {
  const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const f = x - i;
  const c = VIRIDIS[i].map((v, k) => Math.round(v + f * (VIRIDIS[i + 1][k] - v)));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

function rowIndex(letters) {
  let n = 0;
  for (const ch of letters) n = n * 26 + (ch.charCodeAt(0) - 64);
  return n; // A = 1, Z = 26, AA = 27
}

function rowLabel(n) {
  let s = "";
  while (n > 0) {
    const r = (n - 1) % 26;
    s = String.fromCharCode(65 + r) + s;
    n = Math.floor((n - 1) / 26);
  }
  return s;
}

function drawPlate() {
  // One plate, stain, model and level at a time (as the totals group them): a select
  // appears when the results span several.
  // JSON keys: a plate name may hold any character
  const stainOf = (m) => (m.stain === null || m.stain === undefined ? "" : String(m.stain));
  const keyOf = (r) => JSON.stringify([plateLabel(r.metadata || {}), stainOf(r.metadata || {}),
    r.setting || r.model || "", r.level ?? ""]);
  const placed = state.results.filter((r) => r && !r.superseded && r.metadata &&
    r.metadata.row && r.metadata.column);
  const views = [...new Set(placed.filter((r) => r.ok).map(keyOf))];
  if (!views.includes(state.plate)) state.plate = views.length ? views[0] : null;
  const pick = $("plate-select");
  pick.hidden = views.length < 2;
  pick.replaceChildren(...views.map((v) => {
    const [plate, stain, model, level] = JSON.parse(v);
    const channel = stain === "" ? "" : ` · w${stain}`;
    const option = new Option(
      `${plate || "(no plate name)"}${channel} · ${madeWith(model, level)}`, v);
    option.title = option.text; // the select is kept narrow: a long name is cut
    return option;
  }));
  pick.value = state.plate === null ? "" : state.plate;
  pick.title = pick.selectedIndex >= 0 ? pick.options[pick.selectedIndex].text : "";
  const [plateOf, stainShown] = state.plate === null ? [null, null] : JSON.parse(state.plate);
  const wells = new Map();
  const entry = (m) => {
    const key = `${m.row}${m.column}`;
    const e = wells.get(key) ||
      { row: rowIndex(m.row), column: m.column, counts: [], flagged: 0, empty: 0, failed: 0 };
    wells.set(key, e);
    return e;
  };
  for (const r of placed) {
    const m = r.metadata;
    if (!r.ok) { // an image not counted marks its well on every view of its plate and
      // stain, or of its plate where no image of its stain was counted (no view of its own)
      const own = views.some((v) => { const [p, s] = JSON.parse(v); return p === plateOf &&
        s === stainOf(m); });
      if (plateLabel(m) === plateOf && (stainOf(m) === stainShown || !own)) entry(m).failed += 1;
      continue;
    }
    if (keyOf(r) !== state.plate) continue;
    const e = entry(m);
    e.counts.push(r.count);
    if (isUnusual(r)) e.flagged += 1;
    if (mayBeEmpty(r)) e.empty += 1;
  }
  const section = $("plate");
  if (!wells.size) { section.hidden = true; return; }
  section.hidden = false;
  const rows = Math.max(...[...wells.values()].map((w) => w.row));
  const cols = Math.max(...[...wells.values()].map((w) => w.column));
  // Standard plate formats: 96 (8 x 12), 384 (16 x 24), 1536 (32 x 48).
  const [nr, nc] = rows <= 8 && cols <= 12 ? [8, 12] : rows <= 16 && cols <= 24 ? [16, 24]
    : [Math.max(rows, 32), Math.max(cols, 48)];
  const means = [...wells.values()].filter((w) => w.counts.length)
    .map((w) => w.counts.reduce((a, b) => a + b, 0) / w.counts.length);
  const lo = Math.min(...means);
  const hi = Math.max(...means);
  const grid = $("plate-grid");
  grid.replaceChildren();
  grid.style.gridTemplateColumns = `auto repeat(${nc}, auto)`;
  grid.appendChild(document.createElement("span"));
  for (let c = 1; c <= nc; c++) {
    const lab = document.createElement("span");
    lab.className = "lab";
    lab.textContent = String(c);
    grid.appendChild(lab);
  }
  for (let r = 1; r <= nr; r++) {
    const lab = document.createElement("span");
    lab.className = "lab";
    lab.textContent = rowLabel(r);
    grid.appendChild(lab);
    for (let c = 1; c <= nc; c++) {
      const cell = document.createElement("span");
      cell.className = "well";
      const well = [...wells.values()].find((w) => w.row === r && w.column === c);
      const name = `${rowLabel(r)}${String(c).padStart(2, "0")}`;
      if (well) {
        const notes = [];
        if (well.counts.length) {
          const mean = well.counts.reduce((a, b) => a + b, 0) / well.counts.length;
          cell.classList.add("has");
          cell.style.background = viridis(hi > lo ? (mean - lo) / (hi - lo) : 0.5);
          notes.push(`${fmt(mean)} cells` +
            (well.counts.length > 1 ? ` (mean of ${well.counts.length} images)` : ""));
          cell.dataset.count = fmt(mean);
        }
        if (well.flagged) {
          cell.classList.add("flagged");
          notes.push(`${well.flagged} unusual image(s): their intervals may not hold`);
        }
        if (well.empty) {
          cell.classList.add("flagged");
          notes.push(`${well.empty} image(s) of so little contrast that they may hold no ` +
            "cells: check them");
        }
        if (well.failed) {
          cell.classList.add("failed");
          notes.push(`${well.failed} image(s) not counted`);
        }
        cell.title = `${name}: ${notes.join("; ")}`;
        // keyboard, screen-reader and touch users read it too, not only by hovering
        cell.tabIndex = 0;
        cell.setAttribute("role", "button");
        cell.setAttribute("aria-label", cell.title);
        const show = () => { $("well-detail").textContent = cell.title; };
        cell.addEventListener("focus", show);
        cell.addEventListener("click", show);
        cell.addEventListener("mouseenter", show);
      } else {
        cell.title = `${name}: no image`;
      }
      cell.dataset.well = name;
      grid.appendChild(cell);
    }
  }
  $("legend-low").textContent = fmt(lo);
  $("legend-high").textContent = `${fmt(hi)} cells`;
}

// Per-well totals, as `celltally wells` computes them: the images' counts summed;
// the std adds their stds with the model's within-well error correlation, and the
// interval uses the model's own multiplier ((high - count) / std, pooled over the
// model's images at that level). Images that could not be counted are listed per well.
function wellTotals() {
  const groups = new Map();
  const failed = new Map();
  const pooled = new Map(); // model|level -> [sum of (high - count), sum of std]
  for (const r of state.results) {
    const m = (r && r.metadata) || {};
    if (!r || r.superseded || !m.well) continue;
    const stain = m.stain === null || m.stain === undefined ? "" : String(m.stain);
    const where = JSON.stringify([plateLabel(m), m.well, stain]);
    if (!r.ok) {
      failed.set(where, (failed.get(where) || 0) + 1);
      continue;
    }
    const setting = r.setting || r.model || "";
    const key = JSON.stringify([where, setting, r.level ?? ""]);
    const g = groups.get(key) || { plate: plateLabel(m), well: m.well, stain, counts: [], stds: [],
                                   sites: [], model: r.model || "", setting, where,
                                   channel: r.channel ?? "", empty: 0, emptyCount: 0,
                                   spread: `${setting}|${r.level ?? ""}`,
                                   rho: r.well_correlation };
    g.sites.push(m.site === null || m.site === undefined ? "" : String(m.site));
    g.flagged = (g.flagged || 0) + (isUnusual(r) ? 1 : 0);
    g.empty += mayBeEmpty(r) ? 1 : 0;
    g.emptyCount += mayBeEmpty(r) ? r.count : 0;
    g.warned = (g.warned || 0) + (r.warning ? 1 : 0); // `celltally wells`'s warnings
    g.level = r.level;
    g.counts.push(r.count);
    g.stds.push(r.std);
    g.truths = [...(g.truths || []), m.count]; // the name's _C<n>_, if any
    groups.set(key, g);
    if (r.std > 0) {
      const p = pooled.get(g.spread) || [0, 0];
      pooled.set(g.spread, [p[0] + (r.high - r.count), p[1] + r.std]);
    }
  }
  for (const [where, n] of failed) { // wells none of whose images could be counted
    if ([...groups.values()].some((g) => g.where === where)) continue;
    const [plate, well, stain] = JSON.parse(where);
    groups.set(where, { plate, well, stain, counts: [], stds: [], sites: [], model: "",
                        setting: "", where, spread: "", rho: 0, channel: "", empty: 0,
                        emptyCount: 0 });
  }
  const fallback = state.info && state.info.well_correlation !== undefined
    ? state.info.well_correlation : 0.1;
  const sum = (xs) => xs.reduce((a, b) => a + b, 0);
  return [...groups.values()]
    .sort((a, b) => (a.plate + a.well + a.stain).localeCompare(b.plate + b.well + b.stain))
    .map((g) => {
      const total = sum(g.counts);
      const s1 = sum(g.stds);
      const s2 = sum(g.stds.map((s) => s * s));
      const rho = g.rho === null || g.rho === undefined ? fallback : g.rho;
      const p = pooled.get(g.spread) || [0, 0];
      const mult = p[1] > 0 ? p[0] / p[1] : 0;
      const std = Math.sqrt(s2 + rho * (s1 * s1 - s2));
      const half = mult * std;
      // the same site twice (uploaded again, or as another format) is summed twice
      const repeated = [...new Set(g.sites.filter((s, i) => s && g.sites.indexOf(s) !== i))];
      // a frame that may hold no cells may add 0, as its own interval (down to 0) allows
      const low = Math.max(0, total - half - g.emptyCount);
      return { ...g, total, std, half, rho, repeated, low,
               high: total + half, failed: failed.get(g.where) || 0 };
    });
}

// The per-well totals as a CSV, with the columns of `celltally wells` it can fill, then
// the channel the images were read at (the page's: two channels of a well are two rows).
const WELL_COLUMNS = ["plate", "well", "stain", "images", "failed", "sites", "repeated_sites",
  "count", "std", "low", "high", "level", "mean_per_image", "model", "correlation", "warnings",
  "true_count", "error", "channel"];

// Sites as `celltally wells` lists them: once each, numbers first in order, then names.
function siteList(sites) {
  const key = (s) => (/^\d+$/.test(s) ? [0, Number(s), ""] : [1, 0, s]);
  return [...new Set(sites.filter(Boolean))].sort((a, b) => {
    const [x, y] = [key(a), key(b)];
    return x[0] - y[0] || x[1] - y[1] || x[2].localeCompare(y[2]);
  }).join(";");
}

function wellsCSV() {
  const lines = [WELL_COLUMNS.join(",")];
  for (const w of wellTotals()) {
    const has = w.counts.length > 0;
    const row = [w.plate, w.well, w.stain, w.counts.length, w.failed, siteList(w.sites),
      siteList(w.repeated), has ? fmt(w.total, 2) : "", has ? fmt(w.std, 3) : "",
      has ? fmt(w.low, 2) : "", has ? fmt(w.high, 2) : "", has ? w.level : "",
      has ? fmt(w.total / w.counts.length, 2) : "", w.model, has ? fmt(w.rho, 4) : "",
      has ? w.warned || 0 : ""];
    // the true total when every image's name carries its count, as `celltally wells` gives it
    const truths = w.truths || [];
    const known = has && truths.every((t) => t !== null && t !== undefined);
    const truth = known ? truths.reduce((a, b) => a + b, 0) : null;
    row.push(known ? +truth.toFixed(2) : "", known ? (w.total - truth).toFixed(2) : "",
      w.channel);
    lines.push(row.map(csvCell).join(","));
  }
  return lines.join("\r\n") + "\r\n";
}

function downloadWells() {
  saveCSV(wellsCSV(), "celltally-wells.csv");
}

function drawWellTotals() {
  const body = $("well-totals").querySelector("tbody");
  body.replaceChildren();
  const totals = wellTotals();
  const counted = totals.filter((w) => w.counts.length);
  const several = new Set(counted.map((w) => `${w.setting}|${w.level}`)).size > 1;
  // as `celltally wells` warns (wells.fewer_sites): a well with fewer images (counted or
  // not) than most wells of its plate, stain and model lacks a site in its total
  const taken = (w) => w.counts.length + w.failed;
  const plateOf = (w) => JSON.stringify([w.plate, w.stain, w.setting]);
  const tallies = new Map();
  for (const w of totals) {
    const tally = tallies.get(plateOf(w)) || new Map();
    tally.set(taken(w), (tally.get(taken(w)) || 0) + 1);
    tallies.set(plateOf(w), tally);
  }
  const usual = new Map();
  for (const [plate, tally] of tallies) {
    let best = null; // the most common; on a tie the first seen, as Counter.most_common
    for (const [n, k] of tally) if (best === null || k > best[1]) best = [n, k];
    usual.set(plate, best[0]);
  }
  for (const w of totals) {
    const tr = document.createElement("tr");
    tr.dataset.well = w.well;
    const most = usual.get(plateOf(w));
    const fewer = taken(w) < most;
    const images = String(w.counts.length) +
      (w.repeated.length ? ` (site ${w.repeated.join(", ")} more than once)` : "") +
      (w.flagged ? ` (${w.flagged} unusual)` : "") +
      (w.empty ? ` (${w.empty} may hold no cells)` : "") +
      (w.failed ? ` + ${w.failed} not counted` : "") +
      (fewer ? ` (fewer than the ${most} of most wells on its plate)` : "");
    const made = several && w.counts.length
      ? ` (${w.setting}, ${levelText(w.level)})` : "";
    const label = (w.plate ? `${w.plate} ${w.well}` : w.well) + made;
    const has = w.counts.length > 0;
    const cells = [label, w.stain ? `w${w.stain}` : "", images,
      has ? countText(w.total, w.low, w.high) : "no image counted",
      has ? `${fmt(w.low)}–${fmt(w.high)}` : ""];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i === 0) { td.className = "file"; td.title = text; } // a long plate name wraps
      tr.appendChild(td);
    });
    if (w.repeated.length) tr.classList.add("repeated");
    const why = [];
    if (w.flagged) {
      tr.classList.add("flagged");
      why.push(`${w.flagged} image(s) of this well are unlike the model's calibration ` +
        "images: the total's interval may not hold");
    }
    if (w.empty) {
      tr.classList.add("flagged");
      why.push(`${w.empty} image(s) of this well have so little contrast that they may hold ` +
        "no cells: check them before trusting the total");
    }
    if (w.failed) {
      tr.classList.add("incomplete");
      why.push(`${w.failed} image(s) of this well could not be counted: the total leaves ` +
        "them out");
    }
    if (fewer) {
      tr.classList.add("incomplete");
      why.push(`${taken(w)} image(s) where most wells of its plate have ${most}: the total ` +
        "covers fewer sites");
    }
    if (why.length) tr.title = why.join("; ");
    body.appendChild(tr);
  }
}

// -- wiring ----------------------------------------------------------------
function clearAll() {
  state.results = [];
  state.queue = [];
  state.generation += 1; // files still being counted no longer count
  for (const controller of state.inflight) controller.abort();
  state.inflight.clear();
  state.total = 0;
  state.done = 0;
  state.failed = 0;
  $("cards").replaceChildren();
  $("table").querySelector("tbody").replaceChildren();
  $("well-totals").querySelector("tbody").replaceChildren();
  $("summary").hidden = true;
  $("plate").hidden = true;
  updateProgress();
}

function init() {
  const drop = $("drop");
  const input = $("file-input");
  input.addEventListener("change", () => { addFiles(input.files); input.value = ""; });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer && e.dataTransfer.files) addFiles(e.dataTransfer.files);
  });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  // Dropping a file anywhere else must not navigate away from the results.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  $("view").addEventListener("change", () => {
    for (const card of document.querySelectorAll('.card[data-state="done"]')) {
      setView(card, $("view").value);
    }
  });
  $("plate-select").addEventListener("change", () => {
    state.plate = $("plate-select").value;
    drawPlate();
  });
  $("csv").addEventListener("click", downloadCSV);
  $("wells-csv").addEventListener("click", downloadWells);
  $("model").addEventListener("change", showModelUse);
  for (const id of SCALE_FIELDS) $(id).addEventListener("input", oneScale);
  oneScale();  // values the browser restored on a reload
  $("clear").addEventListener("click", clearAll);
  // The results live only in this page: leaving or reloading it asks first.
  window.addEventListener("beforeunload", (e) => {
    if (state.results.some((r) => r) || state.done < state.total) {
      e.preventDefault();
      e.returnValue = "";
    }
  });
  loadInfo();
}

document.addEventListener("DOMContentLoaded", init);
