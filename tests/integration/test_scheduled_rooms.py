"""Admission and a notifier on the real broker: a scheduled room starts by itself and reminds."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import grpc
import pytest

from tests.integration.fanout_helpers import fresh_users, own_topics, until
from tests.integration.helpers import config_for, metadata, serving
from townhall.admission.app import AdmissionApp
from townhall.core.config import KafkaConfig
from townhall.notifier.app import build_app
from townhall.v1 import graph_pb2, graph_pb2_grpc, rooms_pb2, rooms_pb2_grpc
from townhall.v1.common_pb2 import RoomState
from townhall_tools.devtools.fanout import counting_inbox

pytestmark = pytest.mark.kafka

LEAD_MS = 2_000


async def test_a_scheduled_room_starts_at_its_time_and_reminds_who_asked(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    topics = await own_topics(kafka)
    notifier_config = config_for(
        topics,
        notifier={"data_dir": str(tmp_path), "group_id": f"g-{uuid.uuid4().hex[:8]}", "metrics_port": 0},
    )
    admission_config = config_for(topics, admission={"relays": ("127.0.0.1:50999",), "metrics_port": 0})
    host, follower, asker, bystander = fresh_users(4)
    notifier, admission = build_app(notifier_config), AdmissionApp(admission_config)
    async with (
        serving(notifier, notifier_config) as n_addr,
        serving(admission, admission_config) as a_addr,
        grpc.aio.insecure_channel(n_addr) as n_ch,
        grpc.aio.insecure_channel(a_addr) as a_ch,
    ):
        graph, rooms = graph_pb2_grpc.GraphStub(n_ch), rooms_pb2_grpc.RoomsStub(a_ch)
        await graph.Follow(graph_pb2.FollowRequest(followee_id=host), metadata=metadata(follower), timeout=10)
        room = await rooms.CreateRoom(
            rooms_pb2.CreateRoomRequest(title="Tomorrow's AMA"), metadata=metadata(host), timeout=10
        )
        async with counting_inbox(topics, [follower, asker, bystander]) as inbox:
            start_at = int(time.time() * 1000) + LEAD_MS
            scheduled = await rooms.ScheduleRoom(
                rooms_pb2.ScheduleRoomRequest(room_id=room.room_id, start_at_ms=start_at),
                metadata=metadata(host),
                timeout=10,
            )
            assert scheduled.state == RoomState.ROOM_STATE_SCHEDULED
            assert scheduled.scheduled_start_ms == start_at
            reply = await graph.RemindMe(
                graph_pb2.RemindMeRequest(room_id=room.room_id), metadata=metadata(asker), timeout=10
            )
            assert reply.created is True
            assert inbox.delivered(room.room_id) == 0, "nobody is notified before the start"

            await until(
                lambda: inbox.delivered(room.room_id) == 2, what="the follower and the asker reminded"
            )
            live = await rooms.GetRoom(
                rooms_pb2.GetRoomRequest(room_id=room.room_id), metadata=metadata(host), timeout=10
            )
            got = inbox.got(room.room_id)
            [note] = [n for n in inbox.subs[asker]._queue if n.room_id == room.room_id]
    assert live.state == RoomState.ROOM_STATE_LIVE
    assert live.started_at_ms >= start_at and note.started_at_ms == live.started_at_ms
    assert got == {follower: 1, asker: 1, bystander: 0}


async def test_scheduling_is_refused_for_the_past_and_for_others(kafka: KafkaConfig) -> None:
    admission_config = config_for(kafka, admission={"relays": ("127.0.0.1:50999",), "metrics_port": 0})
    host, other = fresh_users(2)
    admission = AdmissionApp(admission_config)
    async with serving(admission, admission_config) as a_addr, grpc.aio.insecure_channel(a_addr) as a_ch:
        rooms = rooms_pb2_grpc.RoomsStub(a_ch)
        room = await rooms.CreateRoom(
            rooms_pb2.CreateRoomRequest(title="later"), metadata=metadata(host), timeout=10
        )
        future = int(time.time() * 1000) + 60_000
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rooms.ScheduleRoom(
                rooms_pb2.ScheduleRoomRequest(room_id=room.room_id, start_at_ms=1),
                metadata=metadata(host),
                timeout=10,
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rooms.ScheduleRoom(
                rooms_pb2.ScheduleRoomRequest(room_id=room.room_id, start_at_ms=future),
                metadata=metadata(other),
                timeout=10,
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
