"""The shipped reference panel (forensics/reference/panel/*.json, built by scripts/build_panel.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forensics.stats.compare import compare_case, same_model
from forensics.reference import PANEL_DIR as DEFAULT_DIR
from forensics.reference import load_panel

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
# docs/models.md: one model per unrelated family. C is not here: A <-> C is ambiguous.
EXPECTED = {"A": "minilm-l6", "D1": "multilingual-e5-small", "E": "smollm2", "F": "gemma3", "G": "qwen2.5-coder",
            "H": "mpnet"}


@pytest.fixture(scope="module")
def panel():
    return load_panel()


def test_one_model_per_unrelated_family(panel):
    assert {fp["panel"]["id"]: fp["panel"]["family"] for fp in panel} == EXPECTED
    for i, a in enumerate(panel):
        for b in panel[i + 1:]:
            assert not same_model(a, b)


def test_files_are_small_canonical_and_machine_independent():
    files = sorted(DEFAULT_DIR.glob("*.json"))
    assert len(files) == len(EXPECTED)
    for f in files:
        text = f.read_text()
        assert len(text) < 16_000, f"{f.name} is {len(text)} bytes"
        fp = json.loads(text)
        assert text == json.dumps(fp, indent=1, sort_keys=True) + "\n"  # as build_panel writes it: reproducible
        assert "run" not in fp  # time and memory of the machine that built it
        assert not Path(fp["model"]["path"]).is_absolute() and "/models/" not in fp["model"]["path"]
        assert all(set(e) == {"path", "size", "sha256"} and "/" not in e["path"] for e in fp["model"]["files"])


def test_signals_have_one_value_per_layer(panel):
    for fp in panel:
        n = fp["model"]["num_layers"]
        for name, sig in fp["signals"].items():
            if sig.get("unavailable"):
                assert sig["values"] == []
            elif name.startswith("act_"):
                assert len(sig["values"]) == n + 1
            else:
                assert len(sig["values"]) == n


def test_panel_is_an_empirical_null(panel):
    """Every pair of panel models is an unrelated pair; a case model equal to a panel model is left out."""
    a, e = (next(fp for fp in panel if fp["panel"]["id"] == i) for i in ("A", "E"))
    res = compare_case(a, {"E": e}, None, panel)
    assert len(res["null"]["members"]) == len(panel) - 2 and len(res["null"]["excluded"]) == 2
    assert res["candidates"]["E"]["signals"]["o"]["empirical_null"]["n_null"] > 0


@pytest.mark.slow
def test_panel_matches_fresh_fingerprints(panel):
    """The weight signals are what fingerprint_model gives on the models now (to the 12 digits the panel keeps)."""
    from forensics.fingerprint import fingerprint_model
    from forensics.models import MODELS as FETCHED

    for fp in panel:
        m = FETCHED[fp["panel"]["id"]]
        path = MODELS / m.folder / m.target
        if not path.exists():
            pytest.skip(f"{path} absent: run `make models` first")
        fresh = fingerprint_model(path, device="cpu")
        assert {f["sha256"] for f in fresh["model"]["files"]} == {f["sha256"] for f in fp["model"]["files"]}
        weights = {k: v for k, v in fp["signals"].items() if not k.startswith("act_")}
        assert set(weights) == set(fresh["signals"])
        for name, sig in weights.items():
            assert sig["values"] == pytest.approx(fresh["signals"][name]["values"], rel=1e-10), name
