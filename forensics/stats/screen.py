"""A scan's first pass: the suspect against every reference of a registry at once.

Screening ranks references so that the full verdict rule (permutation tests, bootstrap intervals, neuron matching)
runs on the few that matter; it decides nothing. It reads the primary curves of the std route: per attention role
(q, k, v, o), the Pearson r between the two models' per-layer std curves (docs/statistics.md), computed for all
references with one interpolation and one product per group of equal depths: no Python loop over references. Depths
differ: the deeper curve is linearly interpolated at the relative depths of the shallower one's layers
(stats/align.py's `interp`). A short curve correlates highly by chance (a 6-layer reference against anything), so
the ranking statistic is each r's Fisher z scaled by its number of points, atanh(r) * sqrt(n - 3), averaged over the
roles; its empirical p is the share of the registry's unrelated pairs whose statistic reaches the reference's,
(1 + #{null >= z}) / (n_null + 1). The mean r is reported beside it.

References screened out keep p = 1 in every adjustment of the full rule (`Settings.untested`), so the family-wise
error of the verdicts is that of the rule over all references scanned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from forensics.stats.align import interp_matrix
from forensics.stats.normalise import zscore

SIGNALS = ("q", "k", "v", "o")


@dataclass(frozen=True)
class Screen:
    """Per reference (in the order given): the screening statistic (NaN when the pair shares no complete curve of
    SIGNALS), the mean r beside it, the statistic's empirical p, and the number of null pairs behind it."""

    statistic: np.ndarray
    r: np.ndarray
    pvalue: np.ndarray
    n_null: int

    def order(self, names: list[str]) -> list[int]:
        """Indices of the references by decreasing statistic (no statistic last), ties by name."""
        key = np.where(np.isnan(self.statistic), -np.inf, self.statistic)
        return sorted(range(len(names)), key=lambda i: (-key[i], names[i]))


def curve_values(fp: dict, signal: str) -> np.ndarray | None:
    """The signal's per-layer values when every layer has a finite one (a screen compares whole curves)."""
    entry = fp.get("signals", {}).get(signal)
    values = entry.get("values") if isinstance(entry, dict) else None
    if not isinstance(values, list) or len(values) < 4:
        return None
    if any(v is None or isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        return None
    out = np.asarray(values, dtype=np.float64)
    return out if np.isfinite(out).all() and out.std() > 0 else None


def paired_r(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of row i of x (n, la) with row i of y (n, lb), the deeper side interpolated onto the shallower's
    relative depths."""
    la, lb = x.shape[1], y.shape[1]
    if la > lb:
        x = x @ interp_matrix(np.linspace(0, 1, lb), np.linspace(0, 1, la)).T
    elif lb > la:
        y = y @ interp_matrix(np.linspace(0, 1, la), np.linspace(0, 1, lb)).T
    return np.clip((zscore(x) * zscore(y)).mean(axis=1), -1.0, 1.0)


def statistics(left: list[dict], right: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """The screening statistic and the mean r of each pair (left[i], right[i]) of fingerprints, over the SIGNALS
    both have, computed per signal and per pair of depths in one batch."""
    n = len(left)
    total, total_r, count = np.zeros(n), np.zeros(n), np.zeros(n)
    for signal in SIGNALS:
        a = [curve_values(fp, signal) for fp in left]
        b = [curve_values(fp, signal) for fp in right]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (u, v) in enumerate(zip(a, b)):
            if u is not None and v is not None:
                groups.setdefault((len(u), len(v)), []).append(i)
        for idx in groups.values():
            la, lb = len(a[idx[0]]), len(b[idx[0]])
            r = paired_r(np.stack([a[i] for i in idx]), np.stack([b[i] for i in idx]))
            total[idx] += np.arctanh(np.clip(r, -1 + 1e-12, 1 - 1e-12)) * np.sqrt(max(min(la, lb) - 3, 1))
            total_r[idx] += r
            count[idx] += 1
    shared = count > 0
    return (np.where(shared, total / np.maximum(count, 1), np.nan),
            np.where(shared, total_r / np.maximum(count, 1), np.nan))


def screen(suspect: dict, references: list[dict], null: list[tuple[dict, dict]]) -> Screen:
    """Screen the suspect's fingerprint against `references`, with `null` pairs of unrelated fingerprints."""
    observed, r = statistics([suspect] * len(references), references)
    null_stats = statistics([a for a, _ in null], [b for _, b in null])[0] if null else np.zeros(0)
    null_stats = np.sort(null_stats[~np.isnan(null_stats)])
    n = len(null_stats)
    reach = n - np.searchsorted(null_stats, np.nan_to_num(observed, nan=np.inf), side="left")
    pvalue = np.where(np.isnan(observed), 1.0, (1 + reach) / (n + 1))
    return Screen(observed, r, pvalue, n)
