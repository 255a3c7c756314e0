"""Ed25519 worker identities: create, save with 0600 permissions, load."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from dht_bridge.errors import IdentityError

WORKER_ID_BYTES = 20
# What every worker id looks like (see `worker_id_for`); checked before an id becomes a key.
WORKER_ID_RE = re.compile(r"[0-9a-f]{40}")


def worker_id_for(public_key: bytes) -> str:
    """The worker id: hex of the first 20 bytes of SHA-256 of the raw public key."""
    return hashlib.sha256(public_key).digest()[:WORKER_ID_BYTES].hex()


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True when `signature` is a valid Ed25519 signature of `message` under `public_key`."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


class Identity:
    """A worker's signing key and the id derived from it."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.worker_id: str = worker_id_for(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity."""
        return cls(Ed25519PrivateKey.generate())

    def sign(self, message: bytes) -> bytes:
        """The Ed25519 signature of `message`."""
        return self._key.sign(message)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key as PKCS#8 PEM, readable by the owner only, atomically."""
        target = Path(path)
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            with contextlib.suppress(OSError):  # its directory may be what failed
                tmp.unlink(missing_ok=True)
            raise IdentityError(f"cannot write key file {target}: {exc}") from exc

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read a key saved by `save`; refuse files that others can read, as ssh does."""
        source = Path(path)
        try:
            mode = source.stat().st_mode
            data = source.read_bytes()
        except OSError as exc:
            raise IdentityError(f"cannot read key file {source}: {exc}") from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(
                f"key file {source} is accessible by others (mode {stat.S_IMODE(mode):o}); "
                f"run: chmod 600 {source}"
            )
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"key file {source} is not a PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"key file {source} holds a {type(key).__name__}, not Ed25519")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Load the key at `path`, creating and saving a new one when there is none."""
        if Path(path).exists():
            return cls.load(path)
        identity = cls.generate()
        identity.save(path)
        return identity
