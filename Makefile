# The README's two commands are `make run` and `make test`; everything else supports them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STACK := $(PY) deploy/local/stack.py

.PHONY: setup run up down status test lint bench-api bench-e2e bench-stack clean-state

setup:  ## venv + dependencies, Kafka jars, redis-server (idempotent, fast when done)
	@bash deploy/local/setup.sh

run: setup  ## the whole stack in the foreground; Ctrl-C stops what it started
	@$(STACK) run

up: setup  ## the whole stack in the background; returns 0 once every part is ready
	@$(STACK) up

down:  ## stop the stack
	@if [ -x $(PY) ]; then $(STACK) down; fi

status:  ## each part, up or down
	@$(STACK) status

test: setup  ## the whole suite on the real Kafka, Redis and Prefect (started if not running)
	@$(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

lint: setup  ## ruff + mypy strict
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/mypy

bench-api: setup  ## GET/POST throughput of the API next to a bare aiohttp handler
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk; } || \
		{ echo "bench-api needs wrk: apt-get install -y wrk"; exit 1; }
	@$(PY) -m benchmarks.api $(BENCH_ARGS)

bench-e2e: setup  ## POST -> running latency, event -> visible latency, consumer apply rate
	@$(PY) -m benchmarks.e2e $(BENCH_ARGS)

bench-stack: setup  ## cold and warm `make up` time, memory of the stack at rest
	@bash deploy/local/bench_stack.sh

clean-state: down  ## forget all local data (Kafka, Redis, Prefect)
	rm -rf .dhub
