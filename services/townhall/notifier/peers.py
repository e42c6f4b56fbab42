"""Channels to the other notifiers, for forwarding graph calls to the owner of a followee."""

from __future__ import annotations

import grpc

from townhall.core.identity import metadata
from townhall.v1 import graph_pb2_grpc

# Marks a forwarded call: the receiver serves it locally even if its own view of the members
# differs for a moment, so a call is forwarded at most once.
FORWARDED_KEY = "townhall-forwarded"


class Peers:
    """Lazily opened channels to peer notifiers, by address."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def graph(self, address: str) -> graph_pb2_grpc.GraphStub:
        """A Graph stub for the notifier at `address`."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        return graph_pb2_grpc.GraphStub(channel)

    async def close(self) -> None:
        """Closes every channel."""
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


def forwarded_metadata(user: int) -> tuple[tuple[str, str], ...]:
    """Metadata for a call forwarded on behalf of `user`."""
    return (*metadata(user), (FORWARDED_KEY, "1"))


def is_forwarded(context: grpc.aio.ServicerContext) -> bool:
    """Whether this call was already forwarded once."""
    return any(key == FORWARDED_KEY for key, _ in context.invocation_metadata() or ())
