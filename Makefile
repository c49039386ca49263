# `make demo` and `make test` work on a fresh clone: they create .venv, install the pinned CPU stack
# and this package (editable), and skip all of that the second time.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_DATA ?= data/demo

.PHONY: install test test-fast test-newest test-floor demo clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py requirements/dev-cpu.txt requirements/torch-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/dev-cpu.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# Every test stage runs on TEST_WORKERS pytest-xdist workers (0: in this process) with one torch
# thread each (tests/conftest.py), sized for the 2-core machines that CI and reviews use.
# --dist loadgroup keeps the tests marked `multiprocess` (torchrun's ranks) on one worker, in turn
# (tests/xdist_groups.py).
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadgroup

test: $(STAMP)
	$(PY) tests/stack_versions.py pinned
	$(PY) -m pytest -q $(XDIST)

test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow"

# The smoke selection (marker `stack`) on two other stacks, each in a venv made afresh: the newest
# releases the package index serves today (torch and triton pinned to the CPU build as above), and the
# oldest that pyproject.toml allows (requirements/floor.txt). Both run from the checkout's root, as
# `python -m pytest` and `torchrun -m` do on a user's machine.
NEWEST_VENV ?= .venv-newest
FLOOR_VENV  ?= .venv-floor

test-newest:
	rm -rf $(NEWEST_VENV) && $(PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(NEWEST_VENV)/bin/python -m pip install --quiet -r requirements/torch-cpu.txt
	$(NEWEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -c requirements/torch-cpu.txt \
		'.[test]' transformers tokenizers datasets huggingface_hub accelerate safetensors
	$(NEWEST_VENV)/bin/python tests/stack_versions.py newest
	$(NEWEST_VENV)/bin/python -m pytest -q $(XDIST) -m stack -p no:cacheprovider --disable-warnings

test-floor:
	rm -rf $(FLOOR_VENV) && $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FLOOR_VENV)/bin/python -m pip install --quiet -r requirements/floor.txt
	$(FLOOR_VENV)/bin/python -m pip install --quiet --no-deps .
	$(FLOOR_VENV)/bin/python tests/stack_versions.py floor
	$(FLOOR_VENV)/bin/python -m pytest -q $(XDIST) -m stack -p no:cacheprovider --disable-warnings

# The demo: a warm-up of the built-in tiny model (a stand-in for pretraining; redone only when its
# config or the data change), then SFT and mSFT on the same mixture, compared side by side.
# final/ is written only when the warm-up finishes (an interrupted one leaves history.json behind)
WARMUP := runs/demo_warmup/final/config.json

$(DEMO_DATA)/manifest.json: $(STAMP) msft_fast/demo_data.py
	$(VENV)/bin/msft-fast demo-data $(DEMO_DATA)

$(WARMUP): $(DEMO_DATA)/manifest.json configs/demo_warmup.yaml
	$(VENV)/bin/msft-fast train --config configs/demo_warmup.yaml --overwrite

demo: $(WARMUP)
	$(VENV)/bin/msft-fast train --config configs/demo_sft.yaml --overwrite
	$(VENV)/bin/msft-fast train --config configs/demo.yaml --overwrite
	$(VENV)/bin/msft-fast compare runs/demo_sft runs/demo
	@echo "demo results: runs/demo/report.md and runs/demo/curves.png (mSFT), runs/demo_sft/ (SFT);"
	@echo "each run folder has history.json, metrics.jsonl and final/ (a HF model folder)"

clean:
	rm -rf $(VENV) $(NEWEST_VENV) $(FLOOR_VENV) runs data/demo
