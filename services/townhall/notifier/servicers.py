"""Thin gRPC servicers: identity and validation, then the follower store (or its owner) or the Inbox hub."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np

from townhall.core import validation
from townhall.core.errors import InvalidArgument, PermissionDenied, Unavailable, from_rpc
from townhall.core.identity import caller
from townhall.notifier.blocks import valid_pairs
from townhall.notifier.inbox import Hub
from townhall.notifier.metrics import FOLLOWERS_STORED, FOLLOWS, FORWARDED, UNFOLLOWS
from townhall.notifier.peers import Peers
from townhall.notifier.placement import Placement
from townhall.notifier.rooms import RoomStates
from townhall.notifier.store import SqliteFollowerStore
from townhall.v1 import graph_pb2, graph_pb2_grpc, inbox_pb2, inbox_pb2_grpc

FORWARD_TIMEOUT_S = 10.0
GRAPH = "/townhall.v1.Graph/"
LIST_DEFAULT, LIST_MAX = 1000, 10_000
# Pairs an Import holds in memory before writing them to the store (16 bytes each).
IMPORT_FLUSH_PAIRS = 1 << 20
# The server's 64 KiB message limit allows about 4,000 16-byte pairs per chunk anyway.
MAX_IMPORT_CHUNK_PAIRS = 4000


class GraphServicer(graph_pb2_grpc.GraphServicer):
    """The graph API; a call about a followee whose shard lives on another notifier is forwarded there."""

    def __init__(
        self,
        store: SqliteFollowerStore,
        placement: Placement,
        peers: Peers,
        rooms: RoomStates,
        reminders_per_user: int = 0,
    ) -> None:
        self._store = store
        self._placement = placement
        self._peers = peers
        self._rooms = rooms
        self._reminders_per_user = reminders_per_user

    def _remote(self, owner: str, context: grpc.aio.ServicerContext) -> bool:
        return owner != self._placement.me and not self._peers.forwarding.check(context)

    async def Follow(
        self, request: graph_pb2.FollowRequest, context: grpc.aio.ServicerContext
    ) -> graph_pb2.FollowResponse:
        """The caller follows followee_id; following twice is accepted."""
        user = caller(context)
        followee = validation.user_id(request.followee_id, "followee_id")
        if followee == user:
            raise InvalidArgument("followee_id is the caller: users cannot follow themselves")
        owner = self._placement.followee_owner(followee)
        if self._remote(owner, context):
            FORWARDED.labels("Follow").inc()
            return await _forward(
                self._peers.graph(owner).Follow(
                    request,
                    metadata=self._peers.forwarding.forward(context, owner, GRAPH + "Follow"),
                    timeout=FORWARD_TIMEOUT_S,
                )
            )
        created = await self._store.follow(followee, user)
        if created:
            FOLLOWS.inc()
            FOLLOWERS_STORED.inc()
        return graph_pb2.FollowResponse(created=created)

    async def Unfollow(
        self, request: graph_pb2.UnfollowRequest, context: grpc.aio.ServicerContext
    ) -> graph_pb2.UnfollowResponse:
        """The caller stops following followee_id; unfollowing twice is accepted."""
        user = caller(context)
        followee = validation.user_id(request.followee_id, "followee_id")
        owner = self._placement.followee_owner(followee)
        if self._remote(owner, context):
            FORWARDED.labels("Unfollow").inc()
            return await _forward(
                self._peers.graph(owner).Unfollow(
                    request,
                    metadata=self._peers.forwarding.forward(context, owner, GRAPH + "Unfollow"),
                    timeout=FORWARD_TIMEOUT_S,
                )
            )
        removed = await self._store.unfollow(followee, user)
        if removed:
            UNFOLLOWS.inc()
            FOLLOWERS_STORED.dec()
        return graph_pb2.UnfollowResponse(removed=removed)

    async def CountFollowers(
        self, request: graph_pb2.CountFollowersRequest, context: grpc.aio.ServicerContext
    ) -> graph_pb2.CountFollowersResponse:
        """How many users follow user_id."""
        user = validation.user_id(request.user_id, "user_id")
        owner = self._placement.followee_owner(user)
        if self._remote(owner, context):
            FORWARDED.labels("CountFollowers").inc()
            return await _forward(
                self._peers.graph(owner).CountFollowers(
                    request,
                    metadata=self._peers.forwarding.forward(context, owner, GRAPH + "CountFollowers"),
                    timeout=FORWARD_TIMEOUT_S,
                )
            )
        return graph_pb2.CountFollowersResponse(count=await self._store.count(user))

    async def ListFollowers(
        self, request: graph_pb2.ListFollowersRequest, context: grpc.aio.ServicerContext
    ) -> graph_pb2.ListFollowersResponse:
        """One ascending page of user_id's followers after after_id: only user_id may list them."""
        user = validation.user_id(request.user_id, "user_id")
        me = caller(context)
        if user != me:
            # Who follows whom is the followee's to see; how many is public (CountFollowers).
            raise PermissionDenied(
                f"user {me} may not list the followers of user {user}: a follower list is shown only to "
                "its owner (CountFollowers gives anyone the count)"
            )
        validation.bounded(request.after_id, "after_id", 0, validation.USER_ID_MAX)
        limit = validation.bounded(request.limit, "limit", 0, LIST_MAX) or LIST_DEFAULT
        owner = self._placement.followee_owner(user)
        if self._remote(owner, context):
            FORWARDED.labels("ListFollowers").inc()
            return await _forward(
                self._peers.graph(owner).ListFollowers(
                    request,
                    metadata=self._peers.forwarding.forward(context, owner, GRAPH + "ListFollowers"),
                    timeout=FORWARD_TIMEOUT_S,
                )
            )
        ids = await self._store.page(user, request.after_id, limit)
        return graph_pb2.ListFollowersResponse(follower_ids=ids.tolist())

    async def Import(
        self, request_iterator: AsyncIterator[graph_pb2.ImportChunk], context: grpc.aio.ServicerContext
    ) -> graph_pb2.ImportSummary:
        """Adds streamed (followee, follower) pairs; pairs owned elsewhere are forwarded to their owner."""
        forwarded = self._peers.forwarding.check(context)
        received = created = invalid = 0
        buffered: list[np.ndarray] = []
        waiting = 0

        async def flush() -> None:
            nonlocal created, waiting
            if not buffered:
                return
            pairs = np.concatenate(buffered)
            buffered.clear()
            waiting = 0
            parts = {self._placement.me: pairs} if forwarded else self._placement.split_pairs(pairs)
            for owner, part in parts.items():
                if owner == self._placement.me:
                    added = await self._store.import_edges(part)
                    FOLLOWERS_STORED.inc(added)
                    FOLLOWS.inc(added)
                    created += added
                else:
                    FORWARDED.labels("Import").inc()
                    created += await self._forward_import(owner, part, context)

        async for chunk in request_iterator:
            if len(chunk.pairs) % 16:
                raise InvalidArgument(
                    f"pairs is {len(chunk.pairs)} bytes: not whole 16-byte (followee, follower) pairs"
                )
            pairs = np.frombuffer(chunk.pairs, dtype="<u8").astype(np.uint64).reshape(-1, 2)
            if len(pairs) > MAX_IMPORT_CHUNK_PAIRS:
                raise InvalidArgument(
                    f"a chunk holds at most {MAX_IMPORT_CHUNK_PAIRS} pairs, not {len(pairs)}"
                )
            received += len(pairs)
            ok = valid_pairs(pairs)
            invalid += int(len(pairs) - ok.sum())
            buffered.append(pairs[ok])
            waiting += int(ok.sum())
            if waiting >= IMPORT_FLUSH_PAIRS:
                await flush()
        await flush()
        return graph_pb2.ImportSummary(received=received, created=created, invalid=invalid)

    async def _forward_import(self, owner: str, pairs: np.ndarray, context: grpc.aio.ServicerContext) -> int:
        async def chunks() -> AsyncIterator[graph_pb2.ImportChunk]:
            for i in range(0, len(pairs), 3000):
                yield graph_pb2.ImportChunk(
                    pairs=np.ascontiguousarray(pairs[i : i + 3000], dtype="<u8").tobytes()
                )

        summary = await _forward(
            self._peers.graph(owner).Import(
                chunks(),
                metadata=self._peers.forwarding.forward(context, owner, GRAPH + "Import"),
                timeout=600,
                wait_for_ready=True,
            )
        )
        return int(summary.created)

    async def RemindMe(
        self, request: graph_pb2.RemindMeRequest, context: grpc.aio.ServicerContext
    ) -> graph_pb2.RemindMeResponse:
        """The caller will be notified when room_id starts (a room that exists and has not started)."""
        user = caller(context)
        room = validation.room_id(request.room_id)
        await self._rooms.before_start(room)
        owner = self._placement.room_owner(room)
        if self._remote(owner, context):
            FORWARDED.labels("RemindMe").inc()
            return await _forward(
                self._peers.graph(owner).RemindMe(
                    request,
                    metadata=self._peers.forwarding.forward(context, owner, GRAPH + "RemindMe"),
                    timeout=FORWARD_TIMEOUT_S,
                )
            )
        return graph_pb2.RemindMeResponse(
            created=await self._store.remind(room, user, self._reminders_per_user)
        )


async def _forward(call):  # type: ignore[no-untyped-def]
    """The owner's answer, or UNAVAILABLE naming what failed (the caller may retry)."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            raise InvalidArgument(exc.details() or "refused by the owner") from exc
        if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            raise from_rpc(exc) from exc
        raise Unavailable(
            f"the notifier that owns this graph shard did not answer: {exc.code().name}"
        ) from exc


class InboxServicer(inbox_pb2_grpc.InboxServicer):
    """Subscribe: the caller's notifications while the stream is open."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    async def Subscribe(
        self, request: inbox_pb2.InboxSubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inbox_pb2.Notification]:
        """Streams notifications; initial metadata is sent once the caller is registered."""
        user = caller(context)
        if self._hub.closed:
            raise Unavailable("this notifier is shutting down; reconnect")
        sub = self._hub.connect(user)
        try:
            # Lets a client know from which moment on it will be notified.
            await context.send_initial_metadata(())
            while (notification := await sub.get()) is not None:
                yield notification
        finally:
            self._hub.disconnect(sub)
        if sub.error is not None:
            raise sub.error
