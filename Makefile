# Set-up and everyday commands. A fresh machine needs only python3 and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config.toml

.PHONY: install run test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

## run: start the daemon on the embedded default (a local Kafka-protocol broker, a DuckDB file)
run: install
	$(BIN)/finopsd run --config $(CONFIG)

## test: install, then run every test
test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check finopsd tests bench
	$(BIN)/ruff format --check finopsd tests bench

## bench: ingest throughput against plain kafka-python consumption (N events, default 1,000,000)
bench: install
	$(BIN)/python bench/ingest.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
