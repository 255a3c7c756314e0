// Everything that is not a cached lookup goes to the origin and back, streamed, never cached.
import { describe, expect, it } from "vitest";
import { edgeFor, newOrigin, waitFor, within } from "./helpers.js";

const CHUNK = 256 * 1024;

function chunk(index) {
  const bytes = new Uint8Array(CHUNK);
  for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 7 + index * 13) & 0xff;
  return bytes;
}

// The same checksum as the mock origin's.
function checksum(chunks) {
  let sum = 0;
  for (const c of chunks) for (const byte of c) sum = (sum * 31 + byte) >>> 0;
  return sum;
}

describe("pass-through", () => {
  it("streams a POST body to the origin as it arrives", async () => {
    const origin = await newOrigin();
    await origin.script({ "POST /workers": [{ echo: true }] });
    const edge = edgeFor(origin);
    const { readable, writable } = new TransformStream();
    const writer = writable.getWriter();

    const pending = edge.send("/workers", {
      method: "POST",
      body: readable,
      headers: { "content-type": "application/json" },
    });
    const parts = [chunk(0), chunk(1)];
    writer.write(parts[0]);
    // The origin holds the first part while the client has not written the second yet.
    await waitFor(
      async () => {
        const [entry] = await origin.log();
        return entry !== undefined && entry.received >= CHUNK && !entry.complete;
      },
      { message: "the first part at the origin before the rest is written" },
    );
    writer.write(parts[1]);
    writer.close();

    const { response, settled } = await pending;
    expect(response.status).toBe(200);
    expect(response.headers.get("x-edge-cache")).toBe("BYPASS");
    expect(await response.json()).toEqual({ received: 2 * CHUNK, checksum: checksum(parts) });
    await settled();
    const [entry] = await origin.log();
    expect(entry.headers["content-type"]).toBe("application/json");
  });

  it("streams the origin's answer to the client as it comes", async () => {
    const origin = await newOrigin();
    await origin.script({
      "GET /route/ocr/stream": [
        {
          headers: { "content-type": "text/plain", "cache-control": "public, max-age=60" },
          chunks: ["first part|", "the rest"],
          gated: true,
        },
      ],
    });
    const edge = edgeFor(origin);
    const { response, settled } = await within(edge.send("/route/ocr/stream"), {
      message: "the answer's headers before its body is complete",
    });
    expect(response.status).toBe(200);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let text = "";
    while (!text.includes("|")) {
      const { value, done } = await within(reader.read(), {
        message: "the first part before the origin sends the rest",
      });
      expect(done).toBe(false); // the origin holds the rest until released
      text += value;
    }
    expect(text).toBe("first part|");
    await origin.release();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      text += value;
    }
    expect(text).toBe("first part|the rest");
    await settled();
  });

  it("caches nothing it passes through, whatever the origin's headers say", async () => {
    const origin = await newOrigin();
    const cacheable = { body: { ok: 1 }, headers: { "cache-control": "public, max-age=600" } };
    await origin.script({
      "GET /route/ocr/page.png": [cacheable],
      "GET /topology": [cacheable],
      "POST /workers": [cacheable],
      "DELETE /workers/abc": [cacheable],
    });
    const edge = edgeFor(origin);
    for (const [method, path] of [
      ["GET", "/route/ocr/page.png"],
      ["GET", "/topology"],
      ["POST", "/workers"],
      ["DELETE", "/workers/abc"],
    ]) {
      for (let i = 0; i < 2; i++) {
        const answer = await edge.get(path, { method, body: method === "GET" ? undefined : "{}" });
        expect(answer.status).toBe(200);
        expect(answer.headers.get("x-edge-cache")).toBe("BYPASS");
      }
      expect(await origin.count(method, path)).toBe(2);
    }
  });

  it("passes the query, status, headers and redirects through untouched", async () => {
    const origin = await newOrigin();
    await origin.script({
      "GET /route/ocr/a?b=1&c=2": [
        { status: 302, body: "", headers: { location: "/elsewhere", "x-custom": "yes" } },
      ],
      "POST /workers": [{ status: 422, body: { error: "bad_record", detail: "signature" } }],
    });
    const edge = edgeFor(origin);
    const moved = await edge.get("/route/ocr/a?b=1&c=2");
    expect(moved.status).toBe(302);
    expect(moved.headers.get("location")).toBe("/elsewhere");
    expect(moved.headers.get("x-custom")).toBe("yes");
    const refused = await edge.get("/workers", { method: "POST", body: "{}" });
    expect(refused.status).toBe(422);
    expect(JSON.parse(refused.body)).toEqual({ error: "bad_record", detail: "signature" });
  });

  it("answers 502 in the router's JSON error format when the origin is unreachable", async () => {
    const origin = await newOrigin();
    await origin.down();
    const edge = edgeFor(origin);
    const answer = await edge.get("/workers", { method: "POST", body: "{}" });
    expect(answer.status).toBe(502);
    expect(JSON.parse(answer.body)).toMatchObject({ error: "origin_unreachable" });
  });

  it("joins a path prefix of ORIGIN_URL and refuses to run without ORIGIN_URL", async () => {
    const origin = await newOrigin();
    await origin.script({ "GET /prefix/healthz": [{ body: { status: "ok" } }] });
    const prefixed = edgeFor({ ...origin, url: `${origin.url}/prefix/` });
    expect((await prefixed.get("/healthz")).status).toBe(200);
    const broken = edgeFor(origin, { ORIGIN_URL: undefined });
    const answer = await broken.get("/healthz");
    expect(answer.status).toBe(500);
    expect(JSON.parse(answer.body).error).toBe("misconfigured");
  });
});
