"""Standard error details on real servers: what a client in any language (and grpcurl) reads from a refusal.

Each refusal carries a google.rpc.Status in `grpc-status-details-bin` (core/errors.py): ErrorInfo with a
stable reason, RetryInfo when the caller should come back, BadRequest naming the field on INVALID_ARGUMENT;
the deprecated trailers stay alongside for one window (docs/errors.md).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from tests.integration.helpers import TOKENS, client, config_for, metadata, rpc_error, serving, users
from townhall.admission.app import AdmissionApp
from townhall.client import retry_hint_s
from townhall.core.config import Config, KafkaConfig
from townhall.core.errors import DETAILS_KEY, DOMAIN, Reason, details
from townhall.v1 import admission_pb2, rooms_pb2

pytestmark = pytest.mark.kafka
RELAY = "127.0.0.1:50999"


@pytest.fixture
def config(kafka: KafkaConfig) -> Config:
    return config_for(kafka, admission={"relays": (RELAY,)})


def status_of(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status the server sent, as any gRPC client library decodes it."""
    found = [v for k, v in error.trailing_metadata() or () if k == DETAILS_KEY]
    assert len(found) == 1, f"no {DETAILS_KEY} in {error.trailing_metadata()}"
    status = status_pb2.Status.FromString(found[0])
    assert (status.code, status.message) == (error.code().value[0], error.details())
    return status


def detail(status: status_pb2.Status, kind: type) -> list:  # type: ignore[type-arg]
    """The details of one type in a status."""
    out = []
    for packed in status.details:
        if packed.Is(kind.DESCRIPTOR):
            message = kind()
            packed.Unpack(message)
            out.append(message)
    return out


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    (info,) = detail(status_of(error), error_details_pb2.ErrorInfo)
    assert info.domain == DOMAIN
    return info


async def full_room(address: str, host_id: int) -> tuple[str, list]:  # type: ignore[type-arg]
    """A live room of one listener seat, taken: the next listener's Join is shed."""
    host = client(address, host_id)
    room = await host.create_room("One seat", listener_limit=1)
    await host.start_room(room.room_id)
    fan = client(address, host_id + 100)
    await fan.join(room.room_id)
    return room.room_id, [host, fan]


async def test_a_shed_join_carries_retry_info_and_error_info(config: Config) -> None:
    host_id, _, late_id = users()
    async with serving(AdmissionApp(config), config) as address:
        room_id, clients = await full_room(address, host_id)
        late = client(address, late_id)
        request = admission_pb2.JoinRequest(room_id=room_id)
        error = await rpc_error(late.admission.Join(request, metadata=late.metadata))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(error).reason == Reason.ROOM_FULL
        (retry,) = detail(status_of(error), error_details_pb2.RetryInfo)
        retry_ms = retry.retry_delay.ToMilliseconds()
        assert 1000 <= retry_ms <= 3000
        # The deprecated trailer says the same, for clients written before the details.
        assert dict(error.trailing_metadata() or ())["retry-after-ms"] == str(retry_ms)
        assert retry_hint_s(error) == retry_ms / 1000
        for c in (*clients, late):
            await c.close()


async def test_an_invalid_field_is_named_in_a_field_violation(config: Config) -> None:
    host_id, _, _ = users()
    async with serving(AdmissionApp(config), config) as address:
        host = client(address, host_id)
        md = metadata(host_id)
        cases = [
            (host.rooms.GetRoom(rooms_pb2.GetRoomRequest(room_id=""), metadata=md), "room_id"),
            (host.rooms.CreateRoom(rooms_pb2.CreateRoomRequest(title="ok", speaker_ids=[5, 0]), metadata=md), "speaker_ids[1]"),
            (host.rooms.CreateRoom(rooms_pb2.CreateRoomRequest(title="a\u202eb"), metadata=md), "title"),
            (host.admission.Join(admission_pb2.JoinRequest(room_id="bad id!"), metadata=md), "room_id"),
            (host.rooms.ListLiveRooms(rooms_pb2.ListLiveRoomsRequest(page_size=-1), metadata=md), "page_size"),
        ]  # fmt: skip
        for call, field in cases:
            error = await rpc_error(call)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_info(error).reason == Reason.INVALID_FIELD
            (bad,) = detail(status_of(error), error_details_pb2.BadRequest)
            assert [(v.field, v.description) for v in bad.field_violations] == [(field, error.details())]
            assert details(error).fields == (field,)
        await host.close()


async def test_a_banned_join_says_banned(config: Config) -> None:
    host_id, fan_id, _ = users()
    async with serving(AdmissionApp(config), config) as address:
        host, fan = client(address, host_id), client(address, fan_id)
        room = await host.create_room("No trolls")
        await host.start_room(room.room_id)
        await fan.join(room.room_id)
        await host.remove(room.room_id, fan_id, ban=True)
        error = await rpc_error(fan.join(room.room_id))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(error).reason == Reason.BANNED
        assert not detail(status_of(error), error_details_pb2.RetryInfo)  # not a retry
        await host.end_room(room.room_id)
        error = await rpc_error(host.join(room.room_id))
        assert (error.code(), error_info(error).reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            Reason.ROOM_ENDED,
        )
        for c in (host, fan):
            await c.close()


async def test_grpcurl_shows_the_details_of_a_shed_join(config: Config, grpcurl: Path) -> None:
    """What an app developer sees with grpcurl (reflection resolves the google.rpc detail types)."""
    host_id, _, late_id = users()
    async with serving(AdmissionApp(config), config) as address:
        room_id, clients = await full_room(address, host_id)
        token = TOKENS.mint(late_id, ["subscribe"])
        # A subprocess of the event loop: the server under test answers from this same loop.
        process = await asyncio.create_subprocess_exec(
            str(grpcurl), "-plaintext", "-format-error", "-H", f"authorization: Bearer {token}",
            "-d", json.dumps({"room_id": room_id}), address, "townhall.v1.Admission/Join",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode != 0, out
        shown = json.loads(err)  # -format-error: the google.rpc.Status as JSON, on stderr
        assert shown["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], (out, err)
        by_type = {d["@type"].rpartition("/")[2]: d for d in shown["details"]}
        assert by_type["google.rpc.ErrorInfo"] == {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "ROOM_FULL",
            "domain": DOMAIN,
        }
        retry_s = float(by_type["google.rpc.RetryInfo"]["retry_delay"].removesuffix("s"))
        assert f"retry after {round(retry_s * 1000)} ms" in shown["message"]
        for c in clients:
            await c.close()
