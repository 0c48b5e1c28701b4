# Targets a developer runs; each works on a fresh clone after `make install`.
VENV ?= .venv
PY := $(VENV)/bin/python
PROTO_FILES := $(wildcard protos/sira/experiments/v1/*.proto)

.PHONY: install run test fuzz migrate protos dashboard lint typecheck bench capacity clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Two distributions: the client (./client, `sira`) and the server (`sira-server`, which
# depends on the client by name; pip takes it from ./client in the same call).
install: $(PY)
	$(PY) -m pip install --quiet -e ./client -e '.[dev]'

run: install
	$(VENV)/bin/sira-server

test: install
	$(PY) -m pytest -q

# The property-based fuzz suite at full budget, fresh randomness (`make test` runs it small
# and derandomized). SIRA_FUZZ_EXAMPLES=N to change the budget.
fuzz: install
	SIRA_FUZZ_EXAMPLES=$${SIRA_FUZZ_EXAMPLES:-10000} SIRA_FUZZ_DERANDOMIZE=$${SIRA_FUZZ_DERANDOMIZE:-0} \
		$(PY) -m pytest -q -s -p no:cacheprovider tests/test_fuzz.py

migrate:
	$(VENV)/bin/sira-server migrate

# Regenerate the committed stubs from protos/ (tests fail when they drift).
protos:
	$(PY) -m sira_server.codegen client

# Rebuild the ops dashboard (server/dashboard/, needs Node 20+ and npm) into the committed
# bundle server/sira_server/web/dist/, typed from protos/; SOURCE_HASH lets the tests catch
# sources changed without a rebuild. `make run` and `make test` never need Node.
dashboard: $(PY)
	cd server/dashboard && npm ci --no-audit --no-fund && npm run generate && npm run build
	$(PY) -m sira_server.dashboard_bundle

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: install
	$(PY) -m sira_loadtest.bench
	$(PY) -m sira_loadtest.bench_transport --write

# Per-decision CPU, Redis and Postgres costs for docs/scaling.md (needs redis-server and
# a Postgres server: SIRA_CAPACITY_POSTGRES, default the local one).
capacity: install
	$(PY) -m sira_loadtest.capacity --json docs/capacity.json

clean:
	rm -rf $(VENV) .sira .pytest_cache .mypy_cache .ruff_cache
