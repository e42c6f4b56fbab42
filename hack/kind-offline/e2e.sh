#!/usr/bin/env bash
# FOR MACHINES WITHOUT A CONTAINER REGISTRY ONLY (see README.md here): `make kind-e2e` with every image built
# locally. Assumes ../../../shared/kind-offline has run (start-docker, build-binaries, prep-rootfs,
# build-node-image: Docker up, kindest/node:v1.34.4-offline, kindoffline/debian-base:bookworm).
#   1. node-image-storage.sh: the offline node image plus the storage provisioner kind's own images carry;
#   2. base-images.sh: the local Python, JRE, Maven and Prometheus images;
#   3. `make kind-e2e` pointed at the local images.
# Extra arguments go to make (e.g. KIND_CLUSTER=...). `make kind-down` afterwards removes the cluster.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); repo=$(cd "$here/../.." && pwd)
W=${W:-/tmp/kindoffline}
export PATH=$W/bin:$PATH
NODE_IMAGE=${NODE_IMAGE:-kindest/node:v1.34.4-offline-storage}
cd "$repo"
NODE_IMAGE=$NODE_IMAGE "$here/node-image-storage.sh"
"$here/base-images.sh"
# The Prometheus image base-images.sh tagged: the version of the binary it holds.
prom_version=$(.cache/bin/prometheus --version | awk 'NR == 1 { print $3 }')
vars=(
  KIND_NODE_IMAGE="$NODE_IMAGE"
  PYTHON_IMAGE=townhall-local/python:3.11-bookworm
  JAVA_IMAGE=townhall-local/jre:17-bookworm
  KAFKA_BUILD_IMAGE=townhall-local/maven:17-bookworm
  KAFKA_IMAGE_REPO=townhall-kafka
  PROMETHEUS_IMAGE=townhall-local/prometheus:$prom_version
)
make kind-e2e "${vars[@]}" "$@"
