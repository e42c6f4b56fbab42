"""Calls one member makes to another, on its internal port: its own internal calls, and client calls
it forwards on a user's behalf (the user's own token plus a service credential for that member and
method).

The receiver checks the user's token as for any call, and serves a forwarded call itself, even if its
view of the members differs for a moment, so a call is forwarded at most once. Only the internal port
takes forwarded calls, and only with a credential that a member of the same service minted for this
member and method (core/credentials.py): a client cannot pass a call off as forwarded.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from townhall.core.auth import AUTHORIZATION, Authenticator, value
from townhall.core.channels import RECONNECT_OPTIONS, channel
from townhall.core.config import TlsConfig
from townhall.core.credentials import ServiceCredential
from townhall.core.identity import forwarded

# A peer that was down when first dialled must be usable as soon as it is back (RECONNECT_OPTIONS), and
# dead peers are found by keepalive as well as by the health probes.
PEER_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    *RECONNECT_OPTIONS,
]


def peer_channel(address: str, tls: TlsConfig) -> grpc.aio.Channel:
    """A channel from one member to another (calls on it should pass wait_for_ready=True)."""
    return channel(address, tls, PEER_CHANNEL_OPTIONS)


class Forwarding:
    """Builds the metadata of forwarded and internal calls, and recognises forwarded ones."""

    def __init__(self, auth: Authenticator) -> None:
        self._credential: ServiceCredential = auth.credential

    def internal(self, member: str, method: str) -> tuple[tuple[str, str], ...]:
        """Metadata of an internal call (`method`: its path) to `member`, on no user's behalf."""
        return self._credential.metadata(member, method)

    def forward(
        self, context: grpc.aio.ServicerContext, member: str, method: str
    ) -> tuple[tuple[str, str], ...]:
        """Metadata for forwarding the current call to `member`: the caller's token and a credential."""
        return self.forward_metadata(context.invocation_metadata(), member, method)

    def forward_metadata(
        self, metadata: Iterable[tuple[str, str | bytes]] | None, member: str, method: str
    ) -> tuple[tuple[str, str], ...]:
        """`forward` on raw invocation metadata."""
        token = value(metadata, AUTHORIZATION)
        user = ((AUTHORIZATION, token),) if token is not None else ()
        return (*user, *self._credential.metadata(member, method))

    def check(self, context: grpc.aio.ServicerContext) -> bool:
        """Whether another member of this service passed the current call on (only on the internal port)."""
        return forwarded()
