# Capstan: `make demo` trains and serves on this machine; `make test` runs the whole suite.
# Both set themselves up from nothing (a venv in .venv, tools in .tools/bin).
# `make test` runs the suite against a local Kubernetes control plane (`make cluster`, built from
# source once per machine); `make test-nocluster` or `make test CAPSTAN_E2E=0` run it without one.
# One tier at a time (together they are the whole suite; none runs ruff, mypy or crds --check):
#   make test-unit          the pure planners, API and admission, in-process (about half a minute)
#   make test-integration   the operator (kopf) against the kmock Kubernetes emulator
#   make test-packaging     Helm chart, kustomize, RBAC, alerts, checkov (needs `make tools`)
#   make test-slow          real training and serving processes (tests/local, tests/workloads, -m slow)
#   make test-e2e           tests/e2e against a fresh local cluster
#   make test-faults        the operator under SIGKILLs and API faults (tests/faults), a fresh cluster

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/.tools/bin:$(CURDIR)/$(BIN):$(PATH)
PYTEST := $(BIN)/python -m pytest -q -ra
# The test tiers by folder; tests/packaging/test_test_tiers.py checks that they cover tests/.
UNIT_TESTS := tests/api tests/config tests/training tests/serving tests/topology tests/checkpoints tests/admission
INTEGRATION_TESTS := tests/kube
PACKAGING_TESTS := tests/packaging
SLOW_TESTS := tests/local tests/workloads
E2E_TESTS := tests/e2e
# Its own pytest session: the e2e suite's operator watches every namespace (tests/faults/conftest.py).
FAULT_TESTS := tests/faults

.PHONY: demo test test-nocluster test-unit test-integration test-packaging test-slow test-e2e test-faults setup tools controlplane cluster cluster-down lint typecheck crds bench bench-scale clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch==2.13.0 first: that CPU build lies on this machine's disk (a bare `torch` pulls CUDA).
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,train,serve]'
	touch $(STAMP)

setup: $(STAMP)

tools: $(STAMP)
	bash scripts/install-tools.sh

# kube-apiserver, kube-controller-manager, kube-scheduler, etcd, kwok: built from the Go modules
# under hack/controlplane into ~/.cache/capstan/tools (once per machine), linked into .tools/bin.
controlplane:
	bash scripts/build-controlplane.sh

# A local cluster on 127.0.0.1 with fake GPU nodes (manifests/dev/topology.yaml); replaces a
# previous one. State, kubeconfig and logs: .capstan/cluster/.
cluster: $(STAMP) tools controlplane
	$(BIN)/python scripts/cluster.py up

cluster-down: $(STAMP)
	$(BIN)/python scripts/cluster.py down

demo: $(STAMP)
	rm -rf .capstan/demo
	$(BIN)/capstan run --local --workdir .capstan/demo \
		-f manifests/samples/trainingjob-local.yaml -f manifests/samples/modelserving-local.yaml \
		--prompt "the model " --prompt "GPU clusters "

lint: $(STAMP)
	$(BIN)/ruff check operator workloads tests bench scripts
	$(BIN)/mypy
	$(BIN)/mypy scripts/cluster.py scripts/test_lanes.py
	$(BIN)/mypy tests/support/kube.py
	$(BIN)/lint-imports

crds: $(STAMP)
	# The pod template's schema: upstream's PodSpec from kubernetes-validate, made structural.
	$(BIN)/python -m capstan.api.podspec
	$(BIN)/capstan crds --out crds
	# The table of condition types and reasons (tests/api/test_condition_types.py checks it).
	$(BIN)/python -m capstan.api.condition_types docs/conditions.md
	# The chart and the kustomize base carry the same generated CRDs.
	$(BIN)/python tests/packaging/capstan_pkg.py sync

# CAPSTAN_E2E=0: no cluster, e2e tests deselected. Otherwise `cluster.py run` starts a fresh
# cluster, runs pytest with its KUBECONFIG and stops it afterwards, also when tests fail. Two
# lanes at once (scripts/test_lanes.py): e2e, faults and the kmock tier, a session each, beside
# the rest, which mostly computes while the cluster tiers mostly wait.
ifeq ($(CAPSTAN_E2E),0)
test: $(STAMP) tools
	$(BIN)/capstan crds --check
	$(MAKE) --no-print-directory lint
	$(PYTEST) -m "not e2e"
else
test: $(STAMP) tools controlplane
	$(BIN)/capstan crds --check
	$(MAKE) --no-print-directory lint
	$(BIN)/python scripts/cluster.py run -- $(BIN)/python scripts/test_lanes.py \
		--beside $(E2E_TESTS) --beside $(FAULT_TESTS) --beside $(INTEGRATION_TESTS) -- $(PYTEST)
endif

test-nocluster:
	$(MAKE) --no-print-directory test CAPSTAN_E2E=0

test-unit: $(STAMP)
	$(PYTEST) -m "not slow and not e2e" $(UNIT_TESTS)

test-integration: $(STAMP)
	$(PYTEST) -m "not slow and not e2e" $(INTEGRATION_TESTS)

test-packaging: $(STAMP) tools
	$(PYTEST) -m "not slow and not e2e" $(PACKAGING_TESTS)

# Everything under $(SLOW_TESTS) counts as slow (tests/conftest.py), and so does any test marked so.
test-slow: $(STAMP)
	$(PYTEST) -m "slow and not e2e"

test-e2e: $(STAMP) tools controlplane
	$(BIN)/python scripts/cluster.py run -- $(PYTEST) $(E2E_TESTS)

test-faults: $(STAMP) tools controlplane
	$(BIN)/python scripts/cluster.py run -- $(PYTEST) $(FAULT_TESTS)

bench: $(STAMP)
	$(BIN)/python bench/reconcile.py --json
	$(BIN)/python bench/placement.py --json
	$(BIN)/python bench/checkpoint.py --json
	$(BIN)/python bench/serving.py --json
	$(BIN)/python bench/fleet.py --json
	$(BIN)/python bench/quantization.py --json

# Placement at scale needs the local control plane (about ten minutes on 2 cores).
bench-scale: $(STAMP) tools controlplane
	$(BIN)/python scripts/cluster.py run -- $(BIN)/python bench/scale.py --json

clean:
	-test -x $(BIN)/python && $(BIN)/python scripts/cluster.py down
	rm -rf $(VENV) .tools .capstan .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
