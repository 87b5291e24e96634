// gwtf dashboard: fetches /api/state every 2 s and draws it. Everything shown comes from that JSON; text from the
// network is set with textContent, never parsed as HTML.
"use strict";

const REFRESH_MS = 2000;
const WIRE_ROWS = 10; // message kinds listed by name, the busiest first
const GRAPH_DX = 150; // flow graph: between stage columns
const GRAPH_DY = 110; // flow graph: between the replicas of a stage
const STATES = ["serving", "joining", "catching-up", "stale", "leaving", "left", "dead"];
const MARKERS = { join: "#2f6fd6", rebuild: "#8b4fd0", crash: "#cf3434" }; // drawn on the charts, in this order
// validation loss: a series only while some data node reports it
const VAL_SERIES = { label: "val loss", stroke: "#8b4fd0", width: 2, dash: [6, 4], value: (u, v) => fmtNum(v, 4) };
let charts = null;
let graph = null;
let graphKey = "";
let events = [];

// ---- small helpers ---------------------------------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function replace(id, ...children) {
  const node = document.getElementById(id);
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined));
  return node;
}

function fmtMs(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const ms = seconds * 1000;
  return ms >= 100 ? `${ms.toFixed(0)} ms` : `${ms.toFixed(1)} ms`;
}

function fmtBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function fmtNum(x, digits) {
  return x === null || x === undefined ? "—" : Number(x).toFixed(digits);
}

function fmtPct(x) {
  return `${(100 * x).toFixed(1)}%`;
}

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
}

// ---- header ----------------------------------------------------------------------------------------------------
function drawHeader(s) {
  const run = s.run || {};
  document.getElementById("run-id").textContent = run.id || "";
  document.title = `gwtf: ${run.id || "run"}`;
  const live = (s.stages || []).slice(1).flatMap((st) => st.nodes).filter((n) => !["dead", "left"].includes(n.state));
  const last = (s.history || []).at(-1);
  const facts = [
    ["model", run.preset],
    ["stages", run.stages],
    ["router", run.router],
    ["recovery", run.recovery],
    ["steps done", s.version === null ? "—" : s.version],
    ["loss", last ? fmtNum(last.loss, 4) : "—"],
    ["tokens/s", last ? fmtNum(last.tokens_per_s, 0) : "—"],
    ["live relays", live.length],
  ];
  if (run.keyed) facts.push(["access", "by invitation"]);
  replace("run-facts", facts.map(([k, v]) => el("span", { class: "fact" }, `${k} `, el("b", {}, v ?? "—"))));
  const fresh = document.getElementById("freshness");
  const age = Date.now() / 1000 - s.time;
  fresh.textContent = s.poll_error ? `reading the run failed: ${s.poll_error}` : `updated ${clock(s.time)}`;
  fresh.className = s.poll_error || age > 10 ? "freshness old" : "freshness";
}

// ---- pipeline --------------------------------------------------------------------------------------------------
function box(n) {
  const rows = [el("div", { class: "row" }, n.region || "no region", " · ", el("b", {}, n.device), " · v", el("b", {}, n.version))];
  if (n.role === "relay") {
    rows.push(
      el("div", { class: "row" }, "capacity ", el("b", {}, n.capacity), " · held ", el("b", {}, n.held)),
      el("div", { class: "row" }, "compute ", el("b", {}, `${fmtNum(n.compute_ms, 1)} ms`), " · routed ", el("b", {}, n.routed)),
    );
  } else {
    rows.push(
      el("div", { class: "row" }, "in flight ", el("b", {}, n.held)),
      el("div", { class: "row" }, "microbatches done ", el("b", {}, n.done)),
    );
  }
  return el(
    "div",
    { class: `box state-${n.state}`, "data-peer": n.peer, "data-state": n.state, title: n.peer },
    el("div", { class: "top" }, el("span", { class: "peer" }, n.short), el("span", { class: "badge" }, n.state)),
    rows,
    n.rebuilt_from ? el("div", { class: "rebuilt" }, `rebuilt: ${n.rebuilt_from}`) : null,
    n.state !== "serving" ? el("div", { class: "why" }, n.why) : null,
  );
}

