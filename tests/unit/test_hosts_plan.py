"""The multi-host topology's plan and report, without Docker (make cluster-up runs them for real)."""

from __future__ import annotations

import itertools

from docker.errors import NotFound

from townhall.core.config import load
from townhall_tools.faults.measure import Outcome
from townhall_tools.hosts.cluster import BENCH_SETTINGS, GATEWAY, LABEL, SUBNET, Cluster, plan
from townhall_tools.hosts.faults import SCENARIOS, HostsReport


def test_every_host_has_its_own_address_and_port() -> None:
    hosts = plan()
    roles = [h.role for h in hosts]
    assert {r: roles.count(r) for r in set(roles)} == {
        "kafka": 3, "admission": 3, "crowd": 1, "relay": 5, "notifier": 2,
    }  # fmt: skip
    ips = [h.ip for h in hosts]
    assert len(set(ips)) == len(ips) and GATEWAY not in ips
    assert all(ip.startswith(SUBNET.rsplit(".", 1)[0] + ".") for ip in ips)
    published = [h.published for h in hosts if h.published]
    assert len(set(published)) == len(published) == len(hosts) - 3  # brokers publish nothing
    assert len({h.name for h in hosts}) == len(hosts)
    # Benches dial a container's own address (no docker-proxy); clients outside its published port.
    relay = next(h for h in hosts if h.role == "relay")
    assert relay.direct == f"{relay.ip}:50052" and relay.grpc == f"127.0.0.1:{relay.published}"


def test_services_get_only_their_keys_and_static_members(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cluster = Cluster.__new__(Cluster)  # no Docker client: the environment alone
    cluster.root, cluster.hosts, cluster._secrets, cluster.settings = tmp_path, plan(), None, {}
    secrets = cluster.secrets
    relay = cluster._service_env(cluster.of("relay")[1], secrets)
    assert "TOWNHALL_TICKETS_PRIVATE_KEY" not in relay and "TOWNHALL_AUTH_KEYS" not in relay
    assert relay["TOWNHALL_RELAY_ADVERTISE"] == cluster.of("relay")[1].grpc  # what clients outside dial
    crowd = cluster._service_env(cluster.of("crowd")[0], secrets)
    assert crowd["TOWNHALL_ADMISSION_OWNER"] == "false"
    assert crowd["TOWNHALL_ADMISSION_MEMBERS"] == ",".join(h.internal for h in cluster.of("admission"))
    assert crowd["TOWNHALL_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    # Made once, kept: a second cluster on the same folder signs with the same keys.
    again = Cluster.__new__(Cluster)
    again.root, again.hosts, again._secrets = tmp_path, plan(), None
    assert again.secrets.keys == secrets.keys


def test_report_rows_count_every_loss() -> None:
    ok = Outcome("host-kill", "killed", {"lost": 0, "forks": 0, "notifications_lost": 0, "gap_ms_max": 40})
    bad = Outcome("host-kill", "killed", {"lost": 1, "forks": 2, "notifications_lost": 3}, ["lost"])
    report = HostsReport({"host-kill": [ok, bad]})
    [row] = report.summary()
    assert (row["runs"], row["passed"], row["lost"], row["forks"], row["notifications_lost"]) == (
        2,
        1,
        1,
        2,
        3,
    )
    assert "| `host-kill` | 2 | 1 |" in report.markdown()
    assert set(SCENARIOS) == {
        "owner-kafka-cut", "owner-peers-cut", "edge-origin-cut", "broker-stop", "broker-partition", "host-kill",
    }  # fmt: skip


def test_every_service_environment_is_a_valid_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """What each container gets loads as the process would load it (keys renamed in core/config.py fail here)."""
    cluster = Cluster.__new__(Cluster)
    cluster.root, cluster.hosts, cluster._secrets = tmp_path, plan(), None
    security = cluster.secrets.security
    assert security is not None
    (tmp_path / "password").write_text("x")
    for host, settings in itertools.product(cluster.hosts, ({}, BENCH_SETTINGS)):
        if host.role == "kafka":
            continue
        cluster.settings = settings  # the benches' topologies' settings load too
        env = cluster._service_env(host, cluster.secrets)
        env |= {
            "TOWNHALL_KAFKA_CA": str(security.ca),
            "TOWNHALL_KAFKA_PASSWORD_FILE": str(tmp_path / "password"),
        }
        load(env=env)


class _Nothing:
    def list(self, **_: object) -> list[object]:
        return []


class _Volume:
    def __init__(self, store: dict[str, _Volume], name: str) -> None:
        self.store, self.name = store, name

    def remove(self, force: bool = False) -> None:
        del self.store[self.name]


class _Volumes:
    def __init__(self, names: dict[str, bool]) -> None:  # name -> labelled with LABEL
        self.labelled = {n for n, labelled in names.items() if labelled}
        self.store: dict[str, _Volume] = {}
        self.store.update({name: _Volume(self.store, name) for name in names})

    def list(self, filters: dict[str, str]) -> list[_Volume]:
        assert filters == {"label": LABEL}
        return [v for n, v in self.store.items() if n in self.labelled]

    def get(self, name: str) -> _Volume:
        if name not in self.store:
            raise NotFound(name)
        return self.store[name]


class _Docker:
    """What `Cluster.down` asks of a Docker client: no containers or networks, some volumes."""

    def __init__(self, volumes: _Volumes) -> None:
        self.containers = self.networks = _Nothing()
        self.volumes = volumes


def test_down_removes_the_notifiers_graph_volumes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Named volumes outlive `remove(v=True)`: without this, the next topology's notifiers start with this
    # one's graph (a 10M-follower celebrity included).
    cluster = Cluster.__new__(Cluster)
    cluster.root, cluster.hosts, cluster._secrets = tmp_path, plan(notifiers=1), None
    volumes = _Volumes({"townhall-notifier-0-data": False, "townhall-notifier-1-data": True, "other": False})
    cluster.docker = _Docker(volumes)
    assert cluster.down() == 0
    assert set(volumes.store) == {"other"}
    assert cluster.down() == 0  # nothing left: still fine


def test_a_fresh_topology_is_removed_after_its_block_even_when_the_block_fails(tmp_path) -> None:  # type: ignore[no-untyped-def]
    calls: list[str] = []

    class Recorded(Cluster):
        def up(self, timeout_s: float = 300.0) -> None:
            calls.append("up")

        def down(self) -> int:
            calls.append("down")
            return 0

    cluster = Recorded.__new__(Recorded)
    with cluster.fresh() as up_s:
        calls.append("measure")
    assert calls == ["down", "up", "measure", "down"] and up_s >= 0
    calls.clear()
    try:
        with cluster.fresh():
            raise RuntimeError("a step failed")
    except RuntimeError:
        pass
    assert calls == ["down", "up", "down"]
