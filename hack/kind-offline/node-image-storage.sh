#!/usr/bin/env bash
# FOR MACHINES WITHOUT A CONTAINER REGISTRY ONLY (see README.md here). Adds to the offline kind node image of
# ../../../shared/kind-offline (build-node-image.sh) the storage provisioner kind's own node images carry:
# without it kind falls back to an in-tree host-path StorageClass whose volumes are root-owned directories that
# a non-root pod (the notifier, uid 10001) cannot write. As `kind build node-image` does:
#   1. rancher local-path-provisioner (Go module, LOCAL_PATH_VERSION) built with the Go toolchain, and its
#      helper image (sh, mkdir, rm: the Debian base), under the exact names kind v0.33's manifest uses;
#   2. both pre-imported into the node's containerd (k8s.io namespace, --no-unpack) and kind's storage manifest
#      (the Go constant in kind's source) at /kind/manifests/default-storage.yaml, which `kind create` applies;
#   3. the result as $NODE_IMAGE (default kindest/node:v1.34.4-offline-storage).
# Idempotent: does nothing if $NODE_IMAGE exists (FORCE=1 rebuilds). Prints each step's time.
set -euo pipefail
W=${W:-/tmp/kindoffline}
KV=${KV:-v1.34.4}
BASE_NODE=${BASE_NODE:-kindest/node:$KV-offline}
NODE_IMAGE=${NODE_IMAGE:-kindest/node:$KV-offline-storage}
LOCAL_PATH_VERSION=${LOCAL_PATH_VERSION:-v0.0.30}
BASE=${BASE_IMAGE:-kindoffline/debian-base:bookworm}
t0=$SECONDS
step() { echo "node-image-storage: [$((SECONDS - t0)) s] $*"; }
if [ -z "${FORCE:-}" ] && docker image inspect "$NODE_IMAGE" >/dev/null 2>&1; then
  step "$NODE_IMAGE exists"; exit 0
fi
[ -f "$W/nodestage/kind/version" ] || { echo "node-image-storage: run shared/kind-offline/build-node-image.sh first" >&2; exit 1; }
consts=$(ls -d "$(go env GOMODCACHE)"/sigs.k8s.io/kind@v0.33.0)/pkg/build/nodeimage/const_storage.go
provisioner=$(sed -n 's/^const storageProvisionerImage = "\(.*\)"$/\1/p' "$consts")
helper=$(sed -n 's/^const storageHelperImage = "\(.*\)"$/\1/p' "$consts")
work=$W/storage; rm -rf "$work"; mkdir -p "$work/bin"

step "building local-path-provisioner $LOCAL_PATH_VERSION"
CGO_ENABLED=0 GOBIN=$work/bin nice go install "github.com/rancher/local-path-provisioner@$LOCAL_PATH_VERSION"
printf 'FROM %s\nCOPY local-path-provisioner /usr/local/bin/local-path-provisioner\n' "$BASE" > "$work/bin/Dockerfile"
docker build -q -t "$provisioner" "$work/bin" >/dev/null
printf 'FROM %s\n' "$BASE" | docker build -q -t "$helper" - >/dev/null
docker save -o "$work/images.tar" "$provisioner" "$helper"

# kind's manifest as its node-image build writes it: the Go string constant with the two image names put in.
awk '/^const defaultStorageManifest = `/{on=1; next} on && /^`$/{exit} on' "$consts" \
  | sed -e "s|\` + storageProvisionerImage + \`|$provisioner|g" -e "s|\` + storageHelperImage + \`|$helper|g" \
  > "$work/default-storage.yaml"
grep -q "image: $provisioner" "$work/default-storage.yaml" || { echo "node-image-storage: manifest not found in $consts" >&2; exit 1; }

step "copying the node tree and importing the images into its containerd"
ST=$work/stage; cp -a "$W/nodestage" "$ST"
install -m644 "$work/default-storage.yaml" "$ST/kind/manifests/default-storage.yaml"
mkdir -p "$ST/proc" "$ST/run/ci"; mount -t proc proc "$ST/proc"
trap 'kill $CPID 2>/dev/null || true; sleep 1; umount "$ST/proc" 2>/dev/null || true' EXIT
printf 'version = 2\nroot = "/var/lib/containerd"\nstate = "/run/ci/state"\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n[grpc]\n  address = "/run/ci/containerd.sock"\n' > "$ST/run/ci/config.toml"
chroot "$ST" /usr/bin/containerd --config /run/ci/config.toml > "$work/containerd.log" 2>&1 & CPID=$!
for _ in $(seq 30); do [ -S "$ST/run/ci/containerd.sock" ] && break; sleep 1; done
chroot "$ST" ctr -a /run/ci/containerd.sock -n k8s.io images import --all-platforms --no-unpack --digests - < "$work/images.tar"
chroot "$ST" ctr -a /run/ci/containerd.sock -n k8s.io images ls -q | grep -F -e "$provisioner" -e "$helper"
kill $CPID; wait $CPID 2>/dev/null || true; umount "$ST/proc"; trap - EXIT; rm -rf "$ST/run/ci"

step "importing $NODE_IMAGE"
tar -C "$ST" -c . | nice docker import - "kindoffline/node-rootfs:$KV-storage" >/dev/null
printf 'FROM kindoffline/node-rootfs:%s-storage\nENV container=docker\nSTOPSIGNAL SIGRTMIN+3\nENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]\n' "$KV" \
  | docker build -q -t "$NODE_IMAGE" - >/dev/null
docker rmi "kindoffline/node-rootfs:$KV-storage" >/dev/null
rm -rf "$work"
step "done: $(docker image inspect "$NODE_IMAGE" --format '{{.Size}}') bytes"
