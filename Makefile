# LLM fine-tuning recipes driven by Make.  `make help` lists the targets.
#   make all                                   # the embedded default recipe (smollm2), offline on a CPU
#   make all RECIPE=tinyllama                  # another recipe (recipes/*.yaml)
#   make all RECIPE=flan-t5 TINY=1             # tiny-model mode: same code path on a tiny random-init model
#   make all ARGS="--set train.max_steps=20"   # override recipe settings
#   make bench RECIPE=mistral-xauusd SHAPE=full  # random-init stand-in at the real model's shape (GPU speed, VRAM)
#   make export && make report                  # GGUF + Ollama Modelfile (checked); every run on one HTML page
#   make train NPROC=2                          # several processes (DDP) under accelerate launch
#   make sweep GRID="lora.r=8,16"               # one run per combination, compared by paired verdicts
# Each step's target is the file it writes last; a second `make all` does nothing, and a changed setting
# re-runs only the steps that depend on it (per-step stamps under outputs/<run>/.stamps/).
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
.SUFFIXES:
MAKEFLAGS += --no-builtin-rules
.DEFAULT_GOAL := all

# The Python that runs everything: PY=... when given; else an activated venv's python3; else the project's own venv
# once `make` made one (.venv, when python3 cannot install packages: PEP 668 system Pythons, no pip); else python3.
# common/core/bootstrap.py decides, with the standard library only, and installs what the recipe reader needs.
VENV   := $(CURDIR)/.venv
PY     ?= $(if $(and $(if $(VIRTUAL_ENV),,1),$(wildcard $(VENV)/bin/python)),$(VENV)/bin/python,python3)
# FT_HOME given as a make variable (make all FT_HOME=...) reaches $(shell ...) too, not only the recipes.
PY_ENV := $(if $(FT_HOME),FT_HOME='$(FT_HOME)')
# A checkout always runs its own code: its root comes first on the import path, even when `pip install -e` of
# another clone of this repository is installed in the same environment.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
RECIPE ?= smollm2
TINY   ?=
ARGS   ?=
BENCH  ?=
SHAPE  ?=
DRY_RUN ?=
NPROC  ?=
GRID   ?=
FORCE  ?=
RECIPES := $(sort $(basename $(notdir $(wildcard recipes/*.yaml))))
FLAGS   := --recipe $(RECIPE) $(if $(or $(TINY),$(SHAPE)),--tiny) $(if $(SHAPE),--set tiny.shape=$(SHAPE)) $(ARGS)

# Every $(shell ...) below is checked: an empty or failed answer stops Make with one line, never an empty path.
ifneq ($(filter-out help recipes,$(or $(MAKECMDGOALS),all)),)
  BOOT := $(shell $(PY) -m common.core.bootstrap --venv '$(VENV)' $(if $(FT_OFFLINE),--offline))
  ifneq ($(filter error:,$(firstword $(BOOT))),)
    $(error $(wordlist 2,999,$(BOOT)))
  endif
  ifeq ($(filter PY=%,$(BOOT)),)
    $(error '$(PY)' did not run (is Python >= 3.10 installed?); name one with make ... PY=/path/to/python3)
  endif
  override PY := $(patsubst PY=%,%,$(filter PY=%,$(BOOT)))
endif

# Goals that need neither the recipe nor the paths.
NO_RECIPE_GOALS := help recipes gpu-check gpu-carry
ifneq ($(filter-out $(NO_RECIPE_GOALS),$(or $(MAKECMDGOALS),all)),)
  ifeq ($(filter $(RECIPE),$(RECIPES)),)
    $(error unknown RECIPE '$(RECIPE)'; available: $(RECIPES))
  endif
  # Validate the recipe and read the run's paths (common/core/paths.py); for the pipeline goals also write per-step
  # stamps (rewritten only when a step's settings change). Other goals (install, test, clean) leave the run alone.
  STAMP_GOALS := all prepare train merge eval export push demo bench
  RUN_VARS := $(shell $(PY_ENV) $(PY) -m common.core.stamps $(FLAGS) \
    $(if $(filter $(STAMP_GOALS),$(or $(MAKECMDGOALS),all)),--write))
  ifneq ($(filter error:,$(firstword $(RUN_VARS))),)
    $(error $(wordlist 2,999,$(RUN_VARS)))
  endif
  $(foreach v,$(RUN_VARS),$(eval $(v)))
  # The run's paths must all be there and under the artifact root: no target, and no clean, may name another path.
  RUN_PATHS := ENV_JSON DATA_DIR OUT_DIR PREPARED TRAINED MERGED EVALUATED EXPORTED STAMPS
  ifneq ($(or $(filter-out /%,$(HOME_DIR)),$(filter /,$(HOME_DIR)),$(if $(HOME_DIR),,empty)),)
    $(error python -m common.core.stamps $(FLAGS) gave no usable artifact root (HOME_DIR='$(HOME_DIR)'); \
      run it by hand to see why)
  endif
  $(foreach v,$(RUN_PATHS),$(if $(filter $(HOME_DIR)/%,$($(v))),,\
    $(error python -m common.core.stamps gave $(v)='$($(v))', not a path under $(HOME_DIR); run it by hand to see why)))
  ifeq ($(filter scripts/%.py,$(TRAIN_SCRIPT)),)
    $(error python -m common.core.stamps $(FLAGS) named no training script; run it by hand to see why)
  endif
  ifneq ($(DIST),)
    $(error DIST is gone: several processes train as DDP (make train NPROC=N); FSDP and DeepSpeed were removed)
  endif
  # NPROC: how training is launched (common/core/dist.py checks it first and prints the launcher, or one error).
  ifneq ($(NPROC),)
    TRAIN_LAUNCH := $(shell $(PY_ENV) $(PY) -m common.core.dist $(FLAGS) --nproc '$(NPROC)' --python '$(PY)')
    ifneq ($(filter error:,$(firstword $(TRAIN_LAUNCH))),)
      $(error $(wordlist 2,999,$(TRAIN_LAUNCH)))
    endif
    ifeq ($(strip $(TRAIN_LAUNCH)),)
      $(error python -m common.core.dist printed no launcher for NPROC=$(NPROC); run it by hand to see why)
    endif
  endif
endif
TRAIN_LAUNCH ?= $(PY)
.PHONY: all help install prepare train merge eval export report push demo bench sweep plan test test-fast \
	test-gpu gpu-check gpu-carry clean clean-all recipes llamacpp
all: $(EVALUATED) ## install -> prepare -> train -> merge -> eval
	@echo "done: $(OUT_DIR)/eval/report.md"

install: $(ENV_JSON) ## install requirements (keeps an existing torch) and record outputs/env.json
prepare: $(PREPARED) ## clean, sample, split and format the data
train: $(TRAINED) ## LoRA/QLoRA fine-tuning -> outputs/<run>/adapter (NPROC=N processes: DDP)
merge: $(MERGED) ## merge the adapter into an fp16 model -> outputs/<run>/merged
eval: $(EVALUATED) ## base vs tuned metrics and reports -> outputs/<run>/eval

# FT_OFFLINE=1 (a machine without a package index, e.g. the borrowed GPU): record the environment, install nothing.
# ENV_STALE=1 (common/core/stamps.py): env.json describes another Python (a new venv), so this one installs too.
$(ENV_JSON): requirements.txt scripts/00_install.py $(if $(filter 1,$(ENV_STALE)),FORCE)
	$(PY) scripts/00_install.py $(if $(FT_OFFLINE),--probe)
FORCE:

# Installed first, order-only: a new Python or a new requirements.txt installs again but retrains nothing by itself.
$(PREPARED): scripts/01_prepare.py $(STAMPS)/prepare.json | $(ENV_JSON)
	$(PY) scripts/01_prepare.py $(FLAGS)

# TRAIN_SCRIPT (common/core/stamps.py): the task's training step, scripts/02_sft_qlora.py or scripts/02_preference.py
$(TRAINED): $(TRAIN_SCRIPT) $(STAMPS)/train.json $(PREPARED)
	$(TRAIN_LAUNCH) $(TRAIN_SCRIPT) $(FLAGS)

$(MERGED): scripts/03_merge_fp16.py $(STAMPS)/merge.json $(TRAINED)
	$(PY) scripts/03_merge_fp16.py $(FLAGS)

$(EVALUATED): scripts/04_eval.py $(STAMPS)/eval.json $(MERGED)
	$(PY) scripts/04_eval.py $(FLAGS)

export: $(EXPORTED) ## GGUF (f16, q8_0) + Ollama Modelfile, checked in llama.cpp against merged/ -> outputs/<run>/export
# The gate runs every file in a real llama.cpp: installed first (order-only: it never re-runs the export by itself).
$(EXPORTED): scripts/06_export.py $(STAMPS)/export.json $(MERGED) | llamacpp
	$(PY) scripts/06_export.py $(FLAGS)

# Each combination is its own `make all` (own run name and stamps): a second `make sweep` makes nothing, a killed
# one makes only the missing runs. FORCE=1: a grid larger than sweep.max_runs.
sweep: $(ENV_JSON) ## every combination of GRID="key=v1,v2 ..." (or the recipe's sweep.grid) -> outputs/sweeps/<run>/
	$(PY) scripts/09_sweep.py $(FLAGS) $(if $(GRID),--grid '$(GRID)') $(if $(FORCE),--force)

# Reads the recipe and the model's configuration only (no install, no download, no weights): seconds.
plan: ## will it fit: peak memory and s/step before any download (GPU=T4|L4|A10|A100-40|A100-80|H100|H200|<GiB>)
	$(PY) scripts/plan.py $(FLAGS) $(if $(GPU),--gpu $(GPU))

# A real llama.cpp for make export's gate and the tests (common/shipping/llamacpp.py install()): a wheel when one
# installs here, else llama-cpp-python built from source once with progress (a C++ compiler; about 3 min on 2 idle
# cores, docs/performance.md), the wheel kept under the model cache. Seconds when it is already there.
llamacpp: $(ENV_JSON) ## a real llama.cpp (llama-cpp-python, built from source once) for make export and the tests
	@$(PY) scripts/00_install.py --llamacpp

# Reads what is on disk (milliseconds) and never re-runs a step: an alias, not a file target, because its inputs
# (every run's eval/metrics.json) are other rules' targets.
report: ## every evaluated run on one page -> outputs/summary.csv, outputs/report.html
	$(PY) scripts/07_report.py

push: $(EVALUATED) ## adapter or merged model + card to the hub (HF_TOKEN, card.repo_id); DRY_RUN=1 writes what would go
	$(PY) scripts/08_push.py $(FLAGS) $(if $(DRY_RUN),--dry-run)

demo: $(TRAINED) ## base vs tuned answers side by side: make demo TITLE="..." (chat: PROMPT="...")
	$(PY) scripts/05_demo.py $(FLAGS) $(if $(TITLE),--title "$(TITLE)")$(if $(PROMPT), --prompt "$(PROMPT)")

bench: $(PREPARED) ## speed: ours vs plain TRL vs the reference way; batched generation -> outputs/bench/ (BENCH="--steps 8")
	$(PY) scripts/bench.py $(FLAGS) $(BENCH)

test: $(ENV_JSON) | llamacpp ## the whole test suite (tiny models for every recipe, plus a short real SmolLM2 run)
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=25

test-fast: $(ENV_JSON) ## the unit tier: no model is trained (a few minutes)
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not e2e and not slow and not gpu"

test-gpu: $(ENV_JSON) ## the GPU tests (every recipe on CUDA, bench at a real shape); skipped without CUDA
	$(PY) -m pytest -q -m gpu

gpu-check: ## the whole GPU verification in one call, 8 min on one H200 -> outputs/gpu-check/ (DRY_RUN=1: on a CPU)
	$(PY) scripts/gpu_check.py $(if $(DRY_RUN),--dry-run)

gpu-carry: ## wheels + tokenizer files for the offline GPU machine -> .gpu/ (checked under 64 MiB; docs/gpu.md)
	$(PY) scripts/gpu_carry.py

recipes: ## list the recipes
	@printf '%s\n' $(RECIPES)

# Every path here was checked to lie under the artifact root (above); quoted, and never read as an option.
clean: ## remove this recipe's processed data and outputs (keeps the model cache)
	rm -rf -- '$(OUT_DIR)' '$(DATA_DIR)'

clean-all: ## remove every run, processed data and the model cache (under FT_HOME)
	rm -rf -- '$(HOME_DIR)/data/processed'
	[ ! -d '$(HOME_DIR)/outputs' ] || find '$(HOME_DIR)/outputs' -mindepth 1 ! -name .gitkeep -delete

help: ## this list
	@echo "usage: make [target] [RECIPE=name] [TINY=1 | SHAPE=full] [ARGS='--set key=value ...'] [NPROC=N]"
	@echo "recipes: $(RECIPES)"
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /  \1\t/'
