# Kubernetes on a laptop: kind cluster, image, chart, dashboards. Included from the Makefile
# (`include deploy/k8s.mk`). helm, kind, prometheus and promtool are built from source with the Go toolchain
# into .cache/bin; docker (for image, kind-up, kind-load) and kubectl (for deploy and dashboards) come from
# your machine.

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
# kube-prometheus-stack, for `make monitoring` (Prometheus Operator, Prometheus, Grafana with its sidecar).
KPS_VERSION ?= 81.6.2

.PHONY: helm prometheus kind kind-up image kind-load deploy helm-test monitoring dashboards dashboards-json chart-check kind-down

helm: ## Build helm (v3.21.4) from source into .cache/bin with the Go toolchain, once
	deploy/tools/install-helm.sh

prometheus: ## Build prometheus and promtool (3.16.0) from source into .cache/bin with Go, once (the tests use them)
	deploy/tools/install-prometheus.sh

kind: ## Build kind (v0.33.0) from source into .cache/bin with the Go toolchain, once
	@test -x $(KIND) && $(KIND) version | grep -q '$(KIND_VERSION) ' || GOBIN=$(K8S_BIN) go install sigs.k8s.io/kind@$(KIND_VERSION)

kind-up: kind ## Create the kind cluster (deploy/kind/cluster.yaml: K8s v1.37, client ports on localhost)
	@command -v $(DOCKER) >/dev/null || { echo "kind-up needs $(DOCKER)"; exit 1; }
	$(KIND) get clusters 2>/dev/null | grep -qx '$(KIND_CLUSTER)' || \
		$(KIND) create cluster --name $(KIND_CLUSTER) --config deploy/kind/cluster.yaml --wait 120s

image: ## Build the Townhall image (townhall:<appVersion>) from deploy/Dockerfile
	@command -v $(DOCKER) >/dev/null || { echo "image needs $(DOCKER)"; exit 1; }
	$(DOCKER) build -f deploy/Dockerfile -t $(IMAGE) .

# The bundled broker's image, a stand-in for apache/kafka built from the Maven jars (deploy/kafka/Dockerfile); the
# chart runs it with --set kafka.image.repository=$(KAFKA_IMAGE_REPO) --set kafka.image.tag=$(KAFKA_IMAGE_TAG).
# JAVA_IMAGE and KAFKA_BUILD_IMAGE replace the Dockerfile's official bases (empty: its defaults).
KAFKA_IMAGE_REPO ?= townhall-kafka
KAFKA_IMAGE_TAG ?= $(shell sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' deploy/kafka/pom.xml)
KAFKA_IMAGE := $(KAFKA_IMAGE_REPO):$(KAFKA_IMAGE_TAG)
JAVA_IMAGE ?=
KAFKA_BUILD_IMAGE ?=

.PHONY: kafka-image
kafka-image: ## Build the Kafka broker image (townhall-kafka:<Kafka version>) from deploy/kafka's Maven jars
	@command -v $(DOCKER) >/dev/null || { echo "kafka-image needs $(DOCKER)"; exit 1; }
	$(DOCKER) build -f deploy/kafka/Dockerfile -t $(KAFKA_IMAGE) \
		$(if $(JAVA_IMAGE),--build-arg JAVA_IMAGE=$(JAVA_IMAGE)) \
		$(if $(KAFKA_BUILD_IMAGE),--build-arg KAFKA_BUILD_IMAGE=$(KAFKA_BUILD_IMAGE)) deploy/kafka

kind-load: kind ## Load the image into the kind cluster's node(s)
	$(KIND) load docker-image $(IMAGE) --name $(KIND_CLUSTER)

# No --wait: with the bundled broker, topics are created by a post-install hook, which helm runs only after
# --wait is satisfied, while the services need the topics to become ready. rollout status waits instead.
deploy: helm ## Install or upgrade the chart on the current kube context with the kind values
	$(HELM) upgrade --install $(RELEASE) $(CHART) --namespace $(NAMESPACE) --create-namespace \
		-f $(KIND_VALUES) --set image.repository=$(IMAGE_REPO) --set image.tag=$(IMAGE_TAG)
	$(KUBECTL) -n $(NAMESPACE) rollout status statefulset -l app.kubernetes.io/instance=$(RELEASE) --timeout 300s
	$(KUBECTL) -n $(NAMESPACE) rollout status deployment -l app.kubernetes.io/instance=$(RELEASE) --timeout 300s
	$(HELM) status $(RELEASE) --namespace $(NAMESPACE)

helm-test: helm ## Run the chart's test pod (gRPC health of every pod and Service)
	$(HELM) test $(RELEASE) --namespace $(NAMESPACE) --logs

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

kind-down: kind ## Delete the kind cluster
	$(KIND) delete cluster --name $(KIND_CLUSTER)
