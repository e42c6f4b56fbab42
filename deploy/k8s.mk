# Kubernetes on a laptop: kind cluster, images, chart, Prometheus, the end-to-end test. Included from the
# Makefile (`include deploy/k8s.mk`). helm, kind, grpcurl, prometheus and promtool are built from source with
# the Go toolchain into .cache/bin; docker comes from your machine, kubectl too for `dashboards`.
# Every image defaults to its official upstream one; the variables point them at local images on a machine
# without a registry (hack/kind-offline/README.md).

K8S_BIN := $(abspath .cache/bin)
HELM := $(K8S_BIN)/helm
KIND := $(K8S_BIN)/kind
KIND_VERSION ?= v0.33.0
KIND_CLUSTER ?= townhall
KUBECTL ?= kubectl
DOCKER ?= docker
CHART := helm/townhall
IMAGE_REPO ?= townhall
IMAGE_TAG ?= $(shell awk '/^appVersion:/ {gsub(/"/, "", $$2); print $$2}' $(CHART)/Chart.yaml)
IMAGE := $(IMAGE_REPO):$(IMAGE_TAG)
NAMESPACE ?= townhall
RELEASE ?= townhall
KIND_VALUES ?= $(CHART)/ci/kind-default-values.yaml
# The kind node image; empty: the one deploy/kind/cluster.yaml names.
KIND_NODE_IMAGE ?=
# deploy/Dockerfile's base; empty: the Dockerfile's default (the official Python image).
PYTHON_IMAGE ?=
# The in-cluster Prometheus of kind-prometheus (deploy/kind/prometheus.yaml).
PROMETHEUS_IMAGE ?= quay.io/prometheus/prometheus:v3.16.0
# Images the kind node gets with `kind load`, those of them Docker has (what was built here); the node pulls the
# others. A local Kafka image (`make kafka-image`) is used when KAFKA_IMAGE_REPO is set; else the chart's default.
KIND_IMAGES ?= $(IMAGE) $(if $(KAFKA_IMAGE_REPO),$(KAFKA_IMAGE)) $(PROMETHEUS_IMAGE)
# The kube context every target below talks to, never whatever kubectl's current context happens to be.
KUBE_CONTEXT ?= kind-$(KIND_CLUSTER)
# More `helm upgrade` flags for deploy (e.g. --set relay.replicas=3).
HELM_EXTRA ?=
GRPCURL := $(K8S_BIN)/grpcurl
# kube-prometheus-stack, for `make monitoring` (Prometheus Operator, Prometheus, Grafana with its sidecar).
KPS_VERSION ?= 81.6.2

.PHONY: helm prometheus grpcurl kind kind-up image kind-images kind-load deploy helm-test kind-prometheus kind-e2e monitoring dashboards dashboards-json chart-check kind-down

helm: ## Build helm (v3.21.4) from source into .cache/bin with the Go toolchain, once
	deploy/tools/install-helm.sh

prometheus: ## Build prometheus and promtool (3.16.0) from source into .cache/bin with Go, once (the tests use them)
	deploy/tools/install-prometheus.sh

grpcurl: ## Build grpcurl (v1.9.4) from source into .cache/bin with Go, once (kind-e2e calls the cluster with it)
	deploy/tools/install-grpcurl.sh

kind: ## Build kind (v0.33.0) from source into .cache/bin with the Go toolchain, once
	@test -x $(KIND) && $(KIND) version | grep -q '$(KIND_VERSION) ' || GOBIN=$(K8S_BIN) go install sigs.k8s.io/kind@$(KIND_VERSION)

kind-up: kind ## Create the kind cluster (deploy/kind/cluster.yaml, KIND_NODE_IMAGE overrides its node image)
	@command -v $(DOCKER) >/dev/null || { echo "kind-up needs $(DOCKER)"; exit 1; }
	$(KIND) get clusters 2>/dev/null | grep -qx '$(KIND_CLUSTER)' || \
		$(KIND) create cluster --name $(KIND_CLUSTER) --config deploy/kind/cluster.yaml --wait 180s \
			$(if $(KIND_NODE_IMAGE),--image $(KIND_NODE_IMAGE))

image: ## Build the Townhall image (townhall:<appVersion>) from deploy/Dockerfile
	@command -v $(DOCKER) >/dev/null || { echo "image needs $(DOCKER)"; exit 1; }
	$(DOCKER) build -f deploy/Dockerfile -t $(IMAGE) $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) .

