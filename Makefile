# Every target sets up what it needs: a fresh clone runs `make test` or `make case NAME=demo` directly.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup test test-slow bench-weights fingerprint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# Pinned first so that nothing pulls a multi-GB CUDA build of torch.
	$(VENV)/bin/pip install -q "torch==2.13.0"
	$(VENV)/bin/pip install -q -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# make fingerprint MODEL=path/to/model [OUT=fp.json]
fingerprint: $(STAMP)
	$(VENV)/bin/forensics fingerprint $(MODEL) $(if $(OUT),-o $(OUT))

bench-weights: $(STAMP)
	$(PY) bench/bench_weights.py
