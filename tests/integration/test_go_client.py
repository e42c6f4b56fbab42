"""The Go client (clients/go) against the real local topology: it creates a room, joins it as a listener
and hears, byte for byte, what a speaker says into it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chart.helpers import build_tool
from tests.integration.helpers import TOKENS, client, processes_on
from townhall.client import Client
from townhall.core.config import KafkaConfig
from townhall.devtools.topology import Topology

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
    """One admission and one relay process, as `townhall dev` starts them, on the session broker."""
    yield from processes_on(
        kafka, tmp_path_factory.mktemp("go-client"), {"admission": 1, "relay": 1}, "go-client"
    )


async def _speak(host: Client, room_id: str, payloads: list[bytes]) -> None:
    """The host joins its room on stage and publishes every payload, one 20 ms frame each."""
    grant = await host.join(room_id)
    await host.publish(grant, payloads)


async def test_go_client_hears_what_the_speaker_said(go_client: Path, topology: Topology) -> None:
    (admission,) = topology.of("admission")
    process = await asyncio.create_subprocess_exec(
        str(go_client),
        "-admission", admission.grpc,
        "-chunks", str(CHUNKS),
        "-timeout", "60s",
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
    # Distinct payloads of varied length, 6 s of frames: more than the Go client waits for.
    payloads = [f"go-{i:04d}-".encode() + os.urandom(20 + i % 200) for i in range(300)]
    host = client(admission.grpc, HOST, {"host", "publish"})
    speaking: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(90):
            async for raw in process.stdout:
                line = json.loads(raw)
                lines.append(line)
                if line["event"] == "room":
                    speaking = asyncio.create_task(_speak(host, line["room_id"], payloads))
            code = await process.wait()
        errors = (await process.stderr.read()).decode()
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        if speaking is not None:
            speaking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await speaking
        await host.close()
    assert code == 0, errors
    room, grant, *chunks = lines
    assert room["event"] == "room" and room["state"] == "ROOM_STATE_LIVE"
    assert grant["event"] == "grant" and grant["role"] == "ROLE_LISTENER" and grant["relay"]
    assert [c["event"] for c in chunks] == ["chunk"] * CHUNKS
    # One epoch, sequence numbers one apart: no chunk lost or repeated.
    assert len({c["epoch"] for c in chunks}) == 1
    sequences = [c["sequence"] for c in chunks]
    assert sequences == list(range(sequences[0], sequences[0] + CHUNKS))
    # Every frame is the host's, and the payloads are an unbroken run of what it said, byte for byte.
    frames = [frame for c in chunks for frame in c["frames"]]
    assert {frame["speaker_id"] for frame in frames} == {HOST}
    heard = [base64.b64decode(frame["payload"]) for frame in frames]
    first = payloads.index(heard[0])
    assert heard == payloads[first : first + len(heard)]
    assert len(heard) >= CHUNKS
