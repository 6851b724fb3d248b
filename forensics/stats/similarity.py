"""Similarity of two aligned curves: Pearson r on z-scored curves (the original's number) and Spearman's rho.

Pearson r is invariant to z-scoring each curve, so r of the raw aligned values is r of the z-scored curves; it is
computed here vectorised over any leading axes because the permutation test evaluates it for thousands of null
curves at once. The Q/K/V/O aggregate is the mean of the four roles' r, as the original reported it.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

QKVO = ("q", "k", "v", "o")
# Pre-specified aggregates; "ffn" reads the experts' mean std where a model has experts instead of a dense FFN.
AGGREGATES = {"qkvo": QKVO, "ffn": ("gate", "up", "down")}


def pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r along the last axis, broadcasting leading axes; clipped to [-1, 1] against rounding."""
    # Each side is centred at its own shape, so a fixed curve against a batch is centred once, not per row.
    xc = np.asarray(x, dtype=np.float64)
    yc = np.asarray(y, dtype=np.float64)
    xc = xc - xc.mean(axis=-1, keepdims=True)
    yc = yc - yc.mean(axis=-1, keepdims=True)
    dot = np.einsum("...i,...i->...", xc, yc)
    r = dot / np.sqrt(np.einsum("...i,...i->...", xc, xc) * np.einsum("...i,...i->...", yc, yc))
    return np.clip(r, -1.0, 1.0)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho only: its textbook p-value assumes independent layers, which depth autocorrelation breaks."""
    return float(stats.spearmanr(x, y).statistic)
