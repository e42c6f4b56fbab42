"""Thin gRPC servicers: identity and validation, then the follower store or the Inbox hub."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from townhall.core import validation
from townhall.core.errors import InvalidArgument, Unavailable
from townhall.core.identity import caller
from townhall.notifier.inbox import Hub
from townhall.notifier.metrics import FOLLOWERS_STORED, FOLLOWS, UNFOLLOWS
from townhall.notifier.store import FollowerStore
from townhall.v1 import graph_pb2, graph_pb2_grpc, inbox_pb2, inbox_pb2_grpc


class GraphServicer(graph_pb2_grpc.GraphServicer):
    """Follow, Unfollow and CountFollowers on the follower store."""

    def __init__(self, store: FollowerStore) -> None:
        self._store = store

    async def Follow(
        self, request: graph_pb2.FollowRequest, context: grpc.aio.ServicerContext
    ) -> graph_pb2.FollowResponse:
        """The caller follows followee_id; following twice is accepted."""
        user = caller(context)
        followee = validation.user_id(request.followee_id, "followee_id")
        if followee == user:
            raise InvalidArgument("followee_id is the caller: users cannot follow themselves")
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
        removed = await self._store.unfollow(followee, user)
        if removed:
            UNFOLLOWS.inc()
            FOLLOWERS_STORED.dec()
        return graph_pb2.UnfollowResponse(removed=removed)

    async def CountFollowers(
        self, request: graph_pb2.CountFollowersRequest, context: grpc.aio.ServicerContext
    ) -> graph_pb2.CountFollowersResponse:
        """How many users follow user_id."""
        caller(context)
        user = validation.user_id(request.user_id, "user_id")
        return graph_pb2.CountFollowersResponse(count=await self._store.count(user))


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
