# Developer entry points. Everything runs in a venv made by `make setup` (idempotent, quick when done).
#   make setup      venv .venv + torch + ComfyUI 0.3.75 (or $COMFYUI_PATH) + the pack linked into custom_nodes
#   make setup-033  the same for the ComfyUI 0.33.0 lane: .venv-033 + .comfyui/ComfyUI-0.33.0
#   make test       setup, then the whole pytest suite against ComfyUI 0.3.75 (the default lane)
#   make test-033   setup-033, then the whole pytest suite against ComfyUI 0.33.0
#   make test-all   both lanes, one after the other; fails if either fails (what .ci/run does)
#   make test-quick the default lane without the tests marked slow
#   make demo       setup, then the example workflow headless -> output/*.png: the miniature world's model, or
#                   CKPT=/path/model.safetensors
#   make snapshot   deliberately regenerate tests/schema_snapshot.json after an intended schema change
# Needs python3.11 on PATH for the venvs (or PYTHON=/path/to/python3.x, 3.10+).
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
VENV_033 ?= $(CURDIR)/.venv-033
PY := $(VENV)/bin/python
PY_033 := $(VENV_033)/bin/python
PYTEST_ARGS ?=

.PHONY: setup setup-033 test test-033 test-all test-quick demo snapshot

setup:
	@SYNCDIFF_VENV="$(VENV)" bash scripts/setup_env.sh --comfyui 0.3.75

setup-033:
	@SYNCDIFF_VENV="$(VENV_033)" bash scripts/setup_env.sh --comfyui 0.33.0

# pytest exits 5 when it collected no tests: that is a failure of the build, reported as such.
define run_pytest
	@$(1) -m pytest $(2); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests (exit 5) -- failing the build" >&2; fi; \
	exit $$rc
endef

test: setup
	$(call run_pytest,$(PY),$(PYTEST_ARGS))

test-033: setup-033
	$(call run_pytest,$(PY_033),$(PYTEST_ARGS))

test-all: test test-033

test-quick: setup
	$(call run_pytest,$(PY),-m "not slow" $(PYTEST_ARGS))

# Without CKPT: the miniature trained world's model (miniworld/), MultiDiffusion against SyncDiffusion, same seed.
demo: setup
	@$(if $(CKPT),$(PY) -m scripts.demo --ckpt "$(CKPT)",$(PY) -m miniworld.demo --output output) $(DEMO_ARGS)

snapshot: setup
	@$(PY) -m scripts.schema_snapshot --write
