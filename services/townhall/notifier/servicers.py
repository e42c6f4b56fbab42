"""Thin gRPC servicers: identity and validation, then the follower store (or its owner), the handover or the
Inbox hub."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
import numpy as np

from townhall.core import pages, validation
from townhall.core.errors import InvalidArgument, PermissionDenied, Reason, Unavailable
from townhall.core.forwarding import MAX_HOPS, Elsewhere, on_owner
from townhall.core.identity import caller
from townhall.internal.v1 import internal_pb2, internal_pb2_grpc
from townhall.notifier.blocks import valid_pairs
from townhall.notifier.handover import Handover
from townhall.notifier.inbox import InboxDelivery
from townhall.notifier.inbox_resume import Backlog, position
from townhall.notifier.metrics import FOLLOWERS_STORED, FOLLOWS, FORWARDED, UNFOLLOWS
from townhall.notifier.peers import NotifierChannels
from townhall.notifier.placement import ShardOwners
from townhall.notifier.rooms import RoomStates
from townhall.notifier.store import Moved, SqliteFollowerStore, followee_key, room_key
from townhall.v1 import graph_pb2, graph_pb2_grpc, inbox_pb2, inbox_pb2_grpc

T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]

FORWARD_TIMEOUT_S = 10.0
# A forwarded Import carries up to IMPORT_FLUSH_PAIRS pairs.
IMPORT_TIMEOUT_S = 600.0
GRAPH = "/townhall.v1.Graph/"
LIST_DEFAULT, LIST_MAX = 1000, 10_000
# Pairs an Import holds in memory before writing them to the store (16 bytes each).
IMPORT_FLUSH_PAIRS = 1 << 20
# The server's 64 KiB message limit allows about 4,000 16-byte pairs per chunk anyway.
MAX_IMPORT_CHUNK_PAIRS = 4000


class GraphServicer(graph_pb2_grpc.GraphServicer):
    """The graph API; a call about a key (a followee, a room's reminders) owned by another notifier is
    forwarded there, and the owner settles the key (notifier/handover.py) before serving it."""

    def __init__(
        self,
        store: SqliteFollowerStore,
        placement: ShardOwners,
        peers: NotifierChannels,
        handover: Handover,
        rooms: RoomStates,
        reminders_per_user: int = 0,
    ) -> None:
        self._store = store
        self._placement = placement
        self._peers = peers
        self._handover = handover
        self._rooms = rooms
        self._reminders_per_user = reminders_per_user

    async def _at_owner(
        self,
        method: str,
        key: str,
        context: grpc.aio.ServicerContext,
        local: Callable[[], Awaitable[T]],
        remote: Callable[[graph_pb2_grpc.GraphStub, Metadata, float], Awaitable[T]],
    ) -> T:
        """`local()` here if this notifier owns `key` (once settled), else the call forwarded to the owner
        (`remote(stub, metadata, timeout_s)`), under the one forwarding policy (core/forwarding.py).

        A forwarded call is forwarded again if the notifiers' views differ for a moment (a resize), at
        most MAX_HOPS times in all.
        """
        hops = self._peers.forwarding.hops(context)
        me = self._placement.me

        def owner() -> str | None:
            member = self._placement.owner(key)
            return None if member == me else member

        async def here() -> T:
            try:
                await self._handover.settle(key)
                return await local()
            except Moved as moved:
                if moved.epoch <= self._placement.epoch:
                    self._handover.forget(key)
                    raise Unavailable(f"{key} is being taken over here; retry") from None
                raise Elsewhere(moved.owner) from None  # a newer view gave it away: this one is behind

        async def there(member: str, timeout_s: float) -> T:
            if hops >= MAX_HOPS:
                raise Unavailable(f"{key} was forwarded {hops} times while the notifiers change; retry")
            FORWARDED.labels(method).inc()
            metadata = self._peers.forwarding.forward(context, member, GRAPH + method, hops + 1)
            return await remote(self._peers.graph(member), metadata, timeout_s)

        return await on_owner(owner, here, there, FORWARD_TIMEOUT_S)

    async def Follow(
        self, request: graph_pb2.FollowRequest, context: grpc.aio.ServicerContext
    ) -> graph_pb2.FollowResponse:
        """The caller follows followee_id; following twice is accepted."""
        user = caller(context)
        followee = validation.user_id(request.followee_id, "followee_id")
        if followee == user:
            raise InvalidArgument("followee_id is the caller: users cannot follow themselves", "followee_id")

        async def local() -> graph_pb2.FollowResponse:
            created = await self._store.follow(followee, user)
            if created:
                FOLLOWS.inc()
                FOLLOWERS_STORED.inc()
            return graph_pb2.FollowResponse(created=created)

        return await self._at_owner(
            "Follow",
            followee_key(followee),
            context,
            local,
            lambda stub, md, timeout_s: stub.Follow(request, metadata=md, timeout=timeout_s),
        )

    async def Unfollow(
        self, request: graph_pb2.UnfollowRequest, context: grpc.aio.ServicerContext
    ) -> graph_pb2.UnfollowResponse:
        """The caller stops following followee_id; unfollowing twice is accepted."""
        user = caller(context)
        followee = validation.user_id(request.followee_id, "followee_id")

        async def local() -> graph_pb2.UnfollowResponse:
            removed = await self._store.unfollow(followee, user)
            if removed:
                UNFOLLOWS.inc()
                FOLLOWERS_STORED.dec()
            return graph_pb2.UnfollowResponse(removed=removed)

        return await self._at_owner(
            "Unfollow",
            followee_key(followee),
            context,
            local,
            lambda stub, md, timeout_s: stub.Unfollow(request, metadata=md, timeout=timeout_s),
        )

    async def CountFollowers(
        self, request: graph_pb2.CountFollowersRequest, context: grpc.aio.ServicerContext
    ) -> graph_pb2.CountFollowersResponse:
        """How many users follow user_id."""
        user = validation.user_id(request.user_id, "user_id")

        async def local() -> graph_pb2.CountFollowersResponse:
            return graph_pb2.CountFollowersResponse(count=await self._store.count(user))

        return await self._at_owner(
            "CountFollowers",
            followee_key(user),
            context,
            local,
            lambda stub, md, timeout_s: stub.CountFollowers(request, metadata=md, timeout=timeout_s),
        )

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
        # The deprecated limit (0.1.0's field) stands in for page_size when a client sends only it.
        size = pages.page_size(request.page_size or request.limit, LIST_DEFAULT, LIST_MAX)
        after = _followers_after(request, user)

        async def local() -> graph_pb2.ListFollowersResponse:
            # One more than the page: whether another page follows, so the last page has no token.
            ids = (await self._store.page(user, after, size + 1)).tolist()
            token = (
                pages.seal(_followers_scope(user), struct.pack(">Q", ids[size - 1]))
                if len(ids) > size
                else ""
            )
            return graph_pb2.ListFollowersResponse(follower_ids=ids[:size], next_page_token=token)

        return await self._at_owner(
            "ListFollowers",
            followee_key(user),
            context,
            local,
            lambda stub, md, timeout_s: stub.ListFollowers(request, metadata=md, timeout=timeout_s),
        )

    async def Import(
        self, request_iterator: AsyncIterator[graph_pb2.ImportChunk], context: grpc.aio.ServicerContext
    ) -> graph_pb2.ImportSummary:
        """Adds streamed (followee, follower) pairs; pairs owned elsewhere are forwarded to their owner."""
        hops = self._peers.forwarding.hops(context)
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
            for owner, part in self._placement.split_pairs(pairs).items():
                if owner == self._placement.me:
                    created += await self._import_here(part)
                elif hops >= MAX_HOPS:
                    raise Unavailable(f"pairs were forwarded {hops} times while the notifiers change; retry")
                else:
                    FORWARDED.labels("Import").inc()
                    created += await self._forward_import(owner, part, context, hops + 1)

        async for chunk in request_iterator:
            if len(chunk.pairs) % 16:
                raise InvalidArgument(
                    f"pairs is {len(chunk.pairs)} bytes: not whole 16-byte (followee, follower) pairs",
                    "pairs",
                )
            pairs = np.frombuffer(chunk.pairs, dtype="<u8").astype(np.uint64).reshape(-1, 2)
            if len(pairs) > MAX_IMPORT_CHUNK_PAIRS:
                raise InvalidArgument(
                    f"a chunk holds at most {MAX_IMPORT_CHUNK_PAIRS} pairs, not {len(pairs)}", "pairs"
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

    async def _import_here(self, pairs: np.ndarray) -> int:
        if not self._handover.steady:
            for followee in np.unique(pairs[:, 0]).tolist():
                await self._handover.settle(followee_key(int(followee)))
        try:
            added = await self._store.import_edges(pairs)
        except Moved as moved:
            self._handover.forget(moved.key)
            raise Unavailable(
                f"{moved.key} moved while importing (the notifiers are changing); retry"
            ) from None
        FOLLOWERS_STORED.inc(added)
        FOLLOWS.inc(added)
        return added

    async def _forward_import(
        self, owner: str, pairs: np.ndarray, context: grpc.aio.ServicerContext, hops: int
    ) -> int:
        async def chunks() -> AsyncIterator[graph_pb2.ImportChunk]:
            for i in range(0, len(pairs), 3000):
                yield graph_pb2.ImportChunk(
                    pairs=np.ascontiguousarray(pairs[i : i + 3000], dtype="<u8").tobytes()
                )

        async def there(member: str, timeout_s: float) -> graph_pb2.ImportSummary:
            summary: graph_pb2.ImportSummary = await self._peers.graph(member).Import(
                chunks(),
                metadata=self._peers.forwarding.forward(context, member, GRAPH + "Import", hops),
                timeout=timeout_s,
            )
            return summary

        async def here() -> graph_pb2.ImportSummary:  # only if the owner were this notifier
            return graph_pb2.ImportSummary(created=await self._import_here(pairs))

        summary = await on_owner(lambda: owner, here, there, IMPORT_TIMEOUT_S)
        return int(summary.created)

    async def RemindMe(
        self, request: graph_pb2.RemindMeRequest, context: grpc.aio.ServicerContext
    ) -> graph_pb2.RemindMeResponse:
        """The caller will be notified when room_id starts (a room that exists and has not started)."""
        user = caller(context)
        room = validation.room_id(request.room_id)
        await self._rooms.before_start(room)

        async def local() -> graph_pb2.RemindMeResponse:
            created = await self._store.remind(room, user, self._reminders_per_user)
            return graph_pb2.RemindMeResponse(created=created)

        return await self._at_owner(
            "RemindMe",
            room_key(room),
            context,
            local,
            lambda stub, md, timeout_s: stub.RemindMe(request, metadata=md, timeout=timeout_s),
        )


def _followers_scope(user: int) -> str:
    """What a ListFollowers page token belongs to (core/pages.py): the list of this user's followers."""
    return f"townhall.v1.Graph/ListFollowers/{user}"


def _followers_after(request: graph_pb2.ListFollowersRequest, user: int) -> int:
    """The follower id a page starts after: from page_token, or the deprecated after_id (0: the start)."""
    legacy = validation.bounded(request.after_id, "after_id", 0, validation.USER_ID_MAX)
    if not request.page_token:
        return legacy
    if legacy:
        raise InvalidArgument(
            "after_id is deprecated and cannot go with page_token: pass page_token only", "after_id"
        )
    key = pages.unseal(request.page_token, _followers_scope(user))
    if len(key) != 8:
        raise InvalidArgument("page_token does not name a follower: start again without it", "page_token")
    (after,) = struct.unpack(">Q", key)
    return int(after)


class ShardsServicer(internal_pb2_grpc.GraphShardsServicer):
    """Between notifiers: keys handed to their new owner (notifier/handover.py)."""

    def __init__(self, handover: Handover) -> None:
        self._handover = handover

    async def Handover(
        self, request: internal_pb2.HandoverRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[internal_pb2.HandoverChunk]:
        """Marks the key moved to the caller and streams what is held of it here."""
        owner = validation.address(request.owner, "owner")
        async for chunk in self._handover.give(request.key, owner, request.epoch):
            yield chunk

    async def Release(
        self, request: internal_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.ReleaseResponse:
        """The caller stored the key: drops the copy here."""
        owner = validation.address(request.owner, "owner")
        return internal_pb2.ReleaseResponse(dropped=await self._handover.release(request.key, owner))

    async def Settle(
        self, request: internal_pb2.SettleRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.SettleResponse:
        """Takes the key over now, from the calling holder too."""
        holder = validation.address(request.holder, "holder")
        await self._handover.settle_for(request.key, holder, request.epoch)
        return internal_pb2.SettleResponse()

    async def Drained(
        self, request: internal_pb2.DrainedRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.DrainedResponse:
        """Takes note that the holder is drained; answers who is known to be."""
        if request.holder:
            await self._handover.mark_drained(validation.address(request.holder, "holder"), request.epoch)
        return internal_pb2.DrainedResponse(
            epoch=self._handover.epoch, drained=self._handover.known_drained(request.epoch)
        )


class InboxServicer(inbox_pb2_grpc.InboxServicer):
    """Subscribe: what the caller missed since its resume cursor, then its notifications while the stream
    is open."""

    def __init__(self, hub: InboxDelivery, backlog: Backlog, start: Callable[[int], str]) -> None:
        self._hub = hub
        self._backlog = backlog
        # The cursor where a stream of a user connected now starts (InboxReader.start_cursor).
        self._start = start

    async def Subscribe(
        self, request: inbox_pb2.InboxSubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inbox_pb2.Notification]:
        """Streams notifications; initial metadata is sent once the caller is registered."""
        user = caller(context)
        if request.resume_cursor:
            position(request.resume_cursor, user)  # a bad cursor is refused before anything is sent
        if self._hub.closed:
            raise Unavailable("this notifier is shutting down; reconnect", reason=Reason.DRAINING)
        # Connected before the backlog is read: a notification sent meanwhile is queued here, and one
        # found in both is sent once (the backlog's ids).
        sub = self._hub.connect(user)
        try:
            # Lets a client know from which moment on it will be notified.
            await context.send_initial_metadata(())
            resumed: set[str] = set()
            if not request.resume_cursor and request.send_start:
                yield inbox_pb2.Notification(
                    kind=inbox_pb2.NOTIFICATION_KIND_CONNECTED, cursor=self._start(user)
                )
            if request.resume_cursor:
                for missed in await self._backlog.since(user, request.resume_cursor):
                    resumed.add(missed.notification_id)
                    yield missed
            while (notification := await sub.get()) is not None:
                if notification.notification_id not in resumed:
                    yield notification
        finally:
            self._hub.disconnect(sub)
        if sub.error is not None:
            raise sub.error