function drawPipeline(s) {
  const columns = (s.stages || []).map((st) =>
    el(
      "div",
      { class: "stage", "data-stage": st.stage },
      el("h3", {}, st.stage === 0 ? "data nodes (stage 0)" : `stage ${st.stage}`),
      st.nodes.length ? st.nodes.map(box) : el("div", { class: "empty" }, "no replica"),
    ),
  );
  replace("pipeline", columns);
  replace("state-legend", STATES.map((k) => el("span", {}, el("i", { style: `background: var(--${k})` }), k)));
}

// ---- flows graph -----------------------------------------------------------------------------------------------
// A data node is drawn twice, as the source of its microbatches (left) and as their sink (right, where the loss is
// computed), so every route reads left to right.
function graphElements(s) {
  const stageOf = {};
  const nodes = [];
  const sinkX = (s.stages.length || 1) * GRAPH_DX;
  for (const st of s.stages || []) {
    st.nodes.forEach((n, i) => {
      stageOf[n.peer] = st.stage;
      const position = { x: st.stage * GRAPH_DX, y: i * GRAPH_DY };
      nodes.push({ data: { id: n.peer, label: n.short, state: n.state }, position });
      if (st.stage === 0) {
        const sink = { id: `sink:${n.peer}`, label: `${n.short} (loss)`, state: n.state };
        nodes.push({ data: sink, position: { x: sinkX, y: i * GRAPH_DY } });
      }
    });
  }
  const edges = (s.flows.edges || [])
    .filter(([a, b]) => a in stageOf && b in stageOf)
    .map(([a, b, count, cost]) => {
      const target = stageOf[b] === 0 ? `sink:${b}` : b;
      return {
        data: { id: `${a}>${b}`, source: a, target, count, label: `${count} × ${fmtMs(cost)}` },
        classes: stageOf[b] !== 0 && stageOf[b] < stageOf[a] ? "back" : "",
      };
    });
  return { nodes, edges };
}

function drawFlows(s) {
  const caption = s.flows.iteration === null ? "no step yet" : `of step ${s.flows.iteration}: microbatches × link cost`;
  document.getElementById("flows-caption").textContent = caption;
  if (typeof cytoscape === "undefined") {
    replace("flow-graph", el("div", { class: "empty" }, "graph library not loaded"));
    return;
  }
  const { nodes, edges } = graphElements(s);
  const key = JSON.stringify([nodes.map((n) => [n.data.id, n.data.state, n.position]), edges.map((e) => e.data)]);
  if (key === graphKey) return;
  graphKey = key;
  if (graph === null) {
    graph = cytoscape({
      container: document.getElementById("flow-graph"),
      layout: { name: "preset" },
      userZoomingEnabled: false,
      maxZoom: 1.4,
      userPanningEnabled: false,
      autoungrabify: true,
      style: [
        { selector: "node", style: {
          label: "data(label)", "font-size": 12, "text-valign": "bottom", "text-margin-y": 5, width: 24, height: 24,
          "background-color": "#2f9e5b", color: "#1d2330" } },
        { selector: 'node[state = "dead"]', style: { "background-color": "#cf3434" } },
        { selector: 'node[state = "joining"]', style: { "background-color": "#2f6fd6" } },
        { selector: 'node[state = "catching-up"]', style: { "background-color": "#d8930f" } },
        { selector: 'node[state = "stale"]', style: { "background-color": "#e0661b" } },
        { selector: 'node[state = "left"]', style: { "background-color": "#8d94a3" } },
        { selector: "edge", style: {
          width: "mapData(count, 1, 16, 1.5, 7)", "line-color": "#7d8aa3", "target-arrow-color": "#7d8aa3",
          "target-arrow-shape": "triangle", "curve-style": "bezier", label: "data(label)", "font-size": 11,
          color: "#4a5263", "text-background-color": "#ffffff", "text-background-opacity": 0.85,
          "text-background-padding": 1, "text-rotation": "autorotate" } },
        { selector: "edge.back", style: {
          "curve-style": "unbundled-bezier", "control-point-distances": [-70], "control-point-weights": [0.5],
          "line-style": "dashed", "line-color": "#a9b2c3", "target-arrow-color": "#a9b2c3" } },
      ],
    });
  }
  graph.elements().remove();
  graph.add([...nodes, ...edges]);
  graph.resize();
  graph.fit(undefined, 24);
}

