# `make test` sets up everything on a fresh machine (virtualenv, control-plane binaries) and runs
# lint, import contracts, the CRD drift check and every test, unit and cluster.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: all venv testbin perf-analyzer lint crd test unit demo clean-cluster

all: test

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*; touch $(STAMP)

venv: $(STAMP)

# Control-plane binaries, built once into ~/.cache/moe-operator (see hack/README.md).
testbin:
	bash hack/build-testbin.sh >/dev/null

# Triton's perf_analyzer for the serving benchmarks, into ~/.cache/moe-operator; prints the path of
# the wrapper to run (see hack/README.md).
perf-analyzer:
	bash hack/perf-analyzer.sh

lint: venv
	$(VENV)/bin/ruff check common operator worker tests bench hack dashboards
	$(VENV)/bin/lint-imports

# Regenerate the CRD from the pydantic models (CI fails if this changes anything).
crd: venv
	$(VENV)/bin/moe crd > crds/moedeployment.yaml

unit: venv lint
	$(PY) -m pytest -m "not cluster" $(PYTEST_ARGS)

test: venv testbin lint
	bash hack/system-deps.sh
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv testbin
	bash hack/system-deps.sh
	$(PY) -m moe_operator.localdev.demo $(MANIFEST)

clean-cluster: venv
	$(VENV)/bin/moe cluster down
