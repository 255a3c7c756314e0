// POST /admin/cache/flush: the origin decides; on success the matching edge copies go.
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { edgeFor, newOrigin } from "./helpers.js";

const TOKEN = "admin-token-0123456789abcdef";
const CACHED = "public, max-age=60, stale-if-error=300";
const cached = (body) => ({ body, headers: { "cdn-cache-control": CACHED } });
const flushed = (service) => ({ body: { flushed: 3, service, propagated: true } });

// Time stands still unless moved: a flush hides the copies asked of the origin at or before its
// own time, so each step below happens a second after the one before.
let now;
beforeEach(() => {
  vi.useFakeTimers({ toFake: ["Date"] });
  now = Date.now();
});
afterEach(() => vi.useRealTimers());
const tick = () => {
  now += 1000;
  vi.setSystemTime(now);
};

async function warm(edge, paths) {
  for (const path of paths) await edge.get(path);
  for (const path of paths) expect((await edge.get(path)).headers.get("x-edge-cache")).toBe("HIT");
}

async function states(edge, paths) {
  const found = {};
  for (const path of paths) found[path] = (await edge.get(path)).headers.get("x-edge-cache");
  return found;
}

async function flush(edge, body) {
  tick();
  const answer = await edge.get("/admin/cache/flush", {
    method: "POST",
    headers: { authorization: `Bearer ${TOKEN}`, "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  tick();
  return answer;
}

const PATHS = ["/services/ocr", "/services/ocr?limit=3", "/services/gpu", "/dht/bootstrap"];

function script(origin, flushReplies) {
  return origin.script({
    "GET /services/ocr": [cached({ ocr: 1 })],
    "GET /services/gpu": [cached({ gpu: 1 })],
    "GET /dht/bootstrap": [cached({ peers: [], ttl: 60 })],
    "POST /admin/cache/flush": flushReplies,
  });
}

describe("flush", () => {
  it("passes a service flush to the origin, then drops that service's edge copies only", async () => {
    const origin = await newOrigin();
    await script(origin, [flushed("ocr")]);
    const edge = edgeFor(origin);
    await warm(edge, PATHS);

    const answer = await flush(edge, { service: "ocr" });
    expect(answer.status).toBe(200);
    expect(JSON.parse(answer.body)).toEqual({ flushed: 3, service: "ocr", propagated: true });
    expect(answer.headers.get("x-edge-flushed")).toBe("service=ocr");
    const [sent] = (await origin.log()).filter((e) => e.method === "POST");
    expect(sent.headers.authorization).toBe(`Bearer ${TOKEN}`);
    expect(JSON.parse(sent.body)).toEqual({ service: "ocr" });

    expect(await states(edge, PATHS)).toEqual({
      "/services/ocr": "MISS",
      "/services/ocr?limit=3": "MISS",
      "/services/gpu": "HIT",
      "/dht/bootstrap": "HIT",
    });
    // The copies fetched after the flush are good again.
    expect((await edge.get("/services/ocr")).headers.get("x-edge-cache")).toBe("HIT");
  });

  it("drops every edge copy, bootstrap included, on a flush of everything", async () => {
    const origin = await newOrigin();
    await script(origin, [flushed(null)]);
    const edge = edgeFor(origin);
    await warm(edge, PATHS);
    const answer = await flush(edge, {});
    expect(answer.status).toBe(200);
    expect(answer.headers.get("x-edge-flushed")).toBe("all");
    expect(Object.values(await states(edge, PATHS))).toEqual(["MISS", "MISS", "MISS", "MISS"]);
  });

  it("drops nothing when the origin refuses the flush", async () => {
    const origin = await newOrigin();
    await script(origin, [
      { status: 403, body: { error: "forbidden", detail: "wrong admin token" } },
    ]);
    const edge = edgeFor(origin);
    await warm(edge, PATHS);
    const answer = await flush(edge, {});
    expect(answer.status).toBe(403);
    expect(JSON.parse(answer.body).error).toBe("forbidden");
    expect(answer.headers.get("x-edge-flushed")).toBeNull();
    expect(Object.values(await states(edge, PATHS))).toEqual(["HIT", "HIT", "HIT", "HIT"]);
  });

  it("drops nothing when the origin cannot be reached", async () => {
    const origin = await newOrigin();
    await script(origin, [flushed(null)]);
    const edge = edgeFor(origin);
    await warm(edge, PATHS);
    await origin.down();
    const answer = await flush(edge, {});
    expect(answer.status).toBe(502);
    expect(Object.values(await states(edge, PATHS))).toEqual(["HIT", "HIT", "HIT", "HIT"]);
  });

  it("drops everything when a successful answer does not name its scope", async () => {
    const origin = await newOrigin();
    await script(origin, [{ body: "flushed", headers: { "content-type": "text/plain" } }]);
    const edge = edgeFor(origin);
    await warm(edge, PATHS);
    const answer = await flush(edge, { service: "ocr" });
    expect(answer.body).toBe("flushed");
    expect(answer.headers.get("x-edge-flushed")).toBe("all");
    expect(Object.values(await states(edge, PATHS))).toEqual(["MISS", "MISS", "MISS", "MISS"]);
  });
});
