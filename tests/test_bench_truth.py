"""The ground-truth bench (bench/bench_truth.py): its truth table and scoring without models, and a reduced run on
the small real models (A, A', B, D1, D2; weights only) when `make models` has fetched them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_truth.py"
MODELS = ROOT / "models"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_truth", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_truth"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def fp(layers: int, sha: str) -> dict:
    return {"model": {"num_layers": layers, "files": [{"path": "w", "sha256": sha}]}, "signals": {}}


def subjects(bench, ids):
    return {i: bench.Subject(i, Path(i), bench.REAL[i][1], bench.REAL[i][2]) for i in ids}


def test_truth_table_follows_models_md(bench):
    ids = list(bench.REAL)
    layers = {"A": 6, "A'": 6, "B": 6, "C": 3, "D1": 12, "D2": 12, "E": 30, "F": 18, "G": 24, "H": 12}
    subj = subjects(bench, ids)
    subj["lab:pruned"] = bench.Subject("lab:pruned", Path("p"), "smollm2", "prune", made=True)
    fps = {i: fp(layers.get(i, 27), i) for i in subj}
    pairs = {(p.suspect, p.candidate): p.truth for p in bench.make_pairs(subj, fps)}
    assert pairs[("A'", "A")] == pairs[("B", "A")] == pairs[("D2", "D1")] == "derived"
    assert pairs[("lab:pruned", "E")] == "derived"
    assert pairs[("C", "A")] == pairs[("C", "B")] == "ambiguous"
    assert pairs[("A", "D1")] == pairs[("C", "D1")] == pairs[("F", "E")] == "unrelated"
    # A' is A byte for byte: it appears once, against A
    assert [k for k in pairs if "A'" in k] == [("A'", "A")]
    # unrelated pairs put the deeper model on the candidate side (the permutation test acts on it)
    assert ("A", "E") in pairs and ("E", "A") not in pairs
    # 17 among A..F; G against the 7 of A, B, C, D1, D2, E, F; H against those and G
    assert pairs[("A", "H")] == pairs[("G", "E")] == "unrelated"  # H shares A's tokenizer, not its weights
    assert sum(t == "unrelated" for t in pairs.values()) == 17 + 7 + 8
    # derived first, then unrelated, then ambiguous
    order = [t for t in pairs.values()]
    assert order == sorted(order, key=["derived", "unrelated", "ambiguous"].index)


def test_scoring(bench):
    assert bench.outcome("derived", "DERIVED") == "right"
    assert bench.outcome("derived", "NO EVIDENCE") == "WRONG"
    assert bench.outcome("unrelated", "DERIVED") == "WRONG"
    assert bench.outcome("unrelated", "NO EVIDENCE") == "right"
    assert bench.outcome("unrelated", "INCONCLUSIVE") == "abstained"
    assert bench.outcome("ambiguous", "DERIVED") == "not scored"
    assert bench.auc([0.9, 1.0], [0.1, 0.95]) == 0.75
    assert bench.auc([], [0.1]) is None
    assert bench.related("minilm-l6", "minilm-l3") and bench.related("e5", "e5") and not bench.related("a", "b")


def test_summary_and_render_are_deterministic(bench):
    subj = subjects(bench, ["A", "B", "D1"])
    pairs = [bench.Pair("B", "A", "derived", "int8", "real"), bench.Pair("A", "D1", "unrelated", "x", "real")]
    result = bench.BenchResult(subj, pairs, panel=[], settings={"alpha": 0.01, "n_permutations": 99,
                                                                "n_bootstrap": 99, "multitest": "holm", "seed": 0,
                                                                "alignment": "dtw", "min_layers": 4})

    def row(pair, truth, r, p, v):
        return {"pair": pair, "truth": truth, "signal": "q", "status": "compared", "r": r, "p_perm": p,
                "perm_floor": 1e-4, "p_emp": 0.2, "n_null": 4, "verdict": v, "outcome": bench.outcome(truth, v)}

    result.rows = [row("B vs A", "derived", 1.0, 1e-4, "INCONCLUSIVE"), row("A vs D1", "unrelated", 0.97, 0.003,
                                                                          "INCONCLUSIVE")]
    result.verdicts = [{"pair": p.name, "truth": p.truth, "primary": "q", "r": 1.0, "p_perm": 0.5, "p_emp": 0.2,
                        "n_null": 4, "verdict": "INCONCLUSIVE", "outcome": "abstained"} for p in pairs]
    (q,) = bench.summarise(result)
    assert (q["perm_tp"], q["perm_testable_d"], q["perm_fp"], q["perm_testable_u"]) == (1, 1, 1, 1)
    assert q["false_perm"] == ["A vs D1"] and q["auc"] == 1.0
    meta = {"git": {"commit": "abc", "dirty": 0}, "date": "2025-01-01", "subset": "all", "models": Path("m")}
    text = bench.render(result, meta)
    assert text == bench.render(result, meta)
    assert "| q | 1 / 1 |" in text and "neither route can decide DERIVED in this bench" in text


@pytest.mark.slow
def test_reduced_bench_on_small_real_models(bench, tmp_path):
    """The CI bench: five small real models, weight signals, fewer permutations, neuron matching at the case
    defaults."""
    missing = [m for m in bench.SUBSETS["tiny"] if not (MODELS / bench.MODELS[bench.REAL[m][0]].folder).exists()]
    if missing:
        pytest.skip(f"models {missing} absent: run `make models` first")
    result = bench.run_bench(MODELS, tmp_path / "cache", subset="tiny", activations=False, permutations=999,
                             log=lambda msg: None)
    truths = {p.name: p.truth for p in result.pairs}
    assert truths == {"A' vs A": "derived", "B vs A": "derived", "D2 vs D1": "derived", "A vs D1": "unrelated",
                      "A vs D2": "unrelated", "B vs D1": "unrelated", "B vs D2": "unrelated"}
    qkvo = {r["pair"]: r for r in result.rows if r["signal"] == "qkvo"}
    for name, truth in truths.items():
        if truth == "derived":
            assert qkvo[name]["r"] > 0.999  # copies, int8 and a vocabulary cut leave the layers' std curves alone
        else:
            assert qkvo[name]["r"] < 0.99
    # the small panel caps every verdict: nothing is called DERIVED, nothing is wrong
    assert {v["verdict"] for v in result.verdicts} <= {"INCONCLUSIVE", "NO EVIDENCE"}
    assert not [r for r in result.rows if r.get("outcome") == "WRONG"]
    # the panel's MiniLM and e5 agree with fresh fingerprints; the decoders were not fingerprinted here
    fresh = {e["id"]: e["fresh"] for e in result.panel}
    assert fresh["A"] is True and fresh["D1"] is True and fresh["E"] is None
    # neuron matching: copies and the vocabulary-cut child hold the parent's neurons, unrelated pairs do not; the
    # ONNX copy ships no vocabulary, so its residual stream cannot be aligned
    neurons = {v["pair"]: v["neurons"] for v in result.verdicts}
    floor = 1 / (result.neurons["permutations"] + 1)
    assert neurons["A' vs A"]["p"] == neurons["D2 vs D1"]["p"] == pytest.approx(floor)
    assert neurons["D2 vs D1"]["layer_map"] == [[i] for i in range(12)]
    assert neurons["B vs A"]["p"] is None and "vocabulary" in neurons["B vs A"]["reason"]
    assert neurons["A vs D1"]["p"] > 0.01 and neurons["A vs D2"]["p"] > 0.01
    assert not any(v["tamper"]["raised"] for v in result.verdicts)
    meta = {"git": {"commit": "x", "dirty": 0}, "date": "d", "subset": "tiny", "models": MODELS}
    assert bench.render(result, meta) == bench.render(result, meta)
    assert "## Neuron matching and the tamper flag" in bench.render(result, meta)
