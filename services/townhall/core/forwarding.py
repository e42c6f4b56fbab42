"""Calls one member forwards to another on a user's behalf: the user's own token, the service
credential and the forwarded mark.

The receiver checks the user's token as for any call, and serves a marked call itself, even if its
view of the members differs for a moment, so a call is forwarded at most once. The mark counts only
next to a valid service credential, which only Townhall processes can make: a client cannot mark a
call as forwarded.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from townhall.core.auth import AUTHORIZATION, SERVICE_KEY, Authenticator, value
from townhall.core.channels import channel
from townhall.core.config import TlsConfig
from townhall.core.errors import PermissionDenied

FORWARDED_KEY = "townhall-forwarded"
# A peer that was down when first dialled must be usable as soon as it is back: gRPC's default
# reconnect backoff (1 s, growing to minutes) fails every call at once meanwhile.
PEER_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def peer_channel(address: str, tls: TlsConfig) -> grpc.aio.Channel:
    """A channel from one member to another (calls on it should pass wait_for_ready=True)."""
    return channel(address, tls, PEER_CHANNEL_OPTIONS)


class Forwarding:
    """Builds the metadata of forwarded and internal calls, and recognises forwarded ones."""

    def __init__(self, auth: Authenticator) -> None:
        self._auth = auth

    def internal(self) -> tuple[tuple[str, str], ...]:
        """Metadata of a call between members made on no user's behalf (leases, forwarded creations)."""
        return self._auth.credential.metadata()

    def forward(self, context: grpc.aio.ServicerContext) -> tuple[tuple[str, str], ...]:
        """Metadata for forwarding the current call: the caller's token and the service credential."""
        return self.forward_metadata(context.invocation_metadata())

    def forward_metadata(
        self, metadata: Iterable[tuple[str, str | bytes]] | None
    ) -> tuple[tuple[str, str], ...]:
        """`forward` on raw invocation metadata."""
        token = value(metadata, AUTHORIZATION)
        user = ((AUTHORIZATION, token),) if token is not None else ()
        return (*user, *self._auth.credential.metadata(), (FORWARDED_KEY, "1"))

    def check(self, context: grpc.aio.ServicerContext) -> bool:
        """Whether a member forwarded the call; a mark without a valid credential is PERMISSION_DENIED."""
        return self.check_metadata(context.invocation_metadata())

    def check_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        """`check` on raw invocation metadata."""
        if value(metadata, FORWARDED_KEY) is None:
            return False
        if self._auth.service(metadata) is None:
            raise PermissionDenied(
                f"metadata {FORWARDED_KEY} is reserved for calls between Townhall members "
                f"(with the service credential, metadata {SERVICE_KEY})"
            )
        return True
