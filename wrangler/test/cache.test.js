// GET /dht/bootstrap and GET /services/{service} through the edge cache (Workers Cache API).
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { edgeFor, newOrigin } from "./helpers.js";

// What the router sends (edge_router/handlers.py): lookups fresh 5 s, bootstrap 60 s at the CDN.
const LOOKUP = "public, max-age=5, stale-while-revalidate=0, stale-if-error=300";
const lookup = (body, extra = {}) => ({
  body,
  headers: { "cache-control": LOOKUP, "cdn-cache-control": LOOKUP, "x-cache": "MISS", ...extra },
});
const BOOTSTRAP = {
  body: { peers: [{ node_id: "aa", host: "192.0.2.1", port: 4000 }], ttl: 60 },
  headers: {
    "cache-control": "public, max-age=60",
    "cdn-cache-control": "public, max-age=60, stale-if-error=240",
  },
};

let now;
beforeEach(() => {
  vi.useFakeTimers({ toFake: ["Date"] });
  now = Date.now();
});
afterEach(() => vi.useRealTimers());
const advance = (seconds) => {
  now += seconds * 1000;
  vi.setSystemTime(now);
};

describe("edge cache", () => {
  it("answers a miss from the origin, stores it, and serves the repeat from the cache", async () => {
    const origin = await newOrigin();
    await origin.script({ "GET /services/ocr": [lookup({ providers: ["a"] })] });
    const edge = edgeFor(origin);

    // The miss is answered first and stored after, in ctx.waitUntil.
    const { response, deferred, settled } = await edge.send("/services/ocr");
    expect(response.headers.get("x-edge-cache")).toBe("MISS");
    expect(deferred).toHaveLength(1);
    const first = { status: response.status, body: await response.text() };
    await settled();
    expect(first.status).toBe(200);
    expect(JSON.parse(first.body)).toEqual({ providers: ["a"] });

    advance(2);
    const second = await edge.get("/services/ocr");
    expect(second.status).toBe(200);
    expect(second.headers.get("x-edge-cache")).toBe("HIT");
    expect(second.body).toBe(first.body);
    expect(second.headers.get("age")).toBe("2");
    // The client sees the origin's own cache headers, not the Worker's bookkeeping.
    expect(second.headers.get("cache-control")).toBe(LOOKUP);
    expect(second.headers.get("cdn-cache-control")).toBe(LOOKUP);
    expect(second.headers.get("content-type")).toBe("application/json");
    expect([...second.headers.keys()].filter((h) => h.startsWith("x-rma-edge"))).toEqual([]);
    expect(await origin.count("GET", "/services/ocr")).toBe(1);
  });

  it("expires at max-age, counting the Age the origin sent", async () => {
    const origin = await newOrigin();
    await origin.script({
      "GET /services/ocr": [
        lookup({ v: 1 }, { age: "3" }), // the router's own cache held it for 3 s already
        lookup({ v: 2 }),
      ],
    });
    const edge = edgeFor(origin);
    expect(JSON.parse((await edge.get("/services/ocr")).body)).toEqual({ v: 1 });

    advance(1.5); // 3 + 1.5 < 5: fresh
    const hit = await edge.get("/services/ocr");
    expect(hit.headers.get("x-edge-cache")).toBe("HIT");
    expect(hit.headers.get("age")).toBe("4");

    advance(1); // 5.5 s old: expired, and stale-while-revalidate=0
    const renewed = await edge.get("/services/ocr");
    expect(renewed.headers.get("x-edge-cache")).toBe("MISS");
    expect(JSON.parse(renewed.body)).toEqual({ v: 2 });
    expect(await origin.count("GET", "/services/ocr")).toBe(2);

    advance(1);
    const again = await edge.get("/services/ocr");
    expect(again.headers.get("x-edge-cache")).toBe("HIT");
    expect(JSON.parse(again.body)).toEqual({ v: 2 });
  });

  it("follows CDN-Cache-Control over Cache-Control (bootstrap: 60 s at the edge)", async () => {
    const origin = await newOrigin();
    await origin.script({
      "GET /dht/bootstrap": [
        {
          ...BOOTSTRAP,
          headers: { "cache-control": "public, max-age=1", "cdn-cache-control": "max-age=60" },
        },
      ],
    });
    const edge = edgeFor(origin);
    await edge.get("/dht/bootstrap");
    advance(30);
    const hit = await edge.get("/dht/bootstrap");
    expect(hit.headers.get("x-edge-cache")).toBe("HIT");
    expect(hit.headers.get("cache-control")).toBe("public, max-age=1"); // the browser's own
    advance(31);
    expect((await edge.get("/dht/bootstrap")).headers.get("x-edge-cache")).toBe("MISS");
    expect(await origin.count("GET", "/dht/bootstrap")).toBe(2);
  });

  it("uses s-maxage from Cache-Control when there is no CDN-Cache-Control", async () => {
    const origin = await newOrigin();
    await origin.script({
      "GET /services/gpu": [{ body: {}, headers: { "cache-control": "max-age=1, s-maxage=20" } }],
    });
    const edge = edgeFor(origin);
    await edge.get("/services/gpu");
    advance(10);
    expect((await edge.get("/services/gpu")).headers.get("x-edge-cache")).toBe("HIT");
  });

  it("serves a copy within stale-while-revalidate and refreshes it in the background", async () => {
    const origin = await newOrigin();
    const swr = "public, max-age=5, stale-while-revalidate=30";
    await origin.script({
      "GET /services/ocr": [
        { body: { v: 1 }, headers: { "cdn-cache-control": swr } },
        { body: { v: 2 }, headers: { "cdn-cache-control": swr } },
      ],
    });
    const edge = edgeFor(origin);
    await edge.get("/services/ocr");
    advance(10);
    const updating = await edge.get("/services/ocr"); // waits for the background refresh too
    expect(updating.headers.get("x-edge-cache")).toBe("UPDATING");
    expect(JSON.parse(updating.body)).toEqual({ v: 1 });
    expect(await origin.count("GET", "/services/ocr")).toBe(2);
    const fresh = await edge.get("/services/ocr");
    expect(fresh.headers.get("x-edge-cache")).toBe("HIT");
    expect(JSON.parse(fresh.body)).toEqual({ v: 2 });
  });

  it("serves the stale copy, marked, when the origin is down, within stale-if-error", async () => {
    const origin = await newOrigin();
    await origin.script({ "GET /services/ocr": [lookup({ v: 1 })] });
    const edge = edgeFor(origin);
    await edge.get("/services/ocr");

    await origin.down();
    advance(60); // expired 55 s ago; stale-if-error=300
    const stale = await edge.get("/services/ocr");
    expect(stale.status).toBe(200);
    expect(JSON.parse(stale.body)).toEqual({ v: 1 });
    expect(stale.headers.get("x-edge-cache")).toBe("STALE");
    expect(stale.headers.get("warning")).toBe('111 - "Revalidation Failed"');
    expect(stale.headers.get("x-edge-stale-reason")).toBe("origin unreachable");
    expect(stale.headers.get("age")).toBe("60");

    advance(250); // 310 s old: beyond max-age + stale-if-error, nothing to serve
    const gone = await edge.get("/services/ocr");
    expect(gone.status).toBe(502);
    expect(JSON.parse(gone.body).error).toBe("origin_unreachable");
    expect(gone.headers.get("content-type")).toContain("application/json");
  });

  it("serves the stale copy when the origin answers 5xx, and passes the 5xx on without one", async () => {
    const origin = await newOrigin();
    const unavailable = {
      status: 503,
      body: { error: "backend_unavailable", detail: "redis and the DHT are down" },
    };
    await origin.script({ "GET /dht/bootstrap": [BOOTSTRAP, unavailable] });
    const edge = edgeFor(origin);
    await edge.get("/dht/bootstrap");

    advance(100); // expired 40 s ago; stale-if-error=240
    const stale = await edge.get("/dht/bootstrap");
    expect(stale.status).toBe(200);
    expect(stale.headers.get("x-edge-cache")).toBe("STALE");
    expect(stale.headers.get("x-edge-origin-status")).toBe("503");
    expect(JSON.parse(stale.body).peers).toHaveLength(1);

    const other = edgeFor(origin); // no copy at this host
    const failed = await other.get("/dht/bootstrap");
    expect(failed.status).toBe(503);
    expect(JSON.parse(failed.body).error).toBe("backend_unavailable");
    expect(failed.headers.get("x-edge-cache")).toBe("BYPASS");
  });

  it("stores nothing the origin forbids: no-store, private, Set-Cookie, errors, max-age=0", async () => {
    const origin = await newOrigin();
    const refused = {
      "GET /services/a": [{ body: {}, headers: { "cache-control": "no-store" } }],
      "GET /services/b": [{ body: {}, headers: { "cdn-cache-control": "private, max-age=60" } }],
      "GET /services/c": [
        { body: {}, headers: { "cache-control": "public, max-age=60", "set-cookie": "a=b" } },
      ],
      "GET /services/d": [{ status: 404, body: {}, headers: { "cache-control": "max-age=60" } }],
      "GET /services/e": [{ body: {}, headers: { "cache-control": "max-age=0" } }],
      "GET /services/f": [{ body: {} }],
    };
    await origin.script(refused);
    const edge = edgeFor(origin);
    for (const route of Object.keys(refused)) {
      const path = route.split(" ")[1];
      expect((await edge.get(path)).headers.get("x-edge-cache")).toBe("BYPASS");
      expect((await edge.get(path)).headers.get("x-edge-cache")).toBe("BYPASS");
      expect(await origin.count("GET", path)).toBe(2);
    }
  });

  it("keys on limit, region and the country, and ignores other query parameters", async () => {
    const origin = await newOrigin();
    await origin.script({ "GET /services/ocr": [lookup({})] });
    const edge = edgeFor(origin);
    const asFrom = (country) => ({ cf: { country } });

    await edge.get("/services/ocr?limit=5", asFrom("DE"));
    expect((await edge.get("/services/ocr?limit=5", asFrom("DE"))).headers.get("x-edge-cache")).toBe(
      "HIT",
    );
    // A cache-busting parameter changes nothing, and never reaches the origin.
    const busted = await edge.get("/services/ocr?x=1&limit=5&junk=2", asFrom("DE"));
    expect(busted.headers.get("x-edge-cache")).toBe("HIT");
    // Another country is another answer (the router picks by CF-IPCountry) ...
    expect((await edge.get("/services/ocr?limit=5", asFrom("FR"))).headers.get("x-edge-cache")).toBe(
      "MISS",
    );
    // ... unless the region is asked for explicitly.
    await edge.get("/services/ocr?region=eu&limit=5", asFrom("DE"));
    expect(
      (await edge.get("/services/ocr?limit=5&region=eu", asFrom("FR"))).headers.get("x-edge-cache"),
    ).toBe("HIT");
    expect((await edge.get("/services/ocr?limit=6", asFrom("DE"))).headers.get("x-edge-cache")).toBe(
      "MISS",
    );
    const paths = (await origin.log()).map((e) => e.path);
    expect(paths).toEqual([
      "/services/ocr?limit=5",
      "/services/ocr?limit=5",
      "/services/ocr?limit=5&region=eu",
      "/services/ocr?limit=6",
    ]);
  });

  it("does not cache other methods or paths next to the cached ones", async () => {
    const origin = await newOrigin();
    await origin.script({
      "HEAD /services/ocr": [lookup("")],
      "GET /services/ocr/extra": [lookup({})],
      "GET /services": [lookup({})],
    });
    const edge = edgeFor(origin);
    for (const [method, path] of [
      ["HEAD", "/services/ocr"],
      ["GET", "/services/ocr/extra"],
      ["GET", "/services"],
    ]) {
      await edge.get(path, { method });
      const again = await edge.get(path, { method });
      expect(again.headers.get("x-edge-cache")).toBe("BYPASS");
      expect(await origin.count(method, path)).toBe(2);
    }
  });
});
