"""Permutation test of a similarity whose null keeps what unrelated models share: depth trend and boundary layers.

Unrelated models of one family share a depth trend (std falls, or rises, with depth), so a plain shuffle of layers
calls them related: on real weights MiniLM vs multilingual-e5-small reach r = 0.69 and a shuffle test gives
p = 0.0005. Besides the trend they share what the architecture does to the layers next to the embedding and next to
the output head. What lineage adds on top is the layer-to-layer detail of the interior, so the null here is

    curve* = boundary layers as they are + interior trend + interior residuals moved in blocks.

Exactly what is permuted, on one model's own curve (native depth, present layers, n of them):

* blocks of b = round(n^(1/3)) consecutive layers (the usual block-length rate; short-range autocorrelation along
  depth travels inside its block);
* the first b and the last b layers (the boundary zones) never move and keep their values;
* on the interior layers a least-squares polynomial in relative depth is the trend (degree 6: an early drop, a
  mid-depth bump and a late rise at once; at most half the interior's length minus one for short curves) and stays
  where it is; the interior residuals are cut into blocks of b layers and the blocks are put in a random order.

The other curve is not touched. Which one moves depends on the lengths only (the longer, which has more orders to
draw; the candidate's when they are equal), so the choice does not look at the values. Every null curve is aligned
exactly like the observed one (for DTW the alignment is searched again) and its r computed. The observed order is one
of the arrangements, so under "interior residual blocks exchangeable and independent of the other curve" the test is
exact. scipy.stats.permutation_test draws the block orders ('pairings' over the interior block ids), enumerates them
all when there are no more than n_resamples, and applies the +1 correction: the smallest p is 1/(T+1), or 1/k! for k
interior blocks when enumerated. A curve with fewer than two interior blocks (n < 8) cannot be tested (p = 1).
docs/calibration.md shows how this null behaves on independently trained models of one recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.polynomial import Polynomial
from scipy import stats

from forensics.stats.align import Aligner
from forensics.stats.normalise import Curve
from forensics.stats.similarity import pearson

TREND_DEGREE = 6
# DTW table cells (float64 costs plus int back-pointers) held at once per pair: about 100 MB at most.
DTW_CELLS = 4_000_000


def block_length(n: int) -> int:
    return max(1, round(n ** (1 / 3)))


def trend_degree(n: int, max_degree: int = TREND_DEGREE) -> int:
    """At most n/2 - 1, so that at least half of a short interior's variation is left free to permute."""
    return max(0, min(max_degree, n // 2 - 1))


class NullCurves:
    """Null versions of candidate curve `b`: boundary zones fixed, interior trend plus residual blocks reordered."""

    def __init__(self, b: Curve, max_degree: int = TREND_DEGREE):
        n = len(b.raw)
        self.n = n
        self.block = block_length(n)
        interior = np.arange(self.block, max(n - self.block, self.block))
        self.n_blocks = math.ceil(len(interior) / self.block)
        self.degree = trend_degree(len(interior), max_degree)
        self.trend = b.raw.copy()
        if len(interior):
            fit = Polynomial.fit(b.positions[interior], b.raw[interior], self.degree)
            self.trend[interior] = fit(b.positions[interior])
        self.resid = b.raw - self.trend  # zero on the boundary zones
        padded = np.full(self.n_blocks * self.block, -1)
        padded[:len(interior)] = interior
        self.blocks = padded.reshape(self.n_blocks, self.block)
        self.interior = interior

    def index(self, order: np.ndarray) -> np.ndarray:
        """Where each interior layer takes its residual from, for interior block orders (..., n_blocks).

        Depends only on the curve's length, so curves of one length share it."""
        idx = self.blocks[order].reshape(*order.shape[:-1], -1)
        # The last interior block may be short; its padding (-1) is dropped, leaving the interior's length.
        return idx[idx >= 0].reshape(*order.shape[:-1], len(self.interior))

    def curves(self, index: np.ndarray) -> np.ndarray:
        """Null curves (..., n) for `index` from `index()`; the identity order gives back the observed curve."""
        out = np.broadcast_to(self.trend, index.shape[:-1] + (self.n,)).copy()
        out[..., self.interior] += self.resid[index]
        return out


@dataclass(frozen=True)
class PermutationResult:
    statistic: float
    pvalue: float
    n_resamples: int  # T: arrangements evaluated (all of them when exact)
    floor: float  # the smallest p the test can give: 1/(T+1), or 1/T when exact
    exact: bool
    block_length: int
    trend_degree: int
    permuted: str  # whose curve the null moves: "candidate" or "suspect"

    def as_dict(self) -> dict:
        return {
            "statistic": self.statistic, "pvalue": self.pvalue, "n_resamples": self.n_resamples,
            "floor": self.floor, "exact": self.exact, "block_length": self.block_length,
            "trend_degree": self.trend_degree, "permuted": self.permuted, "alternative": "greater",
            "null": f"{self.permuted} curve: boundary blocks fixed, interior depth trend kept, interior residual "
                    f"blocks permuted; alignment redone per null curve",
        }


def permutation_tests(pairs: dict[str, tuple[Aligner, NullCurves]], columns: dict[str, list[str]],
                      n_resamples: int, rng: np.random.Generator,
                      permuted: str = "candidate") -> dict[str, PermutationResult]:
    """One test per column: the mean r over the column's pairs (one pair: a signal; several: an aggregate such as
    Q/K/V/O), all columns from the same null draws.

    Every pair must have a candidate curve of the same length, so that one interior block order applies to all of
    them: a model's signals are moved together, which keeps their dependence in the null, and each signal's r is
    computed once per draw however many aggregates use it.
    """
    names = list(pairs)
    first = pairs[names[0]][1]
    if any(null.n != first.n for _, null in pairs.values()):
        raise ValueError("signals of different lengths cannot share block orders")
    where = {name: i for i, name in enumerate(names)}
    members = [[where[name] for name in column] for column in columns.values()]

    def statistic(order: np.ndarray, axis: int = -1) -> np.ndarray:
        index = first.index(order)
        r = np.stack([pearson(*aligner.pairs(null.curves(index))) for aligner, null in pairs.values()], axis=-1)
        return np.stack([r[..., idx].mean(axis=-1) for idx in members], axis=-1)

    ids = np.arange(first.n_blocks)
    if first.n_blocks < 2:
        # Nothing to permute: the only arrangement is the observed one.
        observed, pvalues, t, exact = statistic(ids), np.ones(len(columns)), 1, True
    else:
        cells = max(aligner.dtw_cells for aligner, _ in pairs.values())
        batch = max(1, DTW_CELLS // cells) if cells else None
        res = stats.permutation_test((ids,), statistic, permutation_type="pairings", vectorized=True,
                                     n_resamples=n_resamples, alternative="greater", rng=rng, batch=batch)
        observed, pvalues = res.statistic, res.pvalue
        t = len(res.null_distribution)
        exact = math.factorial(first.n_blocks) <= n_resamples
    floor = 1 / t if exact else 1 / (t + 1)
    return {name: PermutationResult(statistic=float(observed[k]), pvalue=float(pvalues[k]), n_resamples=t,
                                    floor=floor, exact=exact, block_length=first.block, trend_degree=first.degree,
                                    permuted=permuted)
            for k, name in enumerate(columns)}
