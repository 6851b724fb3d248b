"""Empirical null: where the candidate's similarity falls among similarities of pairs known to be unrelated.

This is the test that speaks to lineage directly. Unrelated models of one family can be strikingly alike (llama2-7b
vs deepseek-llm-7b: r = 0.91); the question is whether the suspect and the candidate are more alike than unrelated
pairs are. With n null values, p = (1 + #{null >= observed}) / (n + 1): the candidate pair counts as one more member
of the null (exchangeability), so p is valid at any n and never below 1/(n + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class EmpiricalNullResult:
    statistic: float
    pvalue: float
    percentile: float | None  # % of null values strictly below the statistic; None without a null
    n_null: int
    floor: float  # 1 / (n_null + 1), the smallest p this null can give
    null_median: float | None
    null_max: float | None
    values: tuple[float, ...]  # the null similarities, sorted, so a reader can redraw the distribution

    def as_dict(self) -> dict:
        return {"statistic": self.statistic, "pvalue": self.pvalue, "percentile": self.percentile,
                "n_null": self.n_null, "floor": self.floor, "null_median": self.null_median,
                "null_max": self.null_max, "values": list(self.values)}


def empirical_null(observed: float, null: list[float]) -> EmpiricalNullResult:
    values = np.asarray(null, dtype=np.float64)
    n = len(values)
    have = n > 0
    return EmpiricalNullResult(
        statistic=observed,
        pvalue=(1 + int(np.sum(values >= observed))) / (n + 1),
        percentile=float(stats.percentileofscore(values, observed, kind="strict")) if have else None,
        n_null=n,
        floor=1 / (n + 1),
        null_median=float(np.median(values)) if have else None,
        null_max=float(values.max()) if have else None,
        values=tuple(float(v) for v in np.sort(values)),
    )
