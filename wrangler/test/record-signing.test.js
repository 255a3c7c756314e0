// Cross-language signing (issue 21): a record signed in JavaScript inside workerd is accepted
// by the Python verifier, and the other way round. Python and vitest never run together, so
// they meet in committed files of tests/records/: signed_by_python.json (written by
// `python -m tests.records.cross_language`, checked there to be current) is verified here,
// and signed_by_js.json holds what this test signs, which the Python test verifies.
import { describe, expect, it } from "vitest";
import vectors from "../../tests/records/jcs_vectors.json";
import byJs from "../../tests/records/signed_by_js.json";
import byPython from "../../tests/records/signed_by_python.json";
import version1 from "../../tests/records/signed_v1.json";
import { canonicalize, fromHex, signRecord, verifyRecord } from "./records.js";

function fromIeee754(hex) {
  return new DataView(fromHex(hex).buffer).getFloat64(0);
}

describe("RFC 8785 in workerd", () => {
  it("runs inside workerd", () => {
    expect(navigator.userAgent).toBe("Cloudflare-Workers");
  });

  it.each(vectors.numbers)("writes $ieee754 as $jcs", ({ ieee754, jcs }) => {
    expect(canonicalize(fromIeee754(ieee754))).toBe(jcs);
  });

  it.each(vectors.not_finite)("refuses %s (not finite)", (ieee754) => {
    expect(() => canonicalize(fromIeee754(ieee754))).toThrow(TypeError);
  });

  it.each(vectors.documents)("$why", ({ input, jcs }) => {
    expect(canonicalize(JSON.parse(input))).toBe(jcs);
  });
});

describe("records signed by Python", () => {
  it.each(byPython.records)("verifies: $why", async ({ record }) => {
    expect(await verifyRecord(record)).toBe(true);
  });

  it.each(byPython.records)("signs the same bytes with the same key: $why", async (item) => {
    const { worker_id, public_key, signature, ...unsigned } = item.record;
    expect(await signRecord(item.seed, unsigned)).toEqual(item.record);
  });

  it("refuses them once a field or the version is changed", async () => {
    const { record } = byPython.records[0];
    expect(await verifyRecord({ ...record, load: 0.5 })).toBe(false);
    expect(await verifyRecord({ ...record, services: ["ocr", "asr"] })).toBe(false);
    const { v, ...unversioned } = record;
    expect(await verifyRecord(unversioned)).toBe(false);
    const other = byPython.records[1].record;
    expect(await verifyRecord({ ...record, worker_id: other.worker_id })).toBe(false);
  });

  it("cannot verify a version 1 record: 0.1 signed Python's JSON (0.0, not 0)", async () => {
    expect(await verifyRecord(version1.records[0].record)).toBe(false);
  });
});

describe("records signed in JavaScript", () => {
  it.each(byJs.cases)("signs what Python accepts: $why", async ({ seed, unsigned, record }) => {
    const signed = await signRecord(seed, unsigned);
    // On a mismatch, the record printed is what belongs in signed_by_js.json.
    expect(signed, JSON.stringify(signed)).toEqual(record);
    expect(await verifyRecord(signed)).toBe(true);
  });
});
