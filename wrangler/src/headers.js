// The headers of a request on its way to the origin (the RMA edge router).
//
// The router believes X-Forwarded-For's first hop and CF-IPCountry only when X-RMA-Origin-Secret
// carries its RMA_ORIGIN_SECRET, so everything a client could use to speak for us is removed
// here and rebuilt from what Cloudflare told the Worker.

export const SECRET_HEADER = "X-RMA-Origin-Secret";

// RFC 9110 section 7.6.1, plus the older names proxies still meet.
const HOP_BY_HOP = new Set([
  "connection",
  "keep-alive",
  "proxy-authenticate",
  "proxy-authorization",
  "proxy-connection",
  "te",
  "trailer",
  "transfer-encoding",
  "upgrade",
]);

// Client-address claims and forwarding headers: rebuilt below, never passed on as received.
const REBUILT = new Set([
  "host",
  "forwarded",
  "x-forwarded-for",
  "x-forwarded-host",
  "x-forwarded-proto",
  "x-real-ip",
  "true-client-ip",
]);

/** Is this incoming header ours to drop? */
export function dropped(name) {
  const lower = name.toLowerCase();
  return (
    HOP_BY_HOP.has(lower) ||
    REBUILT.has(lower) ||
    // Miniflare's and workerd's internals (MF-CF-Blob, MF-Original-URL, ...).
    lower.startsWith("mf-") ||
    // Our own: only this Worker sets them (the secret above all).
    lower.startsWith("x-rma-") ||
    // What Cloudflare's edge stamped on the way in (CF-Connecting-IP, CF-Ray, CF-IPCountry,
    // CF-Visitor, CF-Worker, CF-EW-Via, ...): what the origin needs is set again below. Access
    // service-token headers are the client's own credentials and go through.
    (lower.startsWith("cf-") && !lower.startsWith("cf-access-")) ||
    lower === "cdn-loop"
  );
}

// An address as Cloudflare writes it in CF-Connecting-IP: IPv4 or IPv6, nothing else.
const IPV4 = /^\d{1,3}(?:\.\d{1,3}){3}$/;
const IPV6 = /^[0-9a-fA-F:.]{2,45}$/;
const COUNTRY = /^[A-Za-z0-9]{2}$/;

/** The client's address as Cloudflare saw it (CF-Connecting-IP on the incoming request). */
export function clientAddress(request) {
  const value = (request.headers.get("cf-connecting-ip") || "").trim();
  if (IPV4.test(value) || (IPV6.test(value) && value.includes(":"))) return value;
  return null;
}

/** The client's country from Cloudflare's request.cf, upper-case, or null. */
export function clientCountry(request) {
  const country = request.cf && request.cf.country;
  return typeof country === "string" && COUNTRY.test(country) ? country.toUpperCase() : null;
}

/**
 * The headers for the origin request: the client's own headers minus hop-by-hop, internals and
 * claims, plus X-Forwarded-For (exactly the client address: a client's own X-Forwarded-For is
 * replaced, never appended to), X-Forwarded-Proto/Host, CF-Ray, CF-IPCountry and the secret.
 */
export function originHeaders(request, env) {
  const headers = new Headers();
  const listed = (request.headers.get("connection") || "")
    .split(",")
    .map((token) => token.trim().toLowerCase())
    .filter(Boolean);
  for (const [name, value] of request.headers) {
    if (!dropped(name) && !listed.includes(name.toLowerCase())) headers.append(name, value);
  }
  const url = new URL(request.url);
  const client = clientAddress(request);
  if (client) headers.set("X-Forwarded-For", client);
  headers.set("X-Forwarded-Proto", url.protocol.replace(/:$/, ""));
  headers.set("X-Forwarded-Host", url.host);
  const ray = request.headers.get("cf-ray");
  if (ray && /^[\w-]{1,64}$/.test(ray)) headers.set("CF-Ray", ray);
  const country = clientCountry(request);
  if (country) headers.set("CF-IPCountry", country);
  if (env.ORIGIN_SECRET) headers.set(SECRET_HEADER, env.ORIGIN_SECRET);
  return headers;
}
