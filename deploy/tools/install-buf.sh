#!/usr/bin/env bash
# Builds buf from source with the Go toolchain into .cache/bin (no prebuilt downloads), once.
# `make lint` runs `buf lint` and `buf breaking` on proto/ with it (buf.yaml).
set -euo pipefail

BUF_VERSION="${BUF_VERSION:-v1.75.0}"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bin="$root/.cache/bin"
if [[ -x "$bin/buf" ]] && [[ "$("$bin/buf" --version 2>/dev/null)" == "${BUF_VERSION#v}" ]]; then
  exit 0
fi
command -v go >/dev/null || { echo "install-buf: Go is needed to build buf" >&2; exit 1; }
mkdir -p "$bin"
echo "install-buf: building buf $BUF_VERSION into $bin (a few minutes the first time)" >&2
GOBIN="$bin" go install -ldflags "-s -w" "github.com/bufbuild/buf/cmd/buf@$BUF_VERSION"
