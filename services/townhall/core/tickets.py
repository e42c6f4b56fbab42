"""Tickets: what admission grants and relays verify locally, without calling admission.

Tickets are ES256 (ECDSA P-256) JWTs: admission signs with the private key (`TicketSigner`), relays hold
only the public keys (`TicketVerifier`), so a relay, or anyone who reads a relay's keys, can check a
ticket but never make one. The `kid` header names the key, so two can be live while keys rotate.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from townhall.core.config import ConfigError, TicketConfig, parse_ticket_keys
from townhall.core.errors import PermissionDenied, Unauthenticated
from townhall.core.tokens import ES256Signer, KeyRing, Verifier, es256_public
from townhall.v1.common_pb2 import Role

TICKET_KEY = "townhall-ticket"
MAX_TICKET_BYTES = 1024
# Room ids as admission makes them: written into a ticket's JSON without escaping.
_SAFE = re.compile(r"[A-Za-z0-9_-]*")
_MAX_PATHS = 10_000
REQUIRED_CLAIMS = ("exp", "sub", "aud", "room", "role")
# Clock skew between the admission process that issues a ticket and the relay that checks it.
MAX_SKEW_S = 60.0


def void_after_s(ttl_s: float) -> float:
    """Seconds after issue by which every relay refuses a ticket: its lifetime plus a margin for skew.

    What a ticket could still be used for (an ended room, a listener who left) may be forgotten then.
    """
    return ttl_s + min(MAX_SKEW_S, ttl_s)


@dataclass(frozen=True, slots=True)
class Ticket:
    """A verified ticket: this user may use this relay for this room, in this role, until expiry."""

    room_id: str
    user_id: int
    role: int
    relay: str
    expires_at: int  # Unix seconds
    # Relays above this one in the room's tree (their internal addresses), origin first, nearest last;
    # empty on the origin.
    upstream: tuple[str, ...] = ()
    # The room's version when admission issued the ticket (claim `v`): a relay refuses the ticket of a
    # user removed at a later version, and trusts a ticket newer than its own copy of the room.
    room_version: int = 0
    # When admission issued it, Unix milliseconds (claim `at`): a relay voids a listener's tickets issued
    # before the listener's Leave (0: unknown, so voided by any Leave).
    issued_ms: int = 0

    @property
    def on_stage(self) -> bool:
        """Whether the ticket allows publishing audio."""
        return self.role in (Role.ROLE_HOST, Role.ROLE_COHOST, Role.ROLE_SPEAKER)


class TicketSigner:
    """Issues tickets (ES256 JWTs, `kid` header) with admission's private ticket key, parsed once."""

    def __init__(self, kid: str, scalar: bytes, ttl_s: float) -> None:
        self._key = ES256Signer(kid, scalar)
        self._ttl_s = ttl_s
        self._relay_json: dict[tuple[str, tuple[str, ...]], tuple[str, str]] = {}

    @classmethod
    def from_config(cls, config: TicketConfig) -> TicketSigner:
        """The signer of [tickets] (private_key and ttl_s)."""
        keys = parse_ticket_keys(
            "tickets.private_key", (config.private_key,) if config.private_key else (), True
        )
        if not keys:
            raise ConfigError("tickets.private_key is required to issue tickets (admission)")
        return cls(*keys[0], config.ttl_s)

    def public_key(self) -> str:
        """KID=<base64url public key>: the entry of tickets.public_keys that verifies these tickets."""
        return f"{self._key.kid}={base64.urlsafe_b64encode(self._key.public()).rstrip(b'=').decode()}"

    def issue(
        self,
        room_id: str,
        user_id: int,
        role: int,
        relay: str,
        now: float | None = None,
        upstream: tuple[str, ...] = (),
        room_version: int = 0,
    ) -> Ticket:
        """A ticket for the given grant, expiring ttl_s from now."""
        now = time.time() if now is None else now
        expires = int(now + self._ttl_s)
        return Ticket(room_id, user_id, role, relay, expires, tuple(upstream), room_version, int(now * 1000))

    def sign(self, ticket: Ticket) -> str:
        """The ticket's signed text."""
        # The claims written out, not json.dumps'd: tickets are signed on the join path. The relay part
        # (audience and path) is encoded once per relay path; verification stays with PyJWT.
        key = (ticket.relay, ticket.upstream)
        relay = self._relay_json.get(key)
        if relay is None:
            if len(self._relay_json) >= _MAX_PATHS:
                self._relay_json.clear()
            up = (
                ',"up":' + json.dumps(list(ticket.upstream), separators=(",", ":")) if ticket.upstream else ""
            )
            relay = self._relay_json[key] = (json.dumps(ticket.relay), up)
        room = ticket.room_id
        room_json = f'"{room}"' if _SAFE.fullmatch(room) else json.dumps(room)
        version = f',"v":{int(ticket.room_version)}' if ticket.room_version else ""
        issued = f',"at":{int(ticket.issued_ms)}' if ticket.issued_ms else ""
        return self._key.sign(
            f'{{"sub":"{int(ticket.user_id)}","room":{room_json},"role":{int(ticket.role)},'
            f'"aud":{relay[0]},"exp":{int(ticket.expires_at)}{relay[1]}{version}{issued}}}'
        )


class TicketVerifier:
    """Verifies tickets with the ticket public keys (every listed key verifies; none can sign)."""

    def __init__(self, public_keys: Sequence[tuple[str, bytes]]) -> None:
        self._ring = KeyRing(jwks=[es256_public(kid, point) for kid, point in public_keys])
        if not self._ring.keys:
            raise ValueError("tickets need at least one public key")
        self._verifiers: dict[str, Verifier[Ticket]] = {}

    @classmethod
    def from_config(cls, config: TicketConfig) -> TicketVerifier:
        """The verifier of [tickets] (public_keys)."""
        keys = parse_ticket_keys("tickets.public_keys", config.public_keys, False)
        if not keys:
            raise ConfigError("tickets.public_keys is required to verify tickets (relays)")
        return cls(keys)

    def verify(self, token: str, relay: str) -> Ticket:
        """The ticket if a live ticket key signed it, unexpired and for this relay; else a clear error."""
        if not token:
            raise Unauthenticated(f"metadata {TICKET_KEY} (a ticket from Admission.Join) is required")
        if len(token) > MAX_TICKET_BYTES:
            raise Unauthenticated(f"ticket is {len(token)} bytes; at most {MAX_TICKET_BYTES} allowed")
        verifier = self._verifiers.get(relay)
        if verifier is None:
            if len(self._verifiers) >= 16:  # a relay verifies for its own address only
                self._verifiers.clear()
            verifier = self._verifiers[relay] = Verifier(
                "ticket",
                self._ring,
                lambda claims: _ticket(claims, relay),
                require=REQUIRED_CLAIMS,
                audience=relay,
                wrong_audience=lambda _: PermissionDenied(f"ticket is for another relay, not {relay}"),
                renew="join the room again",
            )
        return verifier.verify(token)


def _ticket(claims: dict[str, Any], relay: str) -> Ticket:
    try:
        return Ticket(
            room_id=str(claims["room"]),
            user_id=int(claims["sub"]),
            role=int(claims["role"]),
            relay=relay,
            expires_at=int(claims["exp"]),
            upstream=tuple(str(address) for address in claims.get("up", ())),
            room_version=int(claims.get("v", 0)),
            issued_ms=int(claims.get("at", 0)),
        )
    except (TypeError, ValueError, OverflowError) as exc:
        raise Unauthenticated("ticket claims are malformed") from exc
