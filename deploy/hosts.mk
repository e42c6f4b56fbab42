# Townhall on many hosts (docs/hosts.md): every process in a container of its own on one Docker network, with
# its own address, CPU quota and memory limit; 3 KRaft brokers (replication factor 3, min.insync.replicas 2).
# Included from the Makefile after deploy/k8s.mk, whose image variables it uses: IMAGE (make image) and
# KAFKA_IMAGE (make kafka-image), both built from the official base images unless PYTHON_IMAGE, JAVA_IMAGE and
# KAFKA_BUILD_IMAGE say otherwise (hack/kind-offline/cluster.sh on a machine without a registry).
# Not part of `make test`: these need Docker (and root, for the partitions' iptables in the containers).

# Runs of each partition scenario (`make cluster-faults RUNS=1`); 5 unless given.
CLUSTER_RUNS := $(if $(filter command line environment,$(origin RUNS)),$(RUNS),5)
CLUSTER := $(BIN)/townhall cluster --image $(IMAGE) --kafka-image $(KAFKA_IMAGE)

.PHONY: cluster-up cluster-down cluster-status cluster-demo cluster-faults print-hosts-images cluster-e2e cluster-scale cluster-isolation capacity

cluster-up: setup image kafka-image ## Start the multi-host topology in containers (brokers, admission, relays, notifiers)
	$(CLUSTER) up

cluster-down: setup ## Remove the multi-host topology's containers, volumes and network
	$(CLUSTER) down

cluster-status: setup ## Each container of the multi-host topology: address, published client port, running
	$(CLUSTER) status

cluster-demo: setup ## Run the demo against the multi-host topology from outside its containers
	$(BIN)/townhall --root .townhall/hosts --config .townhall/hosts/client.toml demo

cluster-faults: cluster-up ## Partitions and host loss on the multi-host topology, RUNS (5) each; JSON + table
	$(CLUSTER) faults --runs $(CLUSTER_RUNS)

print-hosts-images: # The Townhall and Kafka images cluster-up runs (tests/hosts read them)
	@echo $(IMAGE) $(KAFKA_IMAGE)

cluster-e2e: setup ## The multi-host topology end to end: up, demo, one run of each partition scenario, down
	HOSTS_E2E=1 HOSTS_E2E_MAKE="$(MAKE) --no-print-directory" $(BIN)/pytest -p no:cacheprovider -s -v tests/hosts

SCALE_STEPS ?= 1 2 4
# The admission rate search starts at SCALE_RATE joins/s per process; each step lasts SCALE_SECONDS. Every scaled
# admission process runs at SCALE_QUOTA cores, every relay at SCALE_RELAY_QUOTA: 4 of them and the load generator
# (about a core per 1,000 listeners) must fit the machine's cores. At 0.1 cores an idle owner's own work (Kafka
# followers, peer probes: 0.024-0.04 cores) took a quarter to two fifths of its quota; at 0.2 four owners (0.8
# cores), the brokers and ghz's runner (0.34 cores at 660 joins/s) still fit 2 cores.
SCALE_RATE ?= 100
SCALE_SECONDS ?= 8
SCALE_QUOTA ?= 0.2
SCALE_RELAY_QUOTA ?= 0.1
SCALE_EDGES ?= 1 2 4
# Steps of 25 around where a 0.1-core edge saturates (175-225): steps of 50 there made the curve the steps' own.
SCALE_LISTENERS ?= 50 100 150 175 200 225 250 300 400 600
cluster-scale: setup image kafka-image joinload ## Scale-out: N owners (SCALE_STEPS), M edge relays (SCALE_EDGES, listeners per edge SCALE_LISTENERS), one CPU quota each; JSON + PNG in .townhall/bench (replaces a running topology)
	$(CLUSTER) scale --steps $(SCALE_STEPS) --rate $(SCALE_RATE) --seconds $(SCALE_SECONDS) --quota $(SCALE_QUOTA) \
		--relay-quota $(SCALE_RELAY_QUOTA) \
		--edges $(SCALE_EDGES) --listeners $(SCALE_LISTENERS) --out .townhall/bench

ISOLATION_SECONDS ?= 20
ISOLATION_FOLLOWERS ?= 10000000
cluster-isolation: setup image kafka-image joinload ## Each half on a lean topology of its own (replaces a running one): Cold joins' p99 alone vs during a crowd-lane storm (x2); small hosts' notification p99 during a 10M fan-out (1 s); .townhall/bench/isolation.json
	$(CLUSTER) isolation --lean --seconds $(ISOLATION_SECONDS) --followers $(ISOLATION_FOLLOWERS) --out .townhall/bench

capacity: setup ## The seed event sized from .townhall/bench's scale-out and isolation JSON (docs/capacity.md); capacity.json + PNG
	$(BIN)/python -m townhall_tools.bench.capacity .townhall/bench
