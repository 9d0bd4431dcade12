// genserve's page: the model cards from GET /models, and per model a "Sample" view (samples
// drawn, with the density of 2-D models) and a "Score" view (rows scored, their histogram
// against the calibrated threshold, the table as CSV). Views are addressed by the URL's
// hash: #/ (the cards), #/models/NAME/sample, #/models/NAME/score.

import {ApiError, callVerb, getJSON, setToken} from "./api.js";
import {extent, gridOver, histogram, imageGrid, pairPlot, scatter2d} from "./plots.js";
import {RowsError, parseNPY, parseText, requestBodies, toCSV} from "./rows.js";

const $ = (id) => document.getElementById(id);
const state = {config: null, cards: new Map(), card: null, download: null};
const TABLE_ROWS = 1000; // rows shown in the table (the CSV holds them all)
const DENSITY_SIDE = 40; // the density grid's side, at most sqrt(GENSERVE_MAX_ROWS)

function node(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, value);
  el.append(...children);
  return el;
}

function number(v, digits = 4) {
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(digits - 1);
  return String(Number(v.toPrecision(digits)));
}

function percent(fraction) {
  return `${Number((100 * fraction).toPrecision(3))} %`;
}

// -- messages ------------------------------------------------------------------------------

/** Show what went wrong: the service's `error` text as is (with its status), or the
 * page's own refusal of the input. A 401 also brings up the token prompt. */
function showError(err) {
  const box = $("message");
  box.replaceChildren();
  if (err instanceof ApiError) {
    box.append(node("span", {class: "status"}, String(err.status)), " ", err.message);
    if (err.status === 401) askToken(true);
  } else if (err instanceof RowsError) {
    box.append(err.message);
  } else {
    box.append(`the page failed: ${err.message}`);
  }
  box.hidden = false;
}

/** The token prompt (`ask`), or the line saying a token is set. */
function askToken(ask) {
  $("auth").hidden = false;
  $("token-form").hidden = !ask;
  $("token-note").hidden = !ask;
  $("token-set").hidden = ask;
  if (ask) $("token").focus();
}

function clearError() {
  $("message").hidden = true;
  $("message").replaceChildren();
}

async function busy(button, work) {
  clearError();
  button.disabled = true;
  try {
    await work();
  } catch (err) {
    showError(err);
  } finally {
    button.disabled = false;
  }
}

// -- the cards -----------------------------------------------------------------------------

function shapeText(card) {
  if (card.shape.length <= 1) return String(card.dim);
  const levels = card.levels ? `, values 0..${card.levels - 1}` : "";
  return `${card.shape.join(" × ")} (${card.dim} values${levels})`;
}

function solverText(card) {
  const {solver, steps} = card.defaults;
  if (!solver) return `${card.solvers.join(", ")} (one pass)`;
  return steps ? `${solver}, ${steps} steps` : solver;
}

function versionsText(versions) {
  if (Array.isArray(versions)) {
    // /models gives {"version": N, "state": "ready" | "failed" | "unloaded", "reason": ...}
    return versions.map((v) => (v && typeof v === "object"
      ? `${v.version ?? v.name ?? JSON.stringify(v)}${v.state ? ` (${v.state})` : ""}`
      : String(v))).join(", ");
  }
  if (versions && typeof versions === "object") return Object.keys(versions).join(", ");
  return String(versions);
}

function cardFacts(card) {
  const facts = [
    ["family", card.family], ["model type", card.model_type],
    [card.shape.length > 1 ? "shape" : "dimension", shapeText(card)],
    ["graphs", card.graphs.join(", ")], ["runtime", card.runtime],
    ["sampling", solverText(card)],
    ["threshold", card.calibration
      ? `${number(card.calibration.threshold)} nats at target FPR ${percent(card.calibration.target_fpr)}`
      : "not calibrated (no /anomaly_score)"],
  ];
  if (card.versions !== undefined && card.versions !== null) {
    facts.push(["versions", versionsText(card.versions)]);
  }
  return facts;
}

function renderCards(models) {
  const cards = models.models.map((card) => {
    state.cards.set(card.name, card);
    const list = node("dl");
    for (const [term, value] of cardFacts(card)) list.append(node("dt", {}, term), node("dd", {}, value));
    const base = `#/models/${encodeURIComponent(card.name)}`;
    return node("article", {class: "card", "data-model": card.name},
      node("h2", {}, card.name), list,
      node("div", {class: "actions"},
        node("a", {class: "button", href: `${base}/sample`}, "Sample"),
        node("a", {class: "button secondary", href: `${base}/score`}, "Score")));
  });
  $("cards").replaceChildren(...cards);
  const failed = Object.entries(models.failed || {});
  $("failed").hidden = !failed.length;
  $("failed").replaceChildren(node("strong", {}, "Model folders refused at start"),
    node("ul", {}, ...failed.map(([name, why]) => node("li", {}, node("code", {}, name), `: ${why}`))));
}