# The bundled broker's image, a stand-in for apache/kafka built from the Maven jars (deploy/kafka/Dockerfile).
# With KAFKA_IMAGE_REPO set, kind-images builds it and deploy runs it (--set kafka.image.repository/tag); empty,
# the chart's default (apache/kafka) is pulled by the node. kafka-image alone builds townhall-kafka:<version>.
# JAVA_IMAGE and KAFKA_BUILD_IMAGE replace the Dockerfile's official bases (empty: its defaults).
KAFKA_IMAGE_REPO ?=
KAFKA_IMAGE_TAG ?= $(shell sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' deploy/kafka/pom.xml)
KAFKA_IMAGE := $(or $(KAFKA_IMAGE_REPO),townhall-kafka):$(KAFKA_IMAGE_TAG)
JAVA_IMAGE ?=
KAFKA_BUILD_IMAGE ?=

.PHONY: kafka-image
kafka-image: ## Build the Kafka broker image (townhall-kafka:<Kafka version>) from deploy/kafka's Maven jars
	@command -v $(DOCKER) >/dev/null || { echo "kafka-image needs $(DOCKER)"; exit 1; }
	$(DOCKER) build -f deploy/kafka/Dockerfile -t $(KAFKA_IMAGE) \
		$(if $(JAVA_IMAGE),--build-arg JAVA_IMAGE=$(JAVA_IMAGE)) \
		$(if $(KAFKA_BUILD_IMAGE),--build-arg KAFKA_BUILD_IMAGE=$(KAFKA_BUILD_IMAGE)) deploy/kafka

kind-images: image $(if $(KAFKA_IMAGE_REPO),kafka-image) ## Build the images kind-e2e runs (Townhall's; Kafka's with KAFKA_IMAGE_REPO)

print-kind-images: # The images kind-load loads (kind-e2e checks them)
	@echo $(KIND_IMAGES)

print-image: # The Townhall image (kind-e2e checks it carries the runtime only)
	@echo $(IMAGE)

kind-load: kind ## Load the images Docker has of KIND_IMAGES (Townhall, Kafka, Prometheus) into the kind node(s)
	@for image in $(KIND_IMAGES); do \
		if $(DOCKER) image inspect $$image >/dev/null 2>&1; then \
			echo "kind-load: $$image"; $(KIND) load docker-image $$image --name $(KIND_CLUSTER) || exit 1; \
		else echo "kind-load: $$image is not local; the node pulls it"; fi; \
	done

# No --wait: with the bundled broker, topics are created by a post-install hook, which helm runs only after
# --wait is satisfied, while the services need the topics to become ready. rollout status waits instead.
deploy: setup helm ## Install or upgrade the chart on KUBE_CONTEXT with the kind values; wait until every pod is Ready
	$(HELM) upgrade --install $(RELEASE) $(CHART) --kube-context $(KUBE_CONTEXT) --namespace $(NAMESPACE) \
		--create-namespace -f $(KIND_VALUES) --set image.repository=$(IMAGE_REPO) --set image.tag=$(IMAGE_TAG) \
		$(if $(KAFKA_IMAGE_REPO),--set kafka.image.repository=$(KAFKA_IMAGE_REPO) --set kafka.image.tag=$(KAFKA_IMAGE_TAG)) \
		$(HELM_EXTRA)
	$(BIN)/python -m townhall_tools.devtools.kind --context $(KUBE_CONTEXT) wait-ready --namespace $(NAMESPACE) \
		--release $(RELEASE) --timeout 600

helm-test: helm ## Run the chart's test pod (gRPC health of every pod and Service)
	$(HELM) test $(RELEASE) --kube-context $(KUBE_CONTEXT) --namespace $(NAMESPACE) --logs --timeout 5m

kind-prometheus: setup ## A plain Prometheus in the cluster (deploy/kind/prometheus.yaml) with the chart's rules, on :30090
	$(BIN)/python -m townhall_tools.devtools.kind --context $(KUBE_CONTEXT) prometheus --image $(PROMETHEUS_IMAGE)

kind-e2e: setup kind helm grpcurl ## The chart on kind end to end: cluster, images, install, demo, faults, scaling, Prometheus
	KIND_E2E=1 KIND_E2E_MAKE="$(MAKE) --no-print-directory" $(BIN)/pytest -p no:cacheprovider -s -v tests/e2e

monitoring: helm ## Install kube-prometheus-stack (Grafana localhost:30300, Prometheus :30090); then re-run deploy
	$(HELM) upgrade --install monitoring kube-prometheus-stack --repo https://prometheus-community.github.io/helm-charts \
		--version $(KPS_VERSION) --namespace monitoring --create-namespace -f deploy/kind/monitoring-values.yaml --wait
	@echo "Now run 'make deploy' again: the chart adds its ServiceMonitor and PrometheusRule once the CRDs exist."

dashboards: ## Port-forward Grafana (localhost:3000, admin/townhall) and Prometheus (localhost:9090) until Ctrl-C
	@echo "Grafana http://localhost:3000 (dashboards: Townhall / ...)   Prometheus http://localhost:9090"
	$(KUBECTL) -n monitoring port-forward svc/monitoring-grafana 3000:80 & \
	trap 'kill $$!' EXIT; $(KUBECTL) -n monitoring port-forward svc/monitoring-kube-prometheus-prometheus 9090:9090

dashboards-json: ## Regenerate helm/townhall/dashboards/*.json from deploy/grafana/dashboards.py
	$(BIN)/python deploy/grafana/dashboards.py

chart-check: setup helm prometheus ## Lint, render and validate the chart (every ci/*-values.yaml), rules and dashboards
	for values in $(CHART)/ci/*-values.yaml; do $(HELM) lint --strict $(CHART) -f $$values || exit 1; done
	$(BIN)/pytest -q tests/chart

kind-down: kind ## Delete the kind cluster and the images kind-images built
	$(KIND) delete cluster --name $(KIND_CLUSTER)
	-$(DOCKER) image rm $(IMAGE) $(if $(KAFKA_IMAGE_REPO),$(KAFKA_IMAGE)) 2>/dev/null
