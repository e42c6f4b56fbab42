"""The Helm chart, rendered by the real helm for every ci/ scenario and checked for what an operator relies on."""

from __future__ import annotations

import base64
import functools
import json
import math
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cryptography import x509

from tests.chart.helpers import (
    CHART,
    KUBE_VERSION,
    MONITORING_API,
    NAMESPACE,
    RELEASE,
    REPO,
    SCENARIOS,
    TEST_KEYS,
    Manifest,
    by_kind,
    component,
    pod_specs,
    run_helm,
    template_args,
    values_file,
    workload,
)
from townhall.core.certs import Authority
from townhall.core.config import Config
from townhall.core.config import load as load_config
from townhall.core.kafka import Topics
from townhall_tools.devtools.kafka_broker import SECURE_SETTINGS, Acl, acls

Render = Callable[..., list[Manifest]]
POD_INDEX_FIELD = "metadata.labels['apps.kubernetes.io/pod-index']"
SERVICES = ("admission", "admission-crowd", "relay", "notifier")
# Shards per scenario: what the StatefulSet (or its HPA's minReplicas) runs and admission is told about.
SHARDS = {
    "kind-default": {"admission": 2, "relay": 2, "notifier": 1},
    "multi-shard": {"admission": 3, "relay": 4, "notifier": 2},
    "external-kafka": {"admission": 2, "relay": 2, "notifier": 1},
    "tls": {"admission": 2, "relay": 2, "notifier": 1},
}
HEALTH_SERVICES = {
    "admission": {"townhall.v1.Rooms", "townhall.v1.Admission"},
    "relay": {"townhall.v1.Relay"},
    "notifier": {"townhall.v1.Graph", "townhall.v1.Inbox"},
}


def test_every_scenario_has_expectations() -> None:
    assert set(SCENARIOS) == set(SHARDS)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint_strict(helm: Path, scenario: str) -> None:
    result = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(values_file(scenario)))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("api_versions", [(), ("--api-versions", MONITORING_API)], ids=["plain", "operator"])
