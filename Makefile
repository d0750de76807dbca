# `make help` lists the targets.
PY ?= python
ARGS ?=

.PHONY: help install test test-slow lint format demo cfg stats clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

install:  ## install PyTorch (2.13.0; CPU build where no CUDA build is wanted) and the project with dev tools
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"

test:  ## the default test suite (CPU, no network, a few minutes)
	$(PY) -m pytest -q

test-slow:  ## the slow tests (longer end-to-end runs)
	$(PY) -m pytest -q -m slow

lint:  ## ruff check + format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:  ## ruff format + autofix
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

demo:  ## MEMIT on the locally trained toy model and the bundled CounterFact sample
	$(PY) run.py $(ARGS)

cfg:  ## print the composed config: make cfg ARGS="editor=rome model=gpt-j"
	$(PY) run.py --cfg job $(ARGS)

stats:  ## compute covariance statistics only: make stats ARGS="model=gpt-j stats=wikipedia"
	$(PY) run.py task=stats $(ARGS)

clean:  ## remove run outputs (keeps the .cache of models and statistics)
	rm -rf outputs multirun .pytest_cache .ruff_cache
