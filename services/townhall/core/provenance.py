"""Who wrote a Kafka record: the writer's identity and an HMAC with the service key, in record headers.

Every record a Townhall process writes carries `townhall-writer: <role>@<member>` (the role is what the
process may write: `admission` for room owners, `crowd` for admission's crowd lane, `relay`, `notifier`)
and `townhall-signature: <kid>:<mac>`, an HMAC-SHA256 over the topic, key, value and writer with a key
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

import base64
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


def _mac(key: bytes, topic: str, record_key: bytes | None, value: bytes, writer: str) -> bytes:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    # Length-prefixed fields: no two (topic, key, value, writer) tuples feed the MAC the same bytes.
    for part in (topic.encode(), record_key if record_key is not None else b"\xff", value, writer.encode()):
        mac.update(len(part).to_bytes(8, "big"))
        mac.update(part)
    return mac.digest()


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
        self._kid = kid.encode()
        self._key = key
        self._writer = str(writer)

    def headers(self, topic: str, key: bytes | None, value: bytes) -> list[tuple[str, bytes]]:
        """The headers that go with a record."""
        mac = base64.urlsafe_b64encode(_mac(self._key, topic, key, value, self._writer)).rstrip(b"=")
        return [(WRITER_HEADER, self._writer.encode()), (SIGNATURE_HEADER, self._kid + b":" + mac)]


class RecordVerifier:
    """Checks a record's signature against every service key; says who wrote it."""

    def __init__(self, auth: AuthConfig) -> None:
        self._keys = _keys(auth)

    def writer(self, topic: str, key: bytes | None, value: bytes, headers: Headers) -> Writer:
        """The record's writer; Unsigned without the headers, Forged if the signature does not verify."""
        found = {name: data for name, data in headers if name in (WRITER_HEADER, SIGNATURE_HEADER)}
        if len(found) < 2:
            raise Unsigned("the record carries no writer signature")
        try:
            text = found[WRITER_HEADER].decode()
            kid, sep, mac = found[SIGNATURE_HEADER].decode().partition(":")
            signature = base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4))
        except (UnicodeDecodeError, ValueError) as exc:
            raise Forged("the writer or signature header is not readable") from exc
        secret = self._keys.get(kid)
        if not sep or secret is None:
            raise Forged(f"the record is signed with an unknown key id {kid[:64]!r}")
        if not hmac.compare_digest(signature, _mac(secret, topic, key, value, text)):
            raise Forged(f"the signature of writer {text[:64]!r} does not verify")
        return Writer.parse(text)
