"""The admission cluster seen from one process: its membership and gRPC stubs to the other members."""

from __future__ import annotations

import grpc

from townhall.core.config import TlsConfig
from townhall.core.forwarding import Forwarding, peer_channel
from townhall.core.membership import Membership, ProbedMembership
from townhall.v1 import internal_pb2_grpc, moderation_pb2_grpc, rooms_pb2_grpc

# Forwarded room changes wait for Kafka on the owner (store.COMMIT_TIMEOUT_S) plus a margin, and
# are tried again at the next owner while the current one is unreachable or handing over.
FORWARD_TIMEOUT_S = 12.0
# The paths of the calls members make to each other (a service credential names the one it is for).
ACQUIRE = "/townhall.v1.Leases/Acquire"
OWNER_CREATE = "/townhall.v1.Owner/CreateRoom"
ROOMS = "/townhall.v1.Rooms/"
MODERATION = "/townhall.v1.Moderation/"


class AdmissionCluster:
    """Membership plus one channel per other member, opened on first use."""

    def __init__(self, membership: Membership, forwarding: Forwarding, tls: TlsConfig) -> None:
        self.membership = membership
        self.forwarding = forwarding
        self._tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}

    @property
    def me(self) -> str:
        """This process's member address."""
        return self.membership.me

    @property
    def leaving(self) -> bool:
        """Whether this process is handing its rooms over (SIGTERM)."""
        return isinstance(self.membership, ProbedMembership) and self.membership.leaving

    def is_owner(self, room_id: str) -> bool:
        """Whether this process owns the room (room changes, leases and schedules run there)."""
        return self.membership.is_owner(room_id)

    def owner(self, room_id: str) -> str:
        """The member that owns the room."""
        return self.membership.owner(room_id)

    def _channel(self, member: str) -> grpc.aio.Channel:
        channel = self._channels.get(member)
        if channel is None:
            channel = self._channels[member] = peer_channel(member, self._tls)
        return channel

    def rooms(self, member: str) -> rooms_pb2_grpc.RoomsStub:
        """The Rooms API of a member."""
        return rooms_pb2_grpc.RoomsStub(self._channel(member))

    def moderation(self, member: str) -> moderation_pb2_grpc.ModerationStub:
        """The Moderation API of a member."""
        return moderation_pb2_grpc.ModerationStub(self._channel(member))

    def owner_api(self, member: str) -> internal_pb2_grpc.OwnerStub:
        """The internal Owner API of a member."""
        return internal_pb2_grpc.OwnerStub(self._channel(member))

    def leases(self, member: str) -> internal_pb2_grpc.LeasesStub:
        """The internal Leases API of a member."""
        return internal_pb2_grpc.LeasesStub(self._channel(member))

    async def close(self) -> None:
        """Closes every channel."""
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
