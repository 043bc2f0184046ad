# Developer entry points. Everything runs in .venv, made by `make setup` (idempotent, quick when done).
#   make setup      venv + torch + ComfyUI 0.3.75 (or $COMFYUI_PATH) + the pack linked into custom_nodes
#   make test       setup, then the whole pytest suite (unit, graph, server, workflow, schema tests)
#   make demo       setup, then the example workflow headless -> output/*.png  (CKPT=/path/model.safetensors)
#   make snapshot   deliberately regenerate tests/schema_snapshot.json after an intended schema change
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
export SYNCDIFF_VENV := $(VENV)

.PHONY: setup test demo snapshot

setup:
	@bash scripts/setup_env.sh

# pytest exits 5 when it collected no tests: that is a failure of the build, reported as such.
test: setup
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5) -- failing the build" >&2; fi; \
	exit $$rc

demo: setup
	@$(PY) scripts/demo.py $(if $(CKPT),--ckpt "$(CKPT)") $(DEMO_ARGS)

snapshot: setup
	@$(PY) scripts/schema_snapshot.py --write
