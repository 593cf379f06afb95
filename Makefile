# Capstan: `make demo` trains and serves on this machine; `make test` runs the whole suite.
# Both set themselves up from nothing (a venv in .venv, tools in .tools/bin).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/.tools/bin:$(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test setup tools lint typecheck crds bench clean

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

demo: $(STAMP)
	rm -rf .capstan/demo
	$(BIN)/capstan run --local --workdir .capstan/demo \
		-f manifests/samples/trainingjob-local.yaml -f manifests/samples/modelserving-local.yaml \
		--prompt "the model " --prompt "GPU clusters "

lint: $(STAMP)
	$(BIN)/ruff check operator workloads tests bench
	$(BIN)/mypy

crds: $(STAMP)
	$(BIN)/capstan crds --out crds
	# The chart and the kustomize base carry the same generated CRDs.
	$(BIN)/python tests/packaging/capstan_pkg.py sync

test: $(STAMP) tools
	$(BIN)/capstan crds --check
	$(MAKE) --no-print-directory lint
	$(BIN)/python -m pytest -q -ra

bench: $(STAMP)
	$(BIN)/python bench/reconcile.py --json
	$(BIN)/python bench/placement.py --json
	$(BIN)/python bench/checkpoint.py --json
	$(BIN)/python bench/serving.py --json

clean:
	rm -rf $(VENV) .tools .capstan .pytest_cache .mypy_cache .ruff_cache
