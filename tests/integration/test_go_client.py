"""The Go client (clients/go) against the real local topology: it creates a room, joins it as a listener
and hears, byte for byte, what a speaker says into it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chart.helpers import build_tool
from tests.integration.helpers import TOKENS, client, processes_on
from townhall.client import Client
from townhall.core.config import KafkaConfig
from townhall.core.tasks import cancel
from townhall.live import Speaker
from townhall.v1.common_pb2 import ROLE_SPEAKER
from townhall_tools.devtools.topology import Process, Topology

pytestmark = pytest.mark.kafka

HOST, LISTENER, ON_STAGE = 7001, 7002, 7003
CHUNKS = 10


@pytest.fixture(scope="session")
def go_client() -> Path:
    """clients/go's townhall-go, built into .cache/bin (deploy/tools/install-goclient.sh)."""
    if shutil.which("go") is None:
        pytest.skip("`go` is not on PATH: the Go client (clients/go) cannot be built on this machine")
    return build_tool("go_client")


@pytest.fixture(scope="module")
def topology(kafka: KafkaConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    """One admission and two relay processes, as `townhall dev` starts them, on the session broker."""
    yield from processes_on(
        kafka, tmp_path_factory.mktemp("go-client"), {"admission": 1, "relay": 2}, "go-client"
    )


Heard = Callable[[Client, dict[str, Any]], Awaitable[None]]


async def _nothing(host: Client, line: dict[str, Any]) -> None:
    pass


async def _listen_from_go(
    go_client: Path, topology: Topology, chunks: int, heard: Heard = _nothing, watch_events: int = 0
) -> tuple[dict[str, list[dict[str, Any]]], list[bytes]]:
    """Runs the Go client (it creates and starts a room with the host's token, then listens with the
    listener's, and watches the room for `watch_events` events) while the host speaks distinct payloads
    into the room (moving relay if it must), each line it prints given to `heard` with the host's client;
    its lines by event and the payloads spoken. Fails if it does not exit 0."""
    (admission,) = topology.of("admission")
    process = await asyncio.create_subprocess_exec(
        str(go_client),
        "-admission", admission.grpc,
        "-chunks", str(chunks),
        "-watch-events", str(watch_events),
        "-timeout", "90s",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={
            **os.environ,
            "TOWNHALL_HOST_TOKEN": TOKENS.mint(HOST, {"host", "publish"}),
            "TOWNHALL_TOKEN": TOKENS.mint(LISTENER, {"subscribe"}),
        },
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    lines: list[dict[str, Any]] = []
    # Distinct payloads of varied length, 60 s of frames: more than the Go client waits for.
    payloads = [f"go-{i:04d}-".encode() + os.urandom(20 + i % 200) for i in range(3000)]
    host = client(admission.grpc, HOST, {"host", "publish", "moderate"})
    speaking: asyncio.Task[int] | None = None
    try:
        async with asyncio.timeout(120):
            async for raw in process.stdout:
                line = json.loads(raw)
                lines.append(line)
                if line["event"] == "room":
                    speaking = asyncio.create_task(Speaker(host, line["room_id"]).speak(payloads))
                await heard(host, line)
            code = await process.wait()
        errors = (await process.stderr.read()).decode()
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        if speaking is not None:
            await cancel(speaking)
        await host.close()
    assert code == 0, errors
    by_event: dict[str, list[dict[str, Any]]] = {"room": [], "grant": [], "chunk": [], "watch": []}
    for line in lines:
        by_event[line["event"]].append(line)
    ((room,), (grant,)) = by_event["room"], by_event["grant"]
    assert lines[0] == room and room["state"] == "ROOM_STATE_LIVE"
    assert grant["role"] == "ROLE_LISTENER" and grant["relay"]
    assert len(by_event["chunk"]) == chunks
    return by_event, payloads


def _payloads(chunks: list[dict[str, Any]]) -> list[bytes]:
    """Every frame's payload, in the order heard; every frame must be the host's."""
    frames = [frame for c in chunks for frame in c["frames"]]
    assert {frame["speaker_id"] for frame in frames} == {HOST}
    return [base64.b64decode(frame["payload"]) for frame in frames]


async def test_go_client_hears_what_the_speaker_said_and_watches_the_room(
    go_client: Path, topology: Topology
) -> None:
    """The Go client hears the host byte for byte and, on WatchRoom, sees itself counted among the
    listeners and then the host put user 7003 on stage."""
    room_ids: list[str] = []
    staged: list[dict[str, Any]] = []

    async def heard(host: Client, line: dict[str, Any]) -> None:
        # Once the Go client is counted, the host changes the stage: an event every watcher sees.
        if line["event"] == "room":
            room_ids.append(line["room_id"])
        elif line["event"] == "watch" and line["listeners"] >= 1 and not staged:
            staged.append(line)
            await host.set_role(room_ids[0], ON_STAGE, ROLE_SPEAKER)

    lines, payloads = await _listen_from_go(go_client, topology, CHUNKS, heard, watch_events=1)
    watched = lines["watch"]
    assert watched[0]["room_id"] == lines["room"][0]["room_id"] and "events" not in watched[0]
    assert staged, "the Go client never saw itself counted among the listeners"
    events = [event for w in watched for event in w.get("events", [])]
    assert {"kind": "KIND_ROLE", "user_id": ON_STAGE, "role": "ROLE_SPEAKER"} in events
    chunks = lines["chunk"]
    # One epoch, sequence numbers one apart: no chunk lost or repeated.
    assert len({c["epoch"] for c in chunks}) == 1
    sequences = [c["sequence"] for c in chunks]
    assert sequences == list(range(sequences[0], sequences[0] + CHUNKS))
    # The payloads are an unbroken run of what the host said, byte for byte.
    spoken = _payloads(chunks)
    first = payloads.index(spoken[0])
    assert spoken == payloads[first : first + len(spoken)]
    assert len(spoken) >= CHUNKS


async def test_go_client_resumes_when_its_relay_dies(go_client: Path, topology: Topology) -> None:
    """kill -9 of the relay the Go client listens on (the room's origin): it joins again, lands on the other
    relay (the room's new origin, a new epoch) and goes on hearing the host, no frame twice."""
    relays = {p.grpc: p for p in topology.of("relay")}
    killed: list[Process] = []

    async def heard(host: Client, line: dict[str, Any]) -> None:
        if line["event"] == "grant":
            killed.append(relays[line["relay"]])
        elif line["event"] == "chunk" and line["sequence"] >= 5 and len(killed) == 1:
            topology.kill(killed[0])
            killed.append(killed[0])

    try:
        lines, payloads = await _listen_from_go(go_client, topology, 40, heard)
    finally:
        if killed:
            topology.restart(killed[0])
    assert len(killed) == 2, "the relay was not killed"
    chunks = lines["chunk"]
    epochs = [c["epoch"] for c in chunks]
    assert len(set(epochs)) == 2 and epochs == sorted(epochs), epochs
    heard_payloads = _payloads(chunks)
    where = [payloads.index(p) for p in heard_payloads]
    assert where == sorted(set(where)), "a frame was heard twice or out of order"
