// sluice dashboard: the jobs page and a job's live page. The job page reads
// the job's events (the JSON lines `sluice logs --json` prints) from
// /api/jobs/ID/events as server-sent events and draws them with uPlot.
// `window.sluice` exposes what it drew (plots, counts) for the browser test.
"use strict";

const sluice = (window.sluice = { plots: {}, steps: 0, completions: 0, done: false, events: 0 });

const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
};
const fmt = (x, d = 3) => (x == null || Number.isNaN(x) ? "–" : Math.abs(x) >= 1000 ? x.toFixed(0) : Number(x.toPrecision(d)).toString());
const age = (ms) => {
  if (!ms) return "–";
  const s = Math.max(0, (Date.now() - ms) / 1000);
  return s < 90 ? `${s.toFixed(0)} s` : s < 5400 ? `${(s / 60).toFixed(0)} min` : `${(s / 3600).toFixed(1)} h`;
};
const finalState = (s) => ["succeeded", "failed", "cancelled"].includes(s);
const trouble = (msg) => { const t = document.getElementById("trouble"); if (t) t.textContent = msg || ""; };

async function getJson(url) {
  const r = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (r.status === 401) { location.reload(); throw new Error("token needed"); }
  if (!r.ok) throw new Error(`${url}: ${r.status} ${(await r.text()).slice(0, 200)}`);
  return r.json();
}

function progressText(j) {
  const p = j.progress || {};
  return p.total_steps ? `${p.step || 0} / ${p.total_steps}` : `${p.step || 0}`;
}

// ---------------------------------------------------------------- jobs page
sluice.jobsPage = function () {
  const body = document.querySelector("#jobs tbody");
  const draw = (jobs) => {
    body.replaceChildren(...jobs.map((j) => el("tr", { "data-job": j.id },
      el("td", {}, el("a", { href: `/jobs/${encodeURIComponent(j.id)}` }, j.id)),
      el("td", { class: `state ${j.state}` }, j.state),
      el("td", {}, progressText(j)),
      el("td", {}, (j.progress && j.progress.live_workers) ?? "–"),
      el("td", {}, age(j.created_unix_ms || j.updated_unix_ms)),
      el("td", { class: "muted" }, j.message || ""))));
    document.getElementById("empty").hidden = jobs.length > 0;
    sluice.jobs = jobs.length;
  };
  const tick = async () => {
    try { draw(await getJson("/api/jobs")); trouble(""); } catch (e) { trouble(String(e.message || e)); }
    setTimeout(tick, 2000);
  };
  tick();
};

// ----------------------------------------------------------------- job page
// Series per plot: [label, colour, value of a step event (or null)].
const STEP_PLOTS = {
  reward: { series: [
    ["total", "#1f77b4", (e) => e.reward_mean],
    ["extrinsic", "#2ca02c", (e) => e.extrinsic_mean],
    ["intrinsic (total − extrinsic)", "#9467bd", (e) => e.reward_mean - e.extrinsic_mean],
  ] },
  signal: { series: [
    ["effective-gradient ratio", "#d62728", (e) => e.effective_gradient_ratio],
    ["clip fraction", "#ff7f0e", (e) => e.clip_fraction],
  ] },
  throughput: { series: [
    ["generation", "#17becf", (e) => e.generation_tokens_per_s],
    ["training", "#8c564b", (e) => e.train_tokens_per_s],
  ] },
  loss: { series: [
    ["policy loss", "#1f77b4", (e) => e.pg_loss],
    ["KL", "#e377c2", (e) => e.kl, "y2"],
  ] },
  grad: { series: [
    ["grad norm", "#7f7f7f", (e) => e.grad_norm],
    ["learning rate", "#bcbd22", (e) => e.lr, "y2"],
  ] },
};
const STALE_COLOURS = ["#2ca02c", "#98df8a", "#ffbb78", "#ff7f0e", "#d62728", "#8c564b", "#7f7f7f"];

// Axis labels that stay short and distinct: 12k, 0.5, 3e-4.
const tickLabels = (u, vals) => vals.map((v) => {
  if (v == null) return "";
  const a = Math.abs(v);
  if (a === 0) return "0";
  if (a >= 1e4) return `${+(v / 1000).toPrecision(3)}k`;
  if (a < 1e-2) return v.toExponential(1);
  return String(+v.toPrecision(3));
});

function markerPlugin(state) {
  const colour = { joined: "#2ca02c", lost: "#d62728", redispatched: "#ff7f0e", checkpoint: "#aaaaaa" };
  return { hooks: { draw: [(u) => {
    const ctx = u.ctx;
    ctx.save();
    ctx.lineWidth = 1.5 * devicePixelRatio;
    for (const m of state.markers) {
      const x = Math.round(u.valToPos(m.x, "x", true));
      if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
      ctx.strokeStyle = colour[m.kind];
      ctx.setLineDash(m.kind === "checkpoint" ? [2, 4] : [6, 3]);
      ctx.beginPath(); ctx.moveTo(x, u.bbox.top); ctx.lineTo(x, u.bbox.top + u.bbox.height); ctx.stroke();
    }
    ctx.restore();
  }] } };
}

