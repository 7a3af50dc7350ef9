# clipcurate — every target creates .venv and installs what it needs first (make setup).
#   make demo            the whole job on the embedded demo world
#   make demo-text-first the same with the text-first recipe, its report compared with the demo run's
#   make test            the test suite
# Variables: RUN (run name), INPUT (URL list or shard folder), CONFIG (TOML, laid over the run's saved config),
#            WORKERS (0 = in-process)

SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CLI := $(BIN)/clipcurate

RUN ?= demo
RUN_TF ?= demo-text-first
INPUT ?=
CONFIG ?=
WORKERS ?=
DEMO_N ?= 3000
DEMO_WORLD ?= runs/demo-world
PYTEST_ARGS ?=

CONFIG_ARG := $(if $(CONFIG),--config $(CONFIG),)
WORKERS_ARG := $(if $(WORKERS),--workers $(WORKERS),)
INPUT_ARG := $(if $(INPUT),--input $(INPUT),)

# The machine's pip configuration (local wheel folders, mirrors) handed to uv, which does not read it.
UV_FLAGS := $(shell for f in $$($(PY) -m pip config get global.find-links 2>/dev/null); do printf -- '--find-links %s ' "$$f"; done; \
                    for u in $$($(PY) -m pip config get global.extra-index-url 2>/dev/null); do printf -- '--extra-index-url %s ' "$$u"; done)

export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled
export PYTHONUNBUFFERED := 1

.PHONY: setup wordnet chromium render-check demo demo-text-first demo-world ingest run align metaclip klite dfn emit train eval dfn-train histograms \
        report ablate ablate-web test bench clean

setup: $(STAMP) wordnet chromium

# uv installs the lock in ~30 s (pip: ~4 min); pip is the fallback when uv cannot be had. --compile-bytecode:
# every Dask worker imports torch and open_clip; without .pyc files each compiles them again (~13 s a worker,
# measured once by hand: 19.8 s cold against 7.0 s with .pyc) wherever bytecode is not written (read-only venv,
# PYTHONDONTWRITEBYTECODE) and, on the first run, in every worker at once.
# requirements-tagger.lock: klite's tagger model, hash-checked (--require-hashes) and without dependencies.
$(STAMP): requirements.lock requirements-tagger.lock pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "== installing Python packages into $(VENV) (requirements.lock, requirements-tagger.lock)"
	@if $(BIN)/python -m pip install -q --disable-pip-version-check "uv==0.13.9" 2>/dev/null; then \
	    $(BIN)/python -m uv pip install -q --python $(BIN)/python --index-strategy unsafe-best-match --compile-bytecode $(UV_FLAGS) -r requirements.lock && \
	    $(BIN)/python -m uv pip install -q --python $(BIN)/python --index-strategy unsafe-best-match --compile-bytecode $(UV_FLAGS) --no-deps --require-hashes -r requirements-tagger.lock && \
	    $(BIN)/python -m uv pip install -q --python $(BIN)/python --no-deps -e . ; \
	else \
	    $(BIN)/python -m pip install -q -r requirements.lock && \
	    $(BIN)/python -m pip install -q --no-deps --require-hashes -r requirements-tagger.lock && \
	    $(BIN)/python -m pip install -q --no-deps -e . ; \
	fi
	@touch $(STAMP)

# WordNet 3.0 from Debian (klite, metadata). Installed when missing and we are root; else one clear line.
wordnet:
	@if [ ! -f /usr/share/wordnet/data.noun ] || [ ! -f /usr/share/wordnet/index.sense ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "== installing WordNet (apt-get install wordnet-base wordnet-sense-index)"; \
	    (apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null && apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null)) || \
	     { echo "WordNet install failed: run 'sudo apt-get install -y wordnet-base wordnet-sense-index'"; exit 1; }; \
	  else \
	    echo "WordNet is missing: run 'sudo apt-get install -y wordnet-base wordnet-sense-index', then make again"; exit 1; \
	  fi; \
	fi

# Headless Chromium from Debian (render-check; the report's browser test in `make test`): installed when no
# browser that pipeline/report/browser.py's find_browser() looks for is on PATH and we are root. Otherwise one line, and
# setup goes on: only render-check and that one test need it (the test skips with its reason; with CI set it fails).
# Debian 12, measured 2026-12-07 (`time make chromium`, apt lists fresh): 26 s, 116 packages, 131 MB downloaded,
# 442 MiB installed (+597 MB on disk with apt's cached .debs).
BROWSERS := chromium chromium-browser google-chrome google-chrome-stable
chromium:
	@for b in $(BROWSERS); do command -v $$b >/dev/null && exit 0; done; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "== installing Chromium (apt-get install chromium): the report's browser check"; \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)) || \
	   { echo "Chromium install failed: run 'sudo apt-get install -y chromium'"; exit 1; }; \
	else \
	  echo "Chromium is missing (the report's browser check skips): run 'sudo apt-get install -y chromium'"; \
	fi

demo-world: setup
	$(CLI) demo-world $(DEMO_WORLD) --n $(DEMO_N)

