"""Moving-block bootstrap confidence interval for r (or for the mean r of an aggregate) over aligned layers.

Layers are not independent draws (neighbouring layers are alike), so resampling single layers would understate the
spread. A moving-block bootstrap (Kuensch 1989) resamples runs of b = round(n^(1/3)) consecutive aligned layers:
ceil(n/b) block starts drawn with replacement from the n - b + 1 possible ones, concatenated and cut to n.

scipy.stats.bootstrap does the drawing, batching and percentiles: its data are the possible block starts, which it
resamples with replacement (n - b + 1 of them per draw); the statistic keeps the first ceil(n/b), which is itself an
i.i.d. draw of block starts. The percentile method is used because BCa's jackknife and the basic interval would
evaluate the statistic on the list of starts itself, which is not a resample of the curve. The same block starts
serve every role of an aggregate, so the dependence between roles stays in the interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from forensics.stats.permutation import block_length
from forensics.stats.similarity import pearson


@dataclass(frozen=True)
class BootstrapResult:
    low: float
    high: float
    level: float
    standard_error: float
    n_resamples: int
    block_length: int

    def as_dict(self) -> dict:
        return {"low": self.low, "high": self.high, "level": self.level, "standard_error": self.standard_error,
                "n_resamples": self.n_resamples, "block_length": self.block_length,
                "method": "moving-block bootstrap over aligned layers, percentile interval"}


def block_bootstrap_ci(pairs: list[tuple[np.ndarray, np.ndarray]], n_resamples: int, level: float,
                       rng: np.random.Generator) -> BootstrapResult:
    """CI of the mean Pearson r over `pairs` of aligned (suspect, candidate) curves of one common length."""
    n = len(pairs[0][0])
    b = block_length(n)
    k = math.ceil(n / b)
    offsets = np.arange(b)

    def statistic(starts: np.ndarray, axis: int = -1) -> np.ndarray:
        idx = (starts[..., :k, None] + offsets).reshape(*starts.shape[:-1], k * b)[..., :n]
        with np.errstate(invalid="ignore", divide="ignore"):  # a resample of one repeated block can be constant
            return np.mean([pearson(x[idx], y[idx]) for x, y in pairs], axis=0)

    res = stats.bootstrap((np.arange(n - b + 1),), statistic, vectorized=True, n_resamples=n_resamples,
                          confidence_level=level, method="percentile", rng=rng)
    ci = res.confidence_interval
    return BootstrapResult(low=float(ci.low), high=float(ci.high), level=level,
                           standard_error=float(res.standard_error), n_resamples=n_resamples, block_length=b)
