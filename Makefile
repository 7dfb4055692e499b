# pickstyle — `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
# dvc.yaml commands say `python`: make it the venv's.
export PATH := $(abspath $(BIN)):$(PATH)
PIP := $(BIN)/pip --disable-pip-version-check --quiet

.DEFAULT_GOAL := help
.PHONY: help install lock demo test test-fast lint format ui bench bench-gpu clean app

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: pip must never pick a newer torch (several GB of CUDA packages on a CPU machine)
	$(PIP) install torch==2.13.0 2> >(grep -v "is ignored: it is neither" >&2)
	# every other package at the version the committed dvc.lock was made with
	$(PIP) install -c requirements.lock -e '.[dev]' 2> >(grep -v "is ignored: it is neither" >&2)
	# gradio (`pickstyle app`) without its declared pillow<13 / tomlkit<0.15 caps (pyproject.toml says why)
	$(PIP) install -c requirements.lock --no-deps gradio 2> >(grep -v "is ignored: it is neither" >&2)
	touch $(STAMP)

install: $(STAMP) ## create .venv and install pickstyle (CPU torch 2.13.0, the rest from requirements.lock)

lock: ## re-resolve pyproject.toml in a scratch venv and rewrite requirements.lock (then commit it)
	rm -rf .lock-venv && $(PY) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet torch==2.13.0
	.lock-venv/bin/pip install --quiet -e '.[dev]'
	.lock-venv/bin/pip install --quiet --no-deps gradio
	{ head -n 2 requirements.lock; .lock-venv/bin/pip freeze --exclude-editable | sed 's/+cpu$$//'; } > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock && rm -rf .lock-venv

demo: $(STAMP) ## run the whole pipeline on the embedded default: dvc repro (tiny profile, offline, CPU)
	$(BIN)/dvc repro
	@# check that the committed dvc.lock is what this machine reproduced (a warning: another CPU may round floats
	@# differently in training, which changes the adapter's hash, not the pipeline's correctness)
	@$(BIN)/dvc status -q && git diff --quiet -- dvc.lock \
		&& echo "reproduced: dvc status clean, dvc.lock as committed" \
		|| echo "note: outputs differ from the committed dvc.lock (see git diff dvc.lock)"

# Two pytest-xdist workers, one test file each at a time (a file's module and session fixtures stay in one process):
# most tests pin torch to one thread or wait on a subprocess or server, so two overlap on a 2-core machine.
# TEST_WORKERS=0 runs them in this process, one after another.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

test: browser $(STAMP) ## run the whole test suite, as CI does
	$(PYTEST) --durations=15

# The web demo's browser test drives Debian's chromium (playwright, executable_path): installed here when missing.
# Without root (or sudo) it warns, and only that test skips, saying why; under CI it fails instead.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo -n)
.PHONY: browser
browser: ## install headless chromium for tests/test_app.py (apt-get, only when /usr/bin/chromium is missing)
	@test -x /usr/bin/chromium || { $(SUDO) apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium; } \
		|| echo "warning: could not install chromium (apt-get needs root); tests/test_app.py's browser test will skip"

app: $(STAMP) ## the web demo (Gradio) on http://127.0.0.1:7860: upload a video, pick a model, stylize
	$(BIN)/pickstyle app

test-fast: $(STAMP) ## the suite without the tests marked slow (end-to-end runs, subprocess kills, servers)
	$(PYTEST) -m "not slow"

lint: $(STAMP) ## ruff lint + format check
	$(BIN)/ruff check pickstyle flows tests bench
	$(BIN)/ruff format --check pickstyle flows tests bench

format: $(STAMP) ## ruff format + autofix
	$(BIN)/ruff format pickstyle flows tests bench
	$(BIN)/ruff check --fix pickstyle flows tests bench

ui: $(STAMP) ## start the Prefect server and the MLflow UI on 127.0.0.1 and print both URLs
	$(BIN)/python -m flows.ui

# `make server SERVER_HOST=0.0.0.0 MLFLOW_BACKEND=postgresql://u:p@db/mlflow MLFLOW_ARTIFACTS=s3://bucket/mlflow`
SERVER_HOST ?= 127.0.0.1
.PHONY: server
server: $(STAMP) ## start the Prefect server and a team's MLflow tracking server (proxied artifacts; README)
	$(BIN)/python -m flows.ui --tracking-server --host $(SERVER_HOST) \
		$(if $(MLFLOW_BACKEND),--backend-store-uri '$(MLFLOW_BACKEND)') \
		$(if $(MLFLOW_ARTIFACTS),--artifacts-destination '$(MLFLOW_ARTIFACTS)')

bench: $(STAMP) ## run the benchmarks (render and sample rewrite their bench/RESULTS.md sections)
	$(BIN)/python bench/render.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/sample.py

bench-gpu: $(STAMP) ## the GPU check on one H100/H200 (~5 min; writes the gpu section of bench/RESULTS.md)
	$(BIN)/python bench/gpu.py

.PHONY: exps
exps: $(STAMP) ## compare experiments: the params that differ, base / adapter style PSNR, the worst style (`pickstyle exps`)
	$(BIN)/pickstyle exps

clean: ## remove the venv, the DVC-cached outputs and the local MLflow store (DVC cache kept)
	rm -rf $(VENV) data/pairs data/clips data/testclips data/valclips data/latents models/backbone models/adapter \
		eval/figures eval/preview.gif mlflow.db mlartifacts .ui
