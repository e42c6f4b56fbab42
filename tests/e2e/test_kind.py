"""The chart on kind, used from the host as a user would: through the NodePorts kind maps to localhost.

In order: the release is Ready and `helm test` passes; the images run as non-root without compilers, and
Townhall's carries the runtime only (no tooling, no rich/psutil/av); grpcurl sees reflection and health; the
demo passes (20 followers notified, 20 listeners hearing byte-identical audio); then, while a speaker talks to
20 listeners and hosts change rooms, faults (the admission pod that owns the room, the relay pod listeners are
on, the Kafka pod: each force-deleted; a `helm upgrade` that changes the config and rolls every pod) and
scaling (relays 2 -> 4 -> 2, admission 2 -> 3 -> 2). Each listener may miss at most 2 s of audio per event,
and no acknowledged room change may be lost. Last, the in-cluster Prometheus has every dashboard panel and
alert query returning data.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.chart import promql
from tests.e2e.audience import Audience, Churn, Window, client, fresh_user
from tests.e2e.conftest import (
    ADMISSION,
    MAKE,
    NAMESPACE,
    NOTIFIER,
    PROMETHEUS,
    RELAY_PORT_BASE,
    REPO,
    Steps,
)
from townhall.client import Endpoints
from townhall.core.sharding import owner
from townhall_tools.devtools.kind import Cluster, ready, wait_ready
from townhall_tools.faults.measure import until

pytestmark = pytest.mark.timeout(3600)

LISTENERS = 20
# deploy/kind/prometheus.yaml's scrape_interval.
SCRAPE_INTERVAL_S = 5
MAX_GAP_MS = 2000.0
# What the helm upgrade of the fault test changes (a rolling restart); the upgrades after it keep it.
UPGRADED = "config.log.level=debug"
ADMISSION_INTERNAL_PORT = 50071
GRPCURL = REPO / ".cache" / "bin" / "grpcurl"
INSTANCE = "app.kubernetes.io/instance=townhall"


def component(name: str) -> str:
    return f"{INSTANCE},app.kubernetes.io/component={name}"


def redeploy(steps: Steps, step: str, *sets: str) -> Callable[[], Awaitable[float]]:
    """`make deploy` as an action: the kind values applied again with UPGRADED and `sets` (--set flags), so
    every upgrade states the whole of what it asks for."""
    extra = "HELM_EXTRA=" + " ".join(f"--set {s}" for s in (UPGRADED, *sets))
    return lambda: steps.amake(step, "deploy", extra)


def relay_pod(address: str) -> str:
    """The relay pod behind a NodePort address (relay.externalAccess: port base + ordinal)."""
    return f"townhall-relay-{int(address.rsplit(':', 1)[1]) - RELAY_PORT_BASE}"


@pytest.fixture(scope="module")
async def audience(endpoints: Endpoints) -> AsyncIterator[Audience]:
    crowd = Audience(endpoints, LISTENERS)
    await crowd.start()
    try:
        yield crowd
    finally:
        await crowd.close()


async def during(
    steps: Steps,
    audience: Audience,
    endpoints: Endpoints,
    step: str,
    action: Callable[[], Awaitable[object]],
    **figures: object,
) -> Window:
    """Runs `action` while the room plays and hosts change rooms; then checks that
    each listener missed at most 2 s of audio and every acknowledged change is still there."""
    churn = Churn(endpoints)
    try:
        await asyncio.sleep(2)  # changes under way before the fault
        window = audience.begin()
        started = time.monotonic()
        await action()
        acted_s = time.monotonic() - started
        await audience.settle(window)
        await asyncio.sleep(2)
    finally:
        await churn.stop()  # whatever happened: no host goes on changing rooms into the next test
    lost = await churn.lost()
    steps.add(
        step,
        acted_s,
        not lost and max(window.gaps_ms) <= MAX_GAP_MS,
        gap_ms_max=max(window.gaps_ms),
        silence_s_max=max(window.silences_s),
        heard_again_s=window.recovered_s,
        listener_moves=window.moves,
        changes_acked=churn.ledger.changes,
        change_errors=len(churn.ledger.errors),
        lost=len(lost),
        **figures,
    )
    assert not lost, f"acknowledged changes lost: {lost[:5]}"
    assert max(window.gaps_ms) <= MAX_GAP_MS, f"listeners missed {sorted(window.gaps_ms)[-5:]} ms of audio"
    assert not audience.errors, audience.errors[:3]
    return window


def test_every_pod_is_ready_and_helm_test_passes(deployed: Cluster, steps: Steps) -> None:
    pods = deployed.pods(NAMESPACE, INSTANCE)
    running = [p for p in pods if p.status.phase == "Running"]
    assert running and all(ready(p) for p in running), [p.metadata.name for p in running if not ready(p)]
    steps.make("helm test", "helm-test")


def test_images_run_as_non_root_without_compilers(deployed: Cluster, steps: Steps) -> None:
    listed = subprocess.run([*MAKE, "-s", "print-kind-images"], cwd=REPO, capture_output=True, text=True)
    images = [i for i in listed.stdout.split() if ":" in i]
    local = [
        i
        for i in images
        if subprocess.run(["docker", "image", "inspect", i], capture_output=True).returncode == 0
    ]
    assert local, f"no local image among {images}"
    for image in local:
        probe = subprocess.run(
            [
                "docker",
                "run",
                "--rm",
                "--entrypoint",
                "/bin/sh",
                image,
                "-c",
                "id -u; for c in gcc cc c++ g++ clang javac make; do command -v $c || true; done",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = probe.stdout.split()
        assert probe.returncode == 0 and lines, probe.stderr
        assert lines[0] != "0", f"{image} runs as root"
        assert lines[1:] == [], f"{image} carries compilers: {lines[1:]}"
        size = subprocess.run(
            ["docker", "image", "inspect", "-f", "{{.Size}}", image],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        steps.add(f"image {image}", 0.0, True, uid=lines[0], size_mb=round(int(size) / 1e6))


# What the image must not carry: the tooling (tools/, townhall-tools) and the packages only the CLI, the
# benchmarks and the tools need. The runtime's own modules must be there.
NOT_RUNTIME = ("rich", "psutil", "av", "matplotlib", "townhall_tools")
RUNTIME = ("townhall.admission.app", "townhall.relay.app", "townhall.notifier.app", "townhall.core.certs")


def test_the_townhall_image_carries_the_runtime_only(deployed: Cluster, steps: Steps) -> None:
    listed = subprocess.run([*MAKE, "-s", "print-image"], cwd=REPO, capture_output=True, text=True)
    image = listed.stdout.strip()
    inspect = subprocess.run(["docker", "image", "inspect", image], capture_output=True)
    assert inspect.returncode == 0, f"{image} is not a local image (make image builds it)"
    probe = (
        "import importlib, importlib.util as u\n"
        f"for m in {RUNTIME!r}: importlib.import_module(m)\n"
        f"print(' '.join(m for m in {NOT_RUNTIME!r} if u.find_spec(m)) or 'none')\n"
        "import townhall, pathlib\n"
        "root = pathlib.Path(townhall.__file__).parent\n"
        "print(' '.join(d for d in ('bench', 'faults', 'devtools') if (root / d).exists()) or 'none')"
    )
    run = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "python", image, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    packages, folders = run.stdout.splitlines()
    assert packages == "none", f"{image} carries what is not the runtime: {packages}"
    assert folders == "none", f"{image}'s townhall package carries tooling: {folders}"
    steps.add(f"runtime only {image}", 0.0, True)


@pytest.mark.parametrize("address", [ADMISSION, NOTIFIER, f"127.0.0.1:{RELAY_PORT_BASE}"])
def test_grpcurl_sees_reflection_and_health_through_the_node_ports(
    deployed: Cluster, steps: Steps, address: str
) -> None:
    started = time.monotonic()
    listed = subprocess.run(
        [GRPCURL, "-plaintext", address, "list"], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    services = listed.stdout.split()
    assert "grpc.health.v1.Health" in services and any(s.startswith("townhall.v1.") for s in services), (
        services
    )
    assert not any(".internal" in s or "Leases" in s for s in services), (
        f"internal services exposed: {services}"
    )
    health = subprocess.run(
        [GRPCURL, "-plaintext", "-d", '{"service": ""}', address, "grpc.health.v1.Health/Check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout)["status"] == "SERVING"
    steps.add(f"grpcurl {address}", time.monotonic() - started, True, services=len(services))


def run_demo(steps: Steps, step: str) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "townhall.cli.main",
            "--admission",
            ADMISSION,
            "--notifier",
            NOTIFIER,
            "demo",
            "--followers",
            "20",
            "--listeners",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(done.stdout[-4000:])
    steps.add(step, time.monotonic() - started, done.returncode == 0)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "demo passed" in done.stdout


def test_the_demo_passes_through_the_node_ports(deployed: Cluster, steps: Steps) -> None:
    run_demo(steps, "demo: 20 followers notified, 20 listeners byte-identical")


async def test_the_admission_pod_that_owns_the_room_is_force_deleted(
    deployed: Cluster, steps: Steps, audience: Audience, endpoints: Endpoints
) -> None:
    pods = [p for p in deployed.pods(NAMESPACE, component("admission")) if ready(p)]
    members = {f"{p.status.pod_ip}:{ADMISSION_INTERNAL_PORT}": p.metadata.name for p in pods}
    victim = members[owner(audience.room_id, list(members))]

    async def act() -> None:
        await asyncio.to_thread(deployed.delete_pod, NAMESPACE, victim, True)

    await during(steps, audience, endpoints, f"fault: owner {victim} force-deleted", act)
    await asyncio.to_thread(wait_ready, deployed, NAMESPACE, INSTANCE, 600)
    reader = client(endpoints, fresh_user())
    try:
        room = await reader.get_room(audience.room_id)
    finally:
        await reader.close()
    assert room.room_id == audience.room_id and room.host_id == audience.host.user


async def test_the_relay_pod_listeners_are_on_is_force_deleted(
    deployed: Cluster, steps: Steps, audience: Audience, endpoints: Endpoints
) -> None:
    assert audience.speaker is not None
    on = audience.relays()
    edges = [relay for relay, _ in on.most_common() if relay != audience.speaker.relay]
    target = edges[0] if edges else audience.speaker.relay
    victim = relay_pod(target)

    async def act() -> None:
        await asyncio.to_thread(deployed.delete_pod, NAMESPACE, victim, True)

    window = await during(
        steps, audience, endpoints, f"fault: relay {victim} force-deleted", act, listeners_on_it=on[target]
    )
    assert window.moves >= on[target], "the listeners of the deleted relay moved"
    await asyncio.to_thread(wait_ready, deployed, NAMESPACE, INSTANCE, 600)


async def test_the_kafka_pod_is_force_deleted_and_joins_go_on(
    deployed: Cluster, steps: Steps, audience: Audience, endpoints: Endpoints
) -> None:
    joined: list[float] = []
    broker = "townhall-kafka-0"
    selector = component("kafka")
    (before,) = [p.metadata.uid for p in deployed.pods(NAMESPACE, selector) if p.metadata.name == broker]

    def broker_down() -> bool:
        """The old broker pod is gone and its replacement is not Ready yet."""
        pods = deployed.pods(NAMESPACE, selector, terminating=True)
        return all(p.metadata.uid != before and not ready(p) for p in pods)

    async def act() -> None:
        await asyncio.to_thread(deployed.delete_pod, NAMESPACE, broker, True)
        await until(broker_down, 60, "the broker pod gone", step_s=0.2)
        # While the broker is down: new listeners join and hear the room (joins do not need Kafka).
        started = time.monotonic()
        newcomers = [client(endpoints, fresh_user()) for _ in range(3)]
        audience.people.extend(newcomers)
        for person in newcomers:
            await audience.add_listener(person)
        await until(lambda: all(t.heard > 10 for t in audience.tapes[-3:]), 60, "newcomers hearing the room")
        joined.append(time.monotonic() - started)
        assert await asyncio.to_thread(broker_down), "the broker came back before the newcomers joined"

    await during(steps, audience, endpoints, "fault: Kafka pod force-deleted", act)
    down_s = await asyncio.to_thread(wait_ready, deployed, NAMESPACE, INSTANCE, 600)
    steps.add(
        "joins while Kafka was down", joined[0], True, newcomers=3, then_all_ready_in_s=round(down_s, 1)
    )


async def test_a_helm_upgrade_that_changes_config_rolls_every_pod_while_they_listen(
    deployed: Cluster, steps: Steps, audience: Audience, endpoints: Endpoints
) -> None:
    before = {p.metadata.name: p.metadata.uid for p in deployed.pods(NAMESPACE, INSTANCE)}

    upgrade = redeploy(steps, "helm upgrade (config change)")
    await during(steps, audience, endpoints, "fault: rolling restart by helm upgrade", upgrade)
    after = {p.metadata.name: p.metadata.uid for p in deployed.pods(NAMESPACE, component("admission"))}
    assert all(before.get(name) != uid for name, uid in after.items()), "admission pods were replaced"


async def test_relays_scale_2_4_2_while_listeners_join(
    deployed: Cluster, steps: Steps, audience: Audience, endpoints: Endpoints
) -> None:
    up = redeploy(steps, "relays 2 -> 4", "relay.replicas=4")
    await during(steps, audience, endpoints, "scale: relays 2 -> 4", up)
    # Listeners joining now reach the new relays too.
    newcomers = Audience(endpoints, LISTENERS)
    await newcomers.start()
    try:
        on_new = {
            r: n
            for r, n in newcomers.relays().items()
            if relay_pod(r) in ("townhall-relay-2", "townhall-relay-3")
        }
        steps.add(
            "listeners on the new relays", 0.0, bool(on_new), **{relay_pod(r): n for r, n in on_new.items()}
        )
        assert on_new, f"no listener on a new relay: {dict(newcomers.relays())}"

        down = redeploy(steps, "relays 4 -> 2")
        crowd_window = newcomers.begin()
        await during(steps, audience, endpoints, "scale: relays 4 -> 2", down)
        await newcomers.settle(crowd_window)
        assert max(crowd_window.gaps_ms) <= MAX_GAP_MS, (
            f"drained listeners missed {max(crowd_window.gaps_ms)} ms"
        )
        assert not set(newcomers.relays()) & {f"127.0.0.1:{RELAY_PORT_BASE + i}" for i in (2, 3)}
        steps.add(
            "drained listeners moved",
            crowd_window.recovered_s,
            True,
            gap_ms_max=max(crowd_window.gaps_ms),
            moves=crowd_window.moves,
        )
    finally:
        await newcomers.close()


async def test_admission_scales_2_3_2_while_rooms_change(
    deployed: Cluster, steps: Steps, audience: Audience, endpoints: Endpoints
) -> None:
    up = redeploy(steps, "admission 2 -> 3", "admission.replicas=3")
    await during(steps, audience, endpoints, "scale: admission 2 -> 3", up)
    prometheus = promql.Prometheus(PROMETHEUS)
    new = "townhall-admission-2"
    # Rooms created now are owned by the new pod too: its changes appear in its own counter.
    churn = Churn(endpoints)
    try:
        seen = await until(
            lambda: bool(
                [
                    r
                    for r in prometheus.query(f'sum(townhall_room_changes_total{{pod="{new}"}})')
                    if float(r["value"][1]) > 0
                ]
            ),
            120,
            f"{new} owning rooms",
            step_s=2,
        )
    finally:
        await churn.stop()
    assert not await churn.lost()
    steps.add("rooms on the new admission pod", 0.0, bool(seen))

    down = redeploy(steps, "admission 3 -> 2")
    await during(steps, audience, endpoints, "scale: admission 3 -> 2", down)


def test_prometheus_scrapes_every_pod_and_every_panel_and_alert_has_data(
    deployed: Cluster, steps: Steps
) -> None:
    run_demo(steps, "demo again (fresh data for the panels)")
    prometheus = promql.Prometheus(PROMETHEUS)
    expected = {
        p.metadata.name
        for p in deployed.pods(NAMESPACE, "app.kubernetes.io/part-of=townhall")
        if ready(p) and any(port.name == "metrics" for c in p.spec.containers for port in c.ports or [])
    }
    started = time.monotonic()

    def every_pod_up() -> bool:
        up = {r["metric"].get("pod") for r in prometheus.query("up == 1")}
        return expected <= up

    def scraped_since(at: float) -> bool:
        """Every target scraped twice after `at` (Unix time): streams are counted when they end, and
        rate() needs two samples of what the demo did."""
        last = prometheus.query("min(timestamp(up))")
        return bool(last) and float(last[0]["value"][1]) >= at + 2 * SCRAPE_INTERVAL_S

    demo_ended = time.time()
    deadline = time.monotonic() + 120
    while not (every_pod_up() and scraped_since(demo_ended)):
        assert time.monotonic() < deadline, (
            f"not scraped: {expected - {r['metric'].get('pod') for r in prometheus.query('up == 1')}}"
        )
        time.sleep(2)
    report = promql.check(PROMETHEUS)
    print(report.summary())
    steps.add(
        "Prometheus: panels and alerts",
        time.monotonic() - started,
        not report.errors and not report.unexpected_empty(),
        targets=len(expected),
        queries=len(report.results),
    )
    assert report.results
    assert not report.errors, report.summary()
    assert not report.unexpected_empty(), report.summary()