// -- views ---------------------------------------------------------------------------------

function route() {
  clearError();
  const match = /^#\/models\/([^/]+)\/(sample|score)$/.exec(window.location.hash);
  const card = match && state.cards.get(decodeURIComponent(match[1]));
  $("view-models").hidden = Boolean(card);
  $("view-model").hidden = !card;
  if (!card) {
    if (match) showError(new Error(`no model '${decodeURIComponent(match[1])}' is served`));
    document.title = "genserve";
    return;
  }
  const view = match[2];
  if (state.card !== card) openModel(card);
  $("panel-sample").hidden = view !== "sample";
  $("panel-score").hidden = view !== "score";
  $("tab-sample").classList.toggle("active", view === "sample");
  $("tab-score").classList.toggle("active", view === "score");
  document.title = `${card.name} · ${view} · genserve`;
}

function openModel(card) {
  state.card = card;
  const base = `#/models/${encodeURIComponent(card.name)}`;
  $("tab-sample").href = `${base}/sample`;
  $("tab-score").href = `${base}/score`;
  $("model-name").textContent = card.name;
  $("model-summary").textContent = `${card.family} · ${card.model_type} · ` +
    `${card.shape.length > 1 ? "shape" : "dimension"} ${shapeText(card)} · ${card.runtime}`;
  // sampling controls: the model's own choices
  const {config} = state;
  const n = $("sample-n");
  n.max = config.max_samples;
  n.value = Math.min(config.max_samples, card.shape.length > 1 ? 32 : card.dim === 2 ? 500 : 300);
  const solver = $("sample-solver");
  solver.replaceChildren(...card.solvers.map((s) => node("option", {value: s}, s)));
  solver.value = card.defaults.solver || card.solvers[0];
  $("steps-field").hidden = !card.defaults.steps;
  $("sample-steps").max = config.max_steps;
  $("sample-steps").value = card.defaults.steps || "";
  for (const id of ["sample-meta", "sample-plot", "density-meta", "score-meta", "score-plot",
    "score-table"]) $(id).replaceChildren();
  $("download").hidden = true;
  $("rows").value = "";
  $("file").value = "";
  $("rows").placeholder = `${card.dim} numbers per row, e.g.\n` +
    Array.from({length: Math.min(card.dim, 6)}, (_, i) => (i * 0.5).toFixed(1)).join(", ") +
    (card.dim > 6 ? ", ..." : "");
}

// -- Sample --------------------------------------------------------------------------------

function integerField(id, name, lo, hi) {
  const text = $(id).value.trim();
  const value = Number(text);
  if (!/^\d+$/.test(text) || value < lo || value > hi) {
    throw new RowsError(`${name} must be a whole number from ${lo} to ${hi}, not '${text}'`);
  }
  return value;
}

async function sample() {
  const card = state.card;
  const {config} = state;
  const request = {model: card.name, n: integerField("sample-n", "n", 1, config.max_samples),
    seed: integerField("sample-seed", "seed", 0, 2 ** 31 - 1), solver: $("sample-solver").value};
  if (card.defaults.steps) {
    request.steps = integerField("sample-steps", "steps", 1, config.max_steps);
  }
  $("density-meta").replaceChildren();
  const {answer, ms} = await callVerb("sample", JSON.stringify(request));
  const samples = answer.samples;
  $("sample-meta").textContent = `${samples.length} samples · seed ${answer.seed} · ` +
    `${answer.solver}${answer.steps ? `, ${answer.steps} steps` : ""} · NFE ${answer.nfe} · ` +
    `${ms.toFixed(0)} ms`;
  const plot = $("sample-plot");
  if (card.shape.length > 1) {
    imageGrid(plot, samples, card.shape, card.levels);
  } else if (card.dim === 2) {
    const box = extent(samples);
    scatter2d(plot, samples, box);
    await density(card, samples, box);
  } else if (card.dim === 1) {
    histogram(plot, samples.map((row) => row[0]), {xName: "x₀"});
  } else {
    pairPlot(plot, samples, card.dim);
  }
}

/** The density of a 2-D model under its samples: one log_likelihood request over a grid. */
async function density(card, samples, box) {
  const side = Math.min(DENSITY_SIDE, Math.floor(Math.sqrt(state.config.max_rows)));
  $("density-meta").textContent = `computing log p(x) over a ${side} × ${side} grid…`;
  const grid = gridOver(box, side);
  const {answer, ms} = await callVerb("log_likelihood", JSON.stringify({model: card.name, x: grid}));
  scatter2d($("sample-plot"), samples, box, {side, values: answer.log_likelihood});
  $("density-meta").textContent = `density: log p(x) over a ${side} × ${side} grid in one ` +
    `/log_likelihood request (${answer.method}) · NFE ${answer.nfe} · ${ms.toFixed(0)} ms`;
}

