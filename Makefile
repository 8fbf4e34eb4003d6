# The README's two commands are `make run` and `make test`; everything else supports them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STACK := $(PY) deploy/local/stack.py

.PHONY: setup run up down status test lint bench-api bench-e2e bench-live bench-stack bench-rebuild bench-storage clean-state chaos rebuild export-state constraints

setup:  ## venv + dependencies, Kafka jars, redis-server, example step plugins (idempotent, fast when done)
	@bash deploy/local/setup.sh
	@bash examples/install.sh

run: setup  ## the whole stack in the foreground; Ctrl-C stops what it started
	@$(STACK) run

up: setup  ## the whole stack in the background; returns 0 once every part is ready
	@$(STACK) up

down:  ## stop the stack
	@if [ -x $(PY) ]; then $(STACK) down; fi

status:  ## each part, up or down
	@$(STACK) status

# Two processes (pytest-xdist), a test file each at a time: the suite mostly waits on the
# engines. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: setup  ## the whole suite on the real Kafka, Redis and Prefect (started if not running)
	@$(PY) -m pytest -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# What a fresh `pip install -e '.[dev]'` resolves today, in a throwaway venv of this Python:
# run after changing pyproject.toml's dependencies (or to take new releases), then `make test`.
constraints:  ## re-pin deploy/local/constraints-py<version>.txt to today's resolution
	@bash deploy/local/pin.sh

lint: setup  ## ruff + mypy strict + the layers' import contract ([tool.importlinter])
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/mypy
	@$(VENV)/bin/lint-imports --no-logo

bench-api: setup  ## GET/POST throughput of the API next to a bare aiohttp handler
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk; } || \
		{ echo "bench-api needs wrk: apt-get install -y wrk"; exit 1; }
	@$(PY) -m benchmarks.api $(BENCH_ARGS)

bench-e2e: setup  ## POST -> running latency, event -> visible latency, consumer apply rate
	@$(PY) -m benchmarks.e2e $(BENCH_ARGS)

bench-live: setup  ## N SSE clients on one API process: change -> every client, memory per stream
	@$(PY) -m benchmarks.live $(BENCH_ARGS)

bench-stack: setup  ## cold and warm `make up` time, memory of the stack at rest
	@bash deploy/local/bench_stack.sh

# Redis from the compacted topics (docs/architecture.md, "Durable state"). Stop the API and
# the consumers first (`stack.py down --parts api consumers`), flush Redis, rebuild, then
# start them again: they continue from their committed offsets. REBUILD_ARGS=--redis-url
# redis://127.0.0.1:6379/9 rebuilds into another database instead, and adding
# --compare-with redis://127.0.0.1:6379/0 checks it against the live one (a dry run).
rebuild: setup  ## Redis rebuilt from Kafka (an empty database; REBUILD_ARGS=--redis-url URL)
	@$(PY) -m consumers.rebuild $(REBUILD_ARGS)

export-state: setup  ## once, for state from before the durable records: Redis's pipelines and batches onto the compacted topics
	@$(PY) -m consumers.export_state

bench-rebuild: setup  ## time to rebuild 100k batches from Kafka next to reading the same records
	@$(PY) -m benchmarks.rebuild $(BENCH_ARGS)

bench-storage: setup  ## Redis bytes per finished and per running batch (100k, through the events path)
	@$(PY) -m benchmarks.storage $(BENCH_ARGS)

# The chaos suite's own stack: other ports and state dir, so killing its Redis, Kafka and
# Prefect never touches the stack of `make up`. CHAOS_KEEP=1 leaves it running afterwards.
CHAOS_ENV := DHUB_STATE_DIR=$(CURDIR)/.dhub-chaos DHUB_REDIS_URL=redis://127.0.0.1:6380/0 \
	DHUB_REDIS_PORT=6380 DHUB_KAFKA_BOOTSTRAP=127.0.0.1:9192 DHUB_POSTGRES_PORT=5434 \
	DHUB_PREFECT_API_URL=http://127.0.0.1:4300/api DHUB_PREFECT_PORT=4300 DHUB_API_PORT=8180 \
	DHUB_WORK_POOL=dhub-chaos DHUB_CHAOS=1

# A chaos stack that is not fully up starts from empty data (its logs kept): runs left
# waiting by an interrupted run must not load the next one. `up` is tried twice: a cold
# Prefect on a busy machine can time out the work pool's set-up.
chaos: setup  ## fault-injection suite (RELIABILITY.md) on its own stack, stopped at the end
	@export $(CHAOS_ENV); \
	if ! $(STACK) status >/dev/null 2>&1; then $(STACK) down >/dev/null; \
		find "$$DHUB_STATE_DIR" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} + 2>/dev/null; fi; \
	[ -n "$(CHAOS_KEEP)" ] || trap '$(STACK) down' EXIT; \
	{ $(STACK) up || $(STACK) up; } && $(PY) -m pytest -p no:cacheprovider -s tests/chaos $(PYTEST_ARGS)

clean-state: down  ## forget all local data (Kafka, Redis, Prefect)
	rm -rf .dhub
