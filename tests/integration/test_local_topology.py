"""The whole system as separate processes on loopback, as `townhall dev` runs it, on a real broker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chart import promql
from tests.chart.helpers import REPO
from tests.integration.helpers import TOKENS
from townhall.cli.endpoints import resolve
from townhall_tools.cli.demo import demo
from townhall_tools.devtools.kafka_broker import free_port
from townhall_tools.devtools.topology import Topology

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    topo = Topology(tmp_path_factory.mktemp("topology"), fixed_ports=False)
    topo.start()
    try:
        yield topo
    finally:
        topo.stop()


async def test_demo_room_end_to_end(topology: Topology) -> None:
    """Follow, start, notified, join, speak real Opus audio, every listener hears every frame in order."""
    checks = await demo(resolve(topology.manifest), followers=8, listeners=8, audio_file=None, tokens=TOKENS)
    assert [c for c in checks if not c.ok] == []


def test_topology_manifest_lists_every_process(topology: Topology) -> None:
    manifest = json.loads(topology.manifest.read_text())
    assert manifest["kafka"].startswith("127.0.0.1:")
    for service in ("admission", "relay", "notifier"):
        (entry,) = manifest["services"][service]
        assert entry["grpc"].startswith("127.0.0.1:")
        assert entry["metrics"].endswith("/metrics")


def test_sigterm_drains_and_exits_cleanly(topology: Topology) -> None:
    relay = next(p for p in topology.processes if p.service == "relay")
    assert relay.popen is not None
    relay.popen.send_signal(signal.SIGTERM)
    assert relay.popen.wait(30) == 0
    topology.restart(relay)


def test_the_cli_moderates_a_room(topology: Topology) -> None:
    """`townhall room` and `townhall mod`, as README's "Using it by hand" shows them."""

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "townhall.cli.main", "--root", str(topology.root), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "200"},
        )

    created = cli("room", "create", "CLI room", "--user", "501")
    room_id = json.loads(created.stdout)["roomId"]
    assert cli("room", "start", room_id, "--user", "501").returncode == 0
    # `townhall room watch` prints the changes below as they happen (the host sees the ban too).
    watch_argv = [sys.executable, "-m", "townhall.cli.main", "--root", str(topology.root), "room", "watch"]
    watching = subprocess.Popen(
        [*watch_argv, room_id, "--user", "501", "--seconds", "20"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    # The same with --json: one JSON line per update, as it comes.
    watching_json = subprocess.Popen(
        [*watch_argv, room_id, "--user", "501", "--seconds", "20", "--json"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert watching.stdout is not None and watching_json.stdout is not None
    first = watching.stdout.readline()  # the room as it is, before the changes below
    assert "live: 0 listening, 1 on stage; host 501, co-hosts -" in first, first
    first_json = json.loads(watching_json.stdout.readline())
    assert first_json["room"]["roomId"] == room_id and first_json["room"]["state"] == "ROOM_STATE_LIVE"
    cohost = cli("mod", "role", room_id, "502", "--role", "cohost", "--user", "501")
    assert cohost.returncode == 0 and "502" in next(
        line for line in cohost.stdout.splitlines() if "co-hosts" in line
    )
    banned = cli("mod", "ban", room_id, "503", "--user", "502")
    assert banned.returncode == 0 and "503" in next(
        line for line in banned.stdout.splitlines() if "banned" in line
    )
    refused = cli("mod", "raise-hand", room_id, "--user", "503")
    assert (
        refused.returncode == 1
        and "PERMISSION_DENIED (BANNED)" in refused.stdout
        and "banned" in refused.stdout
    )
    missing = cli("mod", "mute", room_id, "--user", "501")
    assert missing.returncode == 2 and "needs the user to act on" in missing.stdout
    assert cli("room", "end", room_id, "--user", "501").returncode == 0
    watched = first + watching.communicate(timeout=60)[0]
    assert watching.returncode == 0
    assert "user 502 is now cohost" in watched and "banned: user 503" in watched
    assert "state: ended" in watched  # the stream ends with the room
    updates = [json.loads(line) for line in watching_json.communicate(timeout=60)[0].splitlines()]
    assert watching_json.returncode == 0
    events = [event for update in updates for event in update.get("events", [])]
    assert {"kind": "KIND_BANNED", "userId": "503"} in events
    assert updates[-1]["room"]["state"] == "ROOM_STATE_ENDED"


@pytest.mark.parametrize("service", ["admission", "relay", "notifier"])
def test_bad_config_stops_the_process_naming_the_key(service: str) -> None:
    env = {**os.environ, f"TOWNHALL_{service.upper()}_METRICS_PORT": "lots"}
    done = subprocess.run(
        [sys.executable, "-m", f"townhall.{service}"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert f"{service}.metrics_port must be an integer" in done.stderr


def test_townhall_dev_run_demo_exits_zero(tmp_path: Path) -> None:
    """What `make run` does: start everything, run the demo, stop everything, exit with its status."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "townhall.cli.main",
            "--root",
            str(tmp_path),
            "dev",
            "--ports",
            "auto",
            "--run-demo",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "demo passed" in done.stdout


async def test_every_dashboard_panel_and_alert_has_data_on_the_live_topology(
    topology: Topology, prometheus_server: Path, tmp_path: Path
) -> None:
    """A real Prometheus scrapes the running processes through a demo; every query runs and shows data."""
    config = tmp_path / "prometheus.yml"
    render = REPO / "deploy" / "prometheus" / "render.py"
    await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            str(render),
            "--interval",
            "1s",
            "--topology",
            str(topology.manifest),
            "--out",
            str(config),
        ],
        check=True,
        timeout=60,
    )
    web = f"127.0.0.1:{free_port()}"
    log = (tmp_path / "prometheus.log").open("w")
    server = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block; it is waited for below
        [
            prometheus_server,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={web}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        prometheus = promql.Prometheus(f"http://{web}")
        await asyncio.to_thread(promql.wait_until_scraped, prometheus, 60, 2)
        checks = await demo(
            resolve(topology.manifest), followers=3, listeners=3, audio_file=None, tokens=TOKENS
        )
        assert [c for c in checks if not c.ok] == []
        # Streams are counted when they end, at the demo's end: wait for three scrapes after that.
        after = await asyncio.to_thread(_scrapes, prometheus) + 3
        await asyncio.to_thread(promql.wait_until_scraped, prometheus, 60, after)
        report = await asyncio.to_thread(promql.check, f"http://{web}")
        assert report.results, "no dashboard or alert queries found"
        assert not report.errors, report.summary()
        assert not report.unexpected_empty(), report.summary()
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _scrapes(prometheus: promql.Prometheus) -> int:
    """How many times the least-scraped target has been scraped in the last 5 minutes."""
    counts = prometheus.query("min(count_over_time(up[5m]))")
    return int(float(counts[0]["value"][1])) if counts else 0
