#!/usr/bin/env bash
# Generates the protobuf/gRPC code and .pyi stubs of proto/ into services/: townhall.v1 (the public API)
# and townhall.internal.v1 (calls between Townhall processes, Kafka payloads). Generated code is not
# committed; `make proto` and deploy/Dockerfile both run this.
# Usage: gen-proto.sh PYTHON   (a python with grpcio-tools and mypy-protobuf, whose bin/ has protoc-gen-mypy)
set -euo pipefail

python="$1"
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
rm -rf services/townhall/v1 services/townhall/internal
mkdir -p services/townhall/v1 services/townhall/internal/v1
PATH="$(cd "$(dirname "$python")" && pwd):$PATH" "$python" -m grpc_tools.protoc -Iproto \
  --python_out=services --grpc_python_out=services --mypy_out=services --mypy_grpc_out=services \
  proto/townhall/v1/*.proto proto/townhall/internal/v1/*.proto
echo '"""Generated code for townhall.internal.v1, between Townhall processes only (make proto)."""' \
  > services/townhall/internal/__init__.py
cp services/townhall/internal/__init__.py services/townhall/internal/v1/__init__.py
# Written last: the Makefile takes this file as the sign that generation finished.
echo '"""Generated protobuf and gRPC code for townhall.v1 (make proto; not edited by hand)."""' \
  > services/townhall/v1/__init__.py
