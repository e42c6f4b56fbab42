"""The client library's retries of refused room calls (no network: the refusals are made here)."""

from __future__ import annotations

import grpc
import pytest

from townhall.client import KNOWN_ROOMS, RETRY_EXHAUSTED_TIMES, Client, Endpoints, retry_hint_s
from townhall.v1.common_pb2 import Room
from townhall.v1.inbox_pb2 import Notification


def refusal(details: str, trailers: tuple[tuple[str, str], ...] = ()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details
    )


def test_the_retry_after_hint_comes_from_the_trailer_else_the_message() -> None:
    assert retry_hint_s(refusal("busy; retry after 900 ms", (("retry-after-ms", "250"),))) == 0.25
    assert retry_hint_s(refusal("too many calls in flight; retry after 1200 ms")) == 1.2
    assert retry_hint_s(refusal("3 rooms per hour: retry after 3540 s")) == 3540
    assert retry_hint_s(refusal("message larger than max")) is None


async def test_a_room_call_refused_again_and_again_is_given_up_after_a_bounded_number_of_tries() -> None:
    client = Client(Endpoints("127.0.0.1:1", "127.0.0.1:1"), 1, "token")
    calls = 0

    async def refused(_: object) -> Room:
        nonlocal calls
        calls += 1
        raise refusal("busy; retry after 1 ms")

    try:
        with pytest.raises(grpc.aio.AioRpcError):
            await client._rooms_call(refused)
        assert calls == 1 + RETRY_EXHAUSTED_TIMES
        with pytest.raises(grpc.aio.AioRpcError):  # no hint: nothing says when to come back
            await client._rooms_call(lambda _: _raise(refusal("message larger than max")))
    finally:
        await client.close()


async def _raise(error: grpc.aio.AioRpcError) -> Room:
    raise error


async def test_a_client_remembers_the_newest_version_of_each_room_it_saw_and_a_bounded_number_of_rooms() -> (
    None
):
    client = Client(Endpoints("127.0.0.1:1", "127.0.0.1:1"), 1, "token")
    try:
        client.learn(Room(room_id="r", version=3))
        client.learn(Notification(room_id="r", room_version=2, crowd=True))  # older: the version stays
        assert client.room_versions["r"] == 3 and "r" in client.crowd_rooms
        client.learn(Notification(room_id="r", room_version=5))
        assert client.room_versions["r"] == 5
        for i in range(KNOWN_ROOMS):
            client.learn(Room(room_id=f"room-{i}", version=1, crowd=True))
        assert len(client.room_versions) == KNOWN_ROOMS and len(client.crowd_rooms) <= KNOWN_ROOMS
        assert "r" not in client.room_versions  # the least recently updated room went first
    finally:
        await client.close()
