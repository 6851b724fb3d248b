"""The scan's screen against numpy oracles (float64), and the adjustment that counts screened-out references."""

from __future__ import annotations

import numpy as np

from forensics.stats.multitest import adjust
from forensics.stats.screen import SIGNALS, screen, statistics


def fingerprint(rng: np.random.Generator, layers: int, missing: str | None = None) -> dict:
    signals = {s: {"values": list(rng.normal(1.0, 0.3, layers))} for s in SIGNALS if s != missing}
    return {"signals": signals}


def oracle_r(a: list[float], b: list[float]) -> float:
    """np.interp of the deeper curve at the shallower one's relative depths, then np.corrcoef."""
    a, b = np.asarray(a), np.asarray(b)
    if len(a) > len(b):
        a = np.interp(np.linspace(0, 1, len(b)), np.linspace(0, 1, len(a)), a)
    elif len(b) > len(a):
        b = np.interp(np.linspace(0, 1, len(a)), np.linspace(0, 1, len(b)), b)
    return float(np.corrcoef(a, b)[0, 1])


def test_statistic_is_the_mean_scaled_fisher_z_over_the_roles_both_have():
    rng = np.random.default_rng(0)
    suspect = fingerprint(rng, 24)
    refs = [fingerprint(rng, n, missing) for n, missing in ((24, None), (30, None), (12, "v"), (24, "q"), (7, None))]
    got, got_r = statistics([suspect] * len(refs), refs)
    for ref, value, mean_r in zip(refs, got, got_r):
        shared = [s for s in SIGNALS if s in ref["signals"]]
        rs = [oracle_r(suspect["signals"][s]["values"], ref["signals"][s]["values"]) for s in shared]
        points = min(24, len(ref["signals"][shared[0]]["values"]))
        assert abs(mean_r - np.mean(rs)) < 1e-12
        assert abs(value - np.mean(np.arctanh(rs)) * np.sqrt(points - 3)) < 1e-9


def test_empirical_p_and_order_against_an_oracle():
    rng = np.random.default_rng(1)
    suspect = fingerprint(rng, 16)
    refs = [fingerprint(rng, 16) for _ in range(20)] + [{"signals": {}}]
    refs[3] = {"signals": {s: {"values": list(np.asarray(v["values"]) * 2 + 1)} for s, v in suspect["signals"].items()}}
    null = [(fingerprint(rng, 16), fingerprint(rng, 20)) for _ in range(50)]
    got = screen(suspect, refs, null)
    null_z = statistics([a for a, _ in null], [b for _, b in null])[0]
    for i, z in enumerate(got.statistic[:-1]):
        assert got.pvalue[i] == (1 + np.sum(null_z >= z)) / (len(null_z) + 1)
    assert np.isnan(got.statistic[-1]) and got.pvalue[-1] == 1.0 and got.n_null == 50
    assert abs(got.r[3] - 1.0) < 1e-12 and got.pvalue[3] == 1 / 51
    names = [f"r{i:02d}" for i in range(len(refs))]
    order = got.order(names)
    assert order[0] == 3 and order[-1] == len(refs) - 1
    assert list(got.statistic[order[:-1]]) == sorted(got.statistic[:-1], reverse=True)


def test_screened_out_references_count_at_p_one():
    ps = [0.001, 0.02, 0.3]
    assert adjust(ps, "holm", untested=7) == adjust(ps + [1.0] * 7, "holm")[:3]
    assert adjust([0.001], "holm", untested=9) == [0.01]
    assert adjust(ps, "bh", untested=7) == adjust(ps + [1.0] * 7, "bh")[:3]