// ---- gap -------------------------------------------------------------------------------------------------------
function metric(label, value, versus, gap, note) {
  return el(
    "div",
    { class: "metric" },
    el("div", { class: "label" }, label),
    el("div", { class: "value" }, value),
    el("div", { class: "versus" }, versus),
    el("div", { class: `gapv ${gap > 0.005 ? "bad" : "good"}` }, note),
  );
}

function drawGap(s) {
  const g = s.gap || {};
  if (!g.available) {
    replace("gap", el("div", { class: "empty" }, g.why || "no plan yet"));
    return;
  }
  replace(
    "gap",
    el(
      "div",
      { class: "gap-grid" },
      metric("throughput (microbatches per wave)", fmtNum(g.throughput, 0), `optimum ${fmtNum(g.optimum_throughput, 0)}`,
        g.throughput_gap, `gap ${fmtPct(g.throughput_gap)}`),
      metric("worst path", fmtMs(g.worst_path), `optimum ${fmtMs(g.optimum_worst_path)}`, g.worst_path_gap,
        `gap ${fmtPct(g.worst_path_gap)}`),
    ),
    el("div", { class: "note" }, `The plan of step ${g.iteration} against the optimum that ortools computes on the ` +
      "dashboard's view of the same records (serving relays at the run's version)."),
  );
}

// ---- charts ----------------------------------------------------------------------------------------------------
function markerPlugin() {
  return {
    hooks: {
      draw: (u) => {
        const ctx = u.ctx;
        ctx.save();
        ctx.lineWidth = 2 * devicePixelRatio;
        for (const [kind, color] of Object.entries(MARKERS)) {
          for (const e of events) {
            if (e.kind !== kind || e.step === null) continue;
            const x = Math.round(u.valToPos(e.step, "x", true));
            if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
            ctx.strokeStyle = color;
            ctx.beginPath();
            ctx.moveTo(x, u.bbox.top);
            ctx.lineTo(x, u.bbox.top + u.bbox.height);
            ctx.stroke();
          }
        }
        ctx.restore();
      },
    },
  };
}

function chartWidth(id) {
  return Math.max(300, document.getElementById(id).clientWidth - 4);
}

function makeCharts() {
  const axes = [{ label: "step" }, { size: 56 }];
  const base = { height: 220, scales: { x: { time: false } }, plugins: [markerPlugin()], cursor: { drag: { x: false } } };
  const loss = new uPlot({ ...base, width: chartWidth("loss-chart"), axes, series: [
    { label: "step" },
    { label: "loss", stroke: "#2f6fd6", width: 2, value: (u, v) => fmtNum(v, 4) },
  ] }, [[], []], document.getElementById("loss-chart"));
  const speed = new uPlot({ ...base, width: chartWidth("speed-chart"), axes, series: [
    { label: "step" },
    { label: "tokens/s", stroke: "#2f9e5b", width: 2, fill: "rgba(47,158,91,0.08)", value: (u, v) => fmtNum(v, 0) },
  ] }, [[], []], document.getElementById("speed-chart"));
  for (const id of ["loss-chart", "speed-chart"]) {
    const legend = el("div", { class: "marker-legend" },
      Object.entries(MARKERS).map(([k, c]) => el("span", {}, el("i", { style: `background: ${c}` }), k)));
    document.getElementById(id).append(legend);
  }
  window.addEventListener("resize", () => {
    loss.setSize({ width: chartWidth("loss-chart"), height: 220 });
    speed.setSize({ width: chartWidth("speed-chart"), height: 220 });
  });
  return { loss, speed };
}

