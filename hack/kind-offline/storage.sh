#!/usr/bin/env bash
# FOR MACHINES WITHOUT A CONTAINER REGISTRY ONLY (see README.md here). Gives a running kind cluster the storage
# provisioner kind's own node images carry (rancher local-path-provisioner, kind's manifest), built here:
# the offline node image of ../../../shared/kind-offline has none, so kind falls back to an in-tree host-path
# StorageClass whose volumes are root-owned directories a non-root pod (the notifier, uid 10001) cannot write.
#   1. local-path-provisioner (Go module, LOCAL_PATH_VERSION) built with the Go toolchain;
#   2. images under the exact names kind v0.33's manifest uses (provisioner and helper, on the Debian base);
#   3. kind load both; replace the fallback `standard` StorageClass with kind's manifest (still `standard`, default).
# Run after `make kind-up`, before `make deploy` (no claim may exist yet). Idempotent. Needs W's kubectl.
set -euo pipefail
W=${W:-/tmp/kindoffline}
KUBECTL=${KUBECTL:-$W/bin/kubectl}
CLUSTER=${KIND_CLUSTER:-townhall}
CONTEXT=kind-$CLUSTER
KIND=${KIND:-$W/bin/kind}
LOCAL_PATH_VERSION=${LOCAL_PATH_VERSION:-v0.0.30}
BASE=${BASE_IMAGE:-kindoffline/debian-base:bookworm}
kind_dir=$(ls -d "$(go env GOMODCACHE)"/sigs.k8s.io/kind@v0.33.0)
consts=$kind_dir/pkg/build/nodeimage/const_storage.go
provisioner=$(sed -n 's/^const storageProvisionerImage = "\(.*\)"$/\1/p' "$consts")
helper=$(sed -n 's/^const storageHelperImage = "\(.*\)"$/\1/p' "$consts")
work=$W/storage; mkdir -p "$work/bin"
t0=$SECONDS
step() { echo "storage: [$((SECONDS - t0)) s] $*"; }

if ! docker image inspect "$provisioner" >/dev/null 2>&1; then
  step "building local-path-provisioner $LOCAL_PATH_VERSION"
  CGO_ENABLED=0 GOBIN=$work/bin nice go install "github.com/rancher/local-path-provisioner@$LOCAL_PATH_VERSION"
  printf 'FROM %s\nCOPY local-path-provisioner /usr/local/bin/local-path-provisioner\nUSER 0\n' "$BASE" > "$work/bin/Dockerfile"
  docker build -q -t "$provisioner" "$work/bin" >/dev/null
fi
if ! docker image inspect "$helper" >/dev/null 2>&1; then
  step "helper image (sh, mkdir, rm from the Debian base)"
  printf 'FROM %s\n' "$BASE" | docker build -q -t "$helper" - >/dev/null
fi
step "loading $provisioner and $helper into kind cluster $CLUSTER"
"$KIND" load docker-image "$provisioner" "$helper" --name "$CLUSTER" >/dev/null

# kind's manifest, as its node-image build writes it: the Go string constant with the two image names put in.
awk '/^const defaultStorageManifest = `/{on=1; next} on && /^`$/{exit} on' "$consts" \
  | sed -e "s|\` + storageProvisionerImage + \`|$provisioner|g" -e "s|\` + storageHelperImage + \`|$helper|g" \
  > "$work/default-storage.yaml"
if [ "$("$KUBECTL" --context "$CONTEXT" get storageclass standard -o jsonpath='{.provisioner}' 2>/dev/null)" != rancher.io/local-path ]; then
  step "replacing the fallback StorageClass"
  "$KUBECTL" --context "$CONTEXT" delete storageclass standard --ignore-not-found
fi
"$KUBECTL" --context "$CONTEXT" apply -f "$work/default-storage.yaml" >/dev/null
"$KUBECTL" --context "$CONTEXT" -n local-path-storage rollout status deployment/local-path-provisioner --timeout 180s
step "done: StorageClass standard is rancher.io/local-path"
