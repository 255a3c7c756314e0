// Per-client rate limits at the edge, through the Workers Rate Limiting binding ([[ratelimits]]
// in wrangler.toml): registration (POST and DELETE /workers, RATE_REGISTER) and routing
// (/route/*, RATE_ROUTE), counted by the client's address as Cloudflare saw it (CF-Connecting-IP;
// an IPv6 client by its /64, as the router counts it).
//
// The binding counts per Cloudflare location and is eventually consistent, so it is a first,
// cheap line: the router counts again behind it (RMA_RATE_*), registration shared across its
// replicas. A deployment without the binding, or a binding that fails, lets the request through.

import { clientAddress } from "./headers.js";

// The period of both bindings in wrangler.toml: the longest a refused client waits for a new
// window (the binding does not say when its window ends).
export const RETRY_AFTER_SECONDS = 60;

/** The binding that limits this request, or null for the unlimited ones. */
export function limiterFor(request, env, url) {
  if (url.pathname.startsWith("/route/")) return env.RATE_ROUTE ?? null;
  const workers = url.pathname === "/workers" || url.pathname.startsWith("/workers/");
  if (workers && (request.method === "POST" || request.method === "DELETE")) {
    return env.RATE_REGISTER ?? null;
  }
  return null;
}

/** What a client is counted by: its IPv4 address or its IPv6 /64; null without an address. */
export function clientKey(request) {
  const address = clientAddress(request);
  if (address === null) return null;
  if (!address.includes(":")) return address;
  const dotted = address.lastIndexOf(":");
  if (address.includes(".")) return address.slice(dotted + 1); // ::ffff:192.0.2.1
  const [head, tail] = address.toLowerCase().split("::");
  const left = head ? head.split(":") : [];
  const right = tail ? tail.split(":") : [];
  const missing = tail === undefined ? [] : Array(8 - left.length - right.length).fill("0");
  const groups = [...left, ...missing, ...right];
  const prefix = groups.slice(0, 4).map((group) => parseInt(group, 16).toString(16));
  return `${prefix.join(":")}::/64`;
}

/**
 * Seconds the client should wait when this request is over its limit, else null. Requests
 * without a binding or a client address, and a binding that fails, go through.
 */
export async function retryAfter(request, env, url) {
  const limiter = limiterFor(request, env, url);
  const key = limiter ? clientKey(request) : null;
  if (!limiter || key === null) return null;
  try {
    const { success } = await limiter.limit({ key });
    return success ? null : RETRY_AFTER_SECONDS;
  } catch (err) {
    console.warn(`rate limiting binding failed, request let through: ${err}`);
    return null;
  }
}
