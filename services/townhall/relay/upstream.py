"""Relay-to-relay pulls: one channel per upstream relay, chunks received as the origin's raw bytes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from townhall.core.channels import channel as open_channel
from townhall.core.config import TlsConfig
from townhall.core.credentials import ServiceCredential
from townhall.core.forwarding import PEER_CHANNEL_OPTIONS
from townhall.v1.relay_pb2 import PullRequest

PULL_METHOD = "/townhall.v1.Relay/Pull"


def _identity(data: bytes) -> bytes:
    return data


class Upstreams:
    """Pull streams to upstream relays, sharing one HTTP/2 connection per upstream relay."""

    def __init__(self, max_message_bytes: int, tls: TlsConfig, credential: ServiceCredential) -> None:
        self._tls = tls
        self._credential = credential
        # Quick reconnects (as between admission members): a restarted upstream is usable at once.
        self._options = [
            *((k, v) for k, v in PEER_CHANNEL_OPTIONS if k != "grpc.keepalive_time_ms"),
            ("grpc.max_receive_message_length", 4 * max_message_bytes),
            ("grpc.keepalive_time_ms", 20_000),
            # A channel opened after forget() dials anew instead of sharing the old one's connection.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        self._channels: dict[str, grpc.aio.Channel] = {}

    def pull(
        self,
        room_id: str,
        path: tuple[str, ...],
        resume_after: int,
        resume_epoch: int = 0,
        heartbeat_ms: int = 0,
    ) -> AsyncIterator[bytes]:
        """The room's chunks from path[-1] (internal addresses, origin first), each exactly as the origin
        serialised it, and (with heartbeat_ms) empty messages while the room is silent.

        The call also has initial_metadata(): the upstream sends it as soon as the pull is open.
        """
        address = path[-1]
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, self._tls, self._options)
        call = channel.unary_stream(
            PULL_METHOD, request_serializer=PullRequest.SerializeToString, response_deserializer=_identity
        )
        # A service credential for this relay's Pull: only relays make one; the request says the path above.
        stream: AsyncIterator[bytes] = call(
            PullRequest(
                room_id=room_id,
                resume_after=resume_after,
                resume_epoch=resume_epoch,
                upstream=path[:-1],
                heartbeat_ms=heartbeat_ms,
            ),
            metadata=self._credential.metadata(address, PULL_METHOD),
        )
        return stream

    async def forget(self, address: str) -> None:
        """Closes the channel to a relay that went silent: the next pull dials a new connection
        (a connection cut without a reset would otherwise stay until keepalive gives up on it)."""
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close(grace=None)

    async def close(self) -> None:
        """Closes every upstream channel (their pulls end)."""
        for channel in self._channels.values():
            await channel.close(grace=None)
        self._channels.clear()
