"""Tickets: what admission grants and relays verify locally, without calling admission."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from dataclasses import dataclass

import jwt

from townhall.core.errors import PermissionDenied, Unauthenticated
from townhall.v1.common_pb2 import Role

TICKET_KEY = "townhall-ticket"
MAX_TICKET_BYTES = 1024
_ALGORITHM = "HS256"
# The JOSE header of every ticket, encoded once: tickets are signed on the join path.
_HEADER = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=") + b"."
# Room ids as admission makes them: written into a ticket's JSON without escaping.
_SAFE = re.compile(r"[A-Za-z0-9_-]*")
_MAX_PATHS = 10_000
# The role of a relay-to-relay pull credential; outside the Role enum so no user can hold it.
ROLE_RELAY = 1000


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

    @property
    def on_stage(self) -> bool:
        """Whether the ticket allows publishing audio."""
        return self.role in (Role.ROLE_HOST, Role.ROLE_COHOST, Role.ROLE_SPEAKER)


class TicketSigner:
    """Issues and verifies HMAC-signed tickets (JWT, HS256) with a shared secret."""

    def __init__(self, secret: str, ttl_s: int) -> None:
        self._secret = secret.encode()
        self._ttl_s = ttl_s
        self._relay_json: dict[tuple[str, tuple[str, ...]], tuple[str, str]] = {}

    def issue(
        self,
        room_id: str,
        user_id: int,
        role: int,
        relay: str,
        now: float | None = None,
        upstream: tuple[str, ...] = (),
    ) -> Ticket:
        """A ticket for the given grant, expiring ttl_s from now."""
        expires = int((time.time() if now is None else now) + self._ttl_s)
        return Ticket(room_id, user_id, role, relay, expires, tuple(upstream))

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
        claims = (
            f'{{"sub":"{int(ticket.user_id)}","room":{room_json},"role":{int(ticket.role)},'
            f'"aud":{relay[0]},"exp":{int(ticket.expires_at)}{relay[1]}}}'
        )
        body = _HEADER + _b64(claims.encode())
        return (body + b"." + _b64(hmac.digest(self._secret, body, hashlib.sha256))).decode()

    def verify(self, token: str, relay: str) -> Ticket:
        """The ticket if it is signed by us, unexpired and for this relay; else a clear error."""
        if not token:
            raise Unauthenticated(f"metadata {TICKET_KEY} (a ticket from Admission.Join) is required")
        if len(token) > MAX_TICKET_BYTES:
            raise Unauthenticated(f"ticket is {len(token)} bytes; at most {MAX_TICKET_BYTES} allowed")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                audience=relay,
                options={"require": ["exp", "sub", "aud", "room", "role"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("ticket has expired: join the room again") from exc
        except jwt.InvalidAudienceError as exc:
            raise PermissionDenied(f"ticket is for another relay, not {relay}") from exc
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"ticket is not valid: {exc}") from exc
        try:
            return Ticket(
                room_id=str(claims["room"]),
                user_id=int(claims["sub"]),
                role=int(claims["role"]),
                relay=relay,
                expires_at=int(claims["exp"]),
                upstream=tuple(str(address) for address in claims.get("up", ())),
            )
        except (TypeError, ValueError) as exc:
            raise Unauthenticated("ticket claims are malformed") from exc


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")
