# Set-up and everyday commands. A fresh machine needs only python3 and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config.toml

# the LiteLLM proxy that tests/gateway_harness.py runs: a venv of its own (its pins would
# downgrade polars and rich in ours); the stamp names the pin, so a new pin reinstalls
LITELLM_VENV    ?= .venv-litellm
LITELLM_VERSION := 1.108.7
LITELLM_STAMP   := $(LITELLM_VENV)/.installed-$(LITELLM_VERSION)

.PHONY: install litellm demo run test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

$(LITELLM_STAMP):
	rm -rf $(LITELLM_VENV)
	$(PYTHON) -m venv $(LITELLM_VENV)
	echo '*' > $(LITELLM_VENV)/.gitignore
	$(LITELLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LITELLM_VENV)/bin/python -m pip install --quiet 'litellm[proxy]==$(LITELLM_VERSION)' \
		'kafka-python>=3.0.12,<3.1'
	touch $@

## litellm: the LiteLLM proxy (with kafka-python, for finopsd's callback) in $(LITELLM_VENV)
litellm: $(LITELLM_STAMP)

## demo: the whole loop on real parts (a LiteLLM proxy, Slack's side played locally): the report in ./out
demo: install litellm
	$(BIN)/python demo/run.py --out out

## run: start the daemon on the embedded default (a local Kafka-protocol broker, a DuckDB file)
run: install
	$(BIN)/finopsd run --config $(CONFIG)

## test: install, then run every test
test: install litellm
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check finopsd tests bench demo
	$(BIN)/ruff format --check finopsd tests bench demo

## bench: ingest throughput against plain kafka-python consumption (N events, default 1,000,000)
bench: install
	$(BIN)/python bench/ingest.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(LITELLM_VENV) build *.egg-info .pytest_cache .ruff_cache
