// The Cloudflare Worker in front of the RMA edge router (the origin, behind a Cloudflare Tunnel).
//
// GET /dht/bootstrap and GET /services/{service} come from the edge cache while the origin's
// headers say they are fresh; everything else goes to the origin, streamed, never cached;
// POST /admin/cache/flush goes to the origin and, when it succeeds, hides the edge copies too.
// Registration and routing are rate limited per client first (ratelimit.js).

import {
  cacheKey,
  cachedScope,
  canonicalSearch,
  describe,
  flushedAt,
  markFlushed,
  policyOf,
  served,
  storable,
} from "./cache.js";
import { clientCountry, originHeaders } from "./headers.js";
import { retryAfter } from "./ratelimit.js";

const FLUSH_PATH = "/admin/cache/flush";
// A flush answer larger than this is not read for its scope: everything is dropped instead.
const FLUSH_ANSWER_LIMIT = 65536;

export default {
  async fetch(request, env, ctx) {
    let origin;
    try {
      origin = new URL(env.ORIGIN_URL);
    } catch {
      return problem(500, "misconfigured", "ORIGIN_URL is not set to an absolute URL");
    }
    const url = new URL(request.url);
    const wait = await retryAfter(request, env, url);
    if (wait !== null) {
      return problem(429, "rate_limited", `too many requests; retry in ${wait} s`, {
        "Retry-After": String(wait),
      });
    }
    const scope = cachedScope(url.pathname);
    if (request.method === "GET" && scope !== null) {
      return cached(request, env, ctx, origin, url, scope);
    }
    if (request.method === "POST" && url.pathname === FLUSH_PATH) {
      return flush(request, env, ctx, origin, url);
    }
    return passThrough(request, env, origin, url);
  },
};

function target(origin, url, search) {
  const base = origin.pathname.replace(/\/+$/, "");
  return `${origin.origin}${base}${url.pathname}${search}`;
}

// Our own copy governs caching: Cloudflare's cache must not keep a second one of the answer.
function toOrigin(request, env, origin, url, search) {
  const init = {
    method: request.method,
    headers: originHeaders(request, env),
    redirect: "manual",
    cache: "no-store",
  };
  if (request.method !== "GET" && request.method !== "HEAD" && request.body !== null) {
    init.body = request.body; // streamed as it arrives, never buffered here
  }
  return fetch(target(origin, url, search), init);
}

function problem(status, error, detail, headers = {}) {
  return Response.json(
    { error, detail },
    { status, headers: { ...headers, "X-Edge-Cache": "BYPASS" } },
  );
}

function unreachable(err) {
  console.warn(`origin unreachable: ${err}`);
  return problem(502, "origin_unreachable", `the origin did not answer: ${err.message ?? err}`);
}

// Hop-by-hop headers of the origin connection are not the client's (RFC 9110 section 7.6.1).
const HOP_BY_HOP = ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"];

function marked(response, state) {
  const out = new Response(response.body, response);
  for (const name of HOP_BY_HOP) out.headers.delete(name);
  out.headers.set("X-Edge-Cache", state);
  return out;
}

/** Everything not cached: to the origin and back, bodies streamed both ways. */
async function passThrough(request, env, origin, url) {
  try {
    return marked(await toOrigin(request, env, origin, url, url.search), "BYPASS");
  } catch (err) {
    return unreachable(err);
  }
}

/** GET /dht/bootstrap and GET /services/{service} through the edge cache. */
async function cached(request, env, ctx, origin, url, scope) {
  const cache = caches.default;
  const key = cacheKey(url, clientCountry(request));
  const search = canonicalSearch(url);
  const [stored, flushed] = await Promise.all([
    cache.match(key),
    flushedAt(cache, url.origin, scope),
  ]);
  let copy = null;
  if (stored) {
    copy = describe(stored, Date.now());
    // Asked of the origin before a flush of its scope: as good as gone (the answer below
    // overwrites it, or it is deleted).
    if (copy !== null && copy.askedAt <= flushed) copy = null;
  }
  if (copy) {
    const { age, policy } = copy;
    if (age < policy.fresh) return served(stored, age, "HIT");
    if (age < policy.fresh + policy.swr) {
      ctx.waitUntil(refresh(request, env, origin, url, search, cache, key));
      return served(stored, age, "UPDATING");
    }
  }
  const askedAt = Date.now();
  let response;
  try {
    response = await toOrigin(request, env, origin, url, search);
  } catch (err) {
    if (copy && copy.age < copy.policy.fresh + copy.policy.sie) {
      console.warn(`origin unreachable, serving the edge copy: ${err}`);
      return staleCopy(stored, copy.age, "origin unreachable");
    }
    return unreachable(err);
  }
  if (response.status >= 500 && copy && copy.age < copy.policy.fresh + copy.policy.sie) {
    await response.body?.cancel();
    return staleCopy(stored, copy.age, `origin answered ${response.status}`, response.status);
  }
  const policy = policyOf(response);
  const out = marked(response, policy ? "MISS" : "BYPASS");
  if (policy) ctx.waitUntil(cache.put(key, storable(out.clone(), policy, askedAt)));
  else if (stored) ctx.waitUntil(cache.delete(key)); // flushed, or no longer allowed a copy
  return out;
}

function staleCopy(stored, age, why, status) {
  const extra = {
    Warning: '111 - "Revalidation Failed"',
    "X-Edge-Stale-Reason": why,
  };
  if (status) extra["X-Edge-Origin-Status"] = String(status);
  return served(stored, age, "STALE", extra);
}

/** stale-while-revalidate: ask the origin in the background, store what it allows. */
async function refresh(request, env, origin, url, search, cache, key) {
  const askedAt = Date.now();
  try {
    const response = await toOrigin(request, env, origin, url, search);
    const policy = policyOf(response);
    if (policy) {
      await cache.put(key, storable(response, policy, askedAt));
    } else {
      await response.body?.cancel();
    }
  } catch (err) {
    console.warn(`background revalidation failed: ${err}`);
  }
}

/** POST /admin/cache/flush: the origin decides; on success the edge copies in its scope go. */
async function flush(request, env, ctx, origin, url) {
  let response;
  try {
    response = await toOrigin(request, env, origin, url, url.search);
  } catch (err) {
    return unreachable(err);
  }
  if (!response.ok) return marked(response, "BYPASS");
  // The router answers {"flushed", "service", "propagated"}: service null means everything.
  const length = Number(response.headers.get("content-length") ?? NaN);
  const readable = Number.isFinite(length) && length <= FLUSH_ANSWER_LIMIT;
  const bytes = readable ? await response.arrayBuffer() : null;
  let service = null;
  if (bytes !== null) {
    try {
      const answer = JSON.parse(new TextDecoder().decode(bytes));
      if (answer && typeof answer.service === "string") service = answer.service;
    } catch {
      // not the router's answer: drop everything, the safe side
    }
  }
  await markFlushed(caches.default, url.origin, service, Date.now());
  const out = marked(new Response(bytes ?? response.body, response), "BYPASS");
  out.headers.set("X-Edge-Flushed", service === null ? "all" : `service=${service}`);
  return out;
}
