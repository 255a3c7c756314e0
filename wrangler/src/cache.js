// The edge copy of /dht/bootstrap and /services/{service} in the Workers Cache API.
//
// Freshness follows the origin: Cloudflare-CDN-Cache-Control, then CDN-Cache-Control, then
// Cache-Control (s-maxage before max-age), with stale-while-revalidate and stale-if-error. The
// Worker judges freshness itself (the Cache API would drop a copy at max-age, and a copy is
// wanted for the stale windows too): a copy is stored for max-age plus the longer stale window,
// stamped with when it was asked of the origin and with the policy it came with.
//
// A flush cannot list the Cache API's keys, so it stores a marker per scope (everything, or one
// service) holding the flush time; a copy asked of the origin before the marker of its scope is
// treated as absent and deleted. The Cache API is per data centre: markers and copies alike.

const STORED_AT = "X-RMA-Edge-Stored-At";
const POLICY = "X-RMA-Edge-Policy";
const SAVED_PREFIX = "X-RMA-Edge-Saved-";
// Headers the Cache API reads on put; the origin's values are saved aside and restored on serve.
const CONTROLS = ["Cache-Control", "CDN-Cache-Control", "Cloudflare-CDN-Cache-Control"];
// No copy outlives a day; a flush marker outlives every copy it must hide.
const MAX_RETENTION = 86400;
const MARKER_TTL = 2 * MAX_RETENTION;
// The only query parameters of the cached endpoints (DESIGN.md): anything else would let a
// client bust the edge cache and spend the origin's request budget.
const PARAMS = ["limit", "region"];
const MARKER_PATH = "/__rma-edge/flushed/";

const SERVICE_PATH = /^\/services\/([^/]+)$/;

/** The service a cacheable path belongs to: a name, "" for /dht/bootstrap, null if not cached. */
export function cachedScope(pathname) {
  if (pathname === "/dht/bootstrap") return "";
  const match = SERVICE_PATH.exec(pathname);
  if (!match) return null;
  try {
    return decodeURIComponent(match[1]);
  } catch {
    return null; // malformed escapes: the origin answers 400, nothing to cache
  }
}

/** The query string forwarded and keyed on: the known parameters, in a fixed order. */
export function canonicalSearch(url) {
  const kept = new URLSearchParams();
  for (const name of PARAMS) {
    const value = url.searchParams.get(name);
    if (value !== null) kept.set(name, value);
  }
  const text = kept.toString();
  return text ? `?${text}` : "";
}

/**
 * The cache key: the canonical URL, plus the client's country when no region is asked for,
 * since the router then picks peers and providers by CF-IPCountry.
 */
export function cacheKey(url, country) {
  const key = new URL(url.origin + url.pathname + canonicalSearch(url));
  if (!key.searchParams.has("region")) key.searchParams.set("edge-country", country || "-");
  return key.toString();
}

function directives(value) {
  const found = new Map();
  for (const part of (value || "").split(",")) {
    const [name, raw] = part.split("=", 2).map((s) => s.trim());
    if (!name) continue;
    const unquoted = raw === undefined ? "" : raw.replace(/^"(.*)"$/, "$1");
    found.set(name.toLowerCase(), unquoted);
  }
  return found;
}

function seconds(value) {
  return /^\d+$/.test(value || "") ? Number(value) : null;
}

/**
 * What the origin allows a shared cache to do with `response`: {fresh, swr, sie} in seconds,
 * or null when it must not be stored.
 */
export function policyOf(response) {
  if (response.status !== 200 || response.headers.has("set-cookie")) return null;
  if ((response.headers.get("vary") || "").includes("*")) return null;
  const cdn =
    response.headers.get("cloudflare-cdn-cache-control") ??
    response.headers.get("cdn-cache-control");
  const found = directives(cdn ?? response.headers.get("cache-control"));
  for (const forbidden of ["no-store", "private", "no-cache"]) {
    if (found.has(forbidden)) return null;
  }
  const fresh = (cdn === null ? seconds(found.get("s-maxage")) : null) ?? seconds(found.get("max-age"));
  const swr = seconds(found.get("stale-while-revalidate")) ?? 0;
  const sie = seconds(found.get("stale-if-error")) ?? 0;
  if (fresh === null || fresh + Math.max(swr, sie) <= 0) return null;
  return { fresh, swr, sie };
}

/** A copy to store: the origin's response with its policy and the time it was asked for. */
export function storable(response, policy, askedAt) {
  const headers = new Headers(response.headers);
  for (const name of CONTROLS) {
    const value = headers.get(name);
    headers.delete(name);
    if (value !== null) headers.set(SAVED_PREFIX + name, value);
  }
  const retention = Math.min(policy.fresh + Math.max(policy.swr, policy.sie), MAX_RETENTION);
  headers.set("Cache-Control", `public, max-age=${Math.max(retention, 1)}`);
  headers.set(STORED_AT, String(askedAt));
  headers.set(POLICY, `${policy.fresh},${policy.swr},${policy.sie}`);
  return new Response(response.body, { status: response.status, headers });
}

/** A stored copy read back: its policy, when it was asked for and its age in seconds now. */
export function describe(stored, now) {
  const askedAt = Number(stored.headers.get(STORED_AT));
  const [fresh, swr, sie] = (stored.headers.get(POLICY) || "").split(",").map(Number);
  if (!Number.isFinite(askedAt) || ![fresh, swr, sie].every(Number.isFinite)) return null;
  const originAge = seconds(stored.headers.get("age")) ?? 0;
  const age = originAge + Math.max(0, now - askedAt) / 1000;
  return { askedAt, age, policy: { fresh, swr, sie } };
}

/** The stored copy as the client gets it: the origin's headers back, Age and X-Edge-Cache set. */
export function served(stored, age, state, extra = {}) {
  const headers = new Headers(stored.headers);
  headers.delete("Cache-Control");
  for (const name of CONTROLS) {
    const value = headers.get(SAVED_PREFIX + name);
    headers.delete(SAVED_PREFIX + name);
    if (value !== null) headers.set(name, value);
  }
  headers.delete(STORED_AT);
  headers.delete(POLICY);
  headers.set("Age", String(Math.floor(age)));
  headers.set("X-Edge-Cache", state);
  for (const [name, value] of Object.entries(extra)) headers.set(name, value);
  return new Response(stored.body, { status: stored.status, headers });
}

function markerKey(origin, scope) {
  return `${origin}${MARKER_PATH}${scope === null ? "all" : `service/${encodeURIComponent(scope)}`}`;
}

async function markerTime(cache, origin, scope) {
  const found = await cache.match(markerKey(origin, scope));
  if (!found) return 0;
  const value = Number(await found.text());
  return Number.isFinite(value) ? value : 0;
}

/** The time of the last flush covering `scope` ("" for bootstrap, a service name) or 0. */
export async function flushedAt(cache, origin, scope) {
  const scopes = scope ? [null, scope] : [null];
  const times = await Promise.all(scopes.map((s) => markerTime(cache, origin, s)));
  return Math.max(...times);
}

/** Hide every copy of `service` (or of everything, for null) asked of the origin before `now`. */
export async function markFlushed(cache, origin, service, now) {
  await cache.put(
    markerKey(origin, service),
    new Response(String(now), { headers: { "Cache-Control": `public, max-age=${MARKER_TTL}` } }),
  );
}
