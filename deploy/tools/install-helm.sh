#!/usr/bin/env bash
# Builds helm from source with the Go toolchain into .cache/bin (no prebuilt downloads), once.
# The -X flags are what helm's own Makefile sets: without them a `go install`ed helm believes the cluster
# is Kubernetes v1.20 in `helm template` and `helm lint`, and rejects the chart's kubeVersion.
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-v3.21.4}"
# helm v3.21.4 is built against k8s.io/client-go v0.36, i.e. Kubernetes 1.36: what helm's Makefile derives from
# it. The chart tests pass --kube-version for the cluster they validate against (tests/chart/helpers.py).
K8S_MINOR="${K8S_MINOR:-36}"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bin="$root/.cache/bin"
if [[ -x "$bin/helm" ]] && [[ "$("$bin/helm" version --template '{{.Version}}')" == "$HELM_VERSION" ]]; then
  exit 0
fi
command -v go >/dev/null || { echo "install-helm: Go is needed to build helm" >&2; exit 1; }
pkg=helm.sh/helm/v3
ldflags="-s -w -X $pkg/internal/version.version=$HELM_VERSION"
for p in pkg/lint/rules pkg/chartutil; do
  ldflags+=" -X $pkg/$p.k8sVersionMajor=1 -X $pkg/$p.k8sVersionMinor=$K8S_MINOR"
done
mkdir -p "$bin"
echo "install-helm: building helm $HELM_VERSION into $bin (a few minutes the first time)" >&2
GOBIN="$bin" go install -ldflags "$ldflags" "$pkg/cmd/helm@$HELM_VERSION"
