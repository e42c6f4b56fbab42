#!/usr/bin/env bash
# FOR MACHINES WITHOUT A REACHABLE CONTAINER REGISTRY ONLY. With Docker Hub, use the Dockerfiles' official
# bases (their defaults) and skip this.
#
# Builds the base images that deploy/Dockerfile and deploy/kafka/Dockerfile take as build arguments, and a
# Prometheus image, from Debian packages only, on a debootstrap minbase of Debian bookworm imported into Docker
# (BASE_IMAGE; to make one: `debootstrap --variant=minbase bookworm DIR && tar -C DIR -c . | docker import -
# kindoffline/debian-base:bookworm`). The images trust this machine's extra CA certificates (CA_DIR: an egress
# proxy's), so pip and Maven inside a build reach PyPI and Maven Central through it.
#   $PREFIX/debian:bookworm       base + ca-certificates + the CAs, docs and man pages left out (as debian:slim)
#   $PREFIX/python:3.11-bookworm  python3 (3.11) python3-venv python3-pip, `python`, PIP_CERT  -> PYTHON_IMAGE
#   $PREFIX/jre:17-bookworm       openjdk-17-jre-headless                                     -> JAVA_IMAGE
#   $PREFIX/maven:17-bookworm     maven, openjdk-17-jdk-headless, the CAs in Java's truststore  -> KAFKA_BUILD_IMAGE
#   $PREFIX/prometheus:<version>  .cache/bin/prometheus and promtool (`make prometheus`) as prom/prometheus lays them out
# Idempotent: an image that exists is kept (FORCE=1 rebuilds). Prints each step's time. SKIP_PROMETHEUS=1 leaves
# out the last one (building prometheus from source takes ~10 minutes the first time). See README.md.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BASE_IMAGE=${BASE_IMAGE:-kindoffline/debian-base:bookworm}
CA_DIR=${CA_DIR:-/usr/local/share/ca-certificates}
PREFIX=${PREFIX:-townhall-local}
DOCKER=${DOCKER:-docker}
# Extra `docker build` flags, e.g. BUILD_FLAGS="--cpu-shares=256" on a busy machine.
BUILD_FLAGS=${BUILD_FLAGS:-}

debian=$PREFIX/debian:bookworm
python=$PREFIX/python:3.11-bookworm
jre=$PREFIX/jre:17-bookworm
maven=$PREFIX/maven:17-bookworm

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT

have() { [ -z "${FORCE:-}" ] && "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

# build IMAGE: the Dockerfile on stdin, with $ctx as the context.
build() {
  local image=$1 start=$SECONDS
  if have "$image"; then
    echo "== $image: exists, kept"
    return 0
  fi
  echo "== $image: building"
  cat >"$ctx/Dockerfile"
  # shellcheck disable=SC2086  # BUILD_FLAGS holds several flags
  if ! "$DOCKER" build $BUILD_FLAGS -t "$image" "$ctx" >"$ctx/build.log" 2>&1; then
    tail -n 40 "$ctx/build.log" >&2
    echo "== $image: failed after $((SECONDS - start)) s" >&2
    exit 1
  fi
  echo "== $image: built in $((SECONDS - start)) s ($("$DOCKER" image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1 / 1e6}'))"
}

total=$SECONDS
"$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1 || {
  echo "base-images: $BASE_IMAGE not found; make it from a debootstrap minbase of bookworm (see the top of $0)" >&2
  exit 1
}

# The context: the CAs, and the Prometheus binaries when they are needed.
mkdir -p "$ctx/ca"
cas=()
for crt in "$CA_DIR"/*.crt; do
  [ -e "$crt" ] || continue
  cp "$crt" "$ctx/ca/"
  cas+=("$(basename "$crt" .crt)")
done
echo "== trusting ${#cas[@]} CA certificate(s) from $CA_DIR: ${cas[*]:-none}"
# Each CA as ca-certificates-java names it in Java's truststore, checked in the JRE image.
aliases=""
for name in "${cas[@]}"; do
  aliases+=" debian:$name.pem"
done
apt='apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends'
clean='apt-get clean && rm -rf /var/lib/apt/lists/*'

build "$debian" <<EOF
FROM $BASE_IMAGE
# Documentation, man pages and translations stay out of every image built on this one (as in debian:slim).
RUN printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \\
      'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' 'path-exclude /usr/share/locale/*' \\
      'path-include /usr/share/locale/locale.alias' > /etc/dpkg/dpkg.cfg.d/docker-slim
COPY ca/ /usr/local/share/ca-certificates/
RUN $apt ca-certificates && update-ca-certificates && $clean
ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
EOF

build "$python" <<EOF
FROM $debian
RUN $apt python3 python3-venv python3-pip && $clean \\
 && ln -s python3 /usr/bin/python && python --version | grep -q '^Python 3\.11\.'
# pip's own certificate bundle does not hold this machine's CAs; the system's does.
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
EOF

# The JRE's postinst links man pages, whose folder the slim settings leave out.
build "$jre" <<EOF
FROM $debian
RUN mkdir -p /usr/share/man/man1 && $apt openjdk-17-jre-headless && $clean \\
 && java -version 2>&1 | grep -q '"17\.' \\
 && for alias in $aliases; do keytool -list -cacerts -storepass changeit -alias "\$alias" >/dev/null; done
CMD ["java", "-version"]
EOF

build "$maven" <<EOF
FROM $jre
RUN $apt openjdk-17-jdk-headless maven && $clean && mvn -v | grep -q 'Java version: 17\.'
CMD ["mvn", "-v"]
EOF

# Prometheus: the binaries the tests use (built from the Go module by deploy/tools/install-prometheus.sh, a
# no-op once built), laid out as the official prom/prometheus image: /bin, /etc/prometheus, /prometheus, nobody.
prometheus_image() {
  local bin=$root/.cache/bin start=$SECONDS version
  "$root/deploy/tools/install-prometheus.sh"
  version=$("$bin/prometheus" --version | awk 'NR == 1 { print $3 }')
  echo "== prometheus $version: binaries ready in $((SECONDS - start)) s"
  cp "$bin/prometheus" "$bin/promtool" "$ctx/"
  cat >"$ctx/prometheus.yml" <<'EOF'
# Scrapes itself; the cluster's config replaces this file (a ConfigMap mounted at /etc/prometheus).
global:
  scrape_interval: 15s
scrape_configs:
  - job_name: prometheus
    static_configs:
      - targets: [localhost:9090]
EOF
  build "$PREFIX/prometheus:$version" <<EOF
FROM $debian
COPY prometheus promtool /bin/
COPY prometheus.yml /etc/prometheus/prometheus.yml
RUN install -d -o nobody -g nogroup /prometheus && /bin/prometheus --version | grep -q 'version $version '
USER nobody
WORKDIR /prometheus
EXPOSE 9090
VOLUME ["/prometheus"]
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
EOF
}
if [ -n "${SKIP_PROMETHEUS:-}" ]; then
  echo "== prometheus: skipped (SKIP_PROMETHEUS)"
else
  prometheus_image
fi

echo "== base images ready in $((SECONDS - total)) s:"
"$DOCKER" images --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep "^$PREFIX/" | sort