function drawCharts(s) {
  if (typeof uPlot === "undefined") {
    replace("loss-chart", el("div", { class: "empty" }, "chart library not loaded"));
    return;
  }
  if (charts === null) charts = makeCharts();
  const h = s.history || [];
  const steps = h.map((r) => r.iteration);
  const hasVal = h.some((r) => r.val_loss !== null);
  const shown = charts.loss.series.length === 3;
  if (hasVal && !shown) charts.loss.addSeries(VAL_SERIES, 2);
  if (!hasVal && shown) charts.loss.delSeries(2);
  const lossData = [steps, h.map((r) => r.loss)];
  if (hasVal) lossData.push(h.map((r) => r.val_loss));
  charts.loss.setData(lossData);
  charts.speed.setData([steps, h.map((r) => r.tokens_per_s)]);
}

// ---- events and tables -----------------------------------------------------------------------------------------
function stepLabel(step) {
  if (step === null) return "";
  return step < 0 ? "before step 0 · " : `step ${Math.floor(step)} · `;
}

function drawEvents(s) {
  const items = (s.events || []).slice(-200).reverse().map((e) =>
    el("li", { "data-kind": e.kind },
      el("span", { class: "when" }, clock(e.time)),
      el("span", { class: `kind kind-${e.kind}` }, e.kind),
      el("span", {}, stepLabel(e.step), e.text)));
  replace("events", items.length ? items : [el("li", { class: "empty" }, "nothing yet")]);
}

function drawTables(s) {
  const a = s.accounting;
  const kinds = ["started", "finished", "rerouted", "partial", "lost"];
  replace("accounting",
    el("tr", {}, el("th", {}, ""), kinds.map((k) => el("th", {}, k))),
    el("tr", {}, el("td", {}, "last step"), kinds.map((k) => el("td", {}, a.last[k]))),
    el("tr", {}, el("td", {}, `all ${a.iterations} steps seen`), kinds.map((k) => el("td", {}, a.total[k]))));
  const wire = s.wire || { sent: {}, received: {} };
  const names = [...new Set([...Object.keys(wire.sent), ...Object.keys(wire.received)])].sort(
    (x, y) => (wire.sent[y] || 0) + (wire.received[y] || 0) - (wire.sent[x] || 0) - (wire.received[x] || 0));
  const row = (k, sent, received) => el("tr", {}, el("td", {}, k), el("td", {}, fmtBytes(sent)), el("td", {}, fmtBytes(received)));
  const rows = names.slice(0, WIRE_ROWS).map((k) => row(k, wire.sent[k] || 0, wire.received[k] || 0));
  const rest = names.slice(WIRE_ROWS);
  if (rest.length) {
    const sum = (d) => rest.reduce((acc, k) => acc + (d[k] || 0), 0);
    rows.push(row(`${rest.length} other kinds`, sum(wire.sent), sum(wire.received)));
  }
  replace("wire",
    el("tr", {}, el("th", {}, "message kind"), el("th", {}, "sent"), el("th", {}, "received")),
    rows.length ? rows : el("tr", {}, el("td", { class: "empty" }, "nothing yet")));
}

// ---- the loop --------------------------------------------------------------------------------------------------
function draw(s) {
  events = s.events || [];
  drawHeader(s);
  drawPipeline(s);
  drawFlows(s);
  drawGap(s);
  drawCharts(s);
  drawEvents(s);
  drawTables(s);
  document.body.dataset.ready = "1";
  document.body.dataset.libs = [typeof uPlot !== "undefined" && "uplot", typeof cytoscape !== "undefined" && "cytoscape"]
    .filter(Boolean).join(",");
}

async function refresh() {
  try {
    const response = await fetch("/api/state", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    draw(await response.json());
  } catch (err) {
    const fresh = document.getElementById("freshness");
    fresh.textContent = `dashboard unreachable: ${err.message}`;
    fresh.className = "freshness old";
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
