/*
 * The topology page of the RMA edge router: polls GET /topology and draws the network in SVG,
 * with no library. /topology carries everything drawn, the bootstrap peers included, so the page
 * spends one request a round, and only in the operator's class that the edge budget leaves out.
 *
 * Drawing: one block per service group (a worker offering several services is drawn once, in
 * the group of its whole service set), one cell per region in it, and in each cell the workers
 * packed in a honeycomb. Colour and size follow load; DHT servers are outlined; bootstrap peers
 * get a ring; workers that left (tombstones) are grey and fade as their lease runs out; workers
 * gone from the data fade out before they are removed. Coordinators sit in a band on top.
 *
 * The drawing is laid out for the width it is shown at, one SVG unit to one CSS pixel, so text
 * keeps its size on a phone: regions become columns while they fit, then cells wrap (each one
 * titled with its region) and group names move above their cells. A cell holding more workers
 * than it can draw at the smallest node size shows them as a histogram of load instead, and so
 * do the biggest cells when the whole drawing would pass MAX_DRAWN nodes.
 *
 * Tests read the page through stable hooks: every drawn worker is a <circle class="worker"
 * data-id=...>, every aggregated cell a <g class="aggregate" data-count=...>, every figure a
 * [data-figure] card, and <body> carries data-state ("loading", "ready", "error"), data-renders
 * (redraws so far), data-render-ms (the last one's time) and data-refresh (the poll interval, ms).
 */
"use strict";

