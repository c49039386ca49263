# `make demo` and `make test` work on a fresh clone: they create .venv, install the pinned CPU stack
# and this package (editable), and skip all of that the second time.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_DATA ?= data/demo

.PHONY: install test test-fast demo clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py requirements/dev-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/dev-cpu.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

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
	rm -rf $(VENV) runs data/demo
