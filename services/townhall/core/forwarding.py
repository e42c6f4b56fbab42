"""Calls one member forwards to another on a user's behalf, marked with a signed token.

The receiver of a marked call serves it itself, even if its view of the members differs for a
moment, so a call is forwarded at most once. The mark is an HMAC of the user and the time under
the cluster's shared secret: a client cannot set it to make a non-owner apply a change.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable

import grpc

from townhall.core.errors import PermissionDenied
from townhall.core.identity import USER_KEY
from townhall.core.identity import metadata as user_metadata

FORWARDED_KEY = "townhall-forwarded"
# Clock skew and queueing a forwarded call may see between two members.
MAX_AGE_S = 60
# A peer that was down when first dialled must be usable as soon as it is back: gRPC's default
# reconnect backoff (1 s, growing to minutes) fails every call at once meanwhile.
PEER_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def peer_channel(address: str) -> grpc.aio.Channel:
    """A channel from one member to another (calls on it should pass wait_for_ready=True)."""
    return grpc.aio.insecure_channel(address, options=PEER_CHANNEL_OPTIONS)


class Forwarding:
    """Signs and checks the forwarded-call mark with a key derived from the shared secret."""

    def __init__(self, secret: str) -> None:
        # A key of its own, so a forwarding mark can never be confused with a ticket signature.
        self._key = hashlib.sha256(b"townhall-forwarding\x00" + secret.encode()).digest()

    def _mac(self, user: str, stamp: str) -> str:
        return hmac.new(self._key, f"{user}.{stamp}".encode(), hashlib.sha256).hexdigest()[:32]

    def sign(self, user: int, now: float | None = None) -> tuple[tuple[str, str], ...]:
        """Metadata for a call forwarded on behalf of `user`: its identity and the signed mark."""
        stamp = str(int(time.time() if now is None else now))
        return (*user_metadata(user), (FORWARDED_KEY, f"{stamp}.{self._mac(str(user), stamp)}"))

    def check(self, context: grpc.aio.ServicerContext, now: float | None = None) -> bool:
        """Whether the call carries a valid mark; a mark that does not verify is PERMISSION_DENIED."""
        return self.check_metadata(context.invocation_metadata(), now)

    def check_metadata(
        self, metadata: Iterable[tuple[str, str | bytes]] | None, now: float | None = None
    ) -> bool:
        """`check` on raw invocation metadata."""
        pairs = dict(metadata or ())
        mark = pairs.get(FORWARDED_KEY)
        if mark is None:
            return False
        text = mark if isinstance(mark, str) else mark.decode("ascii", "replace")
        user = pairs.get(USER_KEY, "")
        user = user if isinstance(user, str) else user.decode("ascii", "replace")
        stamp, _, mac = text.partition(".")
        current = time.time() if now is None else now
        fresh = stamp.isdigit() and abs(current - int(stamp)) <= MAX_AGE_S
        if not (fresh and hmac.compare_digest(mac, self._mac(user, stamp))):
            raise PermissionDenied(f"metadata {FORWARDED_KEY} is reserved for calls between Townhall members")
        return True
