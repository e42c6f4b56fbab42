"""Chart test helpers: paths, the scenarios, helm invocation and manifest lookups."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "townhall"
SCENARIOS = sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))
# kind v0.33.0's default node image is kindest/node:v1.37.0; deploy/kind/cluster.yaml pins the same.
KUBE_VERSION = "1.37.0"
RELEASE = "townhall"
NAMESPACE = "townhall"
MONITORING_API = "monitoring.coreos.com/v1"

Manifest = dict[str, Any]


def values_file(scenario: str) -> Path:
    """The values file of a ci/ scenario."""
    return CHART / "ci" / f"{scenario}-values.yaml"


# The fixtures that are a tool built from source with the Go toolchain into .cache/bin, once:
# fixture -> (the deploy/tools script that builds it, the binary).
TOOLS = {
    "helm": ("install-helm.sh", "helm"),
    "prometheus_server": ("install-prometheus.sh", "prometheus"),
    "promtool": ("install-prometheus.sh", "promtool"),
    "grpcurl": ("install-grpcurl.sh", "grpcurl"),
    "go_client": ("install-goclient.sh", "townhall-go"),
}


@functools.cache
def install(script: str) -> subprocess.CompletedProcess[str]:
    """Runs deploy/tools/<script> once per session (it returns at once when the binaries are built)."""
    return subprocess.run(
        [str(REPO / "deploy" / "tools" / script)], capture_output=True, text=True, timeout=1800
    )


def build_tool(fixture: str) -> Path:
    """The binary of a TOOLS fixture in .cache/bin, built if missing; fails the test if it cannot be built."""
    script, binary = TOOLS[fixture]
    result = install(script)
    if result.returncode != 0:
        pytest.fail(f"cannot build {binary} (deploy/tools/{script}):\n{result.stdout}\n{result.stderr}")
    return REPO / ".cache" / "bin" / binary


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Runs helm and returns the finished process (not checked)."""
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120, cwd=REPO)


# Keys for rendering the chart's defaults, which hold none (a render without keys fails, by design).
TEST_KEYS = Path(__file__).resolve().parent / "keys-values.yaml"


def template_args(scenario: str | None, *extra: str, chart: Path = CHART, keys: bool = True) -> list[str]:
    """Arguments of `helm template` for a scenario (None: chart defaults, with TEST_KEYS unless `keys` is
    false) plus extra flags."""
    args = ["template", RELEASE, str(chart), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    if scenario:
        args += ["-f", str(values_file(scenario))]
    elif keys:
        args += ["-f", str(TEST_KEYS)]
    return [*args, *extra]


def by_kind(manifests: list[Manifest], kind: str) -> dict[str, Manifest]:
    """The manifests of one kind, by name."""
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def component(manifest: Manifest) -> str:
    """The app.kubernetes.io/component label of a manifest ('' if none)."""
    return manifest["metadata"].get("labels", {}).get("app.kubernetes.io/component", "")


def pod_specs(manifests: list[Manifest]) -> list[tuple[Manifest, dict[str, Any]]]:
    """(owner manifest, pod spec) for every workload, Job and bare Pod."""
    specs = []
    for m in manifests:
        if m["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            specs.append((m, m["spec"]["template"]["spec"]))
        elif m["kind"] == "Pod":
            specs.append((m, m["spec"]))
    return specs


def workload(manifests: list[Manifest], name: str) -> Manifest:
    """The Deployment or StatefulSet of a Townhall component (admission, relay, notifier, kafka)."""
    found = [m for m in manifests if m["kind"] in {"Deployment", "StatefulSet"} and component(m) == name]
    assert len(found) == 1, f"expected one workload for {name}, found {len(found)}"
    return found[0]
