# Quickstart: `make demo` (tiny MAE on Fashion-MNIST, CPU, a few minutes) and `make test` (the suite).
# Both set up everything first: the virtualenv in .venv, the pinned packages, the system packages.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Debian packages the tests and the demo read (real data sets; see README "A fresh machine"). The SLURM
# packages are installed by launch/local_cluster.sh (PACKAGES) when the SLURM tests start the cluster.
APT_PACKAGES := dataset-fashion-mnist tuxpaint-stamps-default
SHARDS := data/fmnist

.PHONY: help install system-deps emoji-package data clip-data demo clip-demo test test-fast lint format bench gpu-wheels clean-runs

help:
	@echo "make install      virtualenv .venv with the pinned requirements (+ this package, editable)"
	@echo "make system-deps  Debian packages the tests and demo read: $(APT_PACKAGES)"
	@echo "make data         Fashion-MNIST -> WebDataset shards in $(SHARDS)/{train,test}"
	@echo "make clip-data    CLIP image-text shards: Tux Paint stamps and emoji (npm), train + held-out test"
	@echo "make clip-demo    pretrain a tiny CLIP on the Tux Paint stamps (CPU), then retrieval and zero-shot"
	@echo "make demo         pretrain a tiny MAE on Fashion-MNIST on the CPU (a few minutes)"
	@echo "make test         the whole test suite (CPU; multi-process and SLURM tests included)"
	@echo "make lint         ruff check + format check"
	@echo "make bench        CPU benchmarks: loader vs synthetic step-time ratio, checkpoint pause (BENCHMARKS.md)"
	@echo "make gpu-wheels   wheels a bare CUDA PyTorch machine lacks, into .whl/ (benchmarks/gpu_suite.sh)"

$(STAMP): requirements.txt setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip wheel setuptools
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	# DeepSpeed's shared-memory comm op, compiled now instead of at the first engine.name=deepspeed run
	$(BIN)/python -m pretrain.engines.deepspeed_ops
	touch $@

install: $(STAMP)

# Real data sets shipped by Debian packages: Fashion-MNIST (image SSL, evals) and the Tux Paint
# stamps (images with captions, for the caption sources and CLIP). Installed unless already installed.
system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -q && \
		$(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

# The Google emoji images with their names (npm emoji-datasource-google, Apache-2.0 images), unpacked
# here for the CLIP data builds and tests; the tests never download anything themselves.
EMOJI_NPM := emoji-datasource-google@16.0.0
EMOJI_PKG := data/npm/emoji-datasource-google
$(EMOJI_PKG)/package/emoji.json:
	@command -v npm >/dev/null || { echo "installing Debian package npm (for the emoji data)"; \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends npm; }
	mkdir -p $(EMOJI_PKG)
	cd $(EMOJI_PKG) && npm pack -q $(EMOJI_NPM) && tar xzf emoji-datasource-google-16.0.0.tgz && rm emoji-datasource-google-16.0.0.tgz
emoji-package: $(EMOJI_PKG)/package/emoji.json

$(SHARDS)/train/manifest.json: | install system-deps
	$(BIN)/python -m data_pipelines.build_shards fashion-mnist $(SHARDS)/train --split train --shard-size 2000 --image-format pnm
$(SHARDS)/test/manifest.json: | install system-deps
	$(BIN)/python -m data_pipelines.build_shards fashion-mnist $(SHARDS)/test --split test --shard-size 2000 --image-format pnm

data: $(SHARDS)/train/manifest.json $(SHARDS)/test/manifest.json

# CLIP image-text shards with a held-out split: OUT/train and OUT/test (captions .txt, categories .cls)
data/tuxpaint/test/manifest.json: | install system-deps
	$(BIN)/python -m data_pipelines.image_text tuxpaint data/tuxpaint
data/emoji/test/manifest.json: $(EMOJI_PKG)/package/emoji.json | install
	$(BIN)/python -m data_pipelines.image_text emoji data/emoji --source $(EMOJI_PKG)
clip-data: data/tuxpaint/test/manifest.json data/emoji/test/manifest.json

EVAL_DATA := data/fmnist_eval
DEMO_RUN := runs/mae_tiny_fmnist
DEMO_EXPORT := $(DEMO_RUN)/exports/latest

$(EVAL_DATA)/train/manifest.json: | install system-deps
	$(BIN)/python -m data_pipelines.build_shards fashion-mnist $(EVAL_DATA)/train --split train --limit 10000 --shard-size 2000 --image-format pnm
$(EVAL_DATA)/test/manifest.json: | install system-deps
	$(BIN)/python -m data_pipelines.build_shards fashion-mnist $(EVAL_DATA)/test --split test --limit 2000 --shard-size 1000 --image-format pnm

# Pretrain, then k-NN and linear probe of the export against a randomly initialised encoder of the same size.
demo: install system-deps data $(EVAL_DATA)/train/manifest.json $(EVAL_DATA)/test/manifest.json
	$(BIN)/python -m pretrain.train --config configs/mae/tiny_fmnist.yaml
	$(BIN)/python -m evals.run --checkpoint $(DEMO_EXPORT) --protocol knn --data $(EVAL_DATA)
	$(BIN)/python -m evals.run --checkpoint $(DEMO_EXPORT) --protocol knn --data $(EVAL_DATA) --baseline random
	$(BIN)/python -m evals.run --checkpoint $(DEMO_EXPORT) --protocol linear --data $(EVAL_DATA)
	$(BIN)/python -m evals.run --checkpoint $(DEMO_EXPORT) --protocol linear --data $(EVAL_DATA) --baseline random
	$(BIN)/python -m evals.report $(DEMO_RUN)

# Tiny CLIP on the Tux Paint stamps (CPU), then retrieval and zero-shot on the held-out stamps
clip-demo: install system-deps data/tuxpaint/test/manifest.json
	$(BIN)/python -m pretrain.train --config configs/clip/tiny_tuxpaint.yaml
	$(BIN)/python -m evals.run --checkpoint runs/clip_tiny_tuxpaint/exports/latest --protocol retrieval --test-data data/tuxpaint/test --resize resize
	$(BIN)/python -m evals.run --checkpoint runs/clip_tiny_tuxpaint/exports/latest --protocol zeroshot --test-data data/tuxpaint/test --resize resize

test: install system-deps emoji-package
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
	$(BIN)/python benchmarks/train_throughput.py --config configs/mae/tiny_fmnist.yaml --compare-synthetic \
		--interval 10 --windows 5 --repeats 8
	$(BIN)/python benchmarks/checkpoint_stall.py --config configs/mae/vit_l16_in1k.yaml --every 5 --saves 4 \
		model.img_size=64 train.global_batch_size=8 data.num_workers=0 train.export_every=0

# Python 3.12 x86-64 wheels of what benchmarks/gpu_suite.sh needs beyond a CUDA PyTorch image
gpu-wheels: install
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 -d .whl $$(grep -E '^omegaconf==' requirements.txt)
	# DeepSpeed (an sdist: built here into a pure-Python wheel, no ops) and the dependencies it brings
	$(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -w .whl $$(grep -E '^deepspeed==' requirements.txt)
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 -d .whl einops hjson msgpack ninja py-cpuinfo psutil \
		pydantic pydantic-core annotated-types typing-inspection

clean-runs:
	rm -rf runs
