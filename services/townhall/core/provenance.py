"""Who wrote a Kafka record: the writer's identity and an HMAC with the service key, in record headers.

Every record a Townhall process writes carries `townhall-writer: <role>@<member>` (the role is what the
process may write: `admission` for room owners, `crowd` for admission's crowd lane, `relay`, `notifier`)
and `townhall-signature: <kid>:<mac>`, an HMAC-SHA256 (hex) over the topic, key, value and writer with a key
derived from the first of `auth.service_keys` (every key verifies, so keys rotate as service credentials
do). A reader (core/records.py) refuses a record without a valid signature, or from a role that may not
write its topic (core/kafka.py, Topics.writers), before it looks at the value.

What it protects: a Kafka client that does not hold the service key (a wrong ACL, a shared cluster, a
stolen Kafka password) cannot write a record any Townhall reader acts on, nor move a record's value to
another key or topic. What it does not: every Townhall process holds the service key, so one that is
compromised can sign as any writer; Kafka ACLs (each service's principal writes only its own topics)
narrow what it can reach, and fenced ownership (issue 13) will decide between two admission processes.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from townhall.core.config import AuthConfig, ConfigError, parse_keys

WRITER_HEADER = "townhall-writer"
SIGNATURE_HEADER = "townhall-signature"
ADMISSION, CROWD, RELAY, NOTIFIER = "admission", "crowd", "relay", "notifier"
ROLES = frozenset({ADMISSION, CROWD, RELAY, NOTIFIER})
# Record MACs use keys derived from the service keys, so a record signature can never pass for a
# service credential (a JWT signed with the same secret) or the other way round.
_DOMAIN = b"townhall kafka record v1"
Headers = Sequence[tuple[str, bytes]]


class Unsigned(ValueError):
    """A record carries no writer or signature headers."""


class Forged(ValueError):
    """A record's signature does not verify, or its writer header is malformed."""


@dataclass(frozen=True, slots=True)
class Writer:
    """Who wrote a record: a role and the member (the process's advertised address) that holds it."""

    role: str
    member: str

    def __str__(self) -> str:
        return f"{self.role}@{self.member}"

    @classmethod
    def parse(cls, text: str) -> Writer:
        """A writer header's value; Forged if it is not role@member with a known role."""
        role, sep, member = text.partition("@")
        if not sep or role not in ROLES or not member or len(member) > 255:
            raise Forged(f"writer header {text[:64]!r} is not <role>@<member>")
        return cls(role, member)


def _derive(secret: str) -> bytes:
    return hmac.new(secret.encode(), _DOMAIN, hashlib.sha256).digest()


def _part(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def _mac(key: bytes, topic: bytes, record_key: bytes | None, writer: bytes, value: bytes) -> bytes:
    # Length-prefixed fields, so no two (topic, key, writer, value) tuples feed the MAC the same bytes;
    # one message and the one-shot digest, since this runs for every record a process writes.
    message = b"".join(
        (
            _part(topic),
            _part(record_key) if record_key is not None else b"\xff" * 8,
            _part(writer),
            len(value).to_bytes(8, "big"),
            value,
        )
    )
    return hmac.digest(key, message, "sha256")


def _keys(auth: AuthConfig) -> dict[str, bytes]:
    return {kid: _derive(secret) for kid, secret in parse_keys("auth.service_keys", auth.service_keys)}


class RecordSigner:
    """Signs the records one process writes, as `writer`."""

    def __init__(self, auth: AuthConfig, writer: Writer) -> None:
        keys = _keys(auth)
        if not keys:
            raise ConfigError(
                "auth.service_keys must hold a key: it signs the Kafka records this process writes"
            )
        kid, key = next(iter(keys.items()))
        self.writer = writer
        self._key = key
        self._writer = str(writer).encode()
        self._kid = kid.encode() + b":"

    def headers(self, topic: str, key: bytes | None, value: bytes) -> list[tuple[str, bytes]]:
        """The headers that go with a record."""
        mac = _mac(self._key, topic.encode(), key, self._writer, value).hex().encode()
        return [(WRITER_HEADER, self._writer), (SIGNATURE_HEADER, self._kid + mac)]


class RecordVerifier:
    """Checks a record's signature against every service key; says who wrote it."""

    def __init__(self, auth: AuthConfig) -> None:
        self._keys = _keys(auth)

    def writer(self, topic: str, key: bytes | None, value: bytes, headers: Headers) -> Writer:
        """The record's writer; Unsigned without the headers, Forged if the signature does not verify."""
        found = {name: data for name, data in headers if name in (WRITER_HEADER, SIGNATURE_HEADER)}
        if len(found) < 2:
            raise Unsigned("the record carries no writer signature")
        writer = found[WRITER_HEADER]
        kid, sep, mac = found[SIGNATURE_HEADER].partition(b":")
        try:
            text, name = writer.decode(), kid.decode()
            signature = bytes.fromhex(mac.decode())
        except (UnicodeDecodeError, ValueError) as exc:
            raise Forged("the writer or signature header is not readable") from exc
        secret = self._keys.get(name)
        if not sep or secret is None:
            raise Forged(f"the record is signed with an unknown key id {name[:64]!r}")
        if not hmac.compare_digest(signature, _mac(secret, topic.encode(), key, writer, value)):
            raise Forged(f"the signature of writer {text[:64]!r} does not verify")
        return Writer.parse(text)
