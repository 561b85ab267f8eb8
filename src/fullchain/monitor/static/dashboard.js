// fullchain dashboard: polls /metrics (same origin), derives the monitor's figures, draws canvas line charts.
"use strict";

const POLL_MS = 1000;
const KEEP = 300; // points per chart

// Each chart: a title, a unit and how to compute its value from two parsed scrapes (null: no data).
const CHARTS = [
  { key: "latency_p95", title: "request latency p95", unit: "s",
    value: (a, b) => quantile(histDelta(a, b, "serve_request_duration_seconds"), 0.95) },
  { key: "throughput_rps", title: "requests answered", unit: "req/s",
    value: (a, b) => rate(a, b, "serve_requests_total") },
  { key: "queue_depth", title: "queue depth", unit: "requests", value: (a, b) => total(b.values, "serve_queue_depth") },
  { key: "batch_mean", title: "mean batch size", unit: "requests",
    value: (a, b) => mean(histDelta(a, b, "serve_batch_size")) },
  { key: "train_loss", title: "training loss", unit: "", value: (a, b) => total(b.values, "train_loss") },
  { key: "samples_per_s", title: "training samples", unit: "samples/s",
    value: (a, b) => total(b.values, "train_samples_per_second") },
  { key: "step_mean", title: "mean step time", unit: "s",
    value: (a, b) => mean(histDelta(a, b, "train_step_seconds")) },
  { key: "data_share", title: "data wait / step time", unit: "",
    value: (a, b) => {
      const step = histDelta(a, b, "train_step_seconds").sum;
      return step > 0 ? histDelta(a, b, "train_data_wait_seconds").sum / step : null;
    } },
];

// Prometheus text -> Map of "name{labels}" -> value (comments and _created samples dropped).
function parseMetrics(text) {
  const out = new Map();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/);
    if (!m || m[1].endsWith("_created")) continue;
    out.set(m[1] + (m[2] || ""), parseFloat(m[3]));
  }
  return out;
}

function samples(snap, name) {
  const found = [];
  for (const [key, value] of snap) if (key === name || key.startsWith(name + "{")) found.push([key, value]);
  return found;
}

function total(snap, name) {
  const found = samples(snap, name);
  return found.length ? found.reduce((s, [, v]) => s + v, 0) : null;
}

function rate(a, b, name) {
  const before = total(a.values, name), after = total(b.values, name), dt = (b.t - a.t) / 1000;
  return before === null || after === null || dt <= 0 ? null : (after - before) / dt;
}

function histDelta(a, b, name) {
  const buckets = new Map();
  for (const [snap, sign] of [[b.values, 1], [a.values, -1]]) {
    for (const [key, value] of samples(snap, name + "_bucket")) {
      const le = key.match(/le="([^"]+)"/)[1];
      const bound = le === "+Inf" ? Infinity : parseFloat(le);
      buckets.set(bound, (buckets.get(bound) || 0) + sign * value);
    }
  }
  const count = (total(b.values, name + "_count") || 0) - (total(a.values, name + "_count") || 0);
  const sum = (total(b.values, name + "_sum") || 0) - (total(a.values, name + "_sum") || 0);
  return { buckets: [...buckets.entries()].sort((x, y) => x[0] - y[0]), count, sum };
}

function mean(h) { return h.count > 0 ? h.sum / h.count : null; }

function quantile(h, q) {
  if (h.count <= 0) return null;
  const rank = q * h.count;
  let lowerBound = 0, lowerCount = 0;
  for (const [bound, cumulative] of h.buckets) {
    if (cumulative >= rank) {
      if (!isFinite(bound)) return lowerBound;
      const span = cumulative - lowerCount;
      return lowerBound + (bound - lowerBound) * (span ? (rank - lowerCount) / span : 1);
    }
    lowerBound = bound; lowerCount = cumulative;
  }
  return lowerBound;
}

function format(v) {
  if (v === null || !isFinite(v)) return "–";
  const a = Math.abs(v);
  return a !== 0 && (a < 0.01 || a >= 1e4) ? v.toExponential(2) : v.toFixed(3).replace(/\.?0+$/, "");
}

function makeChart(spec) {
  const fig = document.createElement("figure");
  fig.className = "chart empty";
  fig.id = "chart-" + spec.key;
  fig.dataset.points = "0";
  fig.innerHTML = `<figcaption><span>${spec.title}${spec.unit ? " (" + spec.unit + ")" : ""}</span>` +
    `<span class="value">–</span></figcaption><canvas width="800" height="300"></canvas>`;
  document.getElementById("charts").appendChild(fig);
  return { spec, fig, canvas: fig.querySelector("canvas"), points: [] };
}

function draw(chart) {
  const { canvas, points } = chart;
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 40;
  ctx.clearRect(0, 0, w, h);
  ctx.strokeStyle = "#ccd"; ctx.lineWidth = 1;
  ctx.strokeRect(pad, 10, w - pad - 10, h - pad - 10);
  if (points.length === 0) return;
  const ts = points.map(p => p[0]), vs = points.map(p => p[1]);
  const t0 = Math.min(...ts), t1 = Math.max(...ts) || 1;
  let lo = Math.min(...vs), hi = Math.max(...vs);
  if (hi === lo) { hi += Math.abs(hi) * 0.1 || 1; lo -= Math.abs(lo) * 0.1 || 0; }
  const x = t => pad + (w - pad - 10) * (t1 === t0 ? 1 : (t - t0) / (t1 - t0));
  const y = v => h - pad - (h - pad - 20) * (v - lo) / (hi - lo);
  ctx.fillStyle = "#556"; ctx.font = "20px sans-serif";
  ctx.fillText(format(hi), 2, 28); ctx.fillText(format(lo), 2, h - pad);
  ctx.strokeStyle = "#1f6fd1"; ctx.lineWidth = 3; ctx.beginPath();
  points.forEach(([t, v], i) => (i ? ctx.lineTo(x(t), y(v)) : ctx.moveTo(x(t), y(v))));
  ctx.stroke();
  ctx.fillStyle = "#1f6fd1";
  const [lt, lv] = points[points.length - 1];
  ctx.beginPath(); ctx.arc(x(lt), y(lv), 5, 0, 2 * Math.PI); ctx.fill();
}

const charts = CHARTS.map(makeChart);
let previous = null;

function update(previous, current) {
  for (const chart of charts) {
    const v = chart.spec.value(previous, current);
    if (v === null || !isFinite(v)) continue;
    chart.points.push([(current.t - charts.t0) / 1000, v]);
    if (chart.points.length > KEEP) chart.points.shift();
    chart.fig.dataset.points = String(chart.points.length);
    chart.fig.classList.remove("empty");
    chart.fig.querySelector(".value").textContent = format(v);
    draw(chart);
  }
}

async function poll() {
  const status = document.getElementById("status");
  let current = null;
  try {
    const response = await fetch("/metrics", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    current = { t: Date.now(), values: parseMetrics(await response.text()) };
    status.textContent = "live: " + new Date().toLocaleTimeString();
    status.className = "";
  } catch (err) {
    status.textContent = "cannot reach /metrics (" + err.message + "), retrying";
    status.className = "down";
  }
  if (current) {
    if (previous) update(previous, current);
    previous = current;
  }
  setTimeout(poll, POLL_MS);
}

charts.t0 = Date.now();
charts.forEach(draw);
poll();