# The main job on the embedded demo world: crawl it, train the filtering network on its HQ set, curate,
# emit, train a tiny CLIP on the result, evaluate zero-shot on the held-out set, write the report.
# Every step resumes: a second `make demo` redoes nothing that is finished.
demo: setup
	$(CLI) demo-world $(DEMO_WORLD) --n $(DEMO_N)
	$(CLI) ingest $(DEMO_WORLD)/urls.parquet --run $(RUN) $(if $(CONFIG),--config $(CONFIG),--config $(DEMO_WORLD)/config.toml) $(WORKERS_ARG)
	$(CLI) dfn-train --run $(RUN) --hq $(DEMO_WORLD)/hq.parquet --resume
	$(CLI) run align,metaclip,klite,dfn,emit --run $(RUN) $(WORKERS_ARG)
	$(CLI) train --run $(RUN) --resume
	$(CLI) report --run $(RUN)

# The same world with the text-first recipe (stages/recipes/text-first.toml): ingest runs align's text rules,
# metaclip and klite on the URL list and downloads only the survivors; `run` does the rest (align's image rules,
# dfn, emit). The report compares it with the default recipe's run $(RUN) ("Recipes compared"); when that run
# does not exist the report says so in one line: `make demo` makes it, and this target again redoes only the report.
demo-text-first: setup
	$(CLI) demo-world $(DEMO_WORLD) --n $(DEMO_N)
	$(CLI) ingest $(DEMO_WORLD)/urls.parquet --run $(RUN_TF) --config $(DEMO_WORLD)/config-text-first.toml $(WORKERS_ARG)
	$(CLI) dfn-train --run $(RUN_TF) --hq $(DEMO_WORLD)/hq.parquet --resume
	$(CLI) run --run $(RUN_TF) $(WORKERS_ARG)
	$(CLI) train --run $(RUN_TF) --resume
	$(CLI) report --run $(RUN_TF) --compare $(RUN)

ingest: setup
	@test -n "$(INPUT)" || { echo "usage: make ingest RUN=name INPUT=urls.parquet [CONFIG=c.toml]"; exit 2; }
	$(CLI) ingest $(INPUT) --run $(RUN) $(CONFIG_ARG) $(WORKERS_ARG)

# One target per stage: make align RUN=x [INPUT=folder] [CONFIG=c.toml] [WORKERS=2]
align metaclip klite dfn emit: setup
	$(CLI) run $@ --run $(RUN) $(INPUT_ARG) $(CONFIG_ARG) $(WORKERS_ARG)

STAGES ?= align,metaclip,klite,dfn,emit
run: setup
	$(CLI) run $(STAGES) --run $(RUN) $(INPUT_ARG) $(CONFIG_ARG) $(WORKERS_ARG)

histograms report: setup
	$(CLI) $@ --run $(RUN)

# Open the run's report.html in headless Chromium (installed from Debian when missing and we are root):
# fails on a broken image; writes runs/RUN/report/report.png.
render-check: setup
	@for b in $(BROWSERS); do command -v $$b >/dev/null && exit 0; done; \
	  echo "Chromium is missing: run 'sudo apt-get install -y chromium'"; exit 1
	$(CLI) render-check --run $(RUN)

# Train CLIP on the run's emitted set (or DATA= / INPUT= Parquet or tars); RESUME=1 continues from the latest
# step checkpoint.
TRAIN_DATA = $(or $(DATA),$(INPUT))
train: setup
	$(CLI) train --run $(RUN) $(CONFIG_ARG) $(if $(TRAIN_DATA),--data $(TRAIN_DATA),) $(if $(RESUME),--resume,)

ablate: setup
	$(CLI) ablate --run $(RUN) $(CONFIG_ARG) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(STEPS),--steps $(STEPS)) $(if $(VARIANTS),--variants "$(VARIANTS)")

# The ablation on the web-noise demo world (raw pool, each stage, full pipeline, a random subset of the full
# pipeline's size, oracle; seeds 0,1,2): bench/bench_ablate_web.py -> bench/results/ablation_web.json. Long (a bench).
ablate-web: setup
	$(BIN)/python bench/bench_ablate_web.py $(if $(SEEDS),--seeds $(SEEDS)) $(if $(STEPS),--steps $(STEPS))

# Zero-shot eval of the run's model on its [train] eval_sets, or on EVAL=set.parquet (CHECKPOINT=file for another model);
# KLITE=1: classification also with K-LITE's knowledge prompts (both results reported).
eval: setup
	$(CLI) eval --run $(RUN) $(CONFIG_ARG) $(if $(EVAL),--data $(EVAL),) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),) $(if $(KLITE),--klite,)

# The data filtering network for the dfn stage, trained on a high-quality set: runs/RUN/dfn_model/model.pt.
dfn-train: setup
	@test -n "$(HQ)" || { echo "usage: make dfn-train RUN=name HQ=hq.parquet [CONFIG=c.toml] [RESUME=1]"; exit 2; }
	$(CLI) dfn-train --run $(RUN) --hq $(HQ) $(CONFIG_ARG) $(if $(RESUME),--resume,)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done
	@echo "results in bench/results/"

# One benchmark: make bench-dfn (bench/bench_dfn.py -> bench/results/dfn.json), bench-klite, ...
bench-%: setup
	$(BIN)/python bench/bench_$*.py

clean:
	rm -rf runs .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
