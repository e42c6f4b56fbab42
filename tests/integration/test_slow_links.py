"""Connections that take long to set up (a busy server, TLS over a slow network) carry their calls.

The client library and the channels between Townhall processes wait for such a connection within the
call's own deadline; they do not fail the calls waiting for it with UNAVAILABLE.
"""

from __future__ import annotations

import random

import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc

from tests.integration.helpers import client, config_for, join_outcome, serving
from townhall.admission.app import AdmissionApp
from townhall.core.config import KafkaConfig
from townhall.core.health import HealthServicer
from townhall.core.liveness import Probe, Prober
from townhall_tools.devtools.links import slow_handshake

# What setting a connection up takes here: more than the 100 ms the channels used to allow it, far less
# than any call's deadline (a probe's is 1 s, a join's 10 s).
SLOW_S = 0.3


@pytest.mark.kafka
async def test_a_user_whose_connection_is_slow_to_set_up_is_admitted(kafka: KafkaConfig) -> None:
    config = config_for(kafka, admission={"relays": ("127.0.0.1:50999",)})
    host_id, listener_id = (random.randrange(1, 2**40) * 10 + i for i in (1, 2))
    async with serving(AdmissionApp(config), config) as address, slow_handshake(address, SLOW_S) as slow:
        host = client(address, host_id)
        room = await host.create_room("Slow links")
        await host.start_room(room.room_id)
        listener = client(slow, listener_id)
        try:
            outcome, refused = await join_outcome(listener.admission, room.room_id, listener.metadata)
        finally:
            await listener.close()
            await host.close()
    assert outcome == "granted", refused.details() if refused else outcome


async def test_a_peer_slow_to_connect_to_is_probed_up() -> None:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with slow_handshake(f"127.0.0.1:{port}", SLOW_S) as slow:
            prober = Prober(lambda: [slow], interval_s=1.0, timeout_s=1.0, failures=1)
            try:
                assert await prober.probe(slow) is Probe.SERVING
            finally:
                await prober.close()
    finally:
        await server.stop(None)
