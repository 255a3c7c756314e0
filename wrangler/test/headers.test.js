// What the origin receives: the client address, CF-Ray, the country and the shared secret, and
// nothing a client or the runtime could use to speak for the Worker.
import { describe, expect, it } from "vitest";
import { SECRET, edgeFor, newOrigin } from "./helpers.js";

// As Cloudflare's edge delivers a request to the Worker, plus what a client tried to slip in.
const INCOMING = {
  "CF-Connecting-IP": "203.0.113.7",
  "CF-Ray": "8f1d2c3b4a5e6f70-AMS",
  "CF-IPCountry": "NL",
  "CF-Visitor": '{"scheme":"https"}',
  "X-Forwarded-For": "198.51.100.9, 10.0.0.1", // spoofed by the client
  "X-Real-IP": "198.51.100.10",
  "True-Client-IP": "198.51.100.11",
  Forwarded: "for=198.51.100.12",
  "X-RMA-Origin-Secret": "a-guess", // spoofed by the client
  "X-RMA-Worker": "someone",
  "MF-CF-Blob": '{"country":"XX"}', // Miniflare's internals
  "MF-Original-URL": "http://127.0.0.1/",
  "User-Agent": "rma-worker/1.0",
  Accept: "application/json",
  Authorization: "Bearer client-credential",
};

async function exchange(path, { method = "GET", env = {}, headers = INCOMING } = {}) {
  const origin = await newOrigin();
  await origin.script({ [`${method} ${path}`]: [{ body: {}, headers: { "cache-control": "max-age=5" } }] });
  const edge = edgeFor(origin, env);
  const answer = await edge.get(path, {
    method,
    headers,
    body: method === "GET" ? undefined : "{}",
    cf: { country: "DE", colo: "AMS" },
  });
  expect(answer.status).toBe(200);
  const [entry] = await origin.log();
  return entry.headers;
}

describe("headers to the origin", () => {
  for (const [method, path] of [
    ["GET", "/dht/bootstrap"],
    ["GET", "/services/ocr"],
    ["POST", "/workers"],
    ["GET", "/route/ocr/run"],
    ["POST", "/admin/cache/flush"],
  ]) {
    it(`${method} ${path}: client address, ray, country and secret set; spoofs and internals gone`, async () => {
      const sent = await exchange(path, { method });
      // Replaced, not appended to: the router believes the first hop.
      expect(sent["x-forwarded-for"]).toBe("203.0.113.7");
      expect(sent["cf-ray"]).toBe("8f1d2c3b4a5e6f70-AMS");
      expect(sent["cf-ipcountry"]).toBe("DE"); // request.cf.country, not a header
      expect(sent["x-rma-origin-secret"]).toBe(SECRET);
      expect(sent["x-forwarded-proto"]).toBe("https");
      expect(sent["x-forwarded-host"]).toMatch(/\.example\.test$/);
      for (const gone of [
        "x-real-ip",
        "true-client-ip",
        "forwarded",
        "x-rma-worker",
        "cf-connecting-ip",
        "cf-visitor",
      ]) {
        expect(sent).not.toHaveProperty(gone);
      }
      expect(Object.keys(sent).filter((h) => h.startsWith("mf-"))).toEqual([]);
      // The client's own headers go through.
      expect(sent["user-agent"]).toBe("rma-worker/1.0");
      expect(sent.accept).toBe("application/json");
      expect(sent.authorization).toBe("Bearer client-credential");
    });
  }

  it("sends no secret at all when ORIGIN_SECRET is not set, whatever the client sent", async () => {
    const sent = await exchange("/services/ocr", { env: { ORIGIN_SECRET: undefined } });
    expect(sent).not.toHaveProperty("x-rma-origin-secret");
    expect(sent["x-forwarded-for"]).toBe("203.0.113.7");
  });

  it("sends no X-Forwarded-For when Cloudflare gave no usable client address", async () => {
    for (const address of [undefined, "not-an-address", "1.2.3.4, 5.6.7.8"]) {
      const headers = { "X-Forwarded-For": "198.51.100.9" };
      if (address) headers["CF-Connecting-IP"] = address;
      const sent = await exchange("/workers", { method: "POST", headers });
      expect(sent).not.toHaveProperty("x-forwarded-for");
    }
  });

  it("passes an IPv6 client address", async () => {
    const sent = await exchange("/workers", {
      method: "POST",
      headers: { "CF-Connecting-IP": "2001:db8::7" },
    });
    expect(sent["x-forwarded-for"]).toBe("2001:db8::7");
  });

  it("drops headers the client names in Connection", async () => {
    const sent = await exchange("/workers", {
      method: "POST",
      headers: { Connection: "x-private-hop", "X-Private-Hop": "1", "X-Kept": "2" },
    });
    expect(sent).not.toHaveProperty("x-private-hop");
    expect(sent["x-kept"]).toBe("2");
  });
});
