"""Tickets: what admission grants and relays verify locally, without calling admission."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from townhall.core.config import TicketConfig, parse_keys
from townhall.core.errors import PermissionDenied, Unauthenticated
from townhall.core.tokens import KeyRing, Verifier
from townhall.v1.common_pb2 import Role

TICKET_KEY = "townhall-ticket"
MAX_TICKET_BYTES = 1024
# Room ids as admission makes them: written into a ticket's JSON without escaping.
_SAFE = re.compile(r"[A-Za-z0-9_-]*")
_MAX_PATHS = 10_000
# The role of a relay-to-relay pull credential; outside the Role enum so no user can hold it.
ROLE_RELAY = 1000
_REQUIRED = ("exp", "sub", "aud", "room", "role")


@dataclass(frozen=True, slots=True)
class Ticket:
    """A verified ticket: this user may use this relay for this room, in this role, until expiry."""

    room_id: str
    user_id: int
    role: int
    relay: str
    expires_at: int  # Unix seconds
    # Relays above this one in the room's tree, origin first, nearest last; empty on the origin.
    upstream: tuple[str, ...] = ()
    # The room's version when admission issued the ticket (claim `v`): a relay refuses the ticket of a
    # user removed at a later version, and trusts a ticket newer than its own copy of the room.
    room_version: int = 0

    @property
    def on_stage(self) -> bool:
        """Whether the ticket allows publishing audio."""
        return self.role in (Role.ROLE_HOST, Role.ROLE_COHOST, Role.ROLE_SPEAKER)


class TicketSigner:
    """Issues and verifies tickets (JWT, HS256, `kid` header) with the ticket keys.

    The first key signs; every key verifies, so a new key is rolled out to every relay and admission
    process first, admission then signs with it, and the old key goes once its tickets have expired.
    """

    def __init__(self, keys: Sequence[tuple[str, str]], ttl_s: int) -> None:
        self._ring = KeyRing(keys)
        if self._ring.signer is None:
            raise ValueError("tickets need at least one key")
        self._key = self._ring.signer
        self._ttl_s = ttl_s
        self._relay_json: dict[tuple[str, tuple[str, ...]], tuple[str, str]] = {}
        self._verifiers: dict[str, Verifier[Ticket]] = {}

    @classmethod
    def from_config(cls, config: TicketConfig) -> TicketSigner:
        """The signer for [tickets] (keys and ttl_s)."""
        return cls(parse_keys("tickets.keys", config.keys), config.ttl_s)

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
        expires = int((time.time() if now is None else now) + self._ttl_s)
        return Ticket(room_id, user_id, role, relay, expires, tuple(upstream), room_version)

    def pull_token(self, room_id: str, upstream: tuple[str, ...]) -> str:
        """A signed credential for a relay to pull the room from upstream[-1] (the rest is its path)."""
        return self.sign(self.issue(room_id, 0, ROLE_RELAY, upstream[-1], upstream=upstream[:-1]))

    def sign(self, ticket: Ticket) -> str:
        """The ticket's signed text."""
        # A plain HS256 JWT, the same bytes PyJWT makes for these claims at a quarter of its cost:
        # tickets are signed on the join path. The relay part (audience and path) is encoded once
        # per relay path; verification stays with PyJWT.
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
        return self._key.sign(
            f'{{"sub":"{int(ticket.user_id)}","room":{room_json},"role":{int(ticket.role)},'
            f'"aud":{relay[0]},"exp":{int(ticket.expires_at)}{relay[1]}{version}}}'
        )

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
                require=_REQUIRED,
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
        )
    except (TypeError, ValueError) as exc:
        raise Unauthenticated("ticket claims are malformed") from exc
