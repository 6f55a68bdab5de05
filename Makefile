# byol3d: `make demo` and `make test` work on a fresh machine (Python 3.10+).
# torch is installed first, pinned, so that pip does not pull a multi-GB CUDA build
# where a CPU wheel is wanted; override with e.g. `make test TORCH="torch==2.5.1"`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# pip extras installed with byol3d; CI adds nnunet (`make test EXTRAS=test,nnunet`) so that
# the nnU-Net tests run; without it they skip.
EXTRAS ?= test
BIN := $(VENV)/bin
DEMO_DATA ?= data/demo_ct
DEMO_RUN ?= runs/demo_ct
DEMO_EVAL ?= data/demo_ct_eval
ENDO_DATA ?= data/demo_endoscopy
ENDO_RUN ?= runs/demo_endoscopy
ARGS ?=

.PHONY: install demo demo-data demo-endoscopy study test test-all lint clean bench bench-env

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

demo-data: install
	$(BIN)/byol3d demo-data $(DEMO_DATA) --n 16

# A short CPU pretraining run on synthetic CT phantoms (about five minutes on 2 cores), then
# what it bought: a frozen dense probe of its encoder against random inits of the same
# architecture, on 10 labelled phantoms of other subjects that pretraining never saw.
demo: demo-data
	$(BIN)/byol3d preview configs/demo_ct.yaml data.root=$(DEMO_DATA)/images --output $(DEMO_RUN)/views.png
	$(BIN)/byol3d pretrain configs/demo_ct.yaml data.root=$(DEMO_DATA)/images output_dir=$(DEMO_RUN) $(ARGS)
	$(BIN)/byol3d demo-data $(DEMO_EVAL) --n 10 --seed 7
	$(BIN)/byol3d evaluate $(DEMO_RUN) --segmentation $(DEMO_EVAL) --labelled 1 3 --seeds 3 \
		--random-inits 2 --test 4 --voxels-per-class 500

# The transfer study: a 200-phantom pretraining pool, global and global+dense runs (24 epochs
# each), frozen dense probe (both runs) and FlexibleUNet fine-tuning (global vs scratch, 600
# steps) at 1, 3 and 6 labelled volumes against random init, paired over 5 seeds (3 for
# fine-tuning); tables go to docs/evaluation.md (about 90 minutes on 2 quiet cores, 25 of them
# pretraining). Its own data: runs/study/pool and runs/study/eval.
study: install
	$(BIN)/python scripts/transfer_study.py --output runs/study --epochs 24 --ft-seeds 3 --doc docs/evaluation.md $(ARGS)

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

# Benchmark: byol3d vs lightly's BYOL loop and byol-pytorch, in a separate environment
# (.bench-venv, about 6 GB) because the peers need torchvision, which has no CPU build for
# the project's torch; torchvision==0.29.2 brings its own torch build, so both sides run
# on the same torch. byol3d goes in with its nnunet extra, so that every per-network row
# runs. Nothing of it enters `make test`. Example:
#   make bench ARGS="--quick --json bench.json --markdown bench.md"
#   make bench ARGS="--quality --json quality.json"   # encoder quality vs lightly and random init
BENCH_VENV ?= .bench-venv
BENCH_PKGS ?= torchvision==0.29.2 lightly byol-pytorch==0.8.2

$(BENCH_VENV)/.installed: pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet $(BENCH_PKGS)
	$(BENCH_VENV)/bin/python -m pip install --quiet -e ".[nnunet]"
	touch $@

bench-env: $(BENCH_VENV)/.installed

bench: bench-env
	$(BENCH_VENV)/bin/python scripts/benchmark.py $(ARGS)

clean:
	rm -rf $(VENV) $(DEMO_RUN) $(DEMO_DATA) $(DEMO_EVAL) $(ENDO_RUN) $(ENDO_DATA) .pytest_cache