function makePlot(id, series, state, opts = {}) {
  const box = document.getElementById(`plot-${id}`);
  const width = Math.max(300, box.clientWidth || 560);
  const y2 = series.some((s) => s[3] === "y2");
  const u = new uPlot({
    width, height: 220,
    scales: { x: { time: false }, ...(opts.scales || {}) },
    axes: [{ label: opts.xLabel || "step" }, { size: 60, values: tickLabels },
      ...(y2 ? [{ scale: "y2", side: 1, size: 60, values: tickLabels, grid: { show: false } }] : [])],
    series: [{ label: opts.xLabel || "step" }, ...series.map(([label, stroke, , scale]) => ({
      label, stroke, scale: scale || "y", width: 1.5, spanGaps: true,
      points: { show: false },
    }))],
    plugins: opts.markers === false ? [] : [markerPlugin(state)],
  }, [[], ...series.map(() => [])], box);
  box.dataset.points = "0";
  sluice.plots[id] = u;
  return u;
}

sluice.jobPage = function () {
  const id = decodeURIComponent(location.pathname.split("/")[2] || "");
  document.title = `sluice: ${id}`;
  document.getElementById("job-name").textContent = id;
  const state = { steps: [], evals: new Map(), rounds: [], markers: [], samples: [], oni: [], workers: new Set(), lastStep: 0, work: null };
  const plots = {};
  for (const [name, p] of Object.entries(STEP_PLOTS)) plots[name] = makePlot(name, p.series, state);
  // Held-out reward joins the reward plot as points at the steps evaluated.
  plots.reward.addSeries({ label: "held-out", stroke: "#000", width: 0, spanGaps: true, points: { show: true, size: 7, fill: "#000" } }, 4);
  plots.reward.setData([[], [], [], [], []]);
  let staleSeries = 0;
  plots.staleness = makePlot("staleness", [], state, { scales: { y: { range: [0, 1] } } });
  plots.budget = makePlot("budget", [["min", "#aec7e8", null], ["median", "#1f77b4", null], ["max", "#aec7e8", null], ["mean", "#ff7f0e", null]], state, { xLabel: "round", markers: false });
  plots.oni = makePlot("oni", [["labelled", "#2ca02c", null], ["queued", "#1f77b4", null], ["dropped", "#d62728", null], ["LLM s/batch", "#9467bd", null, "y2"]], state, { xLabel: "step" });

  let pending = false;
  const redraw = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; draw(); });
  };

  function draw() {
    const xs = state.steps.map((e) => e.step);
    for (const [name, p] of Object.entries(STEP_PLOTS)) {
      const data = [xs, ...p.series.map(([, , f]) => state.steps.map((e) => { const v = f(e); return v == null || !Number.isFinite(v) ? null : v; }))];
      if (name === "reward") data.push(state.steps.map((e) => state.evals.has(e.step) ? state.evals.get(e.step) : null));
      plots[name].setData(data);
      plots[name].root.parentElement.dataset.points = String(xs.length);
    }
    // Staleness: share of each step's trained groups by versions behind (stacked).
    const depth = Math.max(1, ...state.steps.map((e) => (e.staleness_counts || []).length));
    while (staleSeries < depth) {
      const k = staleSeries;
      const c = STALE_COLOURS[Math.min(k, STALE_COLOURS.length - 1)];
      plots.staleness.addSeries({ label: k === 32 ? "≥32 behind" : `${k} behind`, stroke: c, fill: c, width: 1, paths: uPlot.paths.bars({ size: [0.9, 40] }), points: { show: false } }, k + 1);
      staleSeries++;
    }
    const shares = state.steps.map((e) => {
      const c = e.staleness_counts || [];
      const total = c.reduce((a, b) => a + b, 0) || 1;
      let acc = 1;
      // Cumulative from the top, so each band's fill covers its share.
      return Array.from({ length: depth }, (_, k) => { const top = acc; acc -= (c[k] || 0) / total; return c.length ? top : null; });
    });
    plots.staleness.setData([xs, ...Array.from({ length: depth }, (_, k) => shares.map((s) => s[k]))]);
    const r = state.rounds;
    const stat = (f) => r.map((x) => (x.sizes.length ? f(x.sizes) : null));
    const sorted = (s) => [...s].sort((a, b) => a - b);
    plots.budget.setData([r.map((x) => x.round), stat((s) => Math.min(...s)), stat((s) => sorted(s)[Math.floor(s.length / 2)]), stat((s) => Math.max(...s)), stat((s) => s.reduce((a, b) => a + b, 0) / s.length)]);
    // Annotation counters on the same step axis: at each step, the last report made by then.
    let j = -1;
    const oniAt = state.steps.map((e) => {
      while (j + 1 < state.oni.length && state.oni[j + 1].x <= e.step) j++;
      return j >= 0 ? state.oni[j] : null;
    });
    const oniSeries = (f) => oniAt.map((a) => (a ? f(a) : null));
    plots.oni.setData([xs, oniSeries((a) => a.labelled), oniSeries((a) => a.queued), oniSeries((a) => a.dropped), oniSeries((a) => a.annotate_seconds_mean ?? null)]);
    sluice.oni = state.oni.length;
    drawCompletions();
    sluice.steps = xs.length;
  }

  function drawCompletions() {
    const rows = state.samples.slice(-20).reverse();
    document.querySelector("#completions tbody").replaceChildren(...rows.map((s) => el("tr", {},
      el("td", {}, s.step), el("td", {}, el("pre", {}, s.prompt)), el("td", {}, el("pre", {}, s.completion)),
      el("td", { class: s.reward > 0 ? "good" : "bad" }, fmt(s.reward)))));
    sluice.completions = rows.length;
  }

  function onEvent(e) {
    sluice.events++;
    const at = state.lastStep + 0.5;
    switch (e.event) {
      case "step": state.steps.push(e); state.lastStep = e.step; break;
      case "eval": {
        state.evals.set(e.step, e.reward_mean);
        for (const s of e.samples || []) state.samples.push({ step: e.step, ...s });
        break;
      }
      case "round": state.rounds.push(e); break;
      case "worker": if (!state.workers.has(e.worker)) { state.workers.add(e.worker); state.markers.push({ x: at, kind: "joined", what: e.worker }); } break;
      case "worker_lost": state.workers.delete(e.worker); state.markers.push({ x: at, kind: "lost", what: e.worker }); break;
      case "redispatched": state.markers.push({ x: at, kind: "redispatched", what: `${(e.items || []).length} items` }); break;
      case "checkpoint": state.markers.push({ x: e.step, kind: "checkpoint" }); break;
      case "annotation": state.oni.push({ x: state.lastStep, ...e }); break;
      default: break;
    }
    redraw();
  }

  const es = new EventSource(`/api/jobs/${encodeURIComponent(id)}/events`);
  es.onmessage = (m) => { try { onEvent(JSON.parse(m.data)); } catch (err) { trouble(`bad event: ${err}`); } };
  es.addEventListener("end", () => { es.close(); sluice.done = true; draw(); summary(); });
  es.addEventListener("trouble", (m) => trouble(m.data));
  es.onerror = () => { if (!sluice.done) trouble("event stream interrupted; reconnecting"); };
  es.onopen = () => trouble("");

  async function summary() {
    let j;
    try { j = await getJson(`/api/jobs/${encodeURIComponent(id)}`); } catch (e) { trouble(String(e.message || e)); setTimeout(summary, 4000); return; }
    document.getElementById("job-name").textContent = j.name && j.name !== j.id ? `${j.id} (${j.name})` : j.id;
    const st = document.getElementById("job-state");
    st.textContent = j.state; st.className = `state ${j.state}`;
    const p = j.progress || {};
    const last = state.steps[state.steps.length - 1] || {};
    const item = (k, v) => el("div", { class: "kv" }, el("span", { class: "k" }, k), el("span", { class: "v" }, v));
    document.getElementById("summary").replaceChildren(
      item("step", progressText(j)), item("workers", p.live_workers ?? "–"), item("age", age(j.created_unix_ms)),
      item("reward", fmt(last.reward_mean)), item("held-out", fmt([...state.evals.values()].pop())),
      item("step time", last.step_seconds != null ? `${fmt(last.step_seconds)} s` : "–"), item("message", j.message || ""));
    const w = [["created", p.work_created], ["trained", p.work_trained], ["dropped stale", p.work_dropped_stale],
      ["dropped invalid", p.work_dropped_invalid], ["filtered (no variance)", p.work_filtered], ["unused", p.work_unused],
      ["re-dispatched", p.work_redispatched], ["duplicate outcomes", p.duplicate_outcomes]].filter(([, v]) => v != null);
    document.querySelector("#work tbody").replaceChildren(el("tr", {}, ...w.map(([k]) => el("th", {}, k))), el("tr", {}, ...w.map(([, v]) => el("td", {}, v))));
    sluice.state = j.state;
    if (!finalState(j.state)) setTimeout(summary, 2000);
  }
  summary();
  window.addEventListener("resize", () => {
    for (const [name, u] of Object.entries(plots)) {
      const box = document.getElementById(`plot-${name}`);
      u.setSize({ width: Math.max(300, box.clientWidth), height: 220 });
    }
  });
};

// Each page names itself (no inline script: the pages are served with a CSP that forbids it).
if (document.body.dataset.page === "jobs") sluice.jobsPage();
if (document.body.dataset.page === "job") sluice.jobPage();
