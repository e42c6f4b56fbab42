"""The Go client (clients/go) against the real local topology: it creates a room, joins it as a listener
and hears, byte for byte, what a speaker says into it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chart.helpers import build_tool
from tests.integration.helpers import TOKENS, client, processes_on
from townhall.core.config import KafkaConfig
from townhall.core.tasks import cancel
from townhall.live import Speaker
from townhall_tools.devtools.topology import Process, Topology

pytestmark = pytest.mark.kafka

HOST, LISTENER = 7001, 7002
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


async def _listen_from_go(
    go_client: Path, topology: Topology, chunks: int, heard: Callable[[dict[str, Any]], None]
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Runs the Go client (it creates and starts a room with the host's token, then listens with the
    listener's) while the host speaks distinct payloads into the room (moving relay if it must), each
    line it prints given to `heard`; its lines and the payloads spoken. Fails if it does not exit 0."""
    (admission,) = topology.of("admission")
    process = await asyncio.create_subprocess_exec(
        str(go_client),
        "-admission", admission.grpc,
        "-chunks", str(chunks),
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
    host = client(admission.grpc, HOST, {"host", "publish"})
    speaking: asyncio.Task[int] | None = None
    try:
        async with asyncio.timeout(120):
            async for raw in process.stdout:
                line = json.loads(raw)
                lines.append(line)
                if line["event"] == "room":
                    speaking = asyncio.create_task(Speaker(host, line["room_id"]).speak(payloads))
                heard(line)
            code = await process.wait()
        errors = (await process.stderr.read()).decode()
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        if speaking is not None:
            await cancel(speaking)
        await host.close()
    assert code == 0, errors
    room, grant, *rest = lines
    assert room["event"] == "room" and room["state"] == "ROOM_STATE_LIVE"
    assert grant["event"] == "grant" and grant["role"] == "ROLE_LISTENER" and grant["relay"]
    assert [c["event"] for c in rest] == ["chunk"] * chunks
    return lines, payloads


def _payloads(chunks: list[dict[str, Any]]) -> list[bytes]:
    """Every frame's payload, in the order heard; every frame must be the host's."""
    frames = [frame for c in chunks for frame in c["frames"]]
    assert {frame["speaker_id"] for frame in frames} == {HOST}
    return [base64.b64decode(frame["payload"]) for frame in frames]


async def test_go_client_hears_what_the_speaker_said(go_client: Path, topology: Topology) -> None:
    lines, payloads = await _listen_from_go(go_client, topology, CHUNKS, lambda line: None)
    chunks = lines[2:]
    # One epoch, sequence numbers one apart: no chunk lost or repeated.
    assert len({c["epoch"] for c in chunks}) == 1
    sequences = [c["sequence"] for c in chunks]
    assert sequences == list(range(sequences[0], sequences[0] + CHUNKS))
    # The payloads are an unbroken run of what the host said, byte for byte.
    heard = _payloads(chunks)
    first = payloads.index(heard[0])
    assert heard == payloads[first : first + len(heard)]
    assert len(heard) >= CHUNKS


async def test_go_client_resumes_when_its_relay_dies(go_client: Path, topology: Topology) -> None:
    """kill -9 of the relay the Go client listens on (the room's origin): it joins again, lands on the other
    relay (the room's new origin, a new epoch) and goes on hearing the host, no frame twice."""
    relays = {p.grpc: p for p in topology.of("relay")}
    killed: list[Process] = []

    def heard(line: dict[str, Any]) -> None:
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
    chunks = lines[2:]
    epochs = [c["epoch"] for c in chunks]
    assert len(set(epochs)) == 2 and epochs == sorted(epochs), epochs
    heard_payloads = _payloads(chunks)
    where = [payloads.index(p) for p in heard_payloads]
    assert where == sorted(set(where)), "a frame was heard twice or out of order"
