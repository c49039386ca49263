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

demo: $(STAMP)
	$(VENV)/bin/msft-fast demo-data $(DEMO_DATA)
	$(VENV)/bin/msft-fast train --config configs/demo.yaml --overwrite
	@echo "demo results: runs/demo/history.json (every evaluation), runs/demo/metrics.jsonl (every step), runs/demo/final/ (HF model folder)"

clean:
	rm -rf $(VENV) runs data/demo
