# byol3d: `make demo` and `make test` work on a fresh machine (Python 3.10+).
# torch is installed first, pinned, so that pip does not pull a multi-GB CUDA build
# where a CPU wheel is wanted; override with e.g. `make test TORCH="torch==2.5.1"`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO_DATA ?= data/demo_ct
DEMO_RUN ?= runs/demo_ct
ENDO_DATA ?= data/demo_endoscopy
ENDO_RUN ?= runs/demo_endoscopy
ARGS ?=

.PHONY: install demo demo-data demo-endoscopy test test-all lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo-data: install
	$(BIN)/byol3d demo-data $(DEMO_DATA) --n 16

# A short CPU pretraining run on synthetic CT phantoms (about five minutes on 2 cores).
demo: demo-data
	$(BIN)/byol3d preview configs/demo_ct.yaml data.root=$(DEMO_DATA)/images --output $(DEMO_RUN)/views.png
	$(BIN)/byol3d pretrain configs/demo_ct.yaml data.root=$(DEMO_DATA)/images output_dir=$(DEMO_RUN) $(ARGS)

# The same trainer on 2D RGB frames: synthetic endoscopy frames, preview, a short CPU run.
demo-endoscopy: install
	$(BIN)/byol3d demo-data $(ENDO_DATA) --kind endoscopy --n 48
	$(BIN)/byol3d preview configs/demo_endoscopy.yaml data.root=$(ENDO_DATA)/images --output $(ENDO_RUN)/views.png
	$(BIN)/byol3d pretrain configs/demo_endoscopy.yaml data.root=$(ENDO_DATA)/images output_dir=$(ENDO_RUN) $(ARGS)

test: install
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

test-all: install
	$(BIN)/python -m pytest -q $(ARGS)

lint: install
	$(BIN)/ruff check byol3d tests scripts
	$(BIN)/ruff format --check byol3d tests scripts

clean:
	rm -rf $(VENV) $(DEMO_RUN) $(DEMO_DATA) $(ENDO_RUN) $(ENDO_DATA) .pytest_cache
