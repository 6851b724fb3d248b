"""Neuron matching with an exact permutation test: does the suspect hold the candidate's FFN neurons?

Procedure (docs/statistics.md, "Neuron matching"), for a suspect at most as wide as the candidate; steps 1 and 2 read
the models and run in forensics.pipeline.neuron_test, steps 3-5 are `match_test` here:

1. Align the residual streams (`stats.residual`: through shared tokens, else through the attention weights).
2. Sketch both models' FFN neurons at `dims` residual dimensions (the candidate's through the alignment).
3. For every suspect unit (dense FFN, expert or shared expert of a layer) draw its share of the layer's `neurons`
   (`unit_neurons`: all of them for a dense FFN, an even split over a layer's experts, at least min(4, neurons) each),
   match them one to one to the neurons of every candidate unit with `scipy.optimize.linear_sum_assignment` on their
   similarity (the mean over gate, up and down of the cosine), and keep the best candidate unit (the candidate units are
   visited in the order of a bfloat16 screen of their row maxima, until it says none left can win): the unit statistic
   is that matching's mean similarity, and the unit it came from says which candidate layer the suspect layer holds
   (this localises pruned, duplicated and upcycled layers: each expert is matched against every dense FFN).
4. A layer's statistic is the mean of its units'; the model's is the sum over layers.
5. Null "trained from independent initialisations": such a model's residual dimensions are exchangeable (its
   initialisation is, and training treats them alike), so under the null the alignment found in step 1 is no better
   than a random signed permutation of the candidate's dimensions (step 1 accepts only near-exact maps, which
   unrelated models do not share: stats/residual.py). Each of T draws applies one such permutation (the
   same to every layer) and recomputes everything from step 3 on; p = (1 + #{null >= observed}) / (T + 1), per unit,
   per layer and for the sum (exact, whatever the dependence between layers). With an alpha in the settings the draws
   stop at the h-th total to reach the observed one, h = ceil(alpha T), and the joint p is then Besag and Clifford's
   h/L after L draws: exact too, and never below alpha (a test that must fail is not run to its end). Fisher's method
   (`scipy.stats.combine_pvalues`) also combines the layers' p, as Zhu et al. do; it assumes independent layers and
   is reported beside the exact joint p, which is the one the dossier's conclusions use.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
from scipy import stats
from scipy.optimize import linear_sum_assignment
from threadpoolctl import threadpool_limits

from forensics import settings
from forensics.errors import ForensicsError
from forensics.signals.neurons import Screen, Sketch, UnitKey
from forensics.seeds import rng_for

SCHEMA = "llm-forensics.neurons/2"  # 2: the sample is per layer, and each unit says its share


@dataclass(frozen=True)
class NeuronSettings:
    permutations: int = 199  # T: p >= 1/(T+1)
    neurons: int = 16  # suspect neurons drawn per layer, spread over its FFN units (unit_neurons)
    dims: int = 64  # residual dimensions the sketches keep
    tokens: int = 8192  # shared tokens used for the alignment, at most
    seed: int = 0
    alpha: float | None = None  # with it, the draws stop once the joint p cannot fall below it (Besag-Clifford)

    def __post_init__(self):
        if self.permutations < 1 or self.neurons < 2 or self.dims < 8 or self.tokens < 16 or \
                not (self.alpha is None or 0 < self.alpha < 1):
            raise ForensicsError(None, f"invalid neuron-matching settings {asdict(self)}: need permutations >= 1, "
                                       f"neurons >= 2, dims >= 8, tokens >= 16, alpha in (0, 1) or none")

    def stop_after(self) -> int | None:
        """h of Besag and Clifford's sequential p: once h null totals reach the observed one after L draws, p = h/L,
        at least h/T >= alpha, so no adjustment across candidates can bring it below alpha."""
        return math.ceil(self.alpha * self.permutations) if self.alpha else None


# A unit's statistic is a one-to-one matching: below a few neurons it is little more than one neuron's best cosine.
UNIT_NEURONS_MIN = 4


def unit_neurons(neurons: int, units_in_layer: int) -> int:
    """Neurons drawn from each of a layer's FFN units: the layer's `neurons` split evenly (rounded up), at least
    min(neurons, UNIT_NEURONS_MIN) each. A layer then draws max(neurons, 4 x units) or so: up to `neurons // 4`
    units, what a dense layer draws (the screen's cost and the layer statistic's sample alike); beyond, 4 a unit,
    against `neurons` a unit before (a 64-expert layer drew 64 times a dense one's, now 16 times)."""
    return max(min(neurons, UNIT_NEURONS_MIN), -(-neurons // units_in_layer))


def unavailable(reason: str) -> dict:
    return {"schema": SCHEMA, "status": "unavailable", "reason": reason}


def _matrix(sketch: Sketch, units: list[UnitKey], parts: list[str],
            picks: list[np.ndarray] | None = None) -> np.ndarray:
    """The units' neurons (those `picks` names, where given), one unit after another, as rows of length len(parts) *
    dims: the dot product of two rows is their mean cosine. Written in place, part by part (a 7B candidate's is 0.4
    GB)."""
    blocks = [[sketch.units[u][p] if picks is None else sketch.units[u][p][picks[i]] for p in parts]
              for i, u in enumerate(units)]
    ends = np.cumsum([0] + [len(b[0]) for b in blocks])
    k = blocks[0][0].shape[1]
    out = np.empty((ends[-1], len(parts) * k), blocks[0][0].dtype)
    for block, a, b in zip(blocks, ends, ends[1:]):
        for n, rows in enumerate(block):
            np.divide(rows, math.sqrt(len(parts)), out=out[a:b, n * k:(n + 1) * k])
    return out


def _lsa_mean(sim: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean similarity of the best one-to-one matching of rows to columns.

    Where every row's best column is its own, those columns are the optimal matching. Otherwise an optimal matching
    uses, for every row, one of its m best columns (a row sent elsewhere could move to one of those left free without
    loss), so only their union goes to the solver.
    """
    m, n = sim.shape
    rows, best = np.arange(m), sim.argmax(axis=1)
    if len(np.unique(best)) == m:
        return float(sim[rows, best].mean()), rows, best
    cols = np.arange(n)
    if n > m:
        cols = np.unique(np.argpartition(-sim, m - 1, axis=1)[:, :m])
    r, c = linear_sum_assignment(sim[:, cols], maximize=True)
    return float(sim[r, cols[c]].mean()), r, cols[c]


# The screen's bfloat16 products are within 1.1e-3 of float64 ones in a unit's mean row maximum (measured on the
# demo pair's 3,600 unit pairs over 300 draws, 4 neurons a unit: fewer rows average its rounding less); a unit it puts
# this far below the best matching found is not visited.
SCREEN_MARGIN = 4e-3


class _Matcher:
    """Unit statistics for one signed permutation of the residual dimensions (identity = observed)."""

    def __init__(self, sus: Sketch, cand: Sketch, s: NeuronSettings):
        self.parts = [p for p in ("gate", "up", "down") if p in sus.parts() & cand.parts()]
        if not self.parts:
            raise ForensicsError(sus.path, "the two models share no FFN part (gate, up, down) to match neurons on")
        self.sus_units = sorted(sus.units)
        self.cand_units = sorted(cand.units)
        per_layer = Counter(u.layer for u in self.sus_units)
        self.picks = {}
        for u in self.sus_units:
            n = sus.units[u][self.parts[0]].shape[0]
            k = min(unit_neurons(s.neurons, per_layer[u.layer]), n)
            self.picks[u] = np.sort(rng_for(s.seed, "neurons", u.label()).choice(n, k, replace=False))
        self.sus = _matrix(sus, self.sus_units, self.parts, [self.picks[u] for u in self.sus_units])  # (sum of m, .)
        self.offsets = np.cumsum([0] + [len(self.picks[u]) for u in self.sus_units])
        self.rows = [np.arange(a, b) for a, b in zip(self.offsets, self.offsets[1:])]
        whole = _matrix(cand, self.cand_units, self.parts)
        for path, m in ((sus.path, self.sus), (cand.path, whole)):
            if not np.isfinite(m).all():
                raise ForensicsError(path, "non-finite FFN weights: neurons cannot be matched on NaN or Inf")
        widths = [cand.units[u][self.parts[0]].shape[0] for u in self.cand_units]
        ends = np.cumsum([0] + widths)
        self.cand = [whole[a:b] for a, b in zip(ends, ends[1:])]
        self.screen = Screen(whole, widths, len(self.sus))
        self.k = sus.units[self.sus_units[0]][self.parts[0]].shape[1]
        self.pool: ThreadPoolExecutor | None = None  # where the candidate units of one round are visited at once

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Column order and signs of one random signed permutation, the same in every part."""
        perm, signs = rng.permutation(self.k), rng.choice([-1.0, 1.0], self.k)
        index = np.concatenate([p * self.k + perm for p in range(len(self.parts))])
        return index, np.tile(signs, len(self.parts)).astype(np.float32)

    def unit_stats(self, index: np.ndarray | None = None, signs: np.ndarray | None = None, detail: bool = False,
                   flips: tuple[bool, ...] = (False,)) -> dict:
        """{flip: (unit statistics, best candidate unit of each, same-index fractions)} for the suspect stream and,
        with True in `flips`, its negation: one product serves both, since negating the suspect negates it."""
        # Permuting the suspect's columns by the inverse is the same as permuting the candidate's (cosines are
        # invariant to one orthogonal map applied to both), and the suspect side is the small one.
        sus = self.sus if index is None else self.sus[:, np.argsort(index)] * signs[np.argsort(index)]
        screen = self.screen(sus, self.offsets, flips, self.pool)
        out = {}
        for flip in flips:
            stats_, where, matches = self._best_units(-sus if flip else sus, screen[flip])
            details = [float(np.mean(self.picks[u][r] == c)) for u, (r, c) in zip(self.sus_units, matches)] \
                if detail else []
            out[flip] = stats_, where, details
        return out

    def _best_units(self, side: np.ndarray, screen: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
        """Each suspect unit's best matching over the candidate units, visited in the screen's order until the screen
        says no unit left can beat the best found; ties go to the first candidate unit."""
        n = len(self.sus_units)
        order = np.argsort(-screen, axis=1, kind="stable")
        best, best_j, matches = np.full(n, -np.inf), np.full(n, -1), [None] * n

        def visit(i: int, j: int, product: np.ndarray) -> None:
            # The row-wise maximum bounds any one-to-one matching.
            if product.max(axis=1).mean() < best[i]:
                return
            value, r, c = _lsa_mean(product)
            if value > best[i] or (value == best[i] and j < best_j[i]):
                best[i], best_j[i], matches[i] = value, j, (r, c)

        def visits(j: int, units: np.ndarray) -> None:
            product = side[np.concatenate([self.rows[i] for i in units])] @ self.cand[j].T
            for i, part in zip(units, np.split(product, np.cumsum([len(self.rows[i]) for i in units])[:-1])):
                visit(i, j, part)

        # In rounds: the r-th candidate unit of every unit still searching, each candidate's rows in one product with
        # those of all the units that visit it in the round (one large product costs less than several small ones).
        # A unit stops at the first candidate the screen puts below reach: the screen only falls along its order
        # and the best found only rises, so no later one is in reach either. Each unit visits what it would alone.
        searching = np.arange(n)
        for rank in range(order.shape[1]):
            at = order[searching, rank]
            if rank:
                reach = screen[searching, at] + SCREEN_MARGIN >= best[searching]
                searching, at = searching[reach], at[reach]
            if not len(searching):
                break
            # The candidates of a round are visited by distinct units, so they run at once, each product on one
            # BLAS thread (the same bits as one after another); numpy's product releases the GIL.
            work = [(j, searching[at == j]) for j in np.unique(at)]
            if self.pool is None or len(work) == 1:
                for j, units in work:
                    visits(j, units)
            else:
                list(self.pool.map(lambda job: visits(*job), work))
        return best, best_j, matches


def _best_sign(mt: _Matcher, per_layer, draw: tuple = (), both_signs: bool = False, detail: bool = False):
    """Unit and layer statistics of one draw; with `both_signs`, of whichever sign of the whole stream sums higher."""
    best = None
    for flip, (units, where, details) in mt.unit_stats(*draw, detail=detail,
                                                        flips=(False, True) if both_signs else (False,)).items():
        layers = per_layer(units)
        if best is None or layers.sum() > best[1].sum():
            best = (units, layers, where, details, flip)
    return best if detail else best[:2]


def _null(mt: _Matcher, s: NeuronSettings, observed: np.ndarray, obs_layers: np.ndarray, per_layer,
          progress: Callable[[int], None] | None, both_signs: bool) -> tuple[np.ndarray, np.ndarray, int, list[float]]:
    """How many of the null draws reach the observed unit, layer and total statistics, and each draw's total: all T
    draws, or with `s.alpha` those up to the one where `s.stop_after()` totals have reached the observed."""
    rng = rng_for(s.seed, "null")
    ge_units = np.zeros(len(observed), int)
    ge_layers = np.zeros(len(obs_layers), int)
    ge_total = 0
    null_totals = []
    stop = s.stop_after()
    for t in range(s.permutations):
        null, null_layers = _best_sign(mt, per_layer, mt.draw(rng), both_signs)
        ge_units += null >= observed
        ge_layers += null_layers >= obs_layers
        ge_total += int(null_layers.sum() >= obs_layers.sum())
        null_totals.append(float(null_layers.sum()))
        if progress:
            progress(t + 1)
        if stop and ge_total >= stop:
            if progress:
                progress(s.permutations)
            break
    return ge_units, ge_layers, ge_total, null_totals


def match_test(sus: Sketch, cand: Sketch, s: NeuronSettings, progress: Callable[[int], None] | None = None,
               both_signs: bool = False) -> dict:
    """Steps 3–5 of the module's procedure on two sketches already in one residual basis.

    `both_signs`: the alignment fixed the coordinates' relative signs but not the sign of the whole stream (the
    weights alignment cannot: -h is as good a stream as h), so the observed and every null draw take the better of
    the two; the null keeps its exactness because each draw is treated exactly as the observation is.
    """
    mt = _Matcher(sus, cand, s)
    layers = sorted({u.layer for u in mt.sus_units})
    of_layer = [np.array([u.layer == layer for u in mt.sus_units]) for layer in layers]

    def per_layer(unit_values: np.ndarray) -> np.ndarray:
        return np.array([unit_values[mask].mean() for mask in of_layer])

    # The matcher's own products are one unit pair each: too small for several BLAS threads to pay (they then mostly
    # wait on each other), so they run side by side instead; the screen's large ones run on torch's threads. The
    # observation and the draws alike.
    cores = settings.cores()
    with threadpool_limits(limits=1, user_api="blas"), \
            (ThreadPoolExecutor(max_workers=cores) if cores > 1 else contextlib.nullcontext()) as pool:
        mt.pool = pool
        observed, obs_layers, where, same_index, flipped = _best_sign(mt, per_layer, (), both_signs, detail=True)
        ge_units, ge_layers, ge_total, null_totals = _null(mt, s, observed, obs_layers, per_layer, progress,
                                                           both_signs)
    mt.pool = None
    T, drawn = s.permutations, len(null_totals)
    stopped = s.stop_after() is not None and ge_total >= s.stop_after()
    p_units = (1 + ge_units) / (drawn + 1)
    p_layers = (1 + ge_layers) / (drawn + 1)
    fisher = stats.combine_pvalues(p_layers, method="fisher")
    unit_rows = []
    for i, u in enumerate(mt.sus_units):
        m = mt.cand_units[where[i]]
        unit_rows.append({"unit": u.as_dict(), "label": u.label(), "statistic": float(observed[i]),
                          "pvalue": float(p_units[i]), "matches": {**m.as_dict(), "label": m.label()},
                          "same_index_fraction": same_index[i], "neurons": len(mt.picks[u])})
    null_totals = np.asarray(null_totals)
    return {
        "schema": SCHEMA, "status": "compared",
        "settings": asdict(s), "parts": mt.parts, "stream_sign": -1 if flipped else 1,
        "statistic": float(obs_layers.sum()),
        "statistic_definition": "sum over suspect layers of the mean, over the layer's FFN units, of the best "
                                "one-to-one neuron matching's mean cosine (gate, up, down) over the candidate units "
                                "a bfloat16 screen leaves in reach (docs/statistics.md, step 3)",
        "pvalue": float(ge_total / drawn if stopped else (1 + ge_total) / (T + 1)), "n_permutations": T,
        "draws": drawn, "stopped": stopped, "hits": int(ge_total), "floor": 1 / (T + 1),
        "screen": {"dtype": "bfloat16", "native": mt.screen.native, "margin": SCREEN_MARGIN},
        "null": {"mean": float(null_totals.mean()), "max": float(null_totals.max())},
        "fisher": {"statistic": float(fisher.statistic), "pvalue": float(fisher.pvalue), "df": 2 * len(layers)},
        "layers": [{"layer": layer, "statistic": float(obs_layers[k]), "pvalue": float(p_layers[k]),
                    "units": [row for row, mask in zip(unit_rows, of_layer[k]) if mask]}
                   for k, layer in enumerate(layers)],
    }