def test_manifests_are_valid_kubernetes(render: Render, scenario: str, api_versions: tuple[str, ...]) -> None:
    """Strict schema validation (unknown fields are errors) against the Kubernetes of kind's node image."""
    manifests = render(scenario, *api_versions)
    errors = []
    for m in manifests:
        if m["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # CRDs: no schema in kubernetes-validate; checked in test_monitoring_objects_*.
        try:
            kubernetes_validate.validate(m, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{m['kind']}/{m['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_shard_counts_match_the_scenario(render: Render, scenario: str) -> None:
    manifests = render(scenario)
    hpas = by_kind(manifests, "HorizontalPodAutoscaler")
    config = configmap(manifests)
    for name, shards in SHARDS[scenario].items():
        sts = workload(manifests, name)
        assert sts["kind"] == "StatefulSet"
        hpa = hpas.get(sts["metadata"]["name"])
        if hpa:
            assert "replicas" not in sts["spec"], "with an HPA the StatefulSet must leave replicas to it"
            assert hpa["spec"]["minReplicas"] == shards
            assert hpa["spec"]["scaleTargetRef"] == {
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "name": sts["metadata"]["name"],
            }
        else:
            assert sts["spec"]["replicas"] == shards
    # Admission is given no relay list: it finds the relays that exist from their load reports.
    assert config["TOWNHALL_ADMISSION_RELAYS"] == ""
    # The helm test pod checks every admission, relay and notifier pod by its stable name.
    test_pod = next(iter(by_kind(manifests, "Pod").values()))
    targets = " ".join(test_pod["spec"]["containers"][0]["command"][4:])
    for name, shards in SHARDS[scenario].items():
        for i in range(shards):
            assert f"{RELEASE}-{name}-{i}.{RELEASE}-{name}-headless" in targets
        assert f"{RELEASE}-{name}-{shards}." not in targets


def test_multi_shard_autoscales_admission_and_relay(render: Render) -> None:
    hpas = by_kind(render("multi-shard"), "HorizontalPodAutoscaler")
    assert set(hpas) == {f"{RELEASE}-admission", f"{RELEASE}-relay"}
    for hpa in hpas.values():
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_container_has_resources_and_every_server_has_probes(render: Render, scenario: str) -> None:
    for owner, spec in pod_specs(render(scenario)):
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{owner['kind']}/{owner['metadata']['name']}/{c['name']}"
            resources = c.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), f"{where}: requests"
            assert "memory" in resources.get("limits", {}), f"{where}: memory limit"
            if owner["kind"] in {"Job", "Pod"} or c in spec.get("initContainers", []):
                continue  # run to completion
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{where}: {probe}"
            if component(owner) in SERVICES:
                # The kubelet checks the plaintext health-only port (no TLS; a server of its own).
                port = port_of(c, "health")
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert c[probe]["grpc"] == {"port": port}, f"{where}: {probe} must be gRPC health"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_shutdown_is_consistent_with_the_servers_grace_period(render: Render, scenario: str) -> None:
    """preStop sleep, then SIGTERM and a drain of server.grace_s: all within terminationGracePeriodSeconds."""
    manifests = render(scenario)
    grace_s = float(configmap(manifests)["TOWNHALL_SERVER_GRACE_S"])
    notice_s = float(configmap(manifests)["TOWNHALL_SERVER_DRAIN_NOTICE_S"])
    for name in SERVICES:
        spec = workload(manifests, name)["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pre_stop > 0
        assert (
            spec["terminationGracePeriodSeconds"] >= pre_stop + math.ceil(notice_s) + math.ceil(grace_s) + 1
        )
        # Liveness must not kill a draining server (it reports NOT_SERVING) before the grace period ends.
        # (A notifier scaled away hands its graph keys over first, while it still reports SERVING.)
        handover_s = (
            float(configmap(manifests)["TOWNHALL_NOTIFIER_HANDOVER_GRACE_S"]) if name == "notifier" else 0
        )
        live = c["livenessProbe"]
        assert (
            live["periodSeconds"] * live["failureThreshold"]
            > spec["terminationGracePeriodSeconds"] - handover_s
        )
        if name == "notifier":
            assert spec["terminationGracePeriodSeconds"] >= pre_stop + notice_s + grace_s + handover_s


def test_grace_period_follows_the_configured_drain_time(render: Render) -> None:
    manifests = render("kind-default", "--set", "config.server.grace_s=30")
    assert configmap(manifests)["TOWNHALL_SERVER_GRACE_S"] == "30"
    for name in SERVICES:
        # preStop 5 + drain notice 1 + grace 30 + close 5 (+ the notifier's handover_grace_s, 120)
        expected = 41 + (120 if name == "notifier" else 0)
        assert (
            workload(manifests, name)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == expected
        )


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rbac_reads_endpointslices_and_the_notifier_statefulset_only(render: Render, scenario: str) -> None:
    manifests = render(scenario)
    assert not by_kind(manifests, "ClusterRole") and not by_kind(manifests, "ClusterRoleBinding")
    (role,) = by_kind(manifests, "Role").values()
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        },
        {
            "apiGroups": ["apps"],
            "resources": ["statefulsets"],
            "resourceNames": [workload(manifests, "notifier")["metadata"]["name"]],
            "verbs": ["get"],
        },
    ]
    (binding,) = by_kind(manifests, "RoleBinding").values()
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (account,) = by_kind(manifests, "ServiceAccount").values()
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]
    for owner, spec in pod_specs(manifests):
        if component(owner) in {"admission", "admission-crowd", "relay", "notifier"}:
            assert spec["serviceAccountName"] == account["metadata"]["name"]
        else:
            assert spec.get("automountServiceAccountToken") is False, owner["metadata"]["name"]
            assert "serviceAccountName" not in spec


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_admission_members_find_each_other_through_their_headless_service(
    render: Render, scenario: str
) -> None:
    manifests = render(scenario)
    admission = workload(manifests, "admission")
    (container,) = admission["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    headless = admission["spec"]["serviceName"]
    assert headless in by_kind(manifests, "Service")
    assert env["TOWNHALL_ADMISSION_MEMBERSHIP"]["value"] == "kubernetes"
    assert env["TOWNHALL_ADMISSION_KUBE_SERVICE"]["value"] == headless
    # A member is known by what its EndpointSlice lists: the pod IP and the internal port.
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    port = port_of(container, "internal")
    assert env["TOWNHALL_ADMISSION_ADVERTISE"]["value"] == f"$(POD_IP):{port}"
    listed = by_kind(manifests, "Service")[headless]["spec"]["ports"]
    assert {"name": "internal", "port": port} in [{"name": p["name"], "port": p["port"]} for p in listed]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_membership_counts_only_ready_pods_while_relay_names_resolve_from_pod_start(
    render: Render, scenario: str
) -> None:
    """A pod that is not serving must own no rooms: the Service admission watches publishes only ready
    pods, so its EndpointSlices' `ready` means ready. Relays are known by pod DNS names, which must
    resolve while a relay starts or comes back; their Service publishes every pod, and readiness is
    read from `serving` there (townhall.core.membership.slice_members)."""
    manifests = render(scenario)
    services = by_kind(manifests, "Service")
    admission = workload(manifests, "admission")
    (container,) = admission["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    watched = services[env["TOWNHALL_ADMISSION_KUBE_SERVICE"]]
    assert not watched["spec"].get("publishNotReadyAddresses", False)
    relay = workload(manifests, "relay")
    governing = services[relay["spec"]["serviceName"]]
    assert governing["spec"]["publishNotReadyAddresses"] is True
    (relay_container,) = relay["spec"]["template"]["spec"]["containers"]
    advertise = next(e["value"] for e in relay_container["env"] if e["name"] == "TOWNHALL_RELAY_ADVERTISE")
    if "$(POD_NAME)" in advertise:  # kind advertises the relay NodePort instead
        assert advertise.startswith(f"$(POD_NAME).{governing['metadata']['name']}.")


def test_the_chart_works_as_a_subchart_of_a_parent_with_global_values(helm: Path, tmp_path: Path) -> None:
    """Helm hands a parent's `global` to every subchart: the strict schema must take it."""
    parent = tmp_path / "platform"
    (parent / "charts").mkdir(parents=True)
    shutil.copytree(CHART, parent / "charts" / "townhall")
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: platform\nversion: 1.0.0\n"
        "dependencies:\n  - name: townhall\n    version: 0.1.0\n"
    )
    # The chart generates no keys: the parent gives them, like any other value of the subchart.
    values = {
        "global": {"imageRegistry": "registry.example.com", "storageClass": "fast"},
        "townhall": {**yaml.safe_load(TEST_KEYS.read_text()), "admission": {"replicas": 3}},
    }
    (parent / "values.yaml").write_text(yaml.safe_dump(values))
    result = run_helm(
        helm, "template", "platform", str(parent), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION
    )
    assert result.returncode == 0, result.stderr
    manifests = [m for m in yaml.safe_load_all(result.stdout) if m]
    assert workload(manifests, "admission")["spec"]["replicas"] == 3, "the parent's values reach the chart"
    lint = run_helm(helm, "lint", "--strict", "--with-subcharts", str(parent))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    # The schema still refuses what it should under a parent.
    bad = run_helm(helm, "template", "platform", str(parent), "--set", "townhall.admision.replicas=3")
    assert bad.returncode != 0 and "admision" in bad.stderr


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_images_are_pinned(render: Render, scenario: str) -> None:
    for owner, spec in pod_specs(render(scenario)):
        for c in spec.get("initContainers", []) + spec["containers"]:
            image = c["image"]
            name, _, tag = image.rpartition(":")
            assert name and "/" not in tag, f"{image} has no tag"
            assert tag != "latest", f"{owner['metadata']['name']} uses {image}"


def test_townhall_image_defaults_to_the_app_version(render: Render) -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert workload(render(None), "relay")["spec"]["template"]["spec"]["containers"][0]["image"] == (
        f"townhall:{app_version}"
    )


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pods_are_locked_down(render: Render, scenario: str) -> None:
    for owner, spec in pod_specs(render(scenario)):
        where = owner["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        # Service links would put TOWNHALL_*_PORT (and KAFKA_PORT) variables in the environment.
        assert spec["enableServiceLinks"] is False, where
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], where
            # The broker too: it writes only to /tmp, its keystore volume and its data volume.
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, where


def secret_files_unreadable(spec: dict[str, Any]) -> list[str]:
    """The Secret files (secret and projected volumes) a non-root container of the pod mounts but cannot read.

    Secret files belong to root. With the pod's fsGroup the kubelet gives them that group, with read for the
    group added (0440 at least), and the containers run with it as a supplementary group; without, only the
    mode's bits for others count (0644 unless defaultMode or an item's mode says less).
    """
    pod = spec.get("securityContext", {})
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    unreadable = []
    for c in spec.get("initContainers", []) + spec["containers"]:
        uid = c.get("securityContext", {}).get("runAsUser", pod.get("runAsUser"))
        if uid == 0 or pod.get("fsGroup") is not None:
            continue
        for mount in c.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "secret" in volume:
                sources, default = [{"secret": volume["secret"]}], volume["secret"].get("defaultMode", 0o644)
            elif "projected" in volume:
                sources, default = (
                    volume["projected"]["sources"],
                    volume["projected"].get("defaultMode", 0o644),
                )
            else:
                continue
            for source in sources:
                for item in source.get("secret", {}).get("items", [{"path": "*"}]):
                    if not item.get("mode", default) & 0o004:
                        unreadable.append(f"{c['name']}: {mount['mountPath']}/{item['path']}")
    return unreadable


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_non_root_pod_can_read_the_secrets_it_mounts(render: Render, scenario: str) -> None:
    """The topics Job (the Kafka image's user 1000) once mounted the users Secret 0400 without an fsGroup:
    root's alone, so it could not read the admin password."""
    for owner, spec in pod_specs(render(scenario)):
        assert secret_files_unreadable(spec) == [], (owner["kind"], owner["metadata"]["name"])
    job = topics_job(render(scenario))["spec"]["template"]["spec"]
    assert job["securityContext"]["fsGroup"] == job["securityContext"]["runAsUser"] == 1000
    # The checker itself: the same Job without its fsGroup is caught.
    del job["securityContext"]["fsGroup"]
    assert secret_files_unreadable(job) == ["topics: /etc/kafka/users/*"]


def test_the_helm_test_pod_is_kept_for_its_logs(render: Render) -> None:
    """`helm test --logs` reads the pod's log after it ends: a hook-succeeded policy deletes it first."""
    (pod,) = by_kind(render("kind-default"), "Pod").values()
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["metadata"]["annotations"]["helm.sh/hook-delete-policy"] == "before-hook-creation"


def test_kind_network_policies_let_the_host_the_kubelet_and_a_local_prometheus_in(render: Render) -> None:
    """On kind the host's NodePort traffic reaches the client ports and the kubelet the health ports (from
    anywhere); Prometheus scrapes from namespace monitoring or from its pods in the release's namespace."""
    manifests = render("kind-default")
    policies = {n: p for n, p in by_kind(manifests, "NetworkPolicy").items() if n != f"{RELEASE}-kafka"}
    assert set(policies) == {f"{RELEASE}-{n}" for n in SERVICES}
    for policy in policies.values():
        rules = {tuple(p["port"] for p in r["ports"]): r.get("from") for r in policy["spec"]["ingress"]}
        assert rules[("grpc", "health")] is None
        assert rules[("metrics",)] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
            {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}},
        ]
    # Each per-relay Service targets the port the relay policy opens to everyone.
    relay_ports = {
        p["targetPort"] for s in external_relay_services(manifests).values() for p in s["spec"]["ports"]
    }
    assert relay_ports == {"grpc"}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rendered_config_is_accepted_by_every_service(render: Render, scenario: str, tmp_path: Path) -> None:
    """The env a service container gets loads with townhall.core.config (which rejects unknown keys)."""
    manifests = render(scenario)
    mounted = mounted_files(tmp_path)
    for name in SERVICES:
        sts = workload(manifests, name)
        pod_name = f"{sts['metadata']['name']}-0"
        (c,) = sts["spec"]["template"]["spec"]["containers"]
        env = container_env(manifests, c, pod_name)
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        for key, value in env.items():
            # Files the pod reads from its Secret volumes: each path is under a mount, here made real.
            if value in mounted:
                assert any(value.startswith(m + "/") for m in mounts), (name, key, value)
                env[key] = str(mounted[value])
        config = load_config(env=env)
        service = name.removesuffix("-crowd")  # the crowd lane runs admission
        assert config.missing_keys(service) == [], (scenario, name)
        section = getattr(config, service)
        assert section.listen == f"0.0.0.0:{port_of(c, 'grpc')}"
        assert section.metrics_port == port_of(c, "metrics")
        if name == "admission-crowd":
            assert not config.admission.internal_listen, "nobody calls the crowd lane: no internal port"
        else:
            assert section.internal_listen == f"0.0.0.0:{port_of(c, 'internal')}"
        if name == "relay":
            # Admission knows relays only by the advertised address in their load reports (tickets are
            # bound to it, and name its internal address, where edges pull from), so the reports are on.
            assert config.admission.relays == () and config.admission.relays_internal == ()
            assert config.relay.load_report_s > 0
            # A relay verifies tickets and cannot make one; it checks no user tokens either.
            assert not config.tickets.private_key and not config.auth.keys
        if name == "notifier":
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert config.notifier.data_dir in mounts


