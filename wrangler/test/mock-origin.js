// Vitest global setup (runs in Node, not in workerd): a real HTTP server on 127.0.0.1 that plays
// the RMA edge router. Requests reach it over TCP from the Worker under test, so it sees the
// headers exactly as workerd sent them (MF-CF-Blob included, were the Worker to leak it).
//
// Each test makes its own scenario, an origin at /s/<id>, and scripts it over /__mock:
//   POST /__mock/scenarios                      -> {"id"}
//   POST /__mock/s/<id>/script   {"METHOD /path": [reply, ...]}   replies are used in order,
//        the last one repeats; a reply is {status, headers, body} or {status, headers,
//        chunks: [first, rest], gated: true} (the rest waits for /release) or {echo: true}
//        (answers with the size and a checksum of the request body once it has all arrived)
//   POST /__mock/s/<id>/down    {"down": true|false}   while down, connections are cut
//   POST /__mock/s/<id>/release                         lets gated replies finish
//   GET  /__mock/s/<id>/log                             every request: method, path, headers,
//        bytes received so far, whether the body is complete

import http from "node:http";

const scenarios = new Map();
let next = 1;

function scenario(id) {
  const found = scenarios.get(id);
  if (!found) throw new Error(`no scenario ${id}`);
  return found;
}

async function readJson(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  const text = Buffer.concat(chunks).toString("utf8");
  return text ? JSON.parse(text) : {};
}

function json(res, status, value) {
  res.writeHead(status, { "content-type": "application/json" });
  res.end(JSON.stringify(value));
}

async function control(req, res, parts) {
  if (req.method === "POST" && parts[0] === "scenarios") {
    const id = String(next++);
    scenarios.set(id, { script: {}, used: {}, down: false, log: [], gates: [] });
    return json(res, 200, { id });
  }
  const s = scenario(parts[1]);
  const action = parts[2];
  if (action === "script") {
    Object.assign(s.script, await readJson(req));
    return json(res, 200, { ok: true });
  }
  if (action === "down") {
    s.down = Boolean((await readJson(req)).down);
    return json(res, 200, { ok: true });
  }
  if (action === "release") {
    for (const open of s.gates.splice(0)) open();
    return json(res, 200, { ok: true });
  }
  if (action === "log") return json(res, 200, s.log);
  return json(res, 404, { error: "unknown control" });
}

function checksum(previous, chunk) {
  let sum = previous;
  for (const byte of chunk) sum = (sum * 31 + byte) >>> 0;
  return sum;
}

async function origin(req, res, id, path) {
  const s = scenario(id);
  if (s.down) {
    req.socket.destroy();
    return;
  }
  const entry = {
    method: req.method,
    path,
    headers: Object.fromEntries(
      Object.entries(req.headers).map(([k, v]) => [k, Array.isArray(v) ? v.join(", ") : v]),
    ),
    received: 0,
    checksum: 0,
    complete: false,
    body: "",
  };
  s.log.push(entry);
  const route = `${req.method} ${path}`;
  const replies = s.script[route] ?? s.script[`${req.method} ${path.split("?")[0]}`];
  const echo = replies && replies[0] && replies[0].echo;
  const arrived = new Promise((resolve) => {
    req.on("data", (chunk) => {
      entry.received += chunk.length;
      entry.checksum = checksum(entry.checksum, chunk);
      if (entry.body.length < 4096) entry.body += chunk.toString("utf8");
    });
    req.on("end", () => {
      entry.complete = true;
      resolve();
    });
  });
  if (!replies) {
    await arrived;
    return json(res, 404, { error: "not_found", detail: `mock origin has no script for ${route}` });
  }
  const key = route in s.script ? route : route.split("?")[0];
  const index = Math.min(s.used[key] ?? 0, replies.length - 1);
  s.used[key] = (s.used[key] ?? 0) + 1;
  const reply = replies[index];
  if (echo) {
    await arrived;
    return json(res, 200, { received: entry.received, checksum: entry.checksum });
  }
  if (!reply.chunks) await arrived; // a gated reply starts before the request body is complete
  if (reply.chunks) {
    res.writeHead(reply.status ?? 200, reply.headers ?? {});
    res.write(reply.chunks[0]);
    if (reply.gated) await new Promise((open) => s.gates.push(open));
    res.end(reply.chunks.slice(1).join(""));
    return;
  }
  const body = typeof reply.body === "string" ? reply.body : JSON.stringify(reply.body ?? {});
  res.writeHead(reply.status ?? 200, {
    "content-type": "application/json",
    "content-length": Buffer.byteLength(body),
    ...(reply.headers ?? {}),
  });
  res.end(body);
}

export default async function setup({ provide }) {
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, "http://mock");
    const parts = url.pathname.split("/").filter(Boolean);
    const handle =
      parts[0] === "__mock"
        ? control(req, res, parts.slice(1))
        : parts[0] === "s"
          ? origin(req, res, parts[1], `/${parts.slice(2).join("/")}${url.search}`)
          : Promise.resolve(json(res, 404, { error: "not_found" }));
    handle.catch((err) => {
      if (!res.headersSent) json(res, 500, { error: "mock_failed", detail: String(err) });
      else res.destroy();
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  provide("mockOrigin", `http://127.0.0.1:${server.address().port}`);
  return async () => {
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
  };
}
