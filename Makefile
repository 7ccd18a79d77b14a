# Two commands on a fresh machine: `make demo` and `make test` (both set up .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fsku-installed
export PATH := $(CURDIR)/$(BIN):$(PATH)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# oneDNN's AMX kernels crash (SIGILL) on some virtual CPUs that advertise AMX; AVX-512 is safe.
export ONEDNN_MAX_CPU_ISA ?= AVX512_CORE_BF16

.PHONY: setup models demo test ui bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch would pull several GB of CUDA wheels
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

setup: $(STAMP)

models: setup
	$(BIN)/fsku prepare-models

demo: models
	$(BIN)/mlflow run . -e build_kb --env-manager local \
		-P corpus=data/sample_corpus -P labels=evaluation/sample_retrieval.jsonl
	@echo "MLflow runs: $(CURDIR)/mlflow.db (browse with: make ui)"
	@echo "Knowledge base: $(CURDIR)/outputs/kb ; registered model: models:/fsku-kb/<latest>"

test: models
	$(BIN)/python -m pytest -q -x; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

bench: models
	$(BIN)/python benchmarks/bench_retrieval.py

ui: setup
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --workers 1 \
		--backend-store-uri sqlite:///$(CURDIR)/mlflow.db

clean:
	rm -rf outputs .cache mlruns mlflow.db
