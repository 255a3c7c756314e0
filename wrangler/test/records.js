// Worker records in JavaScript, as a signer outside Python would write them (docs/design.md,
// "The worker record"): RFC 8785 (JCS) bytes of every field but `signature`, signed with
// WebCrypto Ed25519. The Worker itself never signs or verifies records; this is the other
// language that tests/records/test_cross_language.py checks against the Python verifier.

/**
 * RFC 8785 (JCS) of a JSON value. JCS is defined on ECMAScript's own serialization:
 * JSON.stringify writes numbers and strings exactly as section 3.2.2 asks, and the default
 * sort compares UTF-16 code units, as section 3.2.3 asks of object keys.
 */
export function canonicalize(value) {
  if (typeof value === "number" && !Number.isFinite(value)) {
    throw new TypeError(`${value} has no JSON form`);
  }
  if (value === null || typeof value !== "object") return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map(canonicalize).join(",")}]`;
  const members = Object.keys(value)
    .sort()
    .map((key) => `${JSON.stringify(key)}:${canonicalize(value[key])}`);
  return `{${members.join(",")}}`;
}

// PKCS #8 wrapping of a raw 32-byte Ed25519 seed (RFC 8410): WebCrypto imports private keys
// as PKCS #8 or JWK only.
const PKCS8_ED25519_PREFIX = "302e020100300506032b657004220420";

export function toHex(bytes) {
  return [...new Uint8Array(bytes)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

export function fromHex(hex) {
  return Uint8Array.from(hex.match(/../g) ?? [], (pair) => Number.parseInt(pair, 16));
}

function fromBase64url(text) {
  const binary = atob(text.replace(/-/g, "+").replace(/_/g, "/"));
  return Uint8Array.from(binary, (char) => char.charCodeAt(0));
}

/** The worker id: hex of the first 20 bytes of SHA-256 of the raw public key. */
export async function workerIdFor(publicKey) {
  return toHex(await crypto.subtle.digest("SHA-256", publicKey)).slice(0, 40);
}

/** A record signed with the Ed25519 key of `seedHex`: the id and key first, then `unsigned`. */
export async function signRecord(seedHex, unsigned) {
  const key = await crypto.subtle.importKey(
    "pkcs8",
    fromHex(PKCS8_ED25519_PREFIX + seedHex),
    { name: "Ed25519" },
    true,
    ["sign"],
  );
  const publicKey = fromBase64url((await crypto.subtle.exportKey("jwk", key)).x);
  const record = {
    worker_id: await workerIdFor(publicKey),
    public_key: toHex(publicKey),
    ...unsigned,
  };
  const message = new TextEncoder().encode(canonicalize(record));
  const signature = await crypto.subtle.sign({ name: "Ed25519" }, key, message);
  return { ...record, signature: toHex(signature) };
}

/** Does `record` hold its own key's id and a valid signature over its JCS bytes? */
export async function verifyRecord(record) {
  const { signature, ...signed } = record;
  const publicKey = fromHex(signed.public_key);
  if ((await workerIdFor(publicKey)) !== signed.worker_id) return false;
  const key = await crypto.subtle.importKey("raw", publicKey, { name: "Ed25519" }, false, [
    "verify",
  ]);
  const message = new TextEncoder().encode(canonicalize(signed));
  return crypto.subtle.verify({ name: "Ed25519" }, key, fromHex(signature), message);
}
