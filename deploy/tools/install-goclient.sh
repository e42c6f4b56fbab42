#!/usr/bin/env bash
# Builds the Go client (clients/go) into .cache/bin/townhall-go, when its source or the protos are newer:
# protoc-gen-go and protoc-gen-go-grpc (versions pinned in clients/go/go.mod) into .cache/bin, the Go
# code of the public protos with grpcio-tools' protoc (the .venv's: nothing else is downloaded), then
# go vet, the client's unit tests and the binary. Go's module and build caches live in .cache/go, so a
# second build works offline.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
src="$root/clients/go"
bin="$root/.cache/bin"
python="$root/.venv/bin/python"
# The public API, townhall.v1 (its protos name their Go package: go_package).
protos=()
for proto in "$root"/proto/townhall/v1/*.proto; do
  protos+=("${proto#"$root/proto/"}")
done

if [[ -x "$bin/townhall-go" ]] && [[ -z "$(find "$src" "$root/proto" "${BASH_SOURCE[0]}" -newer "$bin/townhall-go" \
  -type f -not -path "$src/townhall/*")" ]]; then
  exit 0
fi
command -v go >/dev/null || { echo "install-goclient: Go is needed to build the Go client" >&2; exit 1; }
[[ -x "$python" ]] || { echo "install-goclient: run make setup first (grpcio-tools' protoc is in .venv)" >&2; exit 1; }
export GOMODCACHE="$root/.cache/go/mod" GOCACHE="$root/.cache/go/build" GOTOOLCHAIN=local
# -modcacherw: a read-only module cache would stop `make clean` from removing .cache.
export GOFLAGS="-modcacherw -buildvcs=false"
mkdir -p "$bin"
echo "install-goclient: building $bin/townhall-go (a minute the first time)" >&2
(cd "$src" && go build -o "$bin/protoc-gen-go" google.golang.org/protobuf/cmd/protoc-gen-go \
  && go build -o "$bin/protoc-gen-go-grpc" google.golang.org/grpc/cmd/protoc-gen-go-grpc)
rm -rf "$src/townhall/v1" && mkdir -p "$src/townhall/v1"
"$python" -m grpc_tools.protoc -I"$root/proto" \
  --plugin=protoc-gen-go="$bin/protoc-gen-go" --plugin=protoc-gen-go-grpc="$bin/protoc-gen-go-grpc" \
  --go_out="$src" --go_opt=module=townhall.dev/townhall/clients/go \
  --go-grpc_out="$src" --go-grpc_opt=module=townhall.dev/townhall/clients/go \
  "${protos[@]}"
(cd "$src" && go vet ./... && go test ./... && go build -o "$bin/townhall-go" ./cmd/townhall-go)
