# Townhall: one Makefile for setup, the local topology, tests and benchmarks.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PROTOS := $(wildcard proto/townhall/v1/*.proto proto/townhall/internal/v1/*.proto)
GEN := services/townhall/v1
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup proto run dev demo test unit integration fuzz lint buf diagram joinload goclient bench faults kafka kafka-stop clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml tools/pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' -e ./tools
	touch $@

setup: $(STAMP) $(GEN)/__init__.py ## Create .venv, install Townhall (dev extra) and townhall-tools, generate the gRPC code

$(GEN)/__init__.py: $(PROTOS) $(STAMP) deploy/tools/gen-proto.sh
	deploy/tools/gen-proto.sh $(BIN)/python

proto: ## Regenerate the protobuf/gRPC code (and .pyi stubs) from proto/
	rm -f $(GEN)/__init__.py && $(MAKE) --no-print-directory $(GEN)/__init__.py

run: setup ## Install everything, start the local topology, run the demo, exit with its status
	$(BIN)/townhall dev --run-demo

dev: setup ## Start the local topology (Kafka + services) and keep it up until Ctrl-C
	$(BIN)/townhall dev

demo: setup ## Run the demo against a topology started by `make dev`
	$(BIN)/townhall demo

test: setup lint helm prometheus ## Install everything, lint, run all tests (unit, integration on a real broker, chart)
	$(BIN)/pytest -q -ra tests

unit: setup ## Run the unit tests only (no network)
	$(BIN)/pytest -q tests/unit

integration: setup prometheus ## Run the integration tests only (real Kafka broker, real servers, Prometheus)
	$(BIN)/pytest -q -ra tests/integration

FUZZ_EXAMPLES ?= 200
fuzz: setup ## Fuzz every RPC and every Kafka consumer with hostile input, FUZZ_EXAMPLES per class (200); counts in .townhall/fuzz/
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) timeout 3600 $(BIN)/pytest -q -ra -p no:cacheprovider tests/integration/test_fuzz_hostile.py tests/integration/test_fuzz_records.py

# The public API as last released: `buf breaking` checks proto/ against it (docs/api-versioning.md).
PROTO_RELEASE ?= proto/released/0.1.0
lint: setup buf ## ruff and mypy on the packages (services/ and tools/); buf lint, buf breaking against the last release
	$(BIN)/ruff check services tools tests deploy
	$(BIN)/ruff format --check services tools tests deploy
	$(BIN)/mypy
	.cache/bin/buf lint
	.cache/bin/buf breaking proto --against $(PROTO_RELEASE)

buf: ## Build buf (the protobuf linter and breaking-change checker) into .cache/bin
	deploy/tools/install-buf.sh

diagram: ## Copy the architecture diagram's source (docs/architecture.mmd) into README.md's mermaid block
	$(PY) deploy/tools/readme_diagram.py

joinload: ## Build the join-storm load generator (ghz's runner, a token per call) into .cache/bin
	deploy/tools/install-joinload.sh

goclient: setup ## Build the Go client (clients/go): protoc-gen-go(-grpc), its generated code, .cache/bin/townhall-go
	deploy/tools/install-goclient.sh

bench: setup joinload ## Run the benchmarks: figures on screen, JSON and PNG plots in .townhall/bench/
	$(BIN)/townhall bench --out .townhall/bench

RUNS ?= 3
faults: setup ## Kill -9 / SIGTERM each kind of process, restart Kafka, RUNS times each (docs/faults.md)
	$(BIN)/townhall faults --runs $(RUNS) --markdown

kafka: setup ## Start the local Kafka broker alone (foreground)
	$(BIN)/townhall kafka

include deploy/k8s.mk
include deploy/hosts.mk

clean: ## Remove the venv, generated code, caches and local state
	rm -rf $(VENV) $(GEN) services/townhall/internal .townhall .cache .pytest_cache .mypy_cache .ruff_cache
