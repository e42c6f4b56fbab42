"""Admission places a hot room's listeners on edges; the relays (in-process) carry the audio to them."""

from __future__ import annotations

import asyncio
import random

import pytest

from tests.integration.helpers import client, config_for, serving
from tests.integration.test_relay import TICKET_KEYS, TICKET_PRIVATE_KEY, TIMEOUT, frame_ids, read_until
from tests.integration.test_relay_tree import tree
from townhall.admission.app import AdmissionApp
from townhall.core.config import KafkaConfig
from townhall.v1.common_pb2 import Role

pytestmark = pytest.mark.kafka
FRAMES = 25


async def test_a_hot_rooms_listeners_are_spread_over_edges_and_all_hear_the_host_in_order(
    kafka: KafkaConfig,
) -> None:
    async with tree(3) as t:
        config = config_for(
            kafka,
            admission={"relays": tuple(t.addresses), "relays_internal": tuple(t.internals)},
            relay={"edge_target": 2, "tree_degree": 2, "load_report_s": 0},
            tickets={"private_key": TICKET_PRIVATE_KEY, "public_keys": (TICKET_KEYS,)},
        )
        base = random.randrange(1, 2**40) * 100
        async with serving(AdmissionApp(config), config) as address:
            host = client(address, base)
            audience = [client(address, base + 1 + i) for i in range(6)]
            try:
                room = await host.create_room("Hot room")
                await host.start_room(room.room_id)
                stage = await host.join(room.room_id)
                grants = [await c.join(room.room_id) for c in audience]
                origin = stage.relay_address
                # Two listeners per relay: the origin first, then two edges, in rendezvous order.
                relays = [g.relay_address for g in grants]
                assert relays.count(origin) == 2 and len(set(relays)) == 3
                assert stage.role == Role.ROLE_HOST

                calls = [c.subscribe(g, room.room_id) for c, g in zip(audience, grants, strict=True)]
                await asyncio.sleep(0.3)  # edges open their pulls to the origin
                speaking = asyncio.create_task(host.publish(stage, [bytes([i]) * 40 for i in range(FRAMES)]))
                heard = await asyncio.gather(
                    *(
                        read_until(call, lambda ch: len(frame_ids(ch)) >= FRAMES, TIMEOUT * 2)
                        for call in calls
                    )
                )
                assert await asyncio.wait_for(speaking, TIMEOUT) == FRAMES
            finally:
                for c in [host, *audience]:
                    await c.close()
    for got in heard:
        assert frame_ids([chunk for _, chunk in got]) == [(base, seq) for seq in range(FRAMES)]
    sequences = [[chunk.sequence for _, chunk in got] for got in heard]
    assert all(s == sequences[0] for s in sequences)
