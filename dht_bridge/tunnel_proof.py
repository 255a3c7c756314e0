"""Tunnel proof: a worker shows that its record's tunnel URL reaches it, not someone else.

The router asks `GET {tunnel_url}/.well-known/rma-proof?c=<nonce>` with a fresh random nonce;
whatever answers at that URL (the worker's embedding middleware, or the agent's local proxy in
front of the service) returns `{"worker_id", "public_key", "signature"}`, the signature being
Ed25519 over `proof_message(tunnel_url, nonce)`. The router checks it with the record's key.

The message is domain-separated (it starts with `rma-tunnel-proof` and a NUL; a record's signed
bytes start with `{`), so a proof can never pass for a record or the other way round, and it
names the canonical tunnel URL, so a worker's proof vouches for its own URL only.
"""

from __future__ import annotations

import enum
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from dht_bridge.identity import Identity, verify_signature, worker_id_for
from dht_bridge.tunnels import canonical_tunnel_url

__all__ = [
    "NONCE_PARAM",
    "NONCE_RE",
    "PROOF_PATH",
    "Outcome",
    "ProofCheck",
    "check_proof",
    "new_nonce",
    "proof_message",
    "sign_proof",
]

PROOF_PATH = "/.well-known/rma-proof"
NONCE_PARAM = "c"
# URL-safe base64, as `secrets.token_urlsafe` writes it: 128 bits at least, nothing to escape.
NONCE_RE = re.compile(r"[A-Za-z0-9_-]{22,128}")
_DOMAIN = b"rma-tunnel-proof\0"
_HEX_KEY = re.compile(r"[0-9a-f]{64}")
_HEX_SIGNATURE = re.compile(r"[0-9a-f]{128}")


class Outcome(enum.Enum):
    """What one proof fetch showed about a (worker, tunnel URL) pair."""

    PROVED = "proved"  # the URL answered with a signature by the record's key
    FOREIGN = "foreign"  # the URL answered for another worker: never route the record to it
    FAILED = "failed"  # no usable answer (down, no proof endpoint, garbage): not proved


@dataclass(frozen=True)
class ProofCheck:
    """An outcome and why, in words for the log."""

    outcome: Outcome
    why: str


def new_nonce() -> str:
    """A fresh challenge: 192 random bits, URL-safe."""
    return secrets.token_urlsafe(24)


def proof_message(tunnel_url: str, nonce: str) -> bytes:
    """The bytes a worker signs: the domain, the canonical tunnel URL and the nonce.

    Raises RecordInvalid for a URL that has no canonical form, ValueError for a bad nonce.
    """
    if not NONCE_RE.fullmatch(nonce):
        raise ValueError("the nonce must be 22 to 128 URL-safe base64 characters")
    url = canonical_tunnel_url(tunnel_url)
    return _DOMAIN + url.encode("ascii") + b"\0" + nonce.encode("ascii")


def sign_proof(identity: Identity, tunnel_url: str, nonce: str) -> dict[str, str]:
    """The proof endpoint's answer for `nonce`, by the worker whose record names `tunnel_url`."""
    signature = identity.sign(proof_message(tunnel_url, nonce))
    return {
        "worker_id": identity.worker_id,
        "public_key": identity.public_key.hex(),
        "signature": signature.hex(),
    }


def check_proof(
    *, worker_id: str, public_key: str, tunnel_url: str, nonce: str, answer: object
) -> ProofCheck:
    """Judge the answer the record's `tunnel_url` gave to `nonce` against the record's key.

    PROVED when the signature verifies under `public_key`. FOREIGN when the answer is a valid
    proof by another key: that URL reaches another worker. Anything else is FAILED, including
    a bad signature claiming the record's own id (a broken worker proves nothing either way).
    """
    if not isinstance(answer, Mapping):
        return ProofCheck(Outcome.FAILED, "the answer is not a JSON object")
    claimed_key = answer.get("public_key")
    signature = answer.get("signature")
    if not isinstance(signature, str) or not _HEX_SIGNATURE.fullmatch(signature):
        return ProofCheck(Outcome.FAILED, "the answer has no hex Ed25519 signature")
    message = proof_message(tunnel_url, nonce)
    if verify_signature(bytes.fromhex(public_key), bytes.fromhex(signature), message):
        return ProofCheck(Outcome.PROVED, "signed by the record's key")
    if (
        isinstance(claimed_key, str)
        and _HEX_KEY.fullmatch(claimed_key)
        and claimed_key != public_key
        and verify_signature(bytes.fromhex(claimed_key), bytes.fromhex(signature), message)
    ):
        other = worker_id_for(bytes.fromhex(claimed_key))
        return ProofCheck(Outcome.FOREIGN, f"the URL answers for worker {other}, not {worker_id}")
    return ProofCheck(Outcome.FAILED, "the signature does not verify")
