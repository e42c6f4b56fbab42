"""Calls one member makes to another, on its internal port: its own internal calls, and client calls
it forwards on a user's behalf (the user's own token plus a service credential for that member and
method).

The receiver checks the user's token as for any call, and serves a forwarded call itself, even if its
view of the members differs for a moment, so a call is forwarded at most once. (The notifier, whose
members hold data that moves with the membership, forwards a call again while views differ, at most
MAX_HOPS times in all, counted in the HOPS_KEY metadata.) Only the internal port takes forwarded calls,
and only with a credential that a member of the same service minted for this member and method
(core/credentials.py): a client cannot pass a call off as forwarded.

Every call that must run on a key's owner (an admission room change, a moderation rule, a notifier
graph call) goes there through `on_owner`, under one policy:
- the owner is asked again before every attempt, and a call this process owns runs here (unless it
  finds there that a newer view gave the key to another member: `Elsewhere`, then it goes there);
- a forwarded call does not wait for the connection (no `wait_for_ready`): an owner that is down
  fails at once, and the next attempt asks the membership again, which drops a dead owner within a
  few probes;
- UNAVAILABLE (no answer, or an owner handing its keys over) is tried again, after 50 ms doubling to
  at most 500 ms, until `timeout_s` has passed since the first attempt; then the last UNAVAILABLE is
  the answer;
- any other status is the owner's answer, passed to the caller as it is (code, message and
  retry-after), so a forwarded call fails exactly as it would on the owner.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import grpc

from townhall.core.auth import AUTHORIZATION, Authenticator, value
from townhall.core.channels import RECONNECT_OPTIONS, channel
from townhall.core.config import TlsConfig
from townhall.core.credentials import ServiceCredential
from townhall.core.errors import from_rpc
from townhall.core.identity import forwarded

T = TypeVar("T")

HOPS_KEY = "townhall-hops"
# Waits between forwarding attempts that found the owner UNAVAILABLE: the first, and the most.
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 0.5
MAX_HOPS = 3
# A peer that was down when first dialled must be usable as soon as it is back (RECONNECT_OPTIONS), and
# dead peers are found by keepalive as well as by the health probes.
PEER_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    *RECONNECT_OPTIONS,
]


def peer_channel(address: str, tls: TlsConfig) -> grpc.aio.Channel:
    """A channel from one member to another."""
    return channel(address, tls, PEER_CHANNEL_OPTIONS)


class Forwarding:
    """Builds the metadata of forwarded and internal calls, and recognises forwarded ones."""

    def __init__(self, auth: Authenticator) -> None:
        self._credential: ServiceCredential = auth.credential

    def internal(self, member: str, method: str) -> tuple[tuple[str, str], ...]:
        """Metadata of an internal call (`method`: its path) to `member`, on no user's behalf."""
        return self._credential.metadata(member, method)

    def forward(
        self, context: grpc.aio.ServicerContext, member: str, method: str, hops: int = 1
    ) -> tuple[tuple[str, str], ...]:
        """Metadata for forwarding the current call to `member`: the caller's token and a credential
        (`hops`: how many times the call will have been forwarded, this time included)."""
        return self.forward_metadata(context.invocation_metadata(), member, method, hops)

    def forward_metadata(
        self, metadata: Iterable[tuple[str, str | bytes]] | None, member: str, method: str, hops: int = 1
    ) -> tuple[tuple[str, str], ...]:
        """`forward` on raw invocation metadata."""
        token = value(metadata, AUTHORIZATION)
        user = ((AUTHORIZATION, token),) if token is not None else ()
        count = ((HOPS_KEY, str(hops)),) if hops > 1 else ()
        return (*user, *self._credential.metadata(member, method), *count)

    def hops(self, context: grpc.aio.ServicerContext) -> int:
        """How many times the current call was forwarded: 0 from a client, else the count its forwarder
        wrote (a count that is not one counts as the most)."""
        if not self.check(context):
            return 0
        mark = value(context.invocation_metadata(), HOPS_KEY) or "1"
        return int(mark) if mark.isdigit() and 0 < int(mark) <= MAX_HOPS else MAX_HOPS

    def check(self, context: grpc.aio.ServicerContext) -> bool:
        """Whether another member of this service passed the current call on (only on the internal port)."""
        return forwarded()


class Elsewhere(Exception):
    """Raised by an `on_owner` call's `here` that finds the key owned by another member after all."""

    def __init__(self, owner: str) -> None:
        super().__init__(owner)
        self.owner = owner


async def on_owner(
    owner: Callable[[], str | None],
    here: Callable[[], Awaitable[T]],
    there: Callable[[str, float], Awaitable[T]],
    timeout_s: float,
    retried: Callable[[], object] | None = None,
) -> T:
    """Runs a call on its key's owner under the one forwarding policy (see the module).

    `owner()` names the owner now (None: this process); `here()` runs the call here; `there(member,
    timeout_s)` forwards it, without wait_for_ready, within the time left. `retried` is called before
    each new attempt (a metric).
    """
    deadline = time.monotonic() + timeout_s
    delay = RETRY_FIRST_S
    while True:
        member = owner()
        if member is None:
            try:
                return await here()
            except Elsewhere as elsewhere:
                member = elsewhere.owner
        try:
            return await there(member, max(0.1, deadline - time.monotonic()))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() + delay >= deadline:
                raise from_rpc(exc) from exc
        if retried is not None:
            retried()
        await asyncio.sleep(delay)
        delay = min(RETRY_MAX_S, delay * 2)
