"""Per-layer curves out of a fingerprint: raw values, z-scores across layers, and the variation check.

The original analysis compares "normalised std" curves, i.e. each curve z-scored across layers. z-scoring throws
away the absolute scale (which is kept here as `raw`, because scale is evidence too) and, worse, blows any curve up
to unit variance: a curve that is flat to four decimals (Gemma3-270m: every layer's std is 1/sqrt(640) with a
coefficient of variation of 0.01-0.03 %) becomes a full-scale curve of rounding noise. Such a curve is flagged
`flat` and never compared. See docs/statistics.md for the threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from forensics.errors import ForensicsError

# Coefficient of variation (std / mean across layers) below which a curve is "flat": 0.1 %. Three to ten times the
# Gemma3-270m case above, and more than an order of magnitude below the depth variation of trained weights (3-54 % on
# the calibration models; docs/statistics.md). Every CV is in the output, so an analyst sees how close a curve was.
FLAT_CV = 1e-3


@dataclass(frozen=True)
class Curve:
    """The present (non-null, finite) layers of one signal of one model."""

    layers: np.ndarray  # int64 layer indices, increasing
    raw: np.ndarray  # float64 values at those layers
    num_layers: int  # length of the fingerprint's `values` list (absent layers included)

    @property
    def positions(self) -> np.ndarray:
        """Relative depth in [0, 1]: the first layer maps to 0 and the last to 1 whatever the model's depth."""
        return self.layers / max(self.num_layers - 1, 1)


@dataclass(frozen=True)
class VariationCheck:
    cv: float  # std / |mean| across the present layers (0 for a constant curve)
    threshold: float
    flat: bool

    def as_dict(self) -> dict:
        return {"cv": self.cv, "threshold": self.threshold, "flat": self.flat}


def model_label(fp: dict) -> str | None:
    model = fp.get("model") if isinstance(fp, dict) else None
    return model.get("path") if isinstance(model, dict) else None


def signal_names(fp: dict) -> list[str]:
    signals = fp.get("signals") if isinstance(fp, dict) else None
    if not isinstance(signals, dict):
        raise ForensicsError(model_label(fp), "fingerprint has no 'signals' object (docs/fingerprint-format.md)")
    return sorted(signals)


def curve(fp: dict, name: str) -> Curve:
    """The curve of signal `name`; NaN/Inf entries count as absent (the fingerprint records them under nonfinite)."""
    entry = fp["signals"].get(name)
    values = entry.get("values") if isinstance(entry, dict) else None
    if not isinstance(values, list):
        raise ForensicsError(model_label(fp), f"signal {name!r} has no 'values' list")
    layers, raw = [], []
    for i, v in enumerate(values):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ForensicsError(model_label(fp), f"signal {name!r} layer {i}: {v!r} is not a number or null")
        if math.isfinite(v):
            layers.append(i)
            raw.append(float(v))
    return Curve(np.asarray(layers, dtype=np.int64), np.asarray(raw, dtype=np.float64), len(values))


def zscore(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Population z-score along `axis`: the original's normalisation (mean 0, std 1 across layers)."""
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(axis=axis, keepdims=True)
    return centred / np.sqrt((centred * centred).mean(axis=axis, keepdims=True))


def variation_check(raw: np.ndarray, threshold: float = FLAT_CV) -> VariationCheck:
    if raw.size == 0:
        return VariationCheck(cv=math.nan, threshold=threshold, flat=True)
    sd = float(np.std(raw))
    mean = abs(float(np.mean(raw)))
    if sd == 0.0:
        cv = 0.0
    elif mean == 0.0:
        cv = math.inf
    else:
        cv = sd / mean
    return VariationCheck(cv=cv, threshold=threshold, flat=not cv >= threshold)
