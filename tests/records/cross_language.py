"""Records signed by Python for the JavaScript test, and the file the JavaScript test signs to.

`python -m tests.records.cross_language` rewrites signed_by_python.json from CASES below;
tests/records/test_cross_language.py fails when the committed file is not what this writes.
wrangler/test/record-signing.test.js verifies those records inside workerd (WebCrypto Ed25519
over its own RFC 8785 bytes), signs the `unsigned` cases of signed_by_js.json with the same
kind of fixed keys and expects the `record` committed there, which the Python test verifies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dht_bridge.identity import Identity
from dht_bridge.records import sign_record

HERE = Path(__file__).parent
PYTHON_SIGNED = HERE / "signed_by_python.json"
JS_SIGNED = HERE / "signed_by_js.json"
# The clock of every case: leases are checked against it, never against the wall clock.
NOW = 1_800_000_000.0

# Each case: why it is here, the key's 32-byte seed, and `sign_record`'s arguments. Together
# they cover what RFC 8785 writes differently from Python's JSON: integral floats (`0.0`,
# `1.0`, the lease end), exponents, non-ASCII text, escapes.
CASES: list[dict[str, Any]] = [
    {
        "why": "load 0.0 and an integral lease end: JCS writes 0 and 1800000090, Python 0.0",
        "seed": "01" * 32,
        "sign": {"tunnel_url": "https://blue-fox-12.trycloudflare.com", "services": ["ocr"]},
    },
    {
        "why": "load 1.0, region, DHT address, several services",
        "seed": "02" * 32,
        "sign": {
            "tunnel_url": "https://red-owl-7.trycloudflare.com/api",
            "services": ["ocr", "asr", "embed"],
            "load": 1.0,
            "region": "eu-west",
            "dht_host": "203.0.113.9",
            "dht_port": 4001,
            "ttl": 90.125,
        },
    },
    {
        "why": "capabilities: integral float, tiny and huge floats, ints, bools, escapes, Unicode",
        "seed": "03" * 32,
        "sign": {
            "tunnel_url": "https://grey-cat-3.trycloudflare.com",
            "services": ["llm"],
            "load": 0.3333,
            "capabilities": {
                "vram_gb": 16.0,
                "tflops": 82.58,
                "eps": 1e-7,
                "big": 1e21,
                "e20": 1.5e20,
                "cores": 64,
                "neg": -(2**53 - 1),
                "cuda": True,
                "spot": False,
                "gpu": "RTX 4090 \u201cfounders\u201d",
                "note": 'tab\there, quote " and backslash \\ and \u001f',
                "city": "Z\u00fcrich \U0001f1e8\U0001f1ed",
                "hebrew": "\ufb33",
            },
        },
    },
    {
        "why": "a tombstone with a high seq",
        "seed": "04" * 32,
        "sign": {
            "tunnel_url": "https://blue-fox-12.trycloudflare.com",
            "services": ["ocr"],
            "seq": 2**53 - 1,
            "tombstone": True,
        },
    },
]


def identity_for(seed_hex: str) -> Identity:
    """The fixed identity of a case."""
    return Identity(Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex)))


def python_signed() -> dict[str, Any]:
    """The content of signed_by_python.json."""
    records = []
    for case in CASES:
        arguments = {"seq": 1, "now": NOW, **case["sign"]}
        record = sign_record(identity_for(case["seed"]), **arguments)
        records.append({"why": case["why"], "seed": case["seed"], "record": record.to_dict()})
    return {
        "about": "Written by `python -m tests.records.cross_language`; do not edit by hand.",
        "now": NOW,
        "records": records,
    }


def render(content: dict[str, Any]) -> str:
    """The file's text: one layout, so that a regenerated file compares byte for byte."""
    return json.dumps(content, indent=2, ensure_ascii=False, sort_keys=False) + "\n"


def main() -> None:
    """Rewrite signed_by_python.json."""
    PYTHON_SIGNED.write_text(render(python_signed()), encoding="utf-8")


if __name__ == "__main__":
    main()

__all__ = ["CASES", "JS_SIGNED", "NOW", "PYTHON_SIGNED", "identity_for", "main", "python_signed"]
