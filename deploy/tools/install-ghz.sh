#!/usr/bin/env bash
# Builds ghz (a compiled gRPC load generator) from source into .cache/bin with the Go toolchain, once.
# The join-storm benchmark uses it for unary joins: about 4x cheaper per call than a Python generator,
# so on a small machine the generator is not what limits the server.
set -euo pipefail

GHZ_VERSION="${GHZ_VERSION:-v0.93.0}"  # the newest version the Go module proxy serves

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bin="$root/.cache/bin"
if [[ -x "$bin/ghz" ]] && go version -m "$bin/ghz" 2>/dev/null | grep -q "github.com/bojand/ghz[[:space:]]*$GHZ_VERSION"; then
  exit 0
fi
command -v go >/dev/null || { echo "install-ghz: Go is needed to build ghz" >&2; exit 1; }
mkdir -p "$bin"
echo "install-ghz: building ghz $GHZ_VERSION into $bin" >&2
GOBIN="$bin" go install "github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION"
