"""Depth alignment of two curves.

* equal depth (same `num_layers`): layer by layer, on the layers present in both (`layerwise`);
* unequal depth, `interp`: the deeper curve is linearly interpolated at the relative depths of the shallower model's
  layers (first layer to first, last to last). The grid is the shallower model's own layers, so no point is invented
  on the side that has fewer;
* unequal depth, `dtw`: a monotone alignment that matches every layer of the shorter curve to a distinct layer of
  the longer one, in order, minimising the squared distance between the z-scored curves. This is the alignment a
  layer-pruned child needs (interpolation smears a dropped layer over its neighbours). Because it is chosen to fit,
  it inflates similarity; the permutation test re-runs it on every null curve so that the inflation is in the null.

An `Aligner` is built once per (suspect curve, candidate curve) and serves both the observed alignment and the
vectorised alignment of a batch of null candidate curves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from forensics.stats.normalise import Curve, zscore

METHODS = ("interp", "dtw")
REFINEMENTS = 3  # at most, for DTW's re-standardisation (see Aligner._match)


def monotone_match(short: np.ndarray, long: np.ndarray) -> np.ndarray:
    """Indices (..., n) into `long` (..., m), strictly increasing, minimising sum_i (short_i - long_idx_i)^2.

    Dynamic programming. Short layer i can only sit at long layer i + d with 0 <= d <= m - n (room must remain on
    both sides), and j' < j for consecutive layers becomes d' <= d, so each row is the row's cost plus a running
    minimum of the previous row: O(n (m - n + 1)) per curve. Ties go to the earliest layer (deterministic).
    Leading axes are a batch (the null curves of a permutation test).
    """
    n, m = short.shape[-1], long.shape[-1]
    width = m - n + 1
    window = np.lib.stride_tricks.sliding_window_view(long, n, axis=-1)  # (..., width, n)
    if short.ndim == 1 and long.ndim == 1:
        return _match_one(((short - window) ** 2).T)
    # cost[i, d, ...] = (short[..., i] - long[..., i + d])^2: layer and shift first, batch last, so that every step
    # below is one operation over the whole batch (numpy's ufunc.accumulate is far slower over a batch axis).
    cost = np.moveaxis((short[..., None, :] - window) ** 2, (-1, -2), (0, 1))
    total = cost[0]
    best = np.empty(cost.shape, dtype=np.intp)  # best[i, d]: argmin over d' <= d of row i's total
    running = np.empty(cost.shape[1:])
    for i in range(n):
        running[0] = total[0]
        best[i, 0] = 0
        for d in range(1, width):
            better = total[d] < running[d - 1]
            running[d] = np.where(better, total[d], running[d - 1])
            best[i, d] = np.where(better, d, best[i, d - 1])
        if i + 1 < n:
            total = cost[i + 1] + running
    shift = np.empty((n,) + cost.shape[2:], dtype=np.intp)
    shift[n - 1] = best[n - 1, width - 1]
    for i in range(n - 2, -1, -1):
        shift[i] = np.take_along_axis(best[i], shift[i + 1][None], axis=0)[0]
    return np.moveaxis(shift, 0, -1) + np.arange(n)


def _match_one(cost: np.ndarray) -> np.ndarray:
    """monotone_match for one curve, cost (n, width): the same recursion with 1-D running minima."""
    n = len(cost)
    total = np.empty_like(cost)
    total[0] = cost[0]
    for i in range(1, n):
        total[i] = cost[i] + np.minimum.accumulate(total[i - 1])
    shift = np.empty(n, dtype=np.intp)
    shift[n - 1] = np.argmin(total[n - 1])
    for i in range(n - 2, -1, -1):
        shift[i] = np.argmin(total[i, :shift[i + 1] + 1])
    return shift + np.arange(n)


def interp_matrix(grid: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """W (len(grid), len(positions)) such that W @ v == np.interp(grid, positions, v) for every v."""
    eye = np.eye(len(positions))
    return np.stack([np.interp(grid, positions, eye[j]) for j in range(len(positions))], axis=1)


@dataclass(frozen=True)
class Alignment:
    method: str  # layerwise | interp | dtw
    x: np.ndarray  # suspect raw values on the common grid
    y: np.ndarray  # candidate raw values on the common grid
    mapping: list[list[float]]  # [suspect layer, candidate layer] per grid point; fractional for interpolated sides

    def as_dict(self) -> dict:
        return {"method": self.method, "n_aligned": len(self.x), "mapping": self.mapping}


class Aligner:
    """Aligns suspect curve `a` with candidate curve `b`, or with null versions of `b` on the same layers."""

    def __init__(self, a: Curve, b: Curve, method: str):
        self.a, self.b = a, b
        if a.num_layers == b.num_layers:
            self.method = "layerwise"
            common = np.intersect1d(a.layers, b.layers)
            self.a_idx = np.searchsorted(a.layers, common)
            self.b_idx = np.searchsorted(b.layers, common)
        elif method == "interp":
            self.method = "interp"
            # The grid is the shallower model's layers; the deeper one is interpolated onto it.
            self.b_deeper = b.num_layers > a.num_layers
            shallow, deep = (a, b) if self.b_deeper else (b, a)
            self.grid = shallow.positions
            self.w = interp_matrix(self.grid, deep.positions)
            self.deep_layers = self.grid * (deep.num_layers - 1)
        elif method == "dtw":
            self.method = "dtw"
            # Ties in length go to the shallower model as the short side so that every layer of it is matched.
            self.b_short = (len(b.raw), b.num_layers) < (len(a.raw), a.num_layers)
        else:
            raise ValueError(f"unknown alignment {method!r}")

    @property
    def n_aligned(self) -> int:
        if self.method == "layerwise":
            return len(self.a_idx)
        if self.method == "interp":
            return len(self.grid)
        return min(len(self.a.raw), len(self.b.raw))

    @property
    def dtw_cells(self) -> int:
        """Size of the DTW table per curve (0 without DTW): what one null curve costs in memory."""
        if self.method != "dtw":
            return 0
        n, m = sorted((len(self.a.raw), len(self.b.raw)))
        return n * (m - n + 1)

    def pairs(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Aligned (suspect, candidate) values for candidate curves `y` (..., len(b.raw)); shapes broadcast."""
        x = self.a.raw
        if self.method == "layerwise":
            return x[self.a_idx], y[..., self.b_idx]
        if self.method == "interp":
            return (x, y @ self.w.T) if self.b_deeper else (self.w @ x, y)
        idx = self._match(y)
        if self.b_short:
            return x[idx], y
        return x, np.take_along_axis(y, idx, axis=-1)

    def _match(self, y: np.ndarray) -> np.ndarray:
        """DTW indices: into the suspect's layers when the candidate is the short side, else into the candidate's."""
        short, long = (y, self.a.raw) if self.b_short else (self.a.raw, y)
        zs = zscore(short)
        idx = monotone_match(zs, zscore(long))
        # The short curve was standardised over its own layers, the long one over all of its layers, which include
        # the unmatched ones: standardise the long curve over the layers it matched and match again, until the match
        # settles or REFINEMENTS times (a quarter of the layers pruned: 50 of 50 synthetic children recovered
        # exactly after three, 38 after one).
        full = np.broadcast_to(long, idx.shape[:-1] + long.shape[-1:])
        for _ in range(REFINEMENTS):
            matched = np.take_along_axis(full, idx, axis=-1)
            centre = matched.mean(axis=-1, keepdims=True)
            spread = matched.std(axis=-1, keepdims=True)
            again = monotone_match(zs, (long - centre) / spread)
            if np.array_equal(again, idx):
                break
            idx = again
        return idx

    def observed(self) -> Alignment:
        xa, ya = self.pairs(self.b.raw)
        a, b = self.a, self.b
        if self.method == "layerwise":
            mapping = [[int(a.layers[i]), int(b.layers[j])] for i, j in zip(self.a_idx, self.b_idx)]
        elif self.method == "interp":
            shallow = a.layers if self.b_deeper else b.layers
            pairs = zip(shallow, self.deep_layers) if self.b_deeper else zip(self.deep_layers, shallow)
            mapping = [[float(s), float(c)] for s, c in pairs]
        elif self.b_short:
            mapping = [[int(a.layers[i]), int(b.layers[j])] for j, i in enumerate(self._match(b.raw))]
        else:
            mapping = [[int(a.layers[i]), int(b.layers[j])] for i, j in enumerate(self._match(b.raw))]
        return Alignment(self.method, xa, ya, mapping)
