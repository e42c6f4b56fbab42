#!/usr/bin/env bash
# Builds the prometheus server and promtool from source with the Go toolchain into .cache/bin (no prebuilt
# downloads), once. The tests use them: promtool checks the alert rules and the scrape config, the server
# scrapes a live topology and answers the dashboards' and alerts' queries over its HTTP API.
# Built without the `builtinassets` tag: the web UI's assets are not in the Go module, and the tests use
# only the HTTP API. The -X flags are what Prometheus's own build sets, so `prometheus --version` is true.
set -euo pipefail

# Prometheus 3.x is tagged as Go module v0.3MM.P for release 3.MM.P.
PROMETHEUS_VERSION="${PROMETHEUS_VERSION:-v0.316.0}"

minor="${PROMETHEUS_VERSION#v0.}"
minor="${minor%%.*}"
release="${minor:0:1}.$((10#${minor:1})).${PROMETHEUS_VERSION##*.}"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bin="$root/.cache/bin"
built() { [[ -x "$bin/$1" ]] && "$bin/$1" --version 2>&1 | grep -q "^$1, version $release "; }
if built prometheus && built promtool; then
  exit 0
fi
command -v go >/dev/null || { echo "install-prometheus: Go is needed to build prometheus and promtool" >&2; exit 1; }
mod=github.com/prometheus/prometheus
mkdir -p "$bin"
echo "install-prometheus: building prometheus and promtool $release into $bin (about 10 minutes the first time)" >&2
GOBIN="$bin" go install -ldflags "-s -w -X github.com/prometheus/common/version.Version=$release" \
  "$mod/cmd/prometheus@$PROMETHEUS_VERSION" "$mod/cmd/promtool@$PROMETHEUS_VERSION"