def test_the_host_failover_grace_reaches_admission_through_the_config_loader(render: Render) -> None:
    for flags, expected in (
        ((), 60.0),
        (("--set", "admission.config.host_grace_s=30"), 30.0),
        (("--set", "admission.config.host_grace_s=0"), 0.0),
    ):
        manifests = render(None, *flags)
        (c,) = workload(manifests, "admission")["spec"]["template"]["spec"]["containers"]
        config = service_config(manifests, c, "admission-0")
        assert config.admission.host_grace_s == expected, flags
        # Presence comes from the relays' load reports: they are on, and often enough for the grace.
        assert config.relay.load_report_s > 0


def test_whole_numbers_reach_the_services_unmangled(render: Render) -> None:
    config = configmap(render(None, "--set", "admission.config.default_listener_limit=100000000"))
    assert config["TOWNHALL_ADMISSION_DEFAULT_LISTENER_LIMIT"] == "100000000"
    assert config["TOWNHALL_SERVER_GRACE_S"] == "10"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_config_checksum_rolls_every_service(render: Render, scenario: str) -> None:
    def checksums(*flags: str) -> set[str]:
        manifests = render(scenario, *flags)
        return {
            workload(manifests, name)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
            for name in SERVICES
        }

    base = checksums()
    assert len(base) == 1 and re.fullmatch(r"[0-9a-f]{64}", next(iter(base)))
    assert checksums("--set", "config.log.level=debug") != base
    assert checksums("--set-json", "relay.config.chunk_s=0.06") != base
    # Values outside the ConfigMap (resources here) do not change it.
    assert checksums("--set", "admission.resources.requests.cpu=300m") == base


def test_a_new_key_list_rolls_every_service(render: Render) -> None:
    def keys(*flags: str) -> set[str]:
        manifests = render(None, *flags)
        return {
            workload(manifests, name)["spec"]["template"]["metadata"]["annotations"]["checksum/keys"]
            for name in SERVICES
        }

    base = keys()
    assert len(base) == 1
    assert keys("--set", "keys.auth[0]=k2=" + "n" * 40) != base
    assert keys("--set", "keys.existingSecret=townhall-keys-2") != keys(
        "--set", "keys.existingSecret=townhall-keys-3"
    )


def test_external_kafka_has_no_bundled_broker(render: Render) -> None:
    manifests = render("external-kafka")
    assert not [m for m in manifests if component(m) == "kafka"]
    assert not [m for m in manifests if "kafka" in m["metadata"]["name"]]
    expected = yaml.safe_load(values_file("external-kafka").read_text())["kafka"]["external"]["bootstrap"]
    assert configmap(manifests)["TOWNHALL_KAFKA_BOOTSTRAP"] == expected
    # The cluster exists before the release: topics are created before the services start.
    job = topics_job(manifests)
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "--replication-factor 3" in job_script(job)


