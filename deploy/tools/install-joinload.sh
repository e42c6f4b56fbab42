#!/usr/bin/env bash
# Builds deploy/tools/joinload (ghz's runner with a new user and token on every call, the join-storm
# load generator) into .cache/bin with the Go toolchain, when its source is newer than the binary.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
src="$root/deploy/tools/joinload"
bin="$root/.cache/bin/joinload"
if [[ -x "$bin" ]] && [[ -z "$(find "$src" -newer "$bin" -type f)" ]]; then
  exit 0
fi
command -v go >/dev/null || { echo "install-joinload: Go is needed to build the load generator" >&2; exit 1; }
mkdir -p "$(dirname "$bin")"
echo "install-joinload: building $bin (ghz v0.93.0's runner; a minute the first time)" >&2
(cd "$src" && go build -o "$bin" .)