// -- Score ---------------------------------------------------------------------------------

async function readRows(card) {
  const limit = state.config.page_max_rows;
  const file = $("file").files[0];
  if (!file) return parseText($("rows").value, card, limit);
  if (/\.npy$/i.test(file.name)) return parseNPY(await file.arrayBuffer(), card, limit);
  return parseText(await file.text(), card, limit);
}

async function score() {
  const card = state.card;
  const {config} = state;
  const rows = await readRows(card); // refuses bad input before anything is sent
  const out = {log_likelihood: [], scores: [], percentile: [], is_anomaly: [], threshold: null};
  let ms = 0;
  let requests = 0;
  for (const {body, rows: count} of requestBodies(card.name, rows, config.max_rows,
    config.max_body_bytes)) {
    $("score-meta").textContent = `scoring… ${out.log_likelihood.length + count} of ${rows.length} rows`;
    const ll = await callVerb("log_likelihood", body);
    out.log_likelihood.push(...ll.answer.log_likelihood);
    ms += ll.ms;
    requests += 1;
    if (card.calibration) {
      const an = await callVerb("anomaly_score", body);
      out.scores.push(...an.answer.scores);
      out.percentile.push(...an.answer.percentile);
      out.is_anomaly.push(...an.answer.is_anomaly);
      out.threshold = an.answer.threshold;
      ms += an.ms;
      requests += 1;
    }
  }
  showScores(card, rows.length, out);
  const flagged = out.is_anomaly.filter(Boolean).length;
  $("score-meta").textContent = `${rows.length} rows scored in ${requests} requests, ` +
    `${ms.toFixed(0)} ms` + (card.calibration ? ` · ${flagged} flagged as anomalies` : "");
}

function showScores(card, count, out) {
  const calibrated = out.threshold !== null;
  const columns = calibrated ? ["row", "log_likelihood", "score", "percentile", "is_anomaly"]
    : ["row", "log_likelihood"];
  const records = [];
  for (let i = 0; i < count; i++) {
    records.push(calibrated ? [i + 1, out.log_likelihood[i], out.scores[i], out.percentile[i],
      out.is_anomaly[i]] : [i + 1, out.log_likelihood[i]]);
  }
  if (calibrated) {
    histogram($("score-plot"), out.scores, {xName: "score: −log p(x), nats",
      threshold: out.threshold, thresholdLabel: `threshold ${number(out.threshold)} ` +
        `(target FPR ${percent(card.calibration.target_fpr)})`});
  } else {
    histogram($("score-plot"), out.log_likelihood.map((v) => -v), {xName: "−log p(x), nats"});
  }
  const table = $("score-table");
  const head = node("tr", {}, ...columns.map((c) => node("th", {}, c)));
  const body = records.slice(0, TABLE_ROWS).map((r) => node("tr",
    calibrated && r[4] ? {class: "anomaly"} : {},
    ...r.map((v) => node("td", {}, typeof v === "number" && !Number.isInteger(v) ? number(v, 6) : String(v)))));
  table.replaceChildren(node("thead", {}, head), node("tbody", {}, ...body));
  if (count > TABLE_ROWS) {
    table.append(node("caption", {}, `the first ${TABLE_ROWS} of ${count} rows; the CSV holds all`));
  }
  if (state.download) URL.revokeObjectURL(state.download);
  state.download = URL.createObjectURL(new Blob([toCSV(columns, records)], {type: "text/csv"}));
  const link = $("download");
  link.href = state.download;
  link.download = `${card.name}-scores.csv`;
  link.hidden = false;
}

// -- start ---------------------------------------------------------------------------------

async function start() {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setToken($("token").value);
    $("token").value = "";
    askToken(false);
    clearError();
  });
  $("token-change").addEventListener("click", () => askToken(true));
  $("sample-form").addEventListener("submit", (event) => {
    event.preventDefault();
    busy($("sample-go"), sample);
  });
  $("score-form").addEventListener("submit", (event) => {
    event.preventDefault();
    busy($("score-go"), score);
  });
  $("rows").addEventListener("input", () => { $("file").value = ""; });
  try {
    const [config, models] = await Promise.all([getJSON("/page/config.json"), getJSON("/models")]);
    state.config = config;
    $("version").textContent = `v${config.version}`;
    if (config.auth) askToken(true);
    renderCards(models);
  } catch (err) {
    showError(err);
    return;
  }
  window.addEventListener("hashchange", route);
  route();
  document.body.dataset.ready = "true";
}

start();