@pytest.mark.parametrize("scenario", ["kind-default", "multi-shard"])
def test_bundled_broker_is_kraft_on_sasl_ssl_with_acls_and_no_topic_auto_creation(
    render: Render, scenario: str
) -> None:
    manifests = render(scenario)
    broker = workload(manifests, "kafka")
    spec = broker["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert re.fullmatch(r"apache/kafka:\d+\.\d+\.\d+", c["image"])
    # The chart's own start script, with the image's /opt/kafka/bin scripts (not its entrypoint).
    assert c["command"] == ["/bin/bash", "/etc/kafka/config/start.sh"]
    script = kafka_files(manifests)["start.sh"]
    assert (
        '$home/bin/kafka-storage.sh" format --ignore-formatted' in script
        and "kafka-server-start.sh" in script
    )
    props = broker_properties(manifests)
    bootstrap = configmap(manifests)["TOWNHALL_KAFKA_BOOTSTRAP"]
    assert bootstrap.startswith(f"{RELEASE}-kafka.{NAMESPACE}.svc")
    assert props["process.roles"] == "broker,controller"
    assert props["auto.create.topics.enable"] == "false"
    assert props["advertised.listeners"] == f"CLIENT://{bootstrap}"
    assert props["listeners"].endswith("CONTROLLER://127.0.0.1:9093"), "the controller is loopback only"
    assert props["listener.security.protocol.map"] == "CONTROLLER:SASL_PLAINTEXT,CLIENT:SASL_SSL"
    assert props["allow.everyone.if.no.acl.found"] == "false" and props["super.users"] == "User:admin"
    assert not any("password" in key or "jaas" in key for key in props), "secrets stay out of the ConfigMap"
    # The same security settings as the local broker's secure mode (devtools/kafka_broker.py).
    assert {k: props.get(k) for k in SECURE_SETTINGS} == SECURE_SETTINGS
    # The key Kafka reads is made PKCS#8 by the Townhall image before the broker starts.
    (init,) = spec["initContainers"]
    assert init["command"][:4] == ["python", "-m", "townhall.core.certs", "keystore"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert topics_job(manifests)["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    # Every service connects over SASL_SSL as its own user, and checks the broker against the CA.
    config = configmap(manifests)
    assert config["TOWNHALL_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert config["TOWNHALL_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert config["TOWNHALL_KAFKA_CA"] == "/etc/townhall/kafka/ca.crt"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_topics_job_creates_the_services_topics(render: Render, scenario: str) -> None:
    """Same names and settings as townhall.core.kafka.Topics (what the local broker gets)."""
    manifests = render(scenario)
    config = configmap(manifests)
    script = job_script(topics_job(manifests))
    created = {}
    for line in script.splitlines():
        if "--create" in line:
            topic = re.search(r"--topic (\S+)", line).group(1)  # type: ignore[union-attr]
            created[topic] = dict(kv.split("=", 1) for kv in re.findall(r"--config (\S+)", line))
            assert f"--partitions {config['TOWNHALL_KAFKA_PARTITIONS']}" in line
            assert "--if-not-exists" in line
    assert created == Topics(config["TOWNHALL_KAFKA_TOPIC_PREFIX"]).all()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_monitoring_objects_only_with_the_operator_api(render: Render, scenario: str) -> None:
    plain = render(scenario)
    assert not [m for m in plain if m["apiVersion"].startswith("monitoring.coreos.com/")]
    with_api = render(scenario, "--api-versions", MONITORING_API)
    (monitor,) = by_kind(with_api, "ServiceMonitor").values()
    (rule,) = by_kind(with_api, "PrometheusRule").values()
    assert rule["spec"] == yaml.safe_load((CHART / "files" / "rules.yml").read_text())
    # The ServiceMonitor selects exactly the three headless Services, on their metrics port.
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [
        s
        for s in by_kind(with_api, "Service").values()
        if selector.items() <= s["metadata"]["labels"].items()
    ]
    assert sorted(component(s) for s in selected) == sorted(SERVICES)
    for s in selected:
        assert s["spec"]["clusterIP"] == "None"
        assert "metrics" in {p["name"] for p in s["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/component"


def test_service_monitor_has_a_scrape_timeout_and_labels_targets_by_namespace_pod_and_component(
    render: Render,
) -> None:
    manifests = render("kind-default", "--api-versions", MONITORING_API)
    (monitor,) = by_kind(manifests, "ServiceMonitor").values()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("15s", "10s")
    relabeled = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
    assert relabeled["namespace"] == ["__meta_kubernetes_namespace"]
    assert relabeled["pod"] == ["__meta_kubernetes_pod_name"]
    # component comes from a label every scraped Service carries (Prometheus's name for it).
    (source,) = relabeled["component"]
    scraped = [
        s
        for s in by_kind(manifests, "Service").values()
        if s["metadata"]["labels"].get("townhall.io/metrics")
    ]
    for service in scraped:
        labels = {
            "__meta_kubernetes_service_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v
            for k, v in service["metadata"]["labels"].items()
        }
        assert labels[source] == component(service) != ""
    custom = render(
        None,
        "--api-versions",
        MONITORING_API,
        "--set",
        "metrics.serviceMonitor.interval=30s",
        "--set",
        "metrics.serviceMonitor.scrapeTimeout=25s",
        "--set",
        "metrics.serviceMonitor.relabelings=null",
    )
    (endpoint,) = next(iter(by_kind(custom, "ServiceMonitor").values()))["spec"]["endpoints"]
    assert endpoint["scrapeTimeout"] == "25s" and "relabelings" not in endpoint


def test_client_services_take_the_external_traffic_policy(render: Render) -> None:
    """Local keeps client source addresses (per-address rate limits); only NodePort/LoadBalancer have it."""

    def client_services(manifests: list[Manifest]) -> list[Manifest]:
        return [
            s
            for s in by_kind(manifests, "Service").values()
            if s["spec"].get("clusterIP") != "None" and component(s) in SERVICES
        ]

    kind = client_services(render("kind-default"))
    # kind: a Service per relay (relay.externalAccess) instead of the shared one.
    assert {component(s) for s in kind} == set(SERVICES)
    assert {s["spec"]["externalTrafficPolicy"] for s in kind} == {"Cluster"}
    cloud = client_services(
        render(None, "--set", "service.type=LoadBalancer", "--set", "service.externalTrafficPolicy=Local")
    )
    assert sorted(component(s) for s in cloud) == sorted(SERVICES)
    for service in cloud:
        assert service["spec"]["externalTrafficPolicy"] == "Local"
        kubernetes_validate.validate(service, KUBE_VERSION, strict=True)
    internal = render(None, "--set", "service.type=ClusterIP", "--set", "service.externalTrafficPolicy=Local")
    assert not [s for s in client_services(internal) if "externalTrafficPolicy" in s["spec"]]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_dashboards_ship_as_grafana_configmaps(render: Render, scenario: str) -> None:
    maps = [
        m for m in by_kind(render(scenario), "ConfigMap").values() if "-dashboard-" in m["metadata"]["name"]
    ]
    files = sorted(p.name for p in (CHART / "dashboards").glob("*.json"))
    assert len(maps) == len(files) >= 4
    for m in maps:
        assert m["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((key, text),) = m["data"].items()
        assert yaml.safe_load(text)["uid"].startswith("townhall-"), key


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pods_carry_scrape_annotations(render: Render, scenario: str) -> None:
    manifests = render(scenario)
    for name in SERVICES:
        w = workload(manifests, name)
        annotations = w["spec"]["template"]["metadata"]["annotations"]
        (c,) = w["spec"]["template"]["spec"]["containers"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(port_of(c, "metrics"))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_disruption_budgets_cover_every_service(render: Render, scenario: str) -> None:
    manifests = render(scenario)
    pdbs = by_kind(manifests, "PodDisruptionBudget")
    for name in SERVICES:
        w = workload(manifests, name)
        pdb = pdbs[w["metadata"]["name"]]
        assert pdb["spec"]["selector"] == w["spec"]["selector"]
        assert pdb["spec"]["maxUnavailable"] >= 1  # never blocks a node drain outright


def test_notifier_keeps_its_store_on_a_volume(render: Render) -> None:
    manifests = render("kind-default")
    notifier = workload(manifests, "notifier")
    assert notifier["kind"] == "StatefulSet"
    # A volume per pod, kept when pods are scaled away or the release is deleted.
    (claim,) = notifier["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert notifier["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    (container,) = notifier["spec"]["template"]["spec"]["containers"]
    assert {"name": "data", "mountPath": "/var/lib/townhall/notifier"} in container["volumeMounts"]
    assert "data" not in {v["name"] for v in notifier["spec"]["template"]["spec"]["volumes"]}
    assert not by_kind(manifests, "PersistentVolumeClaim")
    ephemeral = workload(render(None, "--set", "notifier.persistence.enabled=false"), "notifier")
    assert "volumeClaimTemplates" not in ephemeral["spec"]
    volumes = {v["name"]: v for v in ephemeral["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_notifier_members_are_the_statefulsets_pods_by_their_stable_names(
    render: Render, scenario: str
) -> None:
    """Graph shards follow the StatefulSet's identities: every pod knows the others by the same names."""
    manifests = render(scenario)
    notifier = workload(manifests, "notifier")
    headless = by_kind(manifests, "Service")[notifier["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    (container,) = notifier["spec"]["template"]["spec"]["containers"]
    addresses = set()
    for i in range(SHARDS[scenario]["notifier"]):
        pod = f"{notifier['metadata']['name']}-{i}"
        env = container_env(manifests, container, pod)
        config = load_config(
            env={k: v for k, v in env.items() if k.startswith("TOWNHALL_NOTIFIER_")}
        ).notifier
        assert (config.membership, config.kube_statefulset) == ("kubernetes", notifier["metadata"]["name"])
        # What a pod advertises is what the others compute for it from the StatefulSet's replicas.
        assert config.address == config.kube_member.format(pod=pod)
        assert config.address == f"{pod}.{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local:50073"
        addresses.add(config.address)
    assert len(addresses) == SHARDS[scenario]["notifier"]


def test_client_services_use_fixed_node_ports_mapped_by_kind(render: Render) -> None:
    services = by_kind(render("kind-default"), "Service")
    node_ports = {
        p["nodePort"]
        for s in services.values()
        if s["spec"].get("type") == "NodePort"
        for p in s["spec"]["ports"]
    }
    # admission, notifier, the crowd lane, and relays 0-9 (relay.externalAccess); no shared relay Service.
    assert node_ports == {30051, 30053, 30061, *range(30100, 30110)}
    cluster = yaml.safe_load((REPO / "deploy" / "kind" / "cluster.yaml").read_text())
    mappings = [m for n in cluster["nodes"] for m in n.get("extraPortMappings", [])]
    mapped = {m["hostPort"] for m in mappings}
    assert node_ports <= mapped
    assert {30300, 30090} <= mapped  # Grafana, Prometheus (deploy/kind/monitoring-values.yaml)
    # The same port on the node, and on the host's loopback only.
    assert all(m["containerPort"] == m["hostPort"] and m["listenAddress"] == "127.0.0.1" for m in mappings)
    images = {n["image"] for n in cluster["nodes"]}
    assert all(i.startswith(f"kindest/node:v{KUBE_VERSION}@sha256:") for i in images)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_crowd_lane_runs_admission_pods_that_own_no_rooms(render: Render, enabled: bool) -> None:
    manifests = render(None, "--set", f"admission.crowd.enabled={str(enabled).lower()}")
    crowd = [m for m in manifests if component(m) == "admission-crowd"]
    if not enabled:
        assert crowd == []
        return
    assert sorted(m["kind"] for m in crowd) == [
        "Deployment",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Service",
        "Service",
    ]
    container = workload(manifests, "admission-crowd")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "townhall.admission"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    headless = next(s for s in by_kind(manifests, "Service") if s.endswith("-admission-headless"))
    assert env["TOWNHALL_ADMISSION_OWNER"] == "false"
    assert env["TOWNHALL_ADMISSION_MAX_PENDING_REQUESTS"] == "16"
    # It finds the owners (and only them) through their headless Service, and listens on its own port.
    assert (env["TOWNHALL_ADMISSION_MEMBERSHIP"], env["TOWNHALL_ADMISSION_KUBE_SERVICE"]) == (
        "kubernetes",
        headless,
    )
    assert env["TOWNHALL_ADMISSION_LISTEN"] == "0.0.0.0:50061"
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["grpc"] == 50061
    service = next(
        m for m in crowd if m["kind"] == "Service" and not m["metadata"]["name"].endswith("-headless")
    )
    assert [p["port"] for p in service["spec"]["ports"]] == [50061]
    env_of_pods = service_config(manifests, container, "crowd-pod")
    assert not env_of_pods.admission.owner and env_of_pods.admission.max_pending_requests == 16


def relay_advertise(manifests: list[Manifest]) -> str:
    relay = workload(manifests, "relay")
    env = {e["name"]: e.get("value") for e in relay["spec"]["template"]["spec"]["containers"][0]["env"]}
    return str(env["TOWNHALL_RELAY_ADVERTISE"])


def test_relay_advertise_reaches_the_relays(render: Render) -> None:
    one = render(None, "--set", "relay.replicas=1", "--set", "relay.advertise=127.0.0.1:30052")
    assert relay_advertise(one) == "127.0.0.1:30052"
    per_pod = render(None, "--set", "relay.advertise=$(POD_NAME).relays.example.com:443")
    assert relay_advertise(per_pod) == "$(POD_NAME).relays.example.com:443"
    assert relay_advertise(render(None)) == (
        f"$(POD_NAME).{RELEASE}-relay-headless.{NAMESPACE}.svc.cluster.local:50052"
    )


EXTERNAL = ("--set", "relay.externalAccess.enabled=true", "--set", "relay.externalAccess.host=127.0.0.1")


def external_relay_services(manifests: list[Manifest]) -> dict[str, Manifest]:
    """The per-relay Services of relay.externalAccess: those selecting one relay pod by name."""
    return {
        name: s
        for name, s in by_kind(manifests, "Service").items()
        if "statefulset.kubernetes.io/pod-name" in s["spec"].get("selector", {})
    }


@pytest.mark.parametrize("flags", [(), ("--set", "admission.replicas=3", "--set", "relay.replicas=4")])
def test_each_relay_is_reachable_from_the_host_on_a_node_port_of_its_own(
    render: Render, flags: tuple[str, ...]
) -> None:
    """kind: relay i is Service <fullname>-relay-i on nodePort 30100 + i, selecting that pod alone; it
    advertises 127.0.0.1:30100+i (what tickets are bound to and admission learns from its reports), while
    edges pull from it, and admission probes it, at its in-cluster name."""
    manifests = render("kind-default", *flags)
    relay = workload(manifests, "relay")
    selector = relay["spec"]["selector"]["matchLabels"]
    services = external_relay_services(manifests)
    assert sorted(services) == sorted(f"{RELEASE}-relay-{i}" for i in range(10))
    for i in range(10):
        spec = services[f"{RELEASE}-relay-{i}"]["spec"]
        assert spec["type"] == "NodePort"
        assert spec["selector"] == {**selector, "statefulset.kubernetes.io/pod-name": f"{RELEASE}-relay-{i}"}
        assert spec["ports"] == [
            {
                "name": "grpc",
                "port": 50052,
                "targetPort": "grpc",
                "protocol": "TCP",
                "appProtocol": "grpc",
                "nodePort": 30100 + i,
            }
        ]
    # No shared relay Service: it would send a listener to any relay while its ticket names one.
    assert f"{RELEASE}-relay" not in by_kind(manifests, "Service")
    (container,) = relay["spec"]["template"]["spec"]["containers"]
    refs = {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
        for e in container["env"]
        if "fieldRef" in e.get("valueFrom", {})
    }
    assert refs["TOWNHALL_RELAY_ORDINAL"] == POD_INDEX_FIELD
    for i in range(relay["spec"]["replicas"]):
        config = service_config(manifests, container, f"{RELEASE}-relay-{i}")
        assert config.relay.address == f"127.0.0.1:{30100 + i}"
        assert config.relay.internal_address == (
            f"{RELEASE}-relay-{i}.{RELEASE}-relay-headless.{NAMESPACE}.svc.cluster.local:50072"
        )
    # Admission and the notifier load the same ConfigMap: the per-relay settings are the relays' alone.
    for name in ("admission", "admission-crowd", "notifier"):
        c = workload(manifests, name)["spec"]["template"]["spec"]["containers"][0]
        assert not {e["name"] for e in c["env"]} & {
            "TOWNHALL_RELAY_ORDINAL",
            "TOWNHALL_RELAY_ADVERTISE_PORT_BASE",
        }
        service_config(manifests, c, f"{name}-0")


def test_without_external_access_relays_advertise_as_before(render: Render) -> None:
    manifests = render(None)
    assert external_relay_services(manifests) == {}
    (container,) = workload(manifests, "relay")["spec"]["template"]["spec"]["containers"]
    names = {e["name"] for e in container["env"]}
    assert not names & {"TOWNHALL_RELAY_ORDINAL", "TOWNHALL_RELAY_ADVERTISE_PORT_BASE"}
    assert by_kind(manifests, "Service")[f"{RELEASE}-relay"]["spec"]["ports"][0]["nodePort"] == 30052
    # With autoscaling, a Service for every relay the HPA may add, on a base of one's choosing.
    scaled = render(
        None,
        *EXTERNAL,
        "--set",
        "relay.autoscaling.enabled=true",
        "--set",
        "relay.externalAccess.nodePortBase=31000",
        "--set",
        "relay.externalAccess.maxRelays=8",
    )
    ports = {s["spec"]["ports"][0]["nodePort"] for s in external_relay_services(scaled).values()}
    assert ports == set(range(31000, 31008))


# What a kind node leaves to workloads: a 2-core node's allocatable CPU less the control plane's requests
# (kube-apiserver 250m, controller-manager 200m, scheduler 100m, etcd 100m, CoreDNS 2 x 100m, kindnet 100m).
KIND_FREE_CPU_M = 2000 - 950
# Left of it for a Prometheus the e2e tests run beside the release.
PROMETHEUS_CPU_M = 300


def cpu_millis(quantity: str | int | float) -> float:
    """A CPU quantity in millicores."""
    text = str(quantity)
    return float(text[:-1]) if text.endswith("m") else float(text) * 1000


def test_kind_values_fit_a_two_core_node_scaled_as_the_e2e_tests_scale_them(render: Render) -> None:
    """Admission at 3, relays at 4, the crowd lane, the notifier, Kafka, the topics Job and the helm test pod
    (all may run at once) request no more CPU than a 2-core kind node has left, with room for Prometheus."""
    manifests = render("kind-default", "--set", "admission.replicas=3", "--set", "relay.replicas=4")
    total = 0.0
    for owner, spec in pod_specs(manifests):
        pods = owner["spec"].get("replicas", 1) if owner["kind"] in {"Deployment", "StatefulSet"} else 1
        containers = sum(cpu_millis(c["resources"]["requests"]["cpu"]) for c in spec["containers"])
        init = max(
            (cpu_millis(c["resources"]["requests"]["cpu"]) for c in spec.get("initContainers", [])), default=0
        )
        total += pods * max(containers, init)
    assert total <= KIND_FREE_CPU_M - PROMETHEUS_CPU_M, f"{total:g}m of CPU requested"


def test_the_kind_relay_tree_spreads_twenty_listeners_over_the_relays(render: Render) -> None:
    """edge_target reaches admission's placement: 20 listeners of one room fill 4 relays, not the origin."""
    from townhall.admission.placement import Placer

    manifests = render("kind-default")
    c = workload(manifests, "admission")["spec"]["template"]["spec"]["containers"][0]
    relay = service_config(manifests, c, f"{RELEASE}-admission-0").relay
    relays = [f"127.0.0.1:{30100 + i}" for i in range(4)]
    for count in (2, 4):
        placer = Placer(relays[:count], relay.edge_target, relay.tree_degree, relay.listener_capacity)
        used = {placer.place("room", on_stage=False, now=0.0).relay for _ in range(20)}
        assert used == set(relays[:count]), (count, used)


def test_admission_config_does_not_depend_on_how_many_relays_run(render: Render) -> None:
    """Relays the HPA adds beyond minReplicas get listeners: nothing in admission's config names relays."""
    two = configmap(render(None, "--set", "relay.replicas=2"))
    scaled = render(
        None, "--set", "relay.autoscaling.enabled=true", "--set", "relay.autoscaling.minReplicas=5"
    )
    assert configmap(scaled) == two
    assert two["TOWNHALL_ADMISSION_RELAYS"] == two["TOWNHALL_ADMISSION_RELAYS_INTERNAL"] == ""
    assert float(two["TOWNHALL_RELAY_LOAD_REPORT_S"]) > 0


# The keys each service's container gets (and no other): relays verify tickets and make none.
KEYS_OF = {
    "admission": {"auth-keys", "service-keys", "tickets-private-key", "tickets-public-keys"},
    "admission-crowd": {"auth-keys", "service-keys", "tickets-private-key", "tickets-public-keys"},
    "relay": {"service-keys", "tickets-public-keys"},
    "notifier": {"auth-keys", "service-keys"},
}


def _secret_refs(manifests: list[Manifest], name: str) -> dict[str, dict[str, str]]:
    container = workload(manifests, name)["spec"]["template"]["spec"]["containers"][0]
    return {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def test_keys_are_never_generated_a_render_without_them_fails_and_one_with_them_is_stable(helm: Path) -> None:
    """No key is made up at render time: `helm template` (GitOps) gives the same Secret every time."""
    result = run_helm(helm, *template_args(None, keys=False))
    assert result.returncode != 0
    for missing in ("keys.service", "keys.tickets.privateKey", "keys.tickets.publicKeys", "keys.auth"):
        assert missing in result.stderr, result.stderr
    assert "townhall keys --helm" in result.stderr
    renders = [run_helm(helm, *template_args(None)) for _ in range(2)]
    assert all(r.returncode == 0 for r in renders)
    assert renders[0].stdout == renders[1].stdout
    # A JWKS alone can stand in for the HS256 user keys.
    jwks_only = run_helm(
        helm, *template_args(None, "--set-json", "keys.auth=[]", "--set", "keys.jwksSecret=idp")
    )
    assert jwks_only.returncode == 0, jwks_only.stderr


def test_keys_are_taken_as_given_and_each_service_gets_only_its_own(render: Render) -> None:
    given = yaml.safe_load(TEST_KEYS.read_text())["keys"]
    data = {
        k: base64.b64decode(v).decode() for k, v in by_kind(render(None), "Secret")[RELEASE]["data"].items()
    }
    assert data == {
        "auth-keys": ",".join(given["auth"]),
        "service-keys": ",".join(given["service"]),
        "tickets-private-key": given["tickets"]["privateKey"],
        "tickets-public-keys": ",".join(given["tickets"]["publicKeys"]),
    }
    rotating = by_kind(render("tls"), "Secret")[RELEASE]["data"]  # two user keys, two ticket public keys
    values = yaml.safe_load(values_file("tls").read_text())["keys"]
    assert base64.b64decode(rotating["auth-keys"]).decode() == ",".join(values["auth"])
    assert base64.b64decode(rotating["tickets-public-keys"]).decode() == ",".join(
        values["tickets"]["publicKeys"]
    )
    for scenario in (None, "external-kafka"):
        manifests = render(scenario)
        secret = "townhall-keys" if scenario else RELEASE
        assert bool(by_kind(manifests, "Secret")) is not bool(scenario), (
            "no Secret rendered with existingSecret"
        )
        for name in SERVICES:
            refs = _secret_refs(manifests, name)
            assert {r["key"] for r in refs.values()} == KEYS_OF[name], (scenario, name)
            assert {r["name"] for r in refs.values()} == {secret}


def test_internal_ports_are_only_on_headless_services_and_only_townhall_pods_reach_them(
    render: Render,
) -> None:
    manifests = render("multi-shard")
    services = by_kind(manifests, "Service")
    for name, service in services.items():
        ports = {p["name"] for p in service["spec"]["ports"]}
        if (
            service["spec"].get("clusterIP") == "None"
            and not name.endswith("-crowd-headless")
            and "kafka" not in name
        ):
            assert "internal" in ports, name
        else:
            assert "internal" not in ports, f"{name} exposes an internal port"
    # The bundled broker's policy is test_only_townhall_pods_may_reach_the_bundled_broker's.
    policies = {n: p for n, p in by_kind(manifests, "NetworkPolicy").items() if n != f"{RELEASE}-kafka"}
    assert set(policies) == {f"{RELEASE}-{n}" for n in SERVICES}
    pods_of_release = {"app.kubernetes.io/name": "townhall", "app.kubernetes.io/instance": RELEASE}
    for name, policy in policies.items():
        rules = {
            tuple(p["port"] for p in rule["ports"]): rule.get("from") for rule in policy["spec"]["ingress"]
        }
        assert rules[("grpc", "health")] is None, "clients reach the client port, the kubelet health"
        assert rules[("metrics",)] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ]
        if name.endswith("-crowd"):
            assert ("internal",) not in rules
        else:
            assert rules[("internal",)] == [{"podSelector": {"matchLabels": pods_of_release}}]
    # With networkPolicy off there is none.
    assert not by_kind(render(None, "--set", "networkPolicy.enabled=false"), "NetworkPolicy")


def test_tls_reaches_every_service_and_the_helm_test(render: Render) -> None:
    manifests = render("tls")
    config = configmap(manifests)
    assert config["TOWNHALL_TLS_ENABLED"] == "true"
    assert config["TOWNHALL_TLS_REQUIRE_CLIENT_CERT"] == "true"
    assert config["TOWNHALL_TLS_SERVER_NAME"] == "townhall.internal"
    for name in SERVICES:
        spec = workload(manifests, name)["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == "townhall-tls"
        assert volumes["jwks"]["secret"]["secretName"] == "idp-jwks"
        assert port_of(spec["containers"][0], "health") == int(config["TOWNHALL_SERVER_HEALTH_PORT"])
    test_pod = next(iter(by_kind(manifests, "Pod").values()))
    command = test_pod["spec"]["containers"][0]["command"]
    assert command[command.index("--tls") + 4] == "townhall.internal"
    assert test_pod["spec"]["volumes"][0]["secret"]["secretName"] == "townhall-tls"
    plain = configmap(render(None))
    assert not any(k.startswith("TOWNHALL_TLS_") for k in plain)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--set", "image.tag=latest"], "/image/tag"),
        (["--set", "kafka.bundled=false"], "/kafka/external/bootstrap"),
        (["--set", "notifier.replicas=0"], "/notifier/replicas"),
        (["--set", "notifier.config.members=a:1"], "members"),
        (["--set", "keys.tickets.publicKeys[0]=k1=short"], "/keys/tickets/publicKeys/0"),
        (["--set", "keys.tickets.privateKey=k1=" + "x" * 40], "/keys/tickets/privateKey"),
        (["--set", "admission.internalPort=0"], "/admission/internalPort"),
        (["--set", "keys.auth[0]=no-key-id-0123456789abcdefghijklmnopqrstuv"], "/keys/auth/0"),
        (["--set", "tls.enabled=true"], "secretName"),
        (["--set", "tls.requireClientCert=true"], "/tls/requireClientCert"),
        (["--set", "config.auth.keys=a"], "invalid propertyName 'keys'"),
        (["--set", "admision.replicas=3"], "admision"),
        (["--set", "relay.config.chunk_s=0.005"], "/relay/config/chunk_s"),
        (["--set", "relay.config.load_report_s=0"], "/relay/config/load_report_s"),
        (
            ["--set", "relay.config.chunk_ms=100"],
            "relay.config.chunk_ms is gone: durations are in seconds, set relay.config.chunk_s",
        ),
        (
            ["--set", "config.server.drain_notice_ms=1000"],
            "config.server.drain_notice_ms is gone: durations are in seconds, set config.server.drain_notice_s",
        ),
        (["--set", "admission.config.host_grace_s=0.5"], "/admission/config/host_grace_s"),
        (["--set", "admission.config.relays=a:1"], "relays"),
        (["--set", "service.type=Ingress"], "/service/type"),
        (["--set", "admission.resources=null"], "resources"),
        (["--set", "relay.replicas=2", "--set", "relay.advertise=127.0.0.1:30052"], "POD_NAME"),
        (["--set", "relay.externalAccess.enabled=true"], "relay.externalAccess.host is required"),
        (["--set", "relay.externalAccess.host=127.0.0.1:30100"], "/relay/externalAccess/host"),
        (
            [*EXTERNAL, "--set", "relay.advertise=$(POD_NAME).relays.example.com:443"],
            "relay.advertise and relay.externalAccess both say",
        ),
        (
            [
                *EXTERNAL,
                "--set",
                "relay.autoscaling.enabled=true",
                "--set",
                "relay.autoscaling.maxReplicas=11",
            ],
            "relay.externalAccess.maxRelays (10) must cover the relays that can run (11, "
            "relay.autoscaling.maxReplicas)",
        ),
        (
            [*EXTERNAL, "--set", "relay.replicas=4", "--set", "relay.externalAccess.maxRelays=3"],
            "relay.externalAccess.maxRelays (3) must cover the relays that can run (4, relay.replicas)",
        ),
        ([*EXTERNAL, "--set", "relay.externalAccess.nodePortBase=32760"], "past the NodePort range"),
        (
            [*EXTERNAL, "--set", "relay.externalAccess.nodePortBase=30045"],
            "nodePorts 30045-30054 include admission.service.nodePort (30051)",
        ),
        (["--set", "relay.config.ordinal=1"], "ordinal"),
        (["--set", "service.externalTrafficPolicy=local"], "/service/externalTrafficPolicy"),
        (["--set", "metrics.serviceMonitor.scrapeTimeout=10"], "/metrics/serviceMonitor/scrapeTimeout"),
        (
            ["--api-versions", MONITORING_API, "--set", "metrics.serviceMonitor.scrapeTimeout=1m"],
            "scrapeTimeout must not be longer than metrics.serviceMonitor.interval",
        ),
        (
            ["--set", "metrics.serviceMonitor.relabelings[0].action=rename"],
            "/metrics/serviceMonitor/relabelings/0",
        ),
        (["--set", "global=1"], "/global"),
        (["--set", "kafka.external.securityProtocol=TLS"], "/kafka/external/securityProtocol"),
        (
            [
                "--set",
                "kafka.bundled=false",
                "--set",
                "kafka.external.bootstrap=kafka:9093",
                "--set",
                "kafka.users.passwords.admin=",
            ],
            "kafka.users.passwords (admin) or kafka.users.existingSecret are required",
        ),
        (["--set", "kafka.users.passwords.relay=short"], "/kafka/users/passwords/relay"),
        (["--set", "kafka.users.relay=two words"], "/kafka/users/relay"),
        (["--set", "config.kafka.max_clock_skew_s=-1"], "/config/kafka/max_clock_skew_s"),
        (["--set", "config.kafka.password=x"], "/config/kafka"),
    ],
)
def test_bad_values_fail_at_install(helm: Path, flags: list[str], message: str) -> None:
    result = run_helm(helm, *template_args(None, *flags))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_notes_render(helm: Path, tmp_path: Path, scenario: str) -> None:
    """NOTES.txt is not rendered by `helm template`: render it as a ConfigMap of a copied chart."""
    chart = tmp_path / "townhall"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "_notes.tpl").write_text('{{- define "notes" -}}\n' + notes + "{{- end }}\n")
    (chart / "templates" / "notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n"
        '  notes: |\n{{ include "notes" . | indent 4 }}\n'
    )
    result = run_helm(helm, *template_args(scenario, "--show-only", "templates/notes.yaml", chart=chart))
    assert result.returncode == 0, result.stderr
    text = yaml.safe_load(result.stdout)["data"]["notes"]
    if scenario == "tls":
        assert 'G="grpcurl -cacert ca.crt -cert tls.crt -key tls.key -authority townhall.internal"' in text
    else:
        assert 'G="grpcurl -plaintext"' in text
    assert "$G $ADMISSION list" in text and "authorization: Bearer" in text
    assert "helm test" in text


def configmap(manifests: list[Manifest]) -> dict[str, str]:
    """The data of the services' ConfigMap."""
    return by_kind(manifests, "ConfigMap")[RELEASE]["data"]


def port_of(container: dict[str, Any], name: str) -> int:
    """A container's port number by name."""
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def container_env(manifests: list[Manifest], container: dict[str, Any], pod_name: str) -> dict[str, str]:
    """What the kubelet would give the container: envFrom ConfigMaps, then env with $(VAR) expanded."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(by_kind(manifests, "ConfigMap")[source["configMapRef"]["name"]]["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"]
            )
        elif item["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[item["name"]] = pod_name
        elif item["valueFrom"].get("fieldRef", {}).get("fieldPath") == POD_INDEX_FIELD:
            # A StatefulSet pod's index label: the ordinal its name ends with.
            env[item["name"]] = pod_name.rpartition("-")[2]
        elif "secretKeyRef" in item["valueFrom"]:
            # What the Secret holds: the chart's own, or (an existing Secret) the tests' keys.
            ref = item["valueFrom"]["secretKeyRef"]
            secret = by_kind(manifests, "Secret").get(ref["name"])
            env[item["name"]] = (
                base64.b64decode(secret["data"][ref["key"]]).decode() if secret else _TEST_SECRET[ref["key"]]
            )
    return env


_GIVEN = yaml.safe_load(TEST_KEYS.read_text())["keys"]
_TEST_SECRET = {
    "auth-keys": ",".join(_GIVEN["auth"]),
    "service-keys": ",".join(_GIVEN["service"]),
    "tickets-private-key": _GIVEN["tickets"]["privateKey"],
    "tickets-public-keys": ",".join(_GIVEN["tickets"]["publicKeys"]),
}


def mounted_files(folder: Path) -> dict[str, Path]:
    """Real files for the paths a pod reads from its Secret volumes (TLS certificates, the JWKS)."""
    ca = Authority(folder / "pki")
    pem = ca.issue("townhall", dns=("townhall.internal",))
    jwks = folder / "jwks.json"
    jwks.write_text(
        json.dumps(
            {
                "keys": [
                    {
                        "kty": "oct",
                        "kid": "idp-1",
                        "alg": "HS256",
                        "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA",
                    }
                ]
            }
        )
    )
    password = folder / "kafka-password"
    password.write_text("kafka-user-password\n")
    return {
        "/etc/townhall/tls/tls.crt": pem.cert,
        "/etc/townhall/tls/tls.key": pem.key,
        "/etc/townhall/tls/ca.crt": ca.ca,
        "/etc/townhall/jwks/jwks.json": jwks,
        "/etc/townhall/kafka/ca.crt": ca.ca,
        "/etc/townhall/kafka/password": password,
    }


@functools.cache
def _mounted() -> dict[str, Path]:
    return mounted_files(Path(tempfile.mkdtemp(prefix="townhall-chart-")))


def service_config(manifests: list[Manifest], container: dict[str, Any], pod_name: str) -> Config:
    """What townhall.core.config makes of a container's env, with real files where it reads Secret volumes."""
    env = container_env(manifests, container, pod_name)
    return load_config(env={k: str(_mounted().get(v, v)) for k, v in env.items()})


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_each_service_connects_as_its_own_kafka_user_and_holds_only_its_password(
    render: Render, scenario: str
) -> None:
    manifests = render(scenario)
    users = yaml.safe_load(values_file(scenario).read_text()).get("kafka", {}).get("users", {})
    for name in SERVICES:
        service = name.removesuffix("-crowd")  # the crowd lane is admission
        spec = workload(manifests, name)["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["TOWNHALL_KAFKA_USERNAME"] == users.get(service, service)
        assert env["TOWNHALL_KAFKA_PASSWORD_FILE"] == "/etc/townhall/kafka/password"
        (volume,) = [v for v in spec["volumes"] if v["name"] == "kafka"]
        items = {s["secret"]["name"]: s["secret"]["items"] for s in volume["projected"]["sources"]}
        assert [{"key": service, "path": "password"}] in items.values(), "its own password and no other"
        assert [{"key": "ca.crt", "path": "ca.crt"}] in items.values(), "the CA, never the broker's key"
        assert {"name": "kafka", "mountPath": "/etc/townhall/kafka", "readOnly": True} in c["volumeMounts"]
        assert service_config(manifests, c, f"{name}-0").kafka.username == users.get(service, service)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_topics_job_signs_in_as_admin_and_grants_each_service_only_its_own_topics(
    render: Render, scenario: str
) -> None:
    manifests = render(scenario)
    config = configmap(manifests)
    job = topics_job(manifests)
    script = job_script(job)
    commands = [line.strip() for line in script.splitlines() if line.strip().startswith('"$')]
    assert commands and all('--command-config "$client"' in line for line in commands)
    assert 'username="admin"' in script and "/etc/kafka/users/admin" in script
    bundled = scenario != "external-kafka"
    granted = set()
    for line in commands:
        if "kafka-acls.sh" not in line:
            continue
        principal = re.search(r"--allow-principal (\S+)", line).group(1)  # type: ignore[union-attr]
        operation = re.search(r"--operation (\S+)", line).group(1)  # type: ignore[union-attr]
        prefixed = "--resource-pattern-type prefixed" in line
        for resource, name in re.findall(r"--(topic|group|transactional-id) (\S+)", line):
            granted.add(Acl(principal, operation, resource, name, prefixed))
    if not bundled:
        assert not granted, "an external cluster's ACLs are its operators'"
        return
    prefix, group = config["TOWNHALL_KAFKA_TOPIC_PREFIX"], config["TOWNHALL_NOTIFIER_GROUP_ID"]
    assert granted == set(acls(Topics(prefix), group))
    for user in ("admission", "relay", "notifier"):
        assert (
            f'--entity-name {user} --add-config "SCRAM-SHA-512=[password=$(cat /etc/kafka/users/{user})]"'
            in script
        )


def test_kafka_users_and_certificate_are_given_never_generated(render: Render, helm: Path) -> None:
    manifests = render(None)
    given = yaml.safe_load(TEST_KEYS.read_text())["kafka"]
    secrets = by_kind(manifests, "Secret")
    users = {k: base64.b64decode(v).decode() for k, v in secrets[f"{RELEASE}-kafka-users"]["data"].items()}
    assert users == given["users"]["passwords"]
    tls = {k: base64.b64decode(v).decode() for k, v in secrets[f"{RELEASE}-kafka-tls"]["data"].items()}
    assert (tls["ca.crt"], tls["tls.crt"], tls["tls.key"]) == (
        given["tls"]["ca"],
        given["tls"]["cert"],
        given["tls"]["key"],
    )
    # The certificate `townhall keys --helm --kafka-host` makes names the broker's Service.
    cert = x509.load_pem_x509_certificate(tls["tls.crt"].encode())
    assert cert.issuer == x509.load_pem_x509_certificate(tls["ca.crt"].encode()).subject
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    host = configmap(manifests)["TOWNHALL_KAFKA_BOOTSTRAP"].rpartition(":")[0]
    assert host in names.get_values_for_type(x509.DNSName)
    for flags, words in (
        (
            ("--set", "kafka.users.passwords.relay="),
            "kafka.users.passwords (relay) or kafka.users.existingSecret",
        ),
        (("--set", "kafka.tls.key="), "kafka.tls (ca, cert, key) or kafka.tlsSecret"),
    ):
        result = run_helm(helm, *template_args(None, *flags))
        assert result.returncode != 0 and words in result.stderr, result.stderr
        assert f"townhall keys --helm --kafka-host {host}" in result.stderr
    named = render(None, "--set", "kafka.users.existingSecret=my-users", "--set", "kafka.tlsSecret=my-tls")
    assert not [n for n in by_kind(named, "Secret") if n.startswith(f"{RELEASE}-kafka")]
    spec = workload(named, "kafka")["spec"]["template"]["spec"]
    mounted = {v["name"]: v.get("secret", {}).get("secretName") for v in spec["volumes"]}
    assert (mounted["users"], mounted["tls"]) == ("my-users", "my-tls")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_only_townhall_pods_may_reach_the_bundled_broker(render: Render, scenario: str) -> None:
    policies = by_kind(render(scenario), "NetworkPolicy")
    kafka = policies.get(f"{RELEASE}-kafka")
    if scenario == "external-kafka":
        assert kafka is None
        return
    assert kafka is not None
    spec = kafka["spec"]
    assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "kafka"
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"port": "kafka", "protocol": "TCP"}]
    (source,) = rule["from"]
    assert source["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE
    (expression,) = source["podSelector"]["matchExpressions"]
    assert set(expression["values"]) == {*SERVICES, "topics"}
    assert not by_kind(render(scenario, "--set", "networkPolicy.enabled=false"), "NetworkPolicy")


def kafka_files(manifests: list[Manifest]) -> dict[str, str]:
    """The bundled broker's ConfigMap data (server.properties, start.sh)."""
    return by_kind(manifests, "ConfigMap")[f"{RELEASE}-kafka"]["data"]


def broker_properties(manifests: list[Manifest]) -> dict[str, str]:
    """The bundled broker's server.properties as a dict."""
    lines = kafka_files(manifests)["server.properties"].splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def topics_job(manifests: list[Manifest]) -> Manifest:
    """The topic-creation hook Job."""
    (job,) = by_kind(manifests, "Job").values()
    return job


def job_script(job: Manifest) -> str:
    """The shell script a single-container Job runs."""
    return job["spec"]["template"]["spec"]["containers"][0]["command"][-1]


def test_rate_limits_render_into_config_every_service_loads(render: Render) -> None:
    manifests = render(
        None, "--set", "config.limits.exempt={10.0.0.0/8,fd00::/8}", "--set", "config.limits.joins_user=3"
    )
    env = configmap(manifests)
    assert env["TOWNHALL_LIMITS_EXEMPT"] == "10.0.0.0/8,fd00::/8"
    limits = load_config(
        env={k: v for k, v in env.items() if k.startswith(("TOWNHALL_LIMITS_", "TOWNHALL_SERVER_"))}
    ).limits
    assert limits.exempt == ("10.0.0.0/8", "fd00::/8") and limits.joins_user == 3.0 and limits.enabled
