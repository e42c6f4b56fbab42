"""The `townhall` command against real processes: room schedule, follow/unfollow/followers, status,
--json on read commands, global flags after the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.helpers import processes_on
from townhall.core.config import KafkaConfig
from townhall_tools.devtools.topology import Topology

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def topology(kafka: KafkaConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    """One process of each service, as `townhall dev` starts them, on the session broker."""
    yield from processes_on(
        kafka, tmp_path_factory.mktemp("cli"), {"admission": 1, "relay": 1, "notifier": 1}, "cli"
    )


def cli(topology: Topology, *args: str) -> subprocess.CompletedProcess[str]:
    """`townhall ARGS --root <the topology>`: the global flag after the command, as a user may type it."""
    return subprocess.run(
        [sys.executable, "-m", "townhall.cli.main", *args, "--root", str(topology.root)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )


def read(topology: Topology, *args: str) -> Any:
    """The JSON a read command prints with --json (given after the command)."""
    done = cli(topology, *args, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_room_schedule_and_get_as_json(topology: Topology) -> None:
    room = read(topology, "room", "create", "Scheduled from the CLI", "--user", "601")
    before = time.time()
    scheduled = read(topology, "room", "schedule", room["roomId"], "--in-s", "600", "--user", "601")
    assert scheduled["state"] == "ROOM_STATE_SCHEDULED"
    start_ms = int(scheduled["scheduledStartMs"])
    assert before + 599 <= start_ms / 1000 <= time.time() + 601
    got = read(topology, "room", "get", room["roomId"], "--user", "601")
    assert got["state"] == "ROOM_STATE_SCHEDULED" and int(got["scheduledStartMs"]) == start_ms
    # A time in the past is refused by the server, with its status.
    past = cli(topology, "room", "schedule", room["roomId"], "--at", "2020-01-01T00:00Z", "--user", "601")
    assert past.returncode == 1 and "INVALID_ARGUMENT" in past.stdout
    missing = cli(topology, "room", "schedule", room["roomId"], "--user", "601")
    assert missing.returncode == 2 and "either --at" in missing.stdout


def test_room_list_as_json(topology: Topology) -> None:
    room = read(topology, "room", "create", "Listed", "--user", "602")
    read(topology, "room", "start", room["roomId"], "--user", "602")
    listed = read(topology, "room", "list", "--user", "602")
    assert room["roomId"] in [r["roomId"] for r in listed]
    staged = read(topology, "mod", "role", room["roomId"], "605", "--role", "speaker", "--user", "602")
    assert staged["speakerIds"] == ["605"]


def test_follow_unfollow_and_followers(topology: Topology) -> None:
    for follower in (611, 612, 613):
        assert cli(topology, "follow", "610", "--user", str(follower)).returncode == 0
    assert read(topology, "followers", "--user", "610") == {
        "user_id": 610,
        "count": 3,
        "follower_ids": [611, 612, 613],
    }
    gone = cli(topology, "unfollow", "610", "--user", "612")
    assert gone.returncode == 0 and "no longer follows 610" in gone.stdout
    again = cli(topology, "unfollow", "610", "--user", "612")
    assert again.returncode == 0 and "did not follow 610" in again.stdout
    assert read(topology, "followers", "--user", "610", "--limit", "1") == {
        "user_id": 610,
        "count": 2,
        "follower_ids": [611],
    }
    shown = cli(topology, "followers", "--user", "610")
    assert "has 2 followers" in shown.stdout and "611, 613" in shown.stdout


def test_status_reports_every_process(topology: Topology) -> None:
    statuses = {s["name"]: s for s in read(topology, "status")}
    assert set(statuses) == {"admission-0", "relay-0", "notifier-0"}
    for status in statuses.values():
        assert status["serving"] and status["health"][""] == "SERVING" and status["error"] == ""
    # Admission's view of its members; the notifier's Kafka consumers and their lag.
    assert any(k.startswith("townhall_admission_relays_known") for k in statuses["admission-0"]["membership"])
    assert statuses["notifier-0"]["lag"] and all(v >= 0 for v in statuses["notifier-0"]["lag"].values())
    table = cli(topology, "status")
    assert table.returncode == 0 and "notifier-0" in table.stdout and "SERVING" in table.stdout


def test_status_exits_1_when_a_process_is_down(topology: Topology) -> None:
    (relay,) = topology.of("relay")
    assert relay.popen is not None
    relay.popen.kill()
    relay.popen.wait(10)
    try:
        done = cli(topology, "status", "--json", "--timeout-s", "1")
        assert done.returncode == 1
        statuses = {s["name"]: s for s in json.loads(done.stdout)}
        assert statuses["relay-0"]["health"] == {"": "UNREACHABLE"} and not statuses["relay-0"]["serving"]
        assert statuses["admission-0"]["serving"]
    finally:
        topology.restart(relay)
