# Capstan: `make demo` trains and serves on this machine; `make test` runs the whole suite.
# Both set themselves up from nothing (a venv in .venv, tools in .tools/bin).
# `make test` runs the suite against a local Kubernetes control plane (`make cluster`, built from
# source once per machine); `make test-unit` or `make test CAPSTAN_E2E=0` run it without one.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/.tools/bin:$(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test test-unit setup tools controlplane cluster cluster-down lint typecheck crds bench clean

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
	$(BIN)/mypy scripts/cluster.py
	$(BIN)/lint-imports

crds: $(STAMP)
	$(BIN)/capstan crds --out crds
	# The chart and the kustomize base carry the same generated CRDs.
	$(BIN)/python tests/packaging/capstan_pkg.py sync

# CAPSTAN_E2E=0: no cluster, e2e tests deselected. Otherwise `cluster.py run` starts a fresh
# cluster, runs pytest with its KUBECONFIG and stops it afterwards, also when tests fail.
ifeq ($(CAPSTAN_E2E),0)
test: $(STAMP) tools
	$(BIN)/capstan crds --check
	$(MAKE) --no-print-directory lint
	$(BIN)/python -m pytest -q -ra -m "not e2e"
else
test: $(STAMP) tools controlplane
	$(BIN)/capstan crds --check
	$(MAKE) --no-print-directory lint
	$(BIN)/python scripts/cluster.py run -- $(BIN)/python -m pytest -q -ra
endif

test-unit:
	$(MAKE) --no-print-directory test CAPSTAN_E2E=0

bench: $(STAMP)
	$(BIN)/python bench/reconcile.py --json
	$(BIN)/python bench/placement.py --json
	$(BIN)/python bench/checkpoint.py --json
	$(BIN)/python bench/serving.py --json

clean:
	-test -x $(BIN)/python && $(BIN)/python scripts/cluster.py down
	rm -rf $(VENV) .tools .capstan .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
