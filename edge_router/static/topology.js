/*
 * The topology page of the RMA edge router: polls GET /topology (and now and then
 * GET /dht/bootstrap) and draws the network in SVG, with no library.
 *
 * Drawing: one row per service group (a worker offering several services is drawn once, in the
 * group of its whole service set), one column per region, and in each cell the workers packed
 * in a honeycomb. Colour and size follow load; DHT servers are outlined; bootstrap peers get a
 * ring; workers that left (tombstones) are grey and fade as their lease runs out; workers gone
 * from the data fade out before they are removed. Coordinators sit in a band on top.
 *
 * Tests read the page through stable hooks: every drawn worker is a <circle class="worker"
 * data-id=...>, every figure a [data-figure] card, and <body> carries data-state ("loading",
 * "ready", "error") and data-renders (redraws so far).
 */
"use strict";

(() => {
  const SVG_NS = "http://www.w3.org/2000/svg"; // an XML namespace name, never fetched
  const params = new URLSearchParams(window.location.search);
  // ?refresh=seconds for demos and tests, clamped so that a typo cannot hammer the router.
  const REFRESH_MS = 1000 * clamp(Number(params.get("refresh")) || 2, 0.5, 60);
  // The router caches /dht/bootstrap for a minute; every edge request counts against the
  // daily budget, so the page asks for it only every few rounds.
  const BOOTSTRAP_EVERY = 5;
  const FETCH_TIMEOUT_MS = 5000;
  const LEASE_S = 90; // the default lease: a tombstone fades over this long
  // The bridge's figures, should the router carry them in /topology (the bridge exports
  // rma_bridge_sync_lag_seconds and rma_bridge_journal_records); absent means "n/a".
  const BRIDGE_LAG_KEYS = ["bridge_sync_lag_seconds", "rma_bridge_sync_lag_seconds", "bridge_lag_seconds"];
  const BRIDGE_JOURNAL_KEYS = ["bridge_journal_records", "rma_bridge_journal_records"];

  // Geometry of the drawing, in viewBox units.
  const WIDTH = 960; // columns stretch to fill at least this width
  const LABEL_W = 170; // row labels on the left
  const BAND_H = 78; // the coordinators' band
  const HEADER_H = 30; // region names above the columns
  const CAPTION_H = 20; // a cell's caption under its cluster
  const MIN_COL_W = 190;
  const MIN_ROW_H = 84;
  const CELL_PAD = 14;
  const GAP = 8;

  const svg = document.getElementById("topology");
  const layers = {};
  for (const name of ["grid", "links", "coordinators", "nodes"]) {
    layers[name] = svg.appendChild(el("g", { class: `layer-${name}` }));
  }
  const nodes = new Map(); // worker_id -> <g class="node">, kept across redraws so moves animate
  let bootstrapPeers = new Set(); // "host:port" of the peers /dht/bootstrap hands out
  let round = 0;
  let renders = 0;
  let lastOk = null;
  let timer = null;
  let busy = false; // one round at a time, whoever asks (the timer or a tab shown again)

  // -- polling -----------------------------------------------------------------------------

  async function refresh() {
    if (busy) return;
    busy = true;
    clearTimeout(timer);
    // A hidden tab spends no edge requests; it catches up when shown again.
    if (!document.hidden) {
      let stage = "cannot reach /topology";
      try {
        const topo = await getJSON("/topology");
        if (round % BOOTSTRAP_EVERY === 0) {
          bootstrapPeers = await fetchBootstrapPeers(bootstrapPeers);
        }
        round += 1;
        stage = "cannot draw the topology";
        render(topo);
        lastOk = new Date();
        setStatus(true, `live · updated ${clockTime(lastOk)} · every ${REFRESH_MS / 1000} s`);
        document.body.dataset.state = "ready";
      } catch (err) {
        const since = lastOk ? ` · showing ${clockTime(lastOk)}` : "";
        setStatus(false, `${stage} (${err.message})${since} · retrying`);
        document.body.dataset.state = "error";
      }
    }
    busy = false;
    // setTimeout after each round, not setInterval: a slow router never piles requests up.
    timer = setTimeout(refresh, REFRESH_MS);
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
        const error = new Error(`HTTP ${resp.status}${detail}`);
        error.status = resp.status;
        throw error;
      }
      return body;
    } catch (err) {
      if (err.name === "AbortError") throw new Error("timed out");
      throw err;
    } finally {
      clearTimeout(deadline);
    }
  }

  async function fetchBootstrapPeers(previous) {
    try {
      const answer = await getJSON("/dht/bootstrap");
      return new Set((answer.peers || []).map((p) => `${p.host}:${p.port}`));
    } catch (err) {
      // 503 means no peer is known yet; anything else keeps what we knew.
      return err.status === 503 ? new Set() : previous;
    }
  }

  // -- layout ------------------------------------------------------------------------------

  /** Rows (service groups), columns (regions) and each worker's place, from the JSON. */
  function layout(workers, coordinators) {
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
    const biggest = Math.max(1, ...[...cells.values()].map((c) => c.length));
    // Nodes shrink as cells fill up, so a network of thousands still fits on a screen.
    const radius = clamp(9 * Math.sqrt(30 / biggest), 3, 9);
    const spacing = radius * 2.9; // room for the largest (fully loaded) node and its ring

    // Columns share the page width evenly (each at least MIN_COL_W).
    const colWidth = Math.max(MIN_COL_W, (WIDTH - LABEL_W) / Math.max(regions.length, 1) - GAP);
    const colW = regions.map(() => colWidth);
    const perRow = Math.max(1, Math.floor((colWidth - 2 * CELL_PAD) / spacing));
    const packHeight = (n) => (Math.ceil(n / perRow) - 1) * spacing * 0.87 + 2 * radius;
    const rowH = groups.map((g) =>
      Math.max(MIN_ROW_H, ...regions.map((r) => packHeight(count(cells, g, r)) + CAPTION_H + 2 * CELL_PAD))
    );
    const width = Math.max(WIDTH, LABEL_W + (colWidth + GAP) * regions.length);
    const top = BAND_H + GAP + HEADER_H;
    // With no worker yet, room for the message that says so.
    const height = Math.max(BAND_H + 120, top + sum(rowH) + GAP * groups.length);

    const colX = prefix(colW, LABEL_W);
    const rowY = prefix(rowH, top);
    const places = new Map();
    const cellBoxes = [];
    groups.forEach((g, gi) => {
      regions.forEach((r, ri) => {
        const members = cells.get(`${g}|${r}`) || [];
        const box = { x: colX[ri], y: rowY[gi], w: colW[ri], h: rowH[gi], group: g, region: r, members };
        box.cx = box.x + box.w / 2;
        box.cy = box.y + (box.h - CAPTION_H) / 2;
        cellBoxes.push(box);
        // A honeycomb centred in the cell: rows of up to perRow nodes, odd rows shifted by
        // half a step.
        const lines = Math.ceil(members.length / perRow);
        members.forEach((w, i) => {
          const line = Math.floor(i / perRow);
          const inLine = Math.min(perRow, members.length - line * perRow);
          const shift = lines > 1 ? ((line % 2) - 0.5) * spacing * 0.5 : 0;
          places.set(w.worker_id, {
            x: box.cx + (i % perRow - (inLine - 1) / 2) * spacing + shift,
            y: box.cy + (line - (lines - 1) / 2) * spacing * 0.87,
          });
        });
      });
    });
    const coordinatorX = coordinators.map(
      (_, i) => LABEL_W + ((width - LABEL_W) * (i + 1)) / (coordinators.length + 1)
    );
    return { regions, groups, colX, colW, rowY, rowH, cellBoxes, places, radius, width, height, coordinatorX };

    function prefix(sizes, start) {
      const out = [];
      let at = start;
      for (const size of sizes) {
        out.push(at);
        at += size + GAP;
      }
      return out;
    }
  }

  // -- drawing -----------------------------------------------------------------------------

  function render(topo) {
    const workers = topo.workers || [];
    const coordinators = topo.coordinators || [];
    const plan = layout(workers, coordinators);
    svg.setAttribute("viewBox", `0 0 ${plan.width} ${plan.height}`);
    drawGrid(plan, workers.length);
    drawCoordinators(plan, coordinators);
    drawWorkers(plan, workers);
    drawFigures(topo);
    renders += 1;
    document.body.dataset.renders = String(renders);
  }

  function drawGrid(plan, total) {
    const grid = clear(layers.grid);
    grid.appendChild(el("rect", { class: "band", x: 0, y: 0, width: plan.width, height: BAND_H, rx: 8 }));
    grid.appendChild(text("DHT coordinators", 14, 22, "heading"));
    grid.appendChild(text("bridge nodes: Redis ⇄ DHT", 14, 40, "small muted"));
    if (!total) {
      const y = BAND_H + 70;
      grid.appendChild(text("No workers registered yet.", plan.width / 2, y, "heading", "middle"));
      grid.appendChild(
        text("They appear here as they join the DHT or register at the edge.", plan.width / 2, y + 22, "small muted", "middle")
      );
      return;
    }
    plan.regions.forEach((r, i) => {
      const live = plan.cellBoxes.filter((c) => c.region === r).flatMap((c) => c.members).filter(isLive).length;
      const x = plan.colX[i] + plan.colW[i] / 2;
      const label = text(r, x, BAND_H + GAP + 20, "heading", "middle");
      label.appendChild(tspan(`  ${live} live`, "small muted"));
      grid.appendChild(label);
    });
    plan.groups.forEach((g, i) => {
      const members = plan.cellBoxes.filter((c) => c.group === g).flatMap((c) => c.members);
      const y = plan.rowY[i] + plan.rowH[i] / 2;
      grid.appendChild(text(g, 14, y - 4, "heading"));
      const live = members.filter(isLive).length;
      const left = members.length - live;
      grid.appendChild(text(`${live} live${left ? ` · ${left} left` : ""}`, 14, y + 14, "small muted"));
    });
    for (const box of plan.cellBoxes) {
      grid.appendChild(el("rect", { class: "cell", x: box.x, y: box.y, width: box.w, height: box.h, rx: 8 }));
      const live = box.members.filter(isLive);
      const left = box.members.length - live.length;
      let caption = "no workers";
      if (box.members.length) {
        const load = live.length ? Math.round((100 * sum(live.map((w) => w.load))) / live.length) : 0;
        caption = `${live.length} live${left ? ` · ${left} left` : ""}${live.length ? ` · load ${load}%` : ""}`;
      }
      grid.appendChild(text(caption, box.cx, box.y + box.h - 8, "small muted", "middle"));
    }
  }

  function drawCoordinators(plan, coordinators) {
    const links = clear(layers.links);
    const group = clear(layers.coordinators);
    if (!coordinators.length) {
      group.appendChild(text("none configured (RMA_COORDINATORS)", LABEL_W + 20, BAND_H / 2 + 4, "small muted"));
      return;
    }
    coordinators.forEach((c, i) => {
      const x = plan.coordinatorX[i];
      const y = BAND_H / 2 - 6;
      const address = `${c.host}:${c.port}`;
      // Faint links to every region: the coordinators keep them all in sync.
      plan.regions.forEach((_, ri) => {
        const hx = plan.colX[ri] + plan.colW[ri] / 2;
        const hy = BAND_H + GAP + 4;
        const mid = (y + 12 + hy) / 2;
        links.appendChild(el("path", { class: "link", d: `M${x},${y + 12} C${x},${mid} ${hx},${mid} ${hx},${hy}` }));
      });
      const diamond = el("path", {
        class: `coordinator${bootstrapPeers.has(address) ? " bootstrap" : ""}`,
        d: `M${x},${y - 11} L${x + 11},${y} L${x},${y + 11} L${x - 11},${y} Z`,
        "data-address": address,
      });
      diamond.appendChild(titled(`coordinator ${address}${bootstrapPeers.has(address) ? " · bootstrap peer" : ""}`));
      group.appendChild(diamond);
      group.appendChild(text(address, x + 18, y + 4, "small"));
    });
  }

  function drawWorkers(plan, workers) {
    const seen = new Set();
    for (const w of workers) {
      const place = plan.places.get(w.worker_id);
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
      const peer = isServer(w) && bootstrapPeers.has(w.dht);
      const r = live ? plan.radius * (0.8 + 0.45 * w.load) : plan.radius * 0.8;
      // A CSS transform rather than the attribute, so that a move animates.
      g.style.transform = `translate(${place.x.toFixed(1)}px, ${place.y.toFixed(1)}px)`;
      g.style.opacity = live ? "1" : String(0.15 + 0.55 * clamp(w.expires_in / LEASE_S, 0, 1));
      g.setAttribute("class", `node${peer ? " bootstrap" : ""}`);
      ring.setAttribute("r", (r + 3.5).toFixed(1));
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
    // Workers gone from the data (their lease ran out): fade out, then remove.
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
        (topo.truncated ? " · more in the registry than RMA_TOPOLOGY_LIMIT lets the router read" : ""),
      topo.truncated ? "warn" : ""
    );

    const services = Object.entries(topo.services || {}).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
    setFigure(
      "services",
      fmt(services.length),
      services.length ? services.map(([name, n]) => `${name} ${n}`).join(" · ") : "none yet",
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
      setFigure("bridge", "n/a", "no bridge figure yet", "none");
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
    node.querySelector(".detail").textContent = detail;
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
    if (value < 120) return `${value.toFixed(value < 10 ? 1 : 0)} s`;
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

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refresh();
  });
  refresh();
})();
