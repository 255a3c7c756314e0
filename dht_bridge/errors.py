"""The exception tree of dht_bridge; the router maps these to HTTP statuses in one place."""

from __future__ import annotations


class RMAError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(RMAError):
    """A setting is missing or malformed."""


class IdentityError(RMAError):
    """A key file cannot be created, read, or trusted."""


class RecordError(RMAError):
    """A worker record was refused; the message says why."""


class RecordInvalid(RecordError):
    """A field of a record breaks the contract (bad URL, name, size, range)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class RecordTooLarge(RecordInvalid):
    """The encoded record exceeds the size limit."""


class RecordSignatureError(RecordError):
    """The signature does not verify, or the worker id does not match the key."""


class RecordExpired(RecordError):
    """The record's lease has already ended."""


class JSONTooDeep(RMAError, ValueError):
    """JSON from elsewhere nests deeper than its reader allows (dht_bridge.jsontext)."""


class RegistryError(RMAError):
    """The Redis registry failed."""


class RegistryUnavailable(RegistryError):
    """Redis could not be reached within the configured timeout."""


class DHTError(RMAError):
    """The DHT node failed to do what was asked."""


class BootstrapError(DHTError):
    """No bootstrap peer answered; the message lists what was tried."""


class PublishError(DHTError):
    """A record could not be stored on any node."""


class NotListening(DHTError):
    """The DHT node has no socket yet (or any more): `listen` first."""
