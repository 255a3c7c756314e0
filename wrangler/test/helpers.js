// Test helpers, running inside workerd next to the Worker: a scripted origin per test (see
// mock-origin.js) and an edge host per test, so that tests never share a cache entry.
import { createExecutionContext, waitOnExecutionContext } from "cloudflare:test";
import { env } from "cloudflare:workers";
import worker from "../src/index.js";

export const SECRET = env.ORIGIN_SECRET;

/** A fresh scripted origin: its URL, and the controls of the mock. */
export async function newOrigin() {
  const made = await fetch(`${env.MOCK_ORIGIN}/__mock/scenarios`, { method: "POST" });
  const { id } = await made.json();
  const control = async (action, body) => {
    const res = await fetch(`${env.MOCK_ORIGIN}/__mock/s/${id}/${action}`, {
      method: body === undefined ? "GET" : "POST",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (!res.ok) throw new Error(`mock ${action}: ${res.status} ${await res.text()}`);
    return res.json();
  };
  return {
    url: `${env.MOCK_ORIGIN}/s/${id}`,
    script: (routes) => control("script", routes),
    down: (down = true) => control("down", { down }),
    release: () => control("release", {}),
    log: () => control("log"),
    /** How many requests the origin got for `method path` (query ignored unless given). */
    async count(method, path) {
      const log = await control("log");
      return log.filter(
        (e) => e.method === method && (path.includes("?") ? e.path : e.path.split("?")[0]) === path,
      ).length;
    },
  };
}

let hosts = 0;

/** The Worker under a host of its own, in front of `origin`. */
export function edgeFor(origin, changes = {}) {
  const host = `edge-${++hosts}-${crypto.randomUUID().slice(0, 8)}.example.test`;
  const testEnv = { ...env, ORIGIN_URL: origin.url, ...changes };
  return {
    host,
    /** The Worker's response as soon as it answers, and its execution context. */
    async send(path, init = {}) {
      const ctx = createExecutionContext();
      const deferred = []; // what the Worker handed to ctx.waitUntil
      const waitUntil = ctx.waitUntil.bind(ctx);
      ctx.waitUntil = (promise) => {
        deferred.push(promise);
        waitUntil(promise);
      };
      const request = new Request(`https://${host}${path}`, init);
      const response = await worker.fetch(request, testEnv, ctx);
      return { response, deferred, settled: () => waitOnExecutionContext(ctx) };
    },
    /** The whole exchange: status, headers and body text, after every waitUntil settled. */
    async get(path, init = {}) {
      const { response, settled } = await this.send(path, init);
      const body = await response.text();
      await settled();
      return { status: response.status, headers: response.headers, body };
    },
  };
}

/** Poll `check` until it returns true, failing after `timeout` ms (no bare sleeps). */
export async function waitFor(check, { timeout = 5000, message = "condition" } = {}) {
  const deadline = Date.now() + timeout;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${message}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** `promise`, or a failure naming `message` after `timeout` ms. */
export async function within(promise, { timeout = 5000, message = "an answer" } = {}) {
  let timer;
  const expired = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for ${message}`)), timeout);
  });
  try {
    return await Promise.race([promise, expired]);
  } finally {
    clearTimeout(timer);
  }
}
