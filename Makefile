# Quickstart: `make demo` (tiny MAE on Fashion-MNIST, CPU, a few minutes) and `make test` (the suite).
# Both set up everything first: the virtualenv in .venv, the pinned packages, the system packages.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
TUXPAINT := /usr/share/tuxpaint/stamps
SHARDS := data/fmnist

.PHONY: help install system-deps data demo test test-fast lint format bench clean-runs

help:
	@echo "make install      virtualenv .venv with the pinned requirements (+ this package, editable)"
	@echo "make system-deps  Debian packages the tests and demo need (Fashion-MNIST data set)"
	@echo "make data         Fashion-MNIST -> WebDataset shards in $(SHARDS)/{train,test}"
	@echo "make demo         pretrain a tiny MAE on Fashion-MNIST on the CPU (a few minutes)"
	@echo "make test         the whole test suite (CPU; multi-process and SLURM tests included)"
	@echo "make lint         ruff check + format check"
	@echo "make bench        training-throughput benchmark (see BENCHMARKS.md)"

$(STAMP): requirements.txt setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip wheel setuptools
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(STAMP)

# Real data sets shipped by Debian packages: Fashion-MNIST (image SSL, evals) and the Tux Paint
# stamps (images with captions, for the caption sources and CLIP).
system-deps:
	@if [ ! -f $(FMNIST) ] || [ ! -d $(TUXPAINT) ]; then \
		echo "installing Debian packages dataset-fashion-mnist tuxpaint-stamps-default"; \
		$(SUDO) apt-get update -q && \
		$(SUDO) apt-get install -y -q --no-install-recommends dataset-fashion-mnist tuxpaint-stamps-default; \
	fi

$(SHARDS)/train/manifest.json: | install system-deps
	$(BIN)/python -m data_pipelines.build_shards fashion-mnist $(SHARDS)/train --split train --shard-size 2000
$(SHARDS)/test/manifest.json: | install system-deps
	$(BIN)/python -m data_pipelines.build_shards fashion-mnist $(SHARDS)/test --split test --shard-size 2000

data: $(SHARDS)/train/manifest.json $(SHARDS)/test/manifest.json

demo: install system-deps data
	$(BIN)/python -m pretrain.train --config configs/mae/tiny_fmnist.yaml

test: install system-deps
	$(BIN)/python -m pytest tests

test-fast: install
	$(BIN)/python -m pytest tests -m "not slow and not slurm and not multiproc"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install data
	$(BIN)/python benchmarks/train_throughput.py --config configs/mae/tiny_fmnist.yaml --steps 30

clean-runs:
	rm -rf runs
