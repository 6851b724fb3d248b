"""Statistics of a case (forensics.stats): known answers, null behaviour, determinism, verdict rule."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats

from forensics.errors import ForensicsError
from forensics.reference import load_calibration_table as load_table
from forensics.reference import load_panel
from forensics.stats import Settings, compare_case, to_json
from forensics.stats.align import Aligner, monotone_match
from forensics.stats.bootstrap import block_bootstrap_ci
from forensics.stats.calibration import empirical_null
from forensics.stats.multitest import adjust, best_adjusted, min_null_size
from forensics.stats.normalise import FLAT_CV, Curve, curve, variation_check, zscore
from forensics.stats.permutation import NullCurves, permutation_tests
from forensics.stats.similarity import pearson
from forensics.stats.verdict import DERIVED, INCONCLUSIVE, NO_EVIDENCE, PrimaryEvidence, decide

ROLES = ("q", "k", "v", "o", "gate", "up", "down", "attn_norm")
FAST = Settings(n_permutations=999, n_bootstrap=199)


def family_trend(n: int) -> np.ndarray:
    """A depth trend every model of the family shares: falls over the first layers, then rises slowly."""
    t = np.linspace(0, 1, n)
    return 0.04 * (1 + 0.6 * np.exp(-6 * t) + 0.3 * t ** 2)


def detail(rng: np.random.Generator, n: int, rho: float = 0.5, scale: float = 0.04) -> np.ndarray:
    """Model-specific layer detail: AR(1) along depth, so neighbouring layers are alike as in real curves."""
    e = rng.standard_normal(n)
    out = np.empty(n)
    out[0] = e[0]
    for i in range(1, n):
        out[i] = rho * out[i - 1] + math.sqrt(1 - rho ** 2) * e[i]
    return scale * out


def curves_of(seed: int, n: int = 24) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {role: family_trend(n) * (1 + i * 0.1) * (1 + detail(rng, n)) for i, role in enumerate(ROLES)}


def fingerprint(values: dict[str, np.ndarray | list], name: str = "m") -> dict:
    n = max(len(v) for v in values.values())
    return {"schema": "llm-forensics.fingerprint/1",
            "model": {"path": name, "architecture": "llama", "num_layers": n, "files": []},
            "signals": {k: {"kind": "weight_std", "role": k, "values": [None if x is None else float(x) for x in v]}
                        for k, v in values.items()}}


def as_curve(values: np.ndarray) -> Curve:
    return Curve(np.arange(len(values)), np.asarray(values, dtype=float), len(values))


def perm(aligner: Aligner, null: NullCurves, n_resamples: int, rng: np.random.Generator):
    return permutation_tests({"s": (aligner, null)}, {"s": ["s"]}, n_resamples, rng)["s"]


# --- normalisation and the variation check ---------------------------------------------------------------------

def test_zscore_keeps_shape_and_standardises():
    x = np.array([1.0, 2.0, 4.0, 8.0])
    z = zscore(x)
    assert z.mean() == pytest.approx(0, abs=1e-12)
    assert z.std() == pytest.approx(1)
    assert np.all(np.diff(z) > 0)


def test_flat_curve_of_gemma_kind_is_flagged_and_a_trained_one_is_not():
    rng = np.random.default_rng(0)
    # Gemma3-270m: every layer's std is 1/sqrt(640) up to a relative wobble of ~2e-4 (CV 0.01-0.03 %).
    gemma = (1 / math.sqrt(640)) * (1 + 2e-4 * rng.standard_normal(18))
    check = variation_check(gemma)
    assert check.flat and check.cv < FLAT_CV
    assert not variation_check(curves_of(1)["q"]).flat
    assert variation_check(np.full(6, 0.02)).flat
    assert variation_check(np.array([])).flat


def test_curve_skips_null_and_nonfinite_layers_and_rejects_junk():
    fp = fingerprint({"q": [0.1, None, 0.3, float("nan"), 0.5]})
    c = curve(fp, "q")
    assert c.layers.tolist() == [0, 2, 4] and c.num_layers == 5
    assert c.positions.tolist() == [0.0, 0.5, 1.0]
    with pytest.raises(ForensicsError, match="not a number"):
        curve({"signals": {"q": {"values": [0.1, "x"]}}}, "q")
    with pytest.raises(ForensicsError, match="no 'values'"):
        curve({"signals": {"q": {}}}, "q")


# --- alignment -------------------------------------------------------------------------------------------------

def test_monotone_match_is_the_optimal_increasing_assignment():
    rng = np.random.default_rng(3)
    for _ in range(100):
        n = int(rng.integers(1, 6))
        m = int(rng.integers(n, 9))
        a, b = rng.standard_normal(n), rng.standard_normal(m)
        best = min(sum((a - b[list(c)]) ** 2) for c in itertools.combinations(range(m), n))
        idx = monotone_match(a, b)
        assert np.all(np.diff(idx) > 0)
        assert sum((a - b[idx]) ** 2) == pytest.approx(best)
    batch_a, batch_b = rng.standard_normal((20, 5)), rng.standard_normal((20, 8))
    batched = monotone_match(batch_a, batch_b)
    assert all((batched[i] == monotone_match(batch_a[i], batch_b[i])).all() for i in range(20))


def test_dtw_recovers_the_layers_a_pruned_child_kept():
    parent = curves_of(4)["q"]
    kept = [i for i in range(24) if i not in (3, 8, 9, 15, 20)]
    aligner = Aligner(as_curve(parent), as_curve(parent[kept]), "dtw")
    al = aligner.observed()
    assert al.method == "dtw"
    assert [s for s, _ in al.mapping] == kept
    assert pearson(al.x, al.y) == pytest.approx(1)


def test_interpolation_maps_first_to_first_and_last_to_last():
    a, b = as_curve(np.linspace(1, 2, 6)), as_curve(np.linspace(1, 2, 12))
    al = Aligner(a, b, "interp").observed()
    assert al.method == "interp" and len(al.x) == 6
    assert al.mapping[0] == [0.0, 0.0] and al.mapping[-1] == [5.0, 11.0]
    assert np.allclose(al.x, al.y)  # two samplings of one straight line


def test_equal_depth_is_layer_by_layer_on_common_layers():
    a = Curve(np.array([0, 1, 2, 3, 4]), np.arange(5.0), 6)
    b = Curve(np.array([1, 2, 3, 4, 5]), np.arange(5.0), 6)
    al = Aligner(a, b, "dtw").observed()
    assert al.method == "layerwise"
    assert al.mapping == [[1, 1], [2, 2], [3, 3], [4, 4]]


# --- similarity and the permutation test: known answers --------------------------------------------------------

def test_identical_curves_give_r_one_and_p_at_the_floor():
    c = as_curve(curves_of(5, n=32)["k"])  # 32 layers: 9 interior blocks, too many orders to enumerate
    res = perm(Aligner(c, c, "dtw"), NullCurves(c), 999, np.random.default_rng(0))
    assert res.statistic == pytest.approx(1)
    assert not res.exact and res.n_resamples == 999
    assert res.pvalue == pytest.approx(res.floor) and res.floor == pytest.approx(1 / 1000)


def test_reversed_curve_gives_negative_r_and_is_not_significant():
    rng = np.random.default_rng(6)
    c = as_curve(np.linspace(0.05, 0.03, 24) * (1 + detail(rng, 24)))  # falls with depth; its reverse rises
    rev = as_curve(c.raw[::-1])
    res = perm(Aligner(c, rev, "dtw"), NullCurves(rev), 999, np.random.default_rng(0))
    assert res.statistic < 0
    # The null keeps the (rising) trend of the reversed curve, so p only reflects how the layer detail of a curve
    # relates to its own mirror image: not significant, though not necessarily near 1.
    assert res.pvalue > 0.01


def test_short_curves_get_an_exact_test_with_an_honest_floor():
    c = as_curve(curves_of(7)["q"][:12])  # blocks of 2; layers 0-1 and 10-11 fixed; 4 interior blocks, 4! orders
    null = NullCurves(c)
    assert np.allclose(null.curves(null.index(np.arange(null.n_blocks))), c.raw)
    moved = null.curves(null.index(np.array([3, 2, 1, 0])))
    assert np.array_equal(moved[[0, 1, 10, 11]], c.raw[[0, 1, 10, 11]])
    res = perm(Aligner(c, c, "dtw"), null, 9999, np.random.default_rng(0))
    assert res.exact and res.n_resamples == 24
    assert res.pvalue == pytest.approx(1 / 24) and res.floor == pytest.approx(1 / 24)
    six = as_curve(c.raw[:6])  # one interior block: nothing to permute
    untestable = perm(Aligner(six, six, "dtw"), NullCurves(six), 999, np.random.default_rng(0))
    assert untestable.pvalue == 1 and untestable.floor == 1 and untestable.statistic == pytest.approx(1)


def test_signals_and_aggregates_share_null_draws():
    a, b = curves_of(20), curves_of(21)
    pairs = {r: (Aligner(as_curve(a[r]), as_curve(b[r]), "dtw"), NullCurves(as_curve(b[r]))) for r in "qkvo"}
    res = permutation_tests(pairs, {**{r: [r] for r in "qkvo"}, "qkvo": list("qkvo")}, 999,
                            np.random.default_rng(4))
    assert res["qkvo"].statistic == pytest.approx(np.mean([res[r].statistic for r in "qkvo"]))
    alone = perm(*pairs["k"], 999, np.random.default_rng(4))
    assert alone == res["k"]


def test_pvalues_of_independent_random_curves_are_roughly_uniform():
    rng = np.random.default_rng(10)
    ps = []
    for _ in range(200):
        a, b = as_curve(1 + detail(rng, 24, scale=0.1)), as_curve(1 + detail(rng, 24, scale=0.1))
        ps.append(perm(Aligner(a, b, "dtw"), NullCurves(b), 199, rng).pvalue)
    assert stats.kstest(ps, "uniform").pvalue > 0.001


@pytest.mark.parametrize("shape", ["early drop", "sine"])
def test_unrelated_curves_sharing_a_depth_trend_do_not_look_related(shape):
    """Independent detail around a common trend: a valid null must not reject more than alpha (p-values uniform or
    leaning to 1); a plain layer shuffle calls most such pairs related, which is why the null keeps the trend."""
    t = np.linspace(0, 1, 24)
    trend = family_trend(24) if shape == "early drop" else 0.04 * (1 + 0.3 * np.sin(3 * np.pi * t))
    rng = np.random.default_rng(11)
    ours, shuffle = [], []
    for _ in range(150):
        a = as_curve(trend * (1 + detail(rng, 24)))
        b = as_curve(trend * (1 + detail(rng, 24)))
        ours.append(perm(Aligner(a, b, "dtw"), NullCurves(b), 199, rng).pvalue)
        shuffle.append(stats.permutation_test((b.raw,), lambda y: pearson(a.raw, y), permutation_type="pairings",
                                              n_resamples=199, alternative="greater", rng=rng).pvalue)
    # One-sided: only p-values piling up near 0 (too many false positives) fail a valid test.
    assert stats.kstest(ours, "uniform", alternative="greater").pvalue > 0.001
    assert stats.binomtest(int(np.sum(np.array(ours) < 0.05)), len(ours), 0.05,
                           alternative="greater").pvalue > 0.001
    assert np.mean(np.array(shuffle) < 0.05) > 0.5


def test_a_noisy_copy_is_found_despite_the_shared_trend():
    rng = np.random.default_rng(12)
    hits = 0
    for _ in range(20):
        a = as_curve(family_trend(24) * (1 + detail(rng, 24)))
        child = as_curve(a.raw * (1 + detail(rng, 24, scale=0.02)))  # noise half the size of the detail
        hits += perm(Aligner(a, child, "dtw"), NullCurves(child), 199, rng).pvalue < 0.05
    assert hits >= 18


def test_bootstrap_interval_is_seeded_and_brackets_r():
    rng = np.random.default_rng(2)
    x = family_trend(24) * (1 + detail(rng, 24))
    y = x * (1 + detail(rng, 24, scale=0.02))
    r = float(pearson(x, y))
    one = block_bootstrap_ci([(x, y)], 999, 0.95, np.random.default_rng(5))
    two = block_bootstrap_ci([(x, y)], 999, 0.95, np.random.default_rng(5))
    assert one == two
    assert one.low <= r <= one.high and one.low < one.high <= 1
    same = block_bootstrap_ci([(x, x)], 199, 0.95, np.random.default_rng(5))
    assert same.low == pytest.approx(1) and same.high == pytest.approx(1)


def test_empirical_null_counts_the_candidate_as_one_more_member():
    res = empirical_null(0.5, [0.1, 0.5, 0.9])
    assert res.pvalue == pytest.approx(3 / 4)  # (1 + #{0.5, 0.9}) / (3 + 1)
    assert res.percentile == pytest.approx(100 / 3)
    assert res.floor == pytest.approx(1 / 4)
    top = empirical_null(0.99, list(np.linspace(0, 0.9, 99)))
    assert top.pvalue == pytest.approx(0.01) and top.pvalue == top.floor
    empty = empirical_null(0.99, [])
    assert empty.pvalue == 1 and empty.percentile is None
    assert empirical_null(0.5, [0.9, 0.1, 0.5]).values == (0.1, 0.5, 0.9)


# --- multiple testing and the verdict rule ---------------------------------------------------------------------

def test_reachability_matches_statsmodels_best_case():
    for method in ("holm", "bh"):
        for m in (1, 3, 10):
            n = min_null_size(0.05, m, method)
            assert adjust([1 / (n + 1)] * m, method)[0] < 0.05
            assert adjust([1 / n] * m, method)[0] >= 0.05
            for p in (1e-4, 0.3):
                assert best_adjusted(p, m, method) == pytest.approx(adjust([p] * m, method)[0])


def test_verdict_rule():
    ev = lambda p_perm, p_emp, n: PrimaryEvidence("qkvo", 0.99, p_perm, p_emp, n, 1e-4)  # noqa: E731
    out = decide({"derived": ev(1e-4, 0.004, 300), "trend_only": ev(1e-4, 0.4, 300), "flat": None,
                  "nothing": ev(0.3, 0.2, 300)}, 0.05, "holm")
    assert out["derived"]["verdict"] == DERIVED
    assert out["trend_only"]["verdict"] == NO_EVIDENCE  # rebuttal case: alike, but as alike as unrelated pairs
    assert out["flat"]["verdict"] == INCONCLUSIVE
    assert out["nothing"]["verdict"] == NO_EVIDENCE
    capped = decide({"c": ev(1e-4, 1 / 11, 10)}, 0.05, "holm")["c"]
    assert capped["verdict"] == INCONCLUSIVE and "capped" in capped["reasons"][0]
    # Nominally significant for each of 5 candidates, not after Holm across them.
    many = decide({f"c{i}": ev(1e-4, 0.02, 1000) for i in range(5)}, 0.05, "holm")
    assert {v["verdict"] for v in many.values()} == {INCONCLUSIVE}
    assert {v["verdict"] for v in decide({f"c{i}": ev(1e-4, 0.02, 1000) for i in range(5)}, 0.05,
                                         "bh").values()} == {DERIVED}


# --- compare_case ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def case():
    parent = curves_of(100)
    suspect = fingerprint({k: v * 1.07 for k, v in parent.items()}, "suspect")  # a rescaled copy
    candidates = {"parent": fingerprint(parent, "parent"), "stranger": fingerprint(curves_of(101), "stranger"),
                  "pruned": fingerprint({k: np.delete(v, [4, 10, 16]) for k, v in parent.items()}, "pruned")}
    controls = {f"c{i}": fingerprint(curves_of(200 + i), f"c{i}") for i in range(12)}
    return suspect, candidates, controls


@pytest.fixture(scope="module")
def result(case):
    return compare_case(*case, None, FAST)


def test_case_verdicts(result):
    verdicts = {name: c["verdict"]["verdict"] for name, c in result["candidates"].items()}
    assert verdicts == {"parent": DERIVED, "pruned": DERIVED, "stranger": NO_EVIDENCE}
    for c in result["candidates"].values():
        assert c["verdict"]["rule"] == result["verdict_rule"] and "never" in c["verdict"]["rule"]
        assert c["verdict"]["routes"]["std_curves"]["primary_signal"] == "qkvo"
        assert c["verdict"]["route"] == "std_curves"  # no neuron test and no spectra in these fingerprints


def test_case_reports_every_number(result):
    sig = result["candidates"]["stranger"]["signals"]
    q = sig["q"]
    assert q["status"] == "compared" and q["alignment"]["method"] == "layerwise"
    # 24 layers: blocks of 3, 6 interior blocks, all 720 orders enumerated.
    assert q["permutation"]["n_resamples"] == 720 and q["permutation"]["floor"] == pytest.approx(1 / 720)
    assert q["confidence_interval"]["low"] <= q["statistic"] <= q["confidence_interval"]["high"]
    assert q["empirical_null"]["n_null"] == math.comb(12, 2) + 4 * 12
    assert q["pvalue_adjusted"] >= q["permutation"]["pvalue"]
    assert -1 <= q["spearman"] <= 1 and q["scale"]["ratio_median"] > 0
    qkvo = sig["qkvo"]
    assert sorted(qkvo["roles"]) == ["k", "o", "q", "v"]
    assert qkvo["statistic"] == pytest.approx(np.mean([sig[r]["statistic"] for r in "qkvo"]))
    assert result["multitest"]["m"] == sum(
        e["status"] == "compared" for c in result["candidates"].values() for e in c["signals"].values())
    pruned = result["candidates"]["pruned"]["signals"]["q"]["alignment"]
    assert pruned["method"] == "dtw" and "interp" in pruned["alternatives"]
    assert [s for s, _ in pruned["mapping"]] == [i for i in range(24) if i not in (4, 10, 16)]
    assert result["curves"]["suspect"]["q"]["raw"] == pytest.approx(list(curves_of(100)["q"] * 1.07))


def test_results_are_byte_identical_and_independent_of_candidate_order(case, result):
    suspect, candidates, controls = case
    again = compare_case(suspect, dict(reversed(list(candidates.items()))), controls, None, FAST)
    assert to_json(again) == to_json(result)
    json.loads(to_json(result))
    other_seed = compare_case(suspect, candidates, controls, None, Settings(n_permutations=999, n_bootstrap=199,
                                                                            seed=1))
    assert to_json(other_seed) != to_json(result)


def test_interpolation_is_used_when_asked(case):
    suspect, candidates, _ = case
    res = compare_case(suspect, {"pruned": candidates["pruned"]}, None, None,
                       Settings(n_permutations=99, n_bootstrap=99, alignment="interp"))
    q = res["candidates"]["pruned"]["signals"]["q"]
    assert q["alignment"]["method"] == "interp" and "dtw" in q["alignment"]["alternatives"]


def test_without_enough_unrelated_pairs_the_verdict_is_capped(case):
    suspect, candidates, controls = case
    few = dict(list(controls.items())[:2])
    res = compare_case(suspect, {"parent": candidates["parent"]}, few, None, FAST)
    v = res["candidates"]["parent"]["verdict"]
    std = v["routes"]["std_curves"]
    assert v["verdict"] == INCONCLUSIVE and std["n_null"] == 1 + 2 * 2 and std["role"] == "cannot reach alpha"
    assert any("capped" in r for r in std["reasons"]) and any("std curves could not look" in r for r in v["reasons"])


def test_the_longer_curve_is_the_one_permuted():
    parent = curves_of(40)
    short = {k: np.delete(v, [4, 9, 13, 18]) for k, v in parent.items()}
    long_fp, short_fp = fingerprint(parent, "long"), fingerprint(short, "short")
    controls = {f"c{i}": fingerprint(curves_of(400 + i), f"c{i}") for i in range(8)}
    as_suspect = compare_case(long_fp, {"short": short_fp}, controls, None, FAST)["candidates"]["short"]
    as_candidate = compare_case(short_fp, {"long": long_fp}, controls, None, FAST)["candidates"]["long"]
    kept = [i for i in range(24) if i not in (4, 9, 13, 18)]
    for res, moved, parent_side in ((as_suspect, "suspect", 0), (as_candidate, "candidate", 1)):
        perm = res["signals"]["qkvo"]["permutation"]
        assert perm["permuted"] == moved and perm["n_resamples"] == 720  # the 24-layer curve: 6! orders
        assert [pair[parent_side] for pair in res["signals"]["q"]["alignment"]["mapping"]] == kept
        assert res["verdict"]["verdict"] == DERIVED
    assert as_suspect["signals"]["q"]["statistic"] == pytest.approx(as_candidate["signals"]["q"]["statistic"])


def test_flat_signals_are_reported_and_not_compared():
    rng = np.random.default_rng(9)
    flat = {r: (1 / math.sqrt(640)) * (1 + 2e-4 * rng.standard_normal(18)) for r in ("q", "k", "v", "o")}
    res = compare_case(fingerprint(flat, "a"), {"b": fingerprint(flat, "b")}, None, None, FAST)
    cand = res["candidates"]["b"]
    assert all(cand["signals"][r]["status"] == "flat" for r in "qkvo")
    assert all(cand["signals"][r]["variation"]["suspect"]["flat"] for r in "qkvo")
    assert cand["signals"]["q"]["reason"].startswith("uninformative")
    assert "qkvo" not in cand["signals"]
    assert cand["verdict"]["verdict"] == INCONCLUSIVE and res["multitest"]["m"] == 0


def test_dense_ffn_is_compared_with_the_experts_of_an_upcycled_child():
    dense = curves_of(30)
    moe = {("expert_" + k if k in ("gate", "up", "down") else k): v for k, v in dense.items()}
    res = compare_case(fingerprint(moe, "moe"), {"dense": fingerprint(dense, "dense")}, None, None, FAST)
    sig = res["candidates"]["dense"]["signals"]
    assert sig["expert_up~up"]["statistic"] == pytest.approx(1)
    assert sorted(sig["ffn"]["roles"]) == ["expert_down~down", "expert_gate~gate", "expert_up~up"]


def test_panel_copy_of_a_candidate_is_left_out_and_a_control_copy_is_an_error(case):
    suspect, candidates, controls = case
    shared = [{"path": "model.safetensors", "size": 1, "sha256": "ab" * 32}]
    cand = dict(candidates["stranger"], model={**candidates["stranger"]["model"], "files": shared})
    panel = [fingerprint(curves_of(300), "p0"), dict(cand, model={**cand["model"], "path": "copy"})]
    res = compare_case(suspect, {"stranger": cand}, None, panel, Settings(n_permutations=99, n_bootstrap=99))
    assert res["null"]["members"] == ["panel:p0"]
    assert res["null"]["excluded"][0]["name"] == "panel:copy"
    with pytest.raises(ForensicsError, match="cannot be unrelated to itself"):
        compare_case(suspect, {"stranger": cand}, {"copy": panel[1]}, None, FAST)


def test_measured_false_positive_rate_is_carried_into_the_verdict(case):
    suspect, candidates, _ = case
    table = {"design": {"summary": "test"}, "rule": {"0.05": {"rate": 0.01, "hits": 1, "n": 100}}}
    s = Settings(n_permutations=99, n_bootstrap=99, calibration=table)
    res = compare_case(suspect, {"parent": candidates["parent"]}, None, None, s)
    fpr = res["candidates"]["parent"]["verdict"]["measured_false_positive_rate"]
    assert fpr["rate"] == 0.01 and fpr["alpha"] == 0.05 and fpr["design"] == "test"
    s01 = Settings(n_permutations=99, n_bootstrap=99, calibration=table, alpha=0.01)
    assert compare_case(suspect, {"parent": candidates["parent"]}, None, None, s01)[
        "measured_false_positive_rate"] is None


def test_user_errors_are_forensics_errors(case):
    suspect, candidates, _ = case
    with pytest.raises(ForensicsError, match="no 'signals'"):
        compare_case(suspect, {"x": {"model": {"path": "x.json"}}})
    with pytest.raises(ForensicsError, match="no candidate"):
        compare_case(suspect, {})
    with pytest.raises(ForensicsError, match="cannot be used"):
        compare_case(suspect, {"suspect": candidates["parent"]})
    with pytest.raises(ForensicsError, match="alpha"):
        Settings(alpha=1.5)
    with pytest.raises(ForensicsError, match="multitest"):
        Settings(multitest="bonferroni")


def test_load_calibration_table(tmp_path):
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"rule": {"0.05": {"rate": 0.0}}}))
    assert load_table(table)["rule"]["0.05"]["rate"] == 0.0
    table.write_text("{")
    with pytest.raises(ForensicsError, match="cannot read"):
        load_table(table)
    with pytest.raises(ForensicsError, match="not found"):
        load_table(tmp_path / "missing.json")


def test_load_panel(tmp_path, case):
    suspect = case[0]
    (tmp_path / "b.json").write_text(json.dumps(dict(suspect, model={**suspect["model"], "path": "b"})))
    (tmp_path / "a.json").write_text(json.dumps(dict(suspect, model={**suspect["model"], "path": "a"})))
    (tmp_path / "notes.txt").write_text("not a fingerprint")
    assert [fp["model"]["path"] for fp in load_panel(tmp_path)] == ["a", "b"]
    (tmp_path / "c.json").write_text("{")
    with pytest.raises(ForensicsError, match="cannot read"):
        load_panel(tmp_path)
    with pytest.raises(ForensicsError, match="not found"):
        load_panel(tmp_path / "missing")


# --- the one verdict (stats/decision.py) -------------------------------------------------------------------------

def _routes(neurons=None, spectra=None, std=None):
    from forensics.stats.decision import Route

    def r(name, pf):
        return Route(name, "test", ((pf,),) if pf else ())
    return {"neurons": r("neurons", neurons), "attention_spectra": r("attention_spectra", spectra),
            "std_curves": r("std_curves", std)}


def test_decision_takes_the_first_route_that_can_reach_alpha():
    from forensics.stats.decision import decide

    # neurons applies and can reach 0.01 (floor 1/1000): it decides, the others only support or not
    v = decide({"c": _routes(neurons=(0.001, 0.001), spectra=(0.5, 1e-4), std=(0.003, 1e-4))}, 0.01, "holm")["c"]
    assert (v["verdict"], v["route"]) == ("DERIVED", "neurons")
    assert v["routes"]["std_curves"]["role"] == "supports" and v["routes"]["attention_spectra"]["role"] == \
        "does not support"
    # T = 19: neurons cannot reach 0.01, so the next applicable route decides
    v = decide({"c": _routes(neurons=(0.05, 0.05), std=(0.003, 1e-4))}, 0.01, "holm")["c"]
    assert (v["verdict"], v["route"]) == ("DERIVED", "std_curves") and v["routes"]["neurons"]["role"] == \
        "cannot reach alpha"


def test_no_evidence_only_when_every_route_that_could_look_found_nothing():
    from forensics.stats.decision import decide

    # The case of issue #11: std curves redrawn (p = 0.6), the invariant spectra at their floor. The spectra decide
    # here (neurons not applicable); had the std curves decided, the spectra's p would still forbid NO EVIDENCE.
    v = decide({"c": _routes(spectra=(1e-4, 1e-4), std=(0.6, 1e-4))}, 0.01, "holm")["c"]
    assert v["verdict"] == "DERIVED" and v["route"] == "attention_spectra"
    v = decide({"c": _routes(neurons=(0.2, 0.001), spectra=(0.004, 0.004), std=(0.6, 1e-4))}, 0.01, "holm")["c"]
    assert v["verdict"] == "INCONCLUSIVE" and any("attention spectra sees something" in r for r in v["reasons"])
    v = decide({"c": _routes(neurons=(0.2, 0.001), spectra=(0.3, 0.004), std=(0.6, 1e-4))}, 0.01, "holm")["c"]
    assert v["verdict"] == "NO EVIDENCE"
    # a route that could not look (p above alpha only because its floor is): never NO EVIDENCE
    v = decide({"c": _routes(neurons=(0.5, 0.05), std=(0.9, 1e-4))}, 0.01, "holm")["c"]
    assert v["verdict"] == "INCONCLUSIVE" and v["routes"]["neurons"]["role"] == "cannot reach alpha"
    # none can decide, but each one looked and found nothing: NO EVIDENCE (the demo's Gemma3 against SmolLM2)
    from forensics.stats.decision import Route
    iut = Route("std_curves", "test", (((0.9, 1e-4), (0.5, 0.2)),))
    v = decide({"c": {**_routes(), "std_curves": iut}}, 0.01, "holm")["c"]
    assert v["verdict"] == "NO EVIDENCE" and v["route"] is None


def test_decision_adjusts_across_candidates():
    from forensics.stats.decision import decide

    both = decide({"a": _routes(neurons=(0.004, 0.001)), "b": _routes(neurons=(0.5, 0.001))}, 0.01, "holm")
    assert both["a"]["pvalue_adjusted"] == pytest.approx(0.008) and both["a"]["verdict"] == "DERIVED"
    # floor 1/200 cannot reach 0.01 after Holm over two candidates: neurons may not decide
    capped = decide({"a": _routes(neurons=(0.005, 0.005)), "b": _routes(neurons=(0.5, 0.005))}, 0.01, "holm")
    assert capped["a"]["route"] is None and capped["a"]["verdict"] == "INCONCLUSIVE"
