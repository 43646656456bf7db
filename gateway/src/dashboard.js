// Waystation dashboard: polls /api/v1/status every second and draws the last few minutes.
// No dependencies. Rates use the server's clock (now_ms), so they are right even when the
// browser's timers run fast or late. The page exposes what it drew as data attributes
// (body: data-sensor-count, data-client-count, data-polls; each canvas: data-points; the
// pipeline panel: data-pipeline-*) for tests.
"use strict";

const HISTORY = 180;
const series = { ingest: [], forward: [], backlog: [] };
let previous = null;
let polls = 0;

const $ = (id) => document.getElementById(id);
const fmt = (n) => (n == null ? "–" : Math.round(n).toLocaleString("en-US"));
const rate = (n) => (n >= 100 ? fmt(n) : n.toFixed(1)) + "/s";

function bytes(n) {
  if (n == null) return "–";
  if (n < 1024) return fmt(n) + " B";
  if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KiB";
  return (n / 1024 / 1024).toFixed(1) + " MiB";
}

function age(seconds) {
  if (seconds == null) return "–";
  if (seconds < 1) return "<1 s";
  if (seconds < 120) return Math.round(seconds) + " s";
  if (seconds < 7200) return Math.round(seconds / 60) + " min";
  return Math.round(seconds / 3600) + " h";
}

function push(name, t, v) {
  const s = series[name];
  s.push([t, v]);
  if (s.length > HISTORY) s.shift();
  $("now-" + name).textContent = name === "backlog" ? fmt(v) + " msgs" : rate(v);
  const canvas = $("chart-" + name);
  canvas.dataset.points = String(s.length);
  draw(canvas, s, name === "backlog" ? "#d98c1f" : name === "ingest" ? "#2f6fdf" : "#1f9d55");
}

function draw(canvas, points, color) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 300, h = canvas.clientHeight || 150;
  if (canvas.width !== Math.round(w * dpr)) { canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr); }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const left = 44, bottom = h - 18, top = 8, right = w - 6;
  let max = 1;
  for (const p of points) max = Math.max(max, p[1]);
  max = niceCeil(max);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#6b7480";
  ctx.strokeStyle = "#e3e6ea";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = bottom - (bottom - top) * i / 4;
    ctx.beginPath(); ctx.moveTo(left, y + 0.5); ctx.lineTo(right, y + 0.5); ctx.stroke();
    ctx.fillText(short(max * i / 4), 4, y + 4);
  }
  if (points.length === 0) return;
  const t1 = points[points.length - 1][0];
  const span = Math.max(60000, t1 - points[0][0]);
  const x = (t) => right - (right - left) * (t1 - t) / span;
  const y = (v) => bottom - (bottom - top) * v / max;
  ctx.fillText("-" + Math.round(span / 1000) + " s", left, h - 4);
  ctx.fillText("now", right - 22, h - 4);
  ctx.beginPath();
  points.forEach((p, i) => (i ? ctx.lineTo(x(p[0]), y(p[1])) : ctx.moveTo(x(p[0]), y(p[1]))));
  ctx.strokeStyle = color; ctx.lineWidth = 2; ctx.stroke();
  ctx.lineTo(x(t1), bottom); ctx.lineTo(x(points[0][0]), bottom); ctx.closePath();
  ctx.globalAlpha = 0.12; ctx.fillStyle = color; ctx.fill(); ctx.globalAlpha = 1;
}