(() => {
  const SVG_NS = "http://www.w3.org/2000/svg"; // an XML namespace name, never fetched
  const params = new URLSearchParams(window.location.search);
  // ?refresh=seconds for demos and tests, clamped so that a typo cannot hammer the router.
  const REFRESH_MS = 1000 * clamp(Number(params.get("refresh")) || 2, 0.5, 60);
  // A round (the router reading the registry, the transfer, the drawing) may take at most this
  // share of the time: a big network is polled less often rather than loading the router.
  const BUSY_SHARE = 0.2;
  const MAX_REFRESH_MS = 60000;
  const FETCH_TIMEOUT_MS = 15000;
  const LEASE_S = 90; // the default lease: a tombstone fades over this long
  // The bridge's figures, present when the bridge runs inside the router's process (rma demo);
  // a bridge of its own exports them on its own /metrics.
  const BRIDGE_LAG_KEYS = ["bridge_sync_lag_seconds", "rma_bridge_sync_lag_seconds", "bridge_lag_seconds"];
  const BRIDGE_JOURNAL_KEYS = ["bridge_journal_records", "rma_bridge_journal_records"];

  // Geometry of the drawing, in CSS pixels (the viewBox is as wide as the drawing's box).
  const MIN_WIDTH = 280;
  const WIDE = 640; // from this width group names sit left of their cells
  const LABEL_W = 150; // group names, in the wide layout
  const BAND_LABEL_W = 210; // "DHT coordinators" and its subtitle, in the wide layout
  const MIN_COL_W = 140;
  const BAND_HEAD_H = 50; // "DHT coordinators" and its subtitle
  const COORD_W = 150; // one coordinator and its address
  const COORD_H = 30;
  const HEADER_H = 30; // region names above the columns
  const GROUP_HEAD_H = 26; // a group's name above its cells, in the narrow layout
  const CELL_TITLE_H = 18; // a cell's region name, when cells wrap
  const CAPTION_H = 20; // a cell's caption under its content
  const MIN_CELL_H = 66;
  const CELL_PAD = 12;
  const GAP = 8;
  const R_MAX = 9;
  const R_MIN = 3.5; // below this a node is a speck: the cell aggregates instead
  const MAX_PACK_H = 190; // the tallest honeycomb a cell draws
  const HIST_H = 96; // an aggregated cell's headline, bars and axis
  const LOAD_BINS = 10;
  const MAX_DRAWN = 8000; // worker nodes in the whole drawing
  const CHAR_W = 0.6; // a system font's average glyph width, as a share of its size

  const svg = document.getElementById("topology");
  const drawing = svg.parentElement;
  const layers = {};
  for (const name of ["grid", "links", "coordinators", "aggregates", "nodes"]) {
    layers[name] = svg.appendChild(el("g", { class: `layer-${name}` }));
  }
  const nodes = new Map(); // worker_id -> <g class="node">, kept across redraws so moves animate
  let renders = 0;
  let lastOk = null;
  let lastTopo = null;
  let drawnWidth = 0;
  let refreshMs = REFRESH_MS;
  let timer = null;
  let busy = false; // one round at a time, whoever asks (the timer or a tab shown again)

  // -- polling -----------------------------------------------------------------------------

  async function refresh() {
    if (busy) return;
    busy = true;
    clearTimeout(timer);
    // A hidden tab spends no requests; it catches up when shown again.
    if (!document.hidden) {
      const started = performance.now();
      let stage = "cannot reach /topology";
      try {
        const topo = await getJSON("/topology");
        stage = "cannot draw the topology";
        render(topo);
        lastTopo = topo;
        lastOk = new Date();
        const spent = performance.now() - started;
        refreshMs = clamp(spent / BUSY_SHARE, REFRESH_MS, Math.max(REFRESH_MS, MAX_REFRESH_MS));
        document.body.dataset.refresh = String(Math.round(refreshMs));
        setStatus(true, `live · updated ${clockTime(lastOk)} · every ${seconds(Math.round(refreshMs / 100) / 10)}`);
        document.body.dataset.state = "ready";
      } catch (err) {
        const since = lastOk ? ` · showing ${clockTime(lastOk)}` : "";
        setStatus(false, `${stage} (${err.message})${since} · retrying`);
        document.body.dataset.state = "error";
      }
    }
    busy = false;
    // setTimeout after each round, not setInterval: a slow router never piles requests up.
    timer = setTimeout(refresh, refreshMs);
  }

  async function getJSON(path) {
    const abort = new AbortController();
    const deadline = setTimeout(() => abort.abort(), FETCH_TIMEOUT_MS);
    try {
      const resp = await fetch(path, {
        cache: "no-store",
        headers: { Accept: "application/json" },
        signal: abort.signal,
      });
      const body = await resp.json().catch(() => null);
      if (!resp.ok) {
        const detail = body && body.detail ? `: ${body.detail}` : "";
        throw new Error(`HTTP ${resp.status}${detail}`);
      }
      return body;
    } catch (err) {
      if (err.name === "AbortError") throw new Error("timed out");
      throw err;
    } finally {
      clearTimeout(deadline);
    }
  }

  // -- layout ------------------------------------------------------------------------------

  /** Where everything goes at `width` pixels: groups, cells, each drawn worker's place. */
  function layout(workers, coordinators, width) {
    const W = Math.max(MIN_WIDTH, Math.floor(width));
    const narrow = W < WIDE;
    const labelW = narrow ? 0 : LABEL_W;
    const regionOf = (w) => w.region || "unknown";
    const groupOf = (w) => (w.services.length ? [...w.services].sort().join(" + ") : "(none)");
    // By id, so that a worker keeps its place while others come, go or change load.
    const sorted = [...workers].sort((a, b) => (a.worker_id < b.worker_id ? -1 : 1));
    const regions = unique(sorted.map(regionOf)).sort();
    // Single services first, then combinations; alphabetical within each.
    const groups = unique(sorted.map(groupOf)).sort(
      (a, b) => a.split(" + ").length - b.split(" + ").length || a.localeCompare(b)
    );
    const cells = new Map(); // "group|region" -> workers
    for (const w of sorted) {
      const key = `${groupOf(w)}|${regionOf(w)}`;
      if (!cells.has(key)) cells.set(key, []);
      cells.get(key).push(w);
    }

    // Regions are columns while they fit; past that, cells wrap and each carries its region.
    const cols = clamp(Math.floor((W - labelW + GAP) / (MIN_COL_W + GAP)), 1, Math.max(1, regions.length));
    const wrapped = regions.length > cols;
    const colW = (W - labelW - GAP * (cols - 1)) / cols;
    const colX = Array.from({ length: cols }, (_, i) => labelW + i * (colW + GAP));

    // Nodes shrink as cells fill up, down to R_MIN; a cell that would not fit even then
    // aggregates, and the others are drawn at the largest size at which all of them fit.
    const spacingOf = (r) => r * 2.9; // room for the largest (fully loaded) node and its ring
    const perRowOf = (r) => Math.max(1, Math.floor((colW - 2 * CELL_PAD - spacingOf(r) / 2) / spacingOf(r)));
    const capacity = (r) => perRowOf(r) * (Math.floor((MAX_PACK_H - spacingOf(r)) / (spacingOf(r) * 0.87)) + 1);
    // Past MAX_DRAWN nodes in all the page slows down: the biggest cells aggregate first.
    let limit = capacity(R_MIN);
    const sizes = [...cells.values()].map((c) => c.length).sort((a, b) => b - a);
    const drawnUpTo = (most) => sum(sizes.filter((n) => n <= most));
    for (const n of sizes) {
      if (drawnUpTo(limit) <= MAX_DRAWN) break;
      limit = Math.min(limit, n - 1);
    }
    const drawable = sizes.filter((n) => n <= limit);
    let radius = clamp(R_MAX * Math.sqrt(30 / Math.max(1, ...drawable)), R_MIN, R_MAX);
    while (radius > R_MIN && drawable.some((n) => n > capacity(radius))) radius = Math.max(R_MIN, radius - 0.25);
    const spacing = spacingOf(radius);
    const perRow = perRowOf(radius);
    const contentH = (n) => (n > limit ? HIST_H : n ? (Math.ceil(n / perRow) - 1) * spacing * 0.87 + spacing : 0);
    const titleH = wrapped ? CELL_TITLE_H : 0;
    const cellH = (n) => Math.max(MIN_CELL_H, CELL_PAD + titleH + contentH(n) + CAPTION_H);

    const band = coordinatorBand(coordinators.length, W, narrow);
    let y = band.height + GAP + (wrapped ? 0 : HEADER_H);
    const places = new Map();
    const cellBoxes = [];
    const blocks = [];
    for (const g of groups) {
      // Wrapped cells leave out the regions where the group has nobody; columns keep them all.
      const present = regions.filter((r) => !wrapped || cells.has(`${g}|${r}`));
      const block = { group: g, y, headY: y, members: [] };
      if (narrow) y += GROUP_HEAD_H;
      for (let line = 0; line * cols < present.length; line++) {
        const inLine = present.slice(line * cols, (line + 1) * cols);
        const h = Math.max(...inLine.map((r) => cellH(count(cells, g, r))));
        inLine.forEach((r, i) => {
          const members = cells.get(`${g}|${r}`) || [];
          const col = wrapped ? i : regions.indexOf(r);
          const box = { x: colX[col], y, w: colW, h, group: g, region: r, members, aggregate: members.length > limit };
          box.cx = box.x + box.w / 2;
          box.contentY = y + CELL_PAD / 2 + titleH;
          box.contentH = h - CELL_PAD / 2 - titleH - CAPTION_H;
          box.cy = box.contentY + box.contentH / 2;
          cellBoxes.push(box);
          block.members.push(...members);
          if (!box.aggregate) placeHoneycomb(box, members);
        });
        y += h + GAP;
      }
      block.h = y - GAP - block.y;
      blocks.push(block);
    }
    // With no worker yet, room for the message that says so.
    const height = Math.max(band.height + 120, y);
    return { W, narrow, wrapped, regions, groups, cols, colX, colW, cellBoxes, blocks, places, radius, height, band };

    function placeHoneycomb(box, members) {
      // Rows of up to perRow nodes centred in the cell, odd rows shifted by half a step.
      const lines = Math.ceil(members.length / perRow);
      members.forEach((w, i) => {
        const line = Math.floor(i / perRow);
        const inLine = Math.min(perRow, members.length - line * perRow);
        const shift = lines > 1 ? ((line % 2) - 0.5) * spacing * 0.5 : 0;
        places.set(w.worker_id, {
          x: box.cx + ((i % perRow) - (inLine - 1) / 2) * spacing + shift,
          y: box.cy + (line - (lines - 1) / 2) * spacing * 0.87,
        });
      });
    }
  }

  /** The coordinators' band: their places, in as many lines as the width needs. */
  function coordinatorBand(n, W, narrow) {
    const left = narrow ? 14 : BAND_LABEL_W;
    const top = narrow ? BAND_HEAD_H : 0;
    const perLine = Math.max(1, Math.floor((W - left - 8) / COORD_W));
    const lines = Math.max(1, Math.ceil(n / perLine));
    const inBand = narrow ? top + lines * COORD_H + 6 : Math.max(78, lines * COORD_H + 18);
    const places = Array.from({ length: n }, (_, i) => {
      const line = Math.floor(i / perLine);
      const inLine = Math.min(perLine, n - line * perLine);
      const slot = (W - left) / inLine;
      return {
        // Each in the middle of its slot (diamond and address together), never left of it.
        x: left + slot * (i % perLine) + Math.max(12, slot / 2 - COORD_W / 2 + 12),
        y: top + (narrow ? 14 : (inBand - lines * COORD_H) / 2 + COORD_H / 2) + line * COORD_H,
      };
    });
    return { height: inBand, places, left, top };
  }

  // -- drawing -----------------------------------------------------------------------------

  function render(topo) {
    const started = performance.now();
    const workers = topo.workers || [];
    const coordinators = topo.coordinators || [];
    const peers = new Set((topo.bootstrap_peers || []).map((p) => `${p.host}:${p.port}`));
    const width = availableWidth();
    // A new width moves every node at once: they jump there rather than slide across the page.
    if (drawnWidth && width !== drawnWidth) {
      svg.classList.add("instant");
      requestAnimationFrame(() => requestAnimationFrame(() => svg.classList.remove("instant")));
    }
    drawnWidth = width;
    const plan = layout(workers, coordinators, width);
    svg.setAttribute("viewBox", `0 0 ${plan.W} ${Math.ceil(plan.height)}`);
    svg.setAttribute("width", String(plan.W));
    svg.setAttribute("height", String(Math.ceil(plan.height)));
    drawGrid(plan, workers.length);
    drawCoordinators(plan, coordinators, peers);
    drawAggregates(plan);
    drawWorkers(plan, workers, peers);
    drawFigures(topo);
    renders += 1;
    document.body.dataset.renders = String(renders);
    document.body.dataset.renderMs = String(Math.round(performance.now() - started));
  }

  function availableWidth() {
    const style = getComputedStyle(drawing);
    const padding = parseFloat(style.paddingLeft) + parseFloat(style.paddingRight);
    return Math.max(MIN_WIDTH, Math.floor(drawing.clientWidth - padding));
  }

  function drawGrid(plan, total) {
    const grid = clear(layers.grid);
    grid.appendChild(el("rect", { class: "band", x: 0, y: 0, width: plan.W, height: plan.band.height, rx: 8 }));
    grid.appendChild(text("DHT coordinators", 14, 22, "heading"));
    grid.appendChild(text("bridge nodes: Redis ⇄ DHT", 14, 40, "small muted"));
    if (!total) {
      const y = plan.band.height + 70;
      grid.appendChild(text("No workers registered yet.", plan.W / 2, y, "heading", "middle"));
      grid.appendChild(text("They appear as they join the DHT or register at the edge.", plan.W / 2, y + 22, "small muted", "middle"));
      return;
    }
    if (!plan.wrapped) {
      plan.regions.forEach((r, i) => {
        const live = plan.cellBoxes.filter((c) => c.region === r).reduce((n, c) => n + c.members.filter(isLive).length, 0);
        const x = plan.colX[i] + plan.colW / 2;
        const tail = `  ${fmt(live)} live`;
        const label = text(fit(r, plan.colW - 8 - tail.length * 11 * CHAR_W, 14), x, plan.band.height + GAP + 20, "heading", "middle");
        label.appendChild(tspan(tail, "small muted"));
        label.appendChild(titled(`region ${r}: ${fmt(live)} live`));
        grid.appendChild(label);
      });
    }
    for (const block of plan.blocks) {
      const live = block.members.filter(isLive).length;
      const left = block.members.length - live;
      const counts = `${fmt(live)} live${left ? ` · ${fmt(left)} left` : ""}`;
      if (plan.narrow) {
        const head = text(fit(block.group, plan.W - 20 - (counts.length + 2) * 11 * CHAR_W, 14), 4, block.headY + 17, "heading");
        head.appendChild(tspan(`  ${counts}`, "small muted"));
        head.appendChild(titled(block.group));
        grid.appendChild(head);
      } else {
        const y = block.y + block.h / 2;
        const name = text(fit(block.group, LABEL_W - 20, 14), 14, y - 4, "heading");
        name.appendChild(titled(block.group));
        grid.appendChild(name);
        grid.appendChild(text(fit(counts, LABEL_W - 20, 11), 14, y + 14, "small muted"));
      }
    }
    for (const box of plan.cellBoxes) {
      grid.appendChild(el("rect", { class: "cell", x: box.x, y: box.y, width: box.w, height: box.h, rx: 8 }));
      if (plan.wrapped) {
        grid.appendChild(text(fit(box.region, box.w - 16, 12), box.cx, box.y + CELL_PAD / 2 + 12, "region", "middle"));
      }
      grid.appendChild(text(caption(box), box.cx, box.y + box.h - 8, "small muted", "middle"));
    }
  }

  /** A cell's caption, as much of it as fits its width. */
  function caption(box) {
    if (!box.members.length) return "no workers";
    const live = box.members.filter(isLive);
    const left = box.members.length - live.length;
    const load = live.length ? `${Math.round((100 * sum(live.map((w) => w.load))) / live.length)}%` : "";
    const variants = [
      `${fmt(live.length)} live${left ? ` · ${fmt(left)} left` : ""}${load ? ` · load ${load}` : ""}`,
      `${fmt(live.length)} live${load ? ` · load ${load}` : ""}`,
      `${fmt(live.length)} live`,
    ];
    return variants.find((v) => v.length * 11 * CHAR_W <= box.w - 12) || variants[variants.length - 1];
  }

  function drawCoordinators(plan, coordinators, peers) {
    const links = clear(layers.links);
    const group = clear(layers.coordinators);
    if (!coordinators.length) {
      const { left, top } = plan.band;
      group.appendChild(text("none configured (RMA_COORDINATORS)", left + 6, top + (plan.narrow ? 18 : 43), "small muted"));
      return;
    }
    coordinators.forEach((c, i) => {
      const { x, y } = plan.band.places[i];
      const address = `${c.host}:${c.port}`;
      const peer = peers.has(address);
      // Faint links to every region's column: the coordinators keep them all in sync. Cells
      // that wrap have no columns to point at.
      if (!plan.wrapped) {
        for (let ri = 0; ri < plan.regions.length; ri++) {
          const hx = plan.colX[ri] + plan.colW / 2;
          const hy = plan.band.height + GAP + 4;
          const mid = (y + 12 + hy) / 2;
          links.appendChild(el("path", { class: "link", d: `M${x},${y + 12} C${x},${mid} ${hx},${mid} ${hx},${hy}` }));
        }
      }
      const diamond = el("path", {
        class: `coordinator${peer ? " bootstrap" : ""}`,
        d: `M${x},${y - 10} L${x + 10},${y} L${x},${y + 10} L${x - 10},${y} Z`,
        "data-address": address,
      });
      diamond.appendChild(titled(`coordinator ${address}${peer ? " · bootstrap peer" : ""}`));
      group.appendChild(diamond);
      group.appendChild(text(fit(address, COORD_W - 26, 11), x + 16, y + 4, "small"));
    });
  }

  /** Cells with more workers than they can draw: a histogram of their live workers' load. */
  function drawAggregates(plan) {
    const layer = clear(layers.aggregates);
    for (const box of plan.cellBoxes) {
      if (!box.aggregate) continue;
      const live = box.members.filter(isLive);
      const servers = live.filter(isServer).length;
      const bins = new Array(LOAD_BINS).fill(0);
      for (const w of live) bins[Math.min(LOAD_BINS - 1, Math.floor(clamp(w.load, 0, 1) * LOAD_BINS))] += 1;
      const g = layer.appendChild(
        el("g", {
          class: "aggregate",
          "data-group": box.group,
          "data-region": box.region,
          "data-count": box.members.length,
          "data-live": live.length,
          "data-left": box.members.length - live.length,
        })
      );
      // The bars take what the cell's row leaves them (the row may be taller than HIST_H).
      const top = box.contentY + 14;
      const headline = text(`${fmt(box.members.length)} workers`, box.cx, top, "heading", "middle");
      g.appendChild(headline);
      g.appendChild(text(fit(`${fmt(servers)} DHT servers · by load`, box.w - 16, 11), box.cx, top + 15, "small muted", "middle"));
      const x0 = box.x + CELL_PAD;
      const barsW = box.w - 2 * CELL_PAD;
      const base = box.contentY + box.contentH - 14;
      const barsH = box.contentH - 14 - 28;
      const highest = Math.max(1, ...bins);
      const step = barsW / LOAD_BINS;
      bins.forEach((n, i) => {
        const h = n ? Math.max(1.5, (barsH * n) / highest) : 0;
        const bar = el("rect", {
          class: "bar",
          x: (x0 + i * step + 1).toFixed(1),
          y: (base - h).toFixed(1),
          width: Math.max(1, step - 2).toFixed(1),
          height: h.toFixed(1),
          fill: loadColour((i + 0.5) / LOAD_BINS),
          "data-count": n,
        });
        bar.appendChild(titled(`load ${i * 10}–${(i + 1) * 10}%: ${fmt(n)} live workers`));
        g.appendChild(bar);
      });
      g.appendChild(el("line", { class: "axis", x1: x0, y1: base + 0.5, x2: x0 + barsW, y2: base + 0.5 }));
      g.appendChild(text("0%", x0, base + 12, "tiny muted"));
      g.appendChild(text("load", box.cx, base + 12, "tiny muted", "middle"));
      g.appendChild(text("100%", x0 + barsW, base + 12, "tiny muted", "end"));
    }
  }

  function drawWorkers(plan, workers, peers) {
    const seen = new Set();
    for (const w of workers) {
      const place = plan.places.get(w.worker_id);
      if (!place) continue; // in an aggregated cell
      seen.add(w.worker_id);
      let g = nodes.get(w.worker_id);
      if (!g) {
        g = layers.nodes.appendChild(el("g", { class: "node" }));
        g.appendChild(el("circle", { class: "ring" }));
        g.appendChild(el("circle", { class: "worker" }));
        g.appendChild(el("title", {}));
        nodes.set(w.worker_id, g);
      }
      const [ring, circle, title] = g.children;
      const live = isLive(w);
      const peer = isServer(w) && peers.has(w.dht);
      const r = live ? plan.radius * (0.8 + 0.45 * w.load) : plan.radius * 0.8;
      // A CSS transform rather than the attribute, so that a move animates.
      g.style.transform = `translate(${place.x.toFixed(1)}px, ${place.y.toFixed(1)}px)`;
      g.style.opacity = live ? "1" : String(0.15 + 0.55 * clamp(w.expires_in / LEASE_S, 0, 1));
      g.setAttribute("class", `node${peer ? " bootstrap" : ""}`);
      ring.setAttribute("r", (r + Math.max(2, plan.radius * 0.4)).toFixed(1));
      setAttrs(circle, {
        class: `worker ${live ? "live" : "left"}${isServer(w) ? " server" : ""}`,
        r: r.toFixed(1),
        fill: loadColour(w.load),
        "data-id": w.worker_id,
        "data-state": w.state,
        "data-mode": isServer(w) ? "server" : "client",
        "data-region": w.region || "unknown",
        "data-services": w.services.join(","),
        "data-load": String(w.load),
      });
      title.textContent = describe(w, peer);
    }
    // Workers gone from the drawing (their lease ran out, or their cell aggregated): fade out,
    // then remove.
    for (const [id, g] of nodes) {
      if (seen.has(id)) continue;
      nodes.delete(id);
      g.classList.add("departing");
      g.children[1].setAttribute("class", "gone"); // no longer counted as a drawn worker
      setTimeout(() => g.remove(), 1300);
    }
  }

  // The router says each worker's DHT mode; a record handing out an address is a server.
  function isServer(w) {
    return w.mode ? w.mode === "server" : Boolean(w.dht);
  }

  function describe(w, peer) {
    const lines = [
      `worker ${w.worker_id}`,
      `${w.services.join(", ") || "no service"} · region ${w.region || "unknown"}`,
      `${w.state === "left" ? "left (tombstone)" : "live"} · load ${Math.round(100 * w.load)}% · seq ${w.seq}`,
      `lease ${Math.max(0, Math.round(w.expires_in))} s`,
      isServer(w) ? `DHT server ${w.dht}${peer ? " · bootstrap peer" : ""}` : "DHT client (behind NAT: never handed out)",
    ];
    return lines.join("\n");
  }

  // -- figures -----------------------------------------------------------------------------

  function drawFigures(topo) {
    const f = topo.figures || {};
    const workers = topo.workers || [];
    const live = workers.filter(isLive).length;
    const servers = workers.filter((w) => isLive(w) && isServer(w)).length;
    // A registry larger than the router reads per request: the counts are lower bounds.
    setFigure(
      "workers",
      topo.truncated ? `≥ ${fmt(live)}` : fmt(live),
      `${fmt(workers.length - live)} left · ${fmt(servers)} DHT servers · ${fmt(live - servers)} clients` +
        (topo.truncated ? " · the registry holds more than RMA_TOPOLOGY_LIMIT" : ""),
      topo.truncated ? "warn" : ""
    );

    const services = Object.entries(topo.services || {}).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
    setFigure(
      "services",
      fmt(services.length),
      services.length ? services.map(([name, n]) => `${name} ${fmt(n)}`).join(" · ") : "none yet",
      services.length ? "" : "none"
    );

    const hits = f.cache_hits || 0;
    const served = hits + (f.cache_misses || 0) + (f.cache_stale || 0);
    if (served) {
      setFigure(
        "cache",
        `${Math.round(100 * (f.cache_hit_ratio ?? hits / served))}%`,
        `${fmt(hits)} hits · ${fmt(f.cache_misses || 0)} misses · ${fmt(f.cache_stale || 0)} stale`
      );
    } else {
      setFigure("cache", "–", "no lookups yet", "none");
    }

    const today = f.edge_requests_today || 0;
    const budget = f.edge_daily_budget || 0;
    const share = budget ? today / budget : 0;
    setFigure(
      "edge",
      fmt(today),
      budget ? `of ${fmt(budget)} a day · ${(100 * share).toFixed(share < 0.1 ? 2 : 1)}%` : "no budget set",
      share >= 1 ? "bad" : share >= 0.8 ? "warn" : ""
    );
    card("edge").querySelector(".meter .fill").style.width = `${Math.min(100, 100 * share)}%`;

    const lag = firstNumber(f, BRIDGE_LAG_KEYS);
    const journal = firstNumber(f, BRIDGE_JOURNAL_KEYS);
    if (lag === null) {
      // Only a bridge in the router's own process (rma demo) hands the router its figures.
      setFigure("bridge", "–", "the bridge is its own process: see its /metrics", "none");
    } else {
      // Beyond a third of a lease a heartbeat may be late on the other side; beyond a whole
      // lease records can expire before the other side hears of them.
      setFigure(
        "bridge",
        seconds(lag),
        journal === null ? "Redis ⇄ DHT" : `journal ${fmt(journal)} records`,
        lag >= LEASE_S ? "bad" : lag >= LEASE_S / 3 ? "warn" : ""
      );
    }

    const failures = f.registry_failures || 0;
    setFigure(
      "backends",
      fmt(f.dht_reads || 0),
      `${fmt(failures)} Redis failures · events ${f.events_connected ? "on" : "off"}`,
      failures ? "warn" : ""
    );
  }

  function setFigure(name, value, detail, level = "") {
    const node = card(name);
    node.querySelector(".value").textContent = value;
    const line = node.querySelector(".detail");
    line.textContent = detail;
    line.title = detail; // the whole text on hover when the card clips it
    node.dataset.level = level;
  }

  function card(name) {
    return document.querySelector(`[data-figure="${name}"]`);
  }

  function setStatus(ok, message) {
    document.getElementById("status").dataset.ok = ok ? "yes" : "no";
    document.getElementById("status-text").textContent = message;
  }

  // -- small helpers -----------------------------------------------------------------------

  function el(name, attrs) {
    return setAttrs(document.createElementNS(SVG_NS, name), attrs);
  }

  function setAttrs(node, attrs) {
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
    return node;
  }

  function text(content, x, y, cls, anchor = "start") {
    const node = el("text", { x, y, class: cls, "text-anchor": anchor });
    node.textContent = content; // textContent, never markup: names come from worker records
    return node;
  }

  function tspan(content, cls) {
    const node = el("tspan", { class: cls });
    node.textContent = content;
    return node;
  }

  function titled(content) {
    const node = el("title", {});
    node.textContent = content;
    return node;
  }

  function clear(node) {
    node.replaceChildren();
    return node;
  }

  /** `content` cut to about `px` pixels of text at `size`, with an ellipsis when cut. */
  function fit(content, px, size) {
    const chars = Math.max(2, Math.floor(px / (size * CHAR_W)));
    return content.length <= chars ? content : `${content.slice(0, chars - 1)}…`;
  }

  /** Green at no load through amber to red at full load: the same ramp as the legend. */
  function loadColour(load) {
    const x = clamp(load, 0, 1);
    const hue = 145 - 145 * x;
    const light = 46 + 8 * Math.max(0, x - 0.6);
    return `hsl(${hue.toFixed(0)}, 64%, ${light.toFixed(0)}%)`;
  }

  function isLive(w) {
    return w.state !== "left";
  }

  function count(cells, group, region) {
    return (cells.get(`${group}|${region}`) || []).length;
  }

  function firstNumber(figures, keys) {
    for (const key of keys) {
      if (typeof figures[key] === "number" && Number.isFinite(figures[key])) return figures[key];
    }
    return null;
  }

  function seconds(value) {
    if (value < 1) return `${Math.round(value * 1000)} ms`;
    if (value < 120) return `${value.toFixed(value < 10 && value % 1 ? 1 : 0)} s`;
    return `${(value / 60).toFixed(1)} min`;
  }

  function fmt(n) {
    return Number(n).toLocaleString("en-US");
  }

  function clockTime(date) {
    return date.toLocaleTimeString("en-GB");
  }

  function unique(values) {
    return [...new Set(values)];
  }

  function sum(values) {
    return values.reduce((a, b) => a + b, 0);
  }

  function clamp(x, lo, hi) {
    return Math.min(hi, Math.max(lo, x));
  }

  // A new width (a phone turned, a window resized) redraws what was last fetched, at most once
  // a frame and only when the width really changed.
  let resizeFrame = 0;
  new ResizeObserver(() => {
    cancelAnimationFrame(resizeFrame);
    resizeFrame = requestAnimationFrame(() => {
      if (lastTopo && availableWidth() !== drawnWidth) render(lastTopo);
    });
  }).observe(drawing);

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refresh();
  });
  refresh();
})();
