"""Multiple testing across candidates x signals, via statsmodels: Holm (family-wise error) by default, Benjamini-
Hochberg (false discovery rate) as an option."""

from __future__ import annotations

import math

import numpy as np
from statsmodels.stats.multitest import multipletests

METHODS = {"holm": "holm", "bh": "fdr_bh"}
NAMES = {"holm": "Holm (family-wise error rate)", "bh": "Benjamini-Hochberg (false discovery rate)"}


def adjust(pvalues: list[float], method: str, untested: int = 0) -> list[float]:
    """Adjusted p-values; `untested` more hypotheses of the same family (screened out before testing) count at
    p = 1, which is valid for any of them and makes the adjustment that of the whole family."""
    if untested and pvalues:
        return adjust(list(pvalues) + [1.0] * untested, method)[:len(pvalues)]
    if len(pvalues) < 2:
        # Nothing to adjust; and statsmodels' Holm runs a full gc.collect() per call, which is slow in a big process.
        return [float(p) for p in pvalues]
    return [float(p) for p in multipletests(np.asarray(pvalues, dtype=np.float64), method=METHODS[method])[1]]


def best_adjusted(p: float, n_tests: int, method: str) -> float:
    """The smallest adjusted value a raw p can get among `n_tests`: Holm multiplies the smallest p by n_tests; BH
    leaves it unchanged when every test sits at that p. Used to tell whether a test can reach alpha at all."""
    return min(1.0, p * n_tests) if method == "holm" else p


def min_null_size(alpha: float, n_tests: int, method: str) -> int:
    """Smallest empirical null (n pairs, floor 1/(n+1)) whose floor can be significant after adjustment."""
    factor = n_tests if method == "holm" else 1
    return math.floor(factor / alpha)