function niceCeil(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function short(v) {
  if (v >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (v >= 1e3) return (v / 1e3).toFixed(v >= 1e4 ? 0 : 1) + "k";
  return String(Math.round(v * 10) / 10);
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function render(s) {
  polls += 1;
  document.body.dataset.polls = String(polls);
  $("error").style.display = "none";
  $("gateway").textContent = s.gateway + " · v" + s.version;
  const health = $("health");
  const degraded = s.healthy && (s.degraded || []).length > 0;
  health.textContent = !s.healthy ? "unhealthy" : degraded ? "degraded" : "healthy";
  health.className = "badge " + (!s.healthy ? "bad" : degraded ? "warn" : "ok");
  health.title = s.unhealthy_reason || (s.degraded || []).join("\n");
  $("uptime").textContent = "up " + age(s.uptime_s);

  const sensors = s.clients.filter((c) => c.last_publish);
  document.body.dataset.sensorCount = String(sensors.length);
  document.body.dataset.clientCount = String(s.clients.length);
  // Waiting = what the slowest bridge has not forwarded yet. The log itself may hold a few
  // more: forwarded entries are deleted in runs (bridge.rs DELETE_EVERY / DELETE_INTERVAL).
  const backlog = s.bridges.length ? Math.max(...s.bridges.map((b) => b.backlog)) : (s.storage.log_messages || 0);
  $("k-sensors").textContent = fmt(sensors.length);
  $("k-received").textContent = fmt(s.totals.messages_received);
  $("k-forwarded").textContent = fmt(s.totals.forwarded);
  $("k-backlog").textContent = fmt(backlog);
  $("k-oldest").textContent = s.storage.oldest_age_s == null ? "–" : age(s.storage.oldest_age_s);
  $("k-dropped").textContent = fmt(s.totals.dropped);

  // One chart point per second of server time (timers in a background tab, or a headless
  // browser's virtual time, may fire faster or slower than that).
  if (!previous) {
    push("backlog", s.now_ms, backlog || 0);
    previous = s;
  } else if (s.now_ms - previous.now_ms >= 900) {
    const dt = (s.now_ms - previous.now_ms) / 1000;
    const ingest = Math.max(0, s.totals.messages_received - previous.totals.messages_received) / dt;
    const forward = Math.max(0, s.totals.forwarded - previous.totals.forwarded) / dt;
    push("ingest", s.now_ms, ingest);
    push("forward", s.now_ms, forward);
    push("backlog", s.now_ms, backlog || 0);
    previous = s;
  }

  const bt = $("bridges").tBodies[0];
  bt.replaceChildren();
  for (const b of s.bridges) {
    const tr = document.createElement("tr");
    tr.dataset.bridge = b.name;
    tr.dataset.connected = String(b.connected);
    const name = cell(tr, "");
    const dot = document.createElement("span");
    dot.className = "dot" + (b.connected ? " up" : "");
    name.append(dot, b.name);
    cell(tr, b.connected ? "connected" : (b.down_for_s != null ? "down " + b.down_for_s + " s" : "down"));
    cell(tr, fmt(b.forwarded), "num");
    cell(tr, fmt(b.backlog), "num");
    cell(tr, fmt(b.inflight), "num");
    cell(tr, fmt(b.reconnects), "num");
    const reasons = Object.entries(b.failures || {}).map(([k, v]) => k + " " + fmt(v)).join(", ");
    cell(tr, reasons, "muted");
    cell(tr, b.last_error || "", "muted");
    bt.appendChild(tr);
  }
  if (s.bridges.length === 0) {
    const tr = document.createElement("tr");
    cell(tr, "no bridges configured", "muted").colSpan = 8;
    bt.appendChild(tr);
  }

  const st = $("sensors").tBodies[0];
  st.replaceChildren();
  for (const c of sensors) {
    const tr = document.createElement("tr");
    tr.dataset.client = c.client_id;
    cell(tr, c.client_id);
    cell(tr, c.peer || "", "muted");
    cell(tr, fmt(c.messages_in), "num");
    cell(tr, c.last_publish.topic);
    const code = document.createElement("code");
    code.textContent = c.last_publish.payload;
    cell(tr, "").appendChild(code);
    cell(tr, age((s.now_ms - c.last_publish.at_ms) / 1000), "num");
    st.appendChild(tr);
  }
  if (sensors.length === 0) {
    const tr = document.createElement("tr");
    cell(tr, "no sensor has published yet", "muted").colSpan = 6;
    st.appendChild(tr);
  }

  if (s.pipeline) renderPipeline(s.pipeline);

  const g = s.storage;
  $("storage").textContent = g.enabled
    ? `Storage: ${fmt(g.log_messages)} messages (${fmt(g.log_bytes / 1024)} KiB) in the log · ${fmt(g.commits)} group commits · ` +
      `last batch ${fmt(g.last_batch_ops)} ops · ${g.pending_acks} acks waiting for disk` + (g.error ? ` · ERROR: ${g.error}` : "") +
      (g.moved_aside ? ` · a corrupt store was moved to ${g.moved_aside}` : "")
    : "Storage: none (no data_dir)";
}

// The edge pipeline (docs/pipeline.md): what [[pipeline]] rules passed, refused and dropped as
// resends, the dead letters kept, and what batching and compression kept off the uplinks.
function renderPipeline(p) {
  const panel = $("pipeline");
  const d = panel.dataset;
  d.pipelineValid = String(p.valid);
  d.pipelineInvalid = String(p.invalid);
  d.pipelineDuplicates = String(p.duplicates);
  d.pipelineDeadLetters = String(p.dead_letters);
  d.pipelineDeadLetterBytes = String(p.dead_letter_bytes);
  d.pipelineBatches = String(p.batches);
  d.pipelineBatchedEvents = String(p.batched_events);
  d.pipelineBytesSaved = String(p.bytes_saved);
  const reasons = Object.entries(p.invalid_by_reason || {}).filter(([, n]) => n > 0);
  d.pipelineInvalidByReason = reasons.map(([k, n]) => k + "=" + n).join(",");

  $("p-valid").textContent = fmt(p.valid);
  $("p-invalid").textContent = fmt(p.invalid);
  $("p-invalid").className = "v" + (p.invalid > 0 ? " bad" : "");
  $("p-invalid-s").textContent = reasons.map(([k, n]) => k.replace(/_/g, " ") + " " + fmt(n)).join(", ");
  $("p-duplicates").textContent = fmt(p.duplicates);
  $("p-dead").textContent = fmt(p.dead_letters);
  $("p-dead-s").textContent = bytes(p.dead_letter_bytes);
  $("p-batches").textContent = fmt(p.batches);
  $("p-batches-s").textContent = p.batches > 0 ? fmt(p.batched_events) + " events" : "";
  $("p-per-batch").textContent = p.batches > 0 ? (p.batched_events / p.batches).toFixed(1) : "–";
  $("p-saved").textContent = bytes(p.bytes_saved);
  $("p-saved-s").textContent = p.batch_input_bytes > 0
    ? Math.round(100 * p.bytes_saved / p.batch_input_bytes) + "% of " + bytes(p.batch_input_bytes) : "";

  const notes = [];
  if (p.dead_letters > 0) {
    const hint = document.createElement("code");
    hint.textContent = "waystation dlq list";
    notes.push([`${fmt(p.dead_letters)} dead letters kept (${bytes(p.dead_letter_bytes)}): see them with `, hint,
      ", then replay or purge them"]);
  }
  if (p.dead_letters_evicted > 0) notes.push([`${fmt(p.dead_letters_evicted)} evicted for the [dead_letter] bounds`]);
  if (p.dead_letters_replayed > 0) notes.push([`${fmt(p.dead_letters_replayed)} replayed`]);
  if (p.valid + p.invalid + p.duplicates + p.batches === 0) {
    notes.push(["nothing through the pipeline yet ([[pipeline]] rules, and batch on forward rules: docs/pipeline.md)"]);
  }
  const detail = $("pipeline-detail");
  detail.replaceChildren();
  notes.forEach((parts, i) => detail.append(...(i ? [" · "] : []), ...parts));
}

// The last minutes, sampled by the server once a second, so the charts start full.
async function seed() {
  try {
    const r = await fetch("/api/v1/history", { cache: "no-store" });
    if (!r.ok) return;
    const h = await r.json();
    let prev = null;
    for (const [t, received, forwarded, backlog] of h.samples) {
      if (prev && t > prev[0]) {
        const dt = (t - prev[0]) / 1000;
        push("ingest", t, Math.max(0, received - prev[1]) / dt);
        push("forward", t, Math.max(0, forwarded - prev[2]) / dt);
      }
      push("backlog", t, backlog);
      prev = [t, received, forwarded];
    }
  } catch (e) {
    // No history: the charts fill as the page polls.
  }
}

async function poll() {
  try {
    const r = await fetch("/api/v1/status", { cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
  } catch (e) {
    const el = $("error");
    el.textContent = "cannot reach the gateway: " + e.message;
    el.style.display = "block";
  } finally {
    setTimeout(poll, 1000);
  }
}

seed().then(poll);
