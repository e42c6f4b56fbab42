"""The kind cluster as `make deploy`, `make kind-prometheus` and the end-to-end tests drive it, through the
Kubernetes API (the `kubernetes` client Townhall already uses for membership): no kubectl needed.

    python -m townhall_tools.devtools.kind wait-ready --release townhall --namespace townhall
    python -m townhall_tools.devtools.kind prometheus --image quay.io/prometheus/prometheus:v3.16.0
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient

REPO = Path(__file__).resolve().parents[3]
PROMETHEUS_MANIFEST = REPO / "deploy" / "kind" / "prometheus.yaml"
RULES = REPO / "helm" / "townhall" / "files" / "rules.yml"
FIELD_MANAGER = "townhall-kind"
PROGRESS_EVERY_S = 10.0


class Cluster:
    """One kube context: pods, workloads, exec, apply."""

    def __init__(self, context: str) -> None:
        self.context = context
        self.api_client = config.new_client_from_config(context=context)
        self.core = client.CoreV1Api(self.api_client)
        self.apps = client.AppsV1Api(self.api_client)
        self.dynamic = DynamicClient(self.api_client)

    def pods(self, namespace: str, selector: str, terminating: bool = False) -> list[Any]:
        """The pods matching a label selector, by name; those being deleted only if `terminating`."""
        found: list[Any] = self.core.list_namespaced_pod(
            namespace, label_selector=selector, _request_timeout=30
        ).items
        kept = (p for p in found if terminating or p.metadata.deletion_timestamp is None)
        return sorted(kept, key=lambda p: p.metadata.name)

    def delete_pod(self, namespace: str, name: str, force: bool = False) -> None:
        """Deletes a pod; `force`: at once, without its grace period (as a node that died)."""
        self.core.delete_namespaced_pod(
            name, namespace, grace_period_seconds=0 if force else None, _request_timeout=30
        )

    def expected_pods(self, namespace: str, selector: str) -> int:
        """Pods the release's StatefulSets and Deployments ask for."""
        sets = self.apps.list_namespaced_stateful_set(namespace, label_selector=selector, _request_timeout=30)
        deps = self.apps.list_namespaced_deployment(namespace, label_selector=selector, _request_timeout=30)
        workloads: list[Any] = [*sets.items, *deps.items]
        return sum(int(w.spec.replicas or 0) for w in workloads)

    def apply(self, documents: Iterable[dict[str, Any]]) -> None:
        """Server-side apply of each object (created or updated)."""
        for doc in documents:
            resource = self.dynamic.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
            meta = doc["metadata"]
            resource.server_side_apply(
                body=doc,
                name=meta["name"],
                namespace=meta.get("namespace"),
                field_manager=FIELD_MANAGER,
                force_conflicts=True,
            )


def ready(pod: Any) -> bool:
    """Whether the pod is Running with its Ready condition true."""
    conditions = pod.status.conditions or []
    return pod.status.phase == "Running" and any(c.type == "Ready" and c.status == "True" for c in conditions)


def why_not_ready(pod: Any) -> str:
    """A short reason: terminating, the first waiting container's reason, else the phase."""
    if pod.metadata.deletion_timestamp is not None:
        return "terminating"
    for status in [*(pod.status.init_container_statuses or []), *(pod.status.container_statuses or [])]:
        waiting = status.state.waiting if status.state else None
        if waiting is not None and waiting.reason:
            return f"{status.name}: {waiting.reason} (restarts {status.restart_count})"
        if not status.ready and status.state and status.state.running:
            return f"{status.name}: running, not ready (restarts {status.restart_count})"
    return pod.status.phase or "Pending"


def wait_ready(
    cluster: Cluster, namespace: str, selector: str, timeout_s: float, out: Any = sys.stdout
) -> float:
    """Waits until the workloads' pods all exist and are Ready and none is still terminating (a scale-down is
    over once the pods it removes have drained and exited); prints who is not, every 10 s. Returns seconds."""
    started = time.monotonic()
    last_print = 0.0
    while True:
        every = cluster.pods(namespace, selector, terminating=True)
        pods = [p for p in every if p.metadata.deletion_timestamp is None]
        leaving = [p for p in every if p.metadata.deletion_timestamp is not None]
        expected = cluster.expected_pods(namespace, selector)
        waiting = [p for p in pods if not ready(p) and p.status.phase not in ("Succeeded", "Failed")]
        waiting += leaving
        serving = sum(1 for p in pods if ready(p))
        elapsed = time.monotonic() - started
        if serving >= expected and not waiting:
            print(f"{serving} pods Ready after {elapsed:.0f} s", file=out, flush=True)
            return elapsed
        if elapsed > timeout_s:
            detail = (
                "; ".join(f"{p.metadata.name}: {why_not_ready(p)}" for p in waiting) or "pods not created"
            )
            raise TimeoutError(f"{serving}/{expected} pods Ready after {timeout_s:.0f} s: {detail}")
        if elapsed - last_print >= PROGRESS_EVERY_S:
            last_print = elapsed
            names = ", ".join(f"{p.metadata.name} ({why_not_ready(p)})" for p in waiting[:6])
            print(
                f"[{elapsed:4.0f} s] {serving}/{expected} Ready; waiting: {names or 'pods to be created'}",
                file=out,
                flush=True,
            )
        time.sleep(2)


def prometheus_documents(image: str) -> list[dict[str, Any]]:
    """deploy/kind/prometheus.yaml with its image; the chart's alert rules as ConfigMap prometheus-rules."""
    rules = RULES.read_text()
    checksum = hashlib.sha256(rules.encode()).hexdigest()[:16]
    text = (
        PROMETHEUS_MANIFEST.read_text().replace("PROMETHEUS_IMAGE", image).replace("RULES_CHECKSUM", checksum)
    )
    docs = [d for d in yaml.safe_load_all(text) if d]
    rules_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "prometheus-rules", "namespace": "monitoring"},
        "data": {"townhall.yml": rules},
    }
    # The namespace first, the rules before the Deployment that mounts them.
    return [docs[0], rules_map, *docs[1:]]


def deploy_prometheus(cluster: Cluster, image: str, timeout_s: float) -> float:
    """Applies the in-cluster Prometheus and waits until it is Ready; returns seconds."""
    cluster.apply(prometheus_documents(image))
    return wait_ready(cluster, "monitoring", "app.kubernetes.io/name=prometheus", timeout_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m townhall_tools.devtools.kind", description=__doc__)
    parser.add_argument("--context", default="kind-townhall", help="kube context (default kind-townhall)")
    sub = parser.add_subparsers(dest="command", required=True)
    wait = sub.add_parser("wait-ready", help="wait until every pod of a release is Ready")
    wait.add_argument("--namespace", default="townhall")
    wait.add_argument("--release", default="townhall")
    wait.add_argument("--timeout", type=float, default=600)
    prom = sub.add_parser("prometheus", help="run deploy/kind/prometheus.yaml with the chart's rules")
    prom.add_argument("--image", required=True)
    prom.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args(argv)
    cluster = Cluster(args.context)
    try:
        if args.command == "wait-ready":
            wait_ready(cluster, args.namespace, f"app.kubernetes.io/instance={args.release}", args.timeout)
        else:
            deploy_prometheus(cluster, args.image, args.timeout)
    except (TimeoutError, ApiException) as exc:
        print(f"kind: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
