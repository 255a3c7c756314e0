// The Workers Rate Limiting binding (wrangler.toml [[ratelimits]], miniflare's in tests):
// registration and routing per client address, 429 with Retry-After in the router's format.
import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { clientKey } from "../src/ratelimit.js";
import { edgeFor, newOrigin } from "./helpers.js";

const REGISTER_LIMIT = 60; // RATE_REGISTER in wrangler.toml

function from(address, init = {}) {
  return { ...init, headers: { ...(init.headers ?? {}), "CF-Connecting-IP": address } };
}

/**
 * Registrations from `address` until the first refusal (at most three windows' worth): the
 * refusal, and how many went through before it. miniflare's windows are fixed to the clock,
 * so one may end during the run and let up to twice the limit through.
 */
async function registerUntilRefused(edge, address) {
  let passed = 0;
  for (let n = 0; n < 3 * REGISTER_LIMIT; n++) {
    const answer = await edge.get("/workers", from(address, { method: "POST", body: "{}" }));
    if (answer.status === 429) return { refused: answer, passed };
    expect(answer.status).toBe(200);
    passed++;
  }
  throw new Error(`no refusal after ${passed} registrations`);
}

describe("rate limits", () => {
  it("refuses a client over its registration limit, and only that client", async () => {
    const origin = await newOrigin();
    await origin.script({ "POST /workers": [{ status: 200, body: "{}" }] });
    const edge = edgeFor(origin);
    const { refused, passed } = await registerUntilRefused(edge, "198.51.100.30");
    expect(passed).toBeGreaterThanOrEqual(REGISTER_LIMIT);
    expect(refused.headers.get("retry-after")).toBe("60");
    expect(refused.headers.get("content-type")).toContain("application/json");
    expect(JSON.parse(refused.body)).toMatchObject({ error: "rate_limited" });
    // The refused request never reached the origin.
    expect(await origin.count("POST", "/workers")).toBe(passed);
    // Another address, and lookups from the refused one, go through.
    const other = await edge.get("/workers", from("198.51.100.31", { method: "POST", body: "{}" }));
    expect(other.status).toBe(200);
    await origin.script({ "GET /route/ocr/x": [{ status: 200, body: "ok" }] });
    expect((await edge.get("/route/ocr/x", from("198.51.100.31"))).status).toBe(200);
  });

  it("counts routing by address, an IPv6 client by its /64", async () => {
    const origin = await newOrigin();
    await origin.script({ "GET /route/ocr/x": [{ status: 200, body: "ok" }] });
    let calls = 0;
    const limiter = {
      async limit({ key }) {
        calls++;
        expect(key).toBe("2001:db8:0:7::/64");
        return { success: calls <= 2 };
      },
    };
    const edge = edgeFor(origin, { RATE_ROUTE: limiter });
    for (const address of ["2001:db8:0:7::1", "2001:db8::7:ffff:0:0:1"]) {
      expect((await edge.get("/route/ocr/x", from(address))).status).toBe(200);
    }
    const refused = await edge.get("/route/ocr/x", from("2001:db8:0:7:1::2"));
    expect(refused.status).toBe(429);
    expect(refused.headers.get("retry-after")).toBe("60");
  });

  it("lets everything through without the binding, or when it fails", async () => {
    const origin = await newOrigin();
    await origin.script({ "GET /route/ocr/x": [{ status: 200, body: "ok" }] });
    const broken = { limit: async () => { throw new Error("binding down"); } };
    for (const changes of [{ RATE_ROUTE: undefined }, { RATE_ROUTE: broken }]) {
      const edge = edgeFor(origin, changes);
      expect((await edge.get("/route/ocr/x", from("192.0.2.50"))).status).toBe(200);
    }
    expect(env.RATE_ROUTE).toBeDefined(); // wrangler.toml declares it
  });

  it("keys addresses as the router does", () => {
    const key = (address) => clientKey(new Request("https://e/", from(address)));
    expect(key("203.0.113.7")).toBe("203.0.113.7");
    expect(key("::ffff:203.0.113.7")).toBe("203.0.113.7");
    expect(key("2001:db8:1:2:3:4:5:6")).toBe("2001:db8:1:2::/64");
    expect(key("2001:db8::1")).toBe("2001:db8:0:0::/64");
    expect(key("not-an-address")).toBe(null);
  });
});
