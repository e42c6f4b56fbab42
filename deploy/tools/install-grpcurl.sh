#!/usr/bin/env bash
# Builds grpcurl from source with the Go toolchain into .cache/bin (no prebuilt downloads), once.
# `make kind-e2e` calls the cluster's NodePorts with it (reflection, health), as a user would.
set -euo pipefail

GRPCURL_VERSION="${GRPCURL_VERSION:-v1.9.4}"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bin="$root/.cache/bin"
if [[ -x "$bin/grpcurl" ]] && "$bin/grpcurl" -version 2>&1 | grep -q "grpcurl ${GRPCURL_VERSION#v}\$\|grpcurl $GRPCURL_VERSION\$"; then
  exit 0
fi
command -v go >/dev/null || { echo "install-grpcurl: Go is needed to build grpcurl" >&2; exit 1; }
mkdir -p "$bin"
echo "install-grpcurl: building grpcurl $GRPCURL_VERSION into $bin (about a minute the first time)" >&2
GOBIN="$bin" go install -ldflags "-s -w -X main.version=$GRPCURL_VERSION" \
  "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION"
