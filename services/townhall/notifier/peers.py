"""Channels to the other notifiers, for forwarding graph calls to the owner of a followee."""

from __future__ import annotations

import grpc

from townhall.core.config import TlsConfig
from townhall.core.forwarding import Forwarding, peer_channel
from townhall.v1 import graph_pb2_grpc


class Peers:
    """Lazily opened channels to peer notifiers, by address."""

    def __init__(self, forwarding: Forwarding, tls: TlsConfig) -> None:
        self.forwarding = forwarding
        self._tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}

    def graph(self, address: str) -> graph_pb2_grpc.GraphStub:
        """A Graph stub for the notifier at `address`."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = peer_channel(address, self._tls)
        return graph_pb2_grpc.GraphStub(channel)

    async def close(self) -> None:
        """Closes every channel."""
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
