"""Per-layer standard deviation of every weight role: the intrinsic fingerprint of the original analysis.

The std is the population std (ddof = 0) over all elements of a matrix, accumulated in float64 chunk by chunk and
merged with Chan's parallel formula, so memory stays at one tensor plus one float64 chunk whatever the model's size,
and the result matches numpy's float64 `std` to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# 4 Mi elements: a 32 MiB float64 chunk keeps the working set small next to the tensor itself.
CHUNK_ELEMENTS = 1 << 22


@dataclass
class Moments:
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    nan: int = 0
    inf: int = 0

    def merge(self, n: int, mean: float, m2: float) -> None:
        if n == 0:
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else float("nan")


def moments(t: torch.Tensor, device: torch.device) -> Moments:
    """Float64 moments of every element of `t`; NaN and Inf are counted and left out."""
    flat = t.reshape(-1)
    out = Moments()
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        c = flat[start:start + CHUNK_ELEMENTS].to(device=device).to(torch.float64)
        n = c.numel()
        mean = c.sum() / n
        # NaN/Inf anywhere make the sum non-finite: only then pay for counting and dropping them.
        if not bool(torch.isfinite(mean)):
            out.nan += int(torch.isnan(c).sum())
            out.inf += int(torch.isinf(c).sum())
            c = c[torch.isfinite(c)]
            n = c.numel()
            if not n:
                continue
            mean = c.sum() / n
        # In place only on our own float64 copy, never on the caller's tensor.
        d = c - mean if t.dtype == torch.float64 and c.device == t.device else c.sub_(mean)
        out.merge(n, float(mean), float(torch.dot(d, d)))
    return out


def pick_device(requested: str | None) -> torch.device:
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(requested)
