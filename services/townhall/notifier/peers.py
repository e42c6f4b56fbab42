"""Channels to the other notifiers: graph calls forwarded to a key's owner, and moving keys between them."""

from __future__ import annotations

import asyncio

import grpc

from townhall.core.config import TlsConfig
from townhall.core.forwarding import Forwarding, peer_channel
from townhall.internal.v1 import internal_pb2_grpc
from townhall.v1 import graph_pb2_grpc


class NotifierChannels:
    """Lazily opened channels to peer notifiers, by address."""

    def __init__(self, forwarding: Forwarding, tls: TlsConfig) -> None:
        self.forwarding = forwarding
        self._tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = peer_channel(address, self._tls)
        return channel

    async def ready(self, address: str, timeout_s: float) -> bool:
        """Whether the notifier at `address` can be reached within `timeout_s` (a peer that just started,
        or was down when last dialled, is reachable as soon as it listens)."""
        try:
            await asyncio.wait_for(self._channel(address).channel_ready(), timeout_s)
        except TimeoutError:
            return False
        return True

    def graph(self, address: str) -> graph_pb2_grpc.GraphStub:
        """A Graph stub for the notifier at `address`."""
        return graph_pb2_grpc.GraphStub(self._channel(address))

    def shards(self, address: str) -> internal_pb2_grpc.GraphShardsStub:
        """The internal GraphShards stub (moving keys between notifiers) of the notifier at `address`."""
        return internal_pb2_grpc.GraphShardsStub(self._channel(address))

    async def close(self) -> None:
        """Closes every channel."""
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
