#!/bin/bash
# The multi-host topology's make targets (deploy/hosts.mk) on a machine without a registry: the local
# Debian-based stand-ins for the official base images (base-images.sh, kept once built), then
#   make cluster-up | cluster-faults | cluster-down ...   with every image variable pointing at them.
#   hack/kind-offline/cluster.sh cluster-up
#   RUNS=1 hack/kind-offline/cluster.sh cluster-faults
#   hack/kind-offline/cluster.sh cluster-down
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
prefix=${PREFIX:-townhall-local}
SKIP_PROMETHEUS=1 PREFIX=$prefix "$here/base-images.sh"
exec make -C "$here/../.." "$@" \
  PYTHON_IMAGE="$prefix/python:3.11-bookworm" \
  JAVA_IMAGE="$prefix/jre:17-bookworm" \
  KAFKA_BUILD_IMAGE="$prefix/maven:17-bookworm"
