"""The verdict per candidate: DERIVED / INCONCLUSIVE / NO EVIDENCE, by a rule fixed in advance and printed with it.

The rule never reads a raw correlation. It reads one pre-specified primary signal per candidate (the Q/K/V/O
aggregate, the original's number, else the first informative one in PRIMARY_ORDER) and two tests of it that fail in
different ways: the block-permutation test (wrong if unrelated models share layer-specific structure beyond the depth
trend and the boundary layers) and the empirical null from unrelated pairs (wrong if those pairs are not comparable
with the case). DERIVED needs both: p = max(p_perm, p_emp) is a valid p for "both nulls are false" (intersection-union
test), and it is then adjusted across the candidates (Holm by default). A false DERIVED needs both tests to fail.
"""

from __future__ import annotations

from dataclasses import dataclass

from forensics.stats.multitest import NAMES, adjust, best_adjusted, min_null_size

DERIVED, INCONCLUSIVE, NO_EVIDENCE = "DERIVED", "INCONCLUSIVE", "NO EVIDENCE"
# Pre-specified order: which signal decides. Aggregates first (they pool four, resp. three, matrices per layer).
PRIMARY_ORDER = ("qkvo", "ffn", "attn_norm", "mlp_norm", "act_norm")


@dataclass(frozen=True)
class PrimaryEvidence:
    signal: str
    statistic: float  # the similarity (r, or mean r of an aggregate), reported for context only
    p_permutation: float
    p_empirical: float
    n_null: int
    permutation_floor: float  # the smallest p the permutation test could give (short curves: large)

    @property
    def empirical_floor(self) -> float:
        return 1 / (self.n_null + 1)


def rule_text(alpha: float, method: str) -> str:
    return (
        f"Primary signal: the first informative (not flat, compared) of {', '.join(PRIMARY_ORDER)}. "
        f"DERIVED if max(p_perm, p_emp) of the primary signal, adjusted across candidates by {NAMES[method]}, is "
        f"< {alpha}, where p_perm is the block-permutation p (boundary layers and depth trend kept) and p_emp the "
        f"empirical p against unrelated pairs; both tests must be able to reach that at all. "
        f"NO EVIDENCE if p_perm >= {alpha} or p_emp >= {alpha}, counting only a test whose smallest possible p is "
        f"below {alpha}. INCONCLUSIVE otherwise: no informative primary signal, too few unrelated pairs or too few "
        f"layers for the adjusted p to reach {alpha}, or significant before adjustment only. "
        f"A raw correlation alone never gives DERIVED."
    )


def decide(evidence: dict[str, PrimaryEvidence | None], alpha: float, method: str,
           untested: int = 0) -> dict[str, dict]:
    tested = sorted(name for name, ev in evidence.items() if ev is not None)
    combined = [max(evidence[n].p_permutation, evidence[n].p_empirical) for n in tested]
    adjusted = dict(zip(tested, adjust(combined, method, untested)))
    needed = min_null_size(alpha, len(tested) + untested, method)
    out = {}
    for name in sorted(evidence):
        ev = evidence[name]
        if ev is None:
            out[name] = {"verdict": INCONCLUSIVE, "primary_signal": None,
                         "reasons": ["no informative signal is shared by the suspect and this candidate "
                                     "(every common signal is flat, too short or absent)"]}
            continue
        p_adj = adjusted[name]
        perm_capped = best_adjusted(ev.permutation_floor, len(tested) + untested, method) >= alpha
        emp_capped = ev.n_null < needed
        reasons = []
        if not (perm_capped or emp_capped) and p_adj < alpha:
            verdict = DERIVED
            reasons.append(f"{ev.signal}: p_perm = {ev.p_permutation:.3g} and p_emp = {ev.p_empirical:.3g}; "
                           f"adjusted max {p_adj:.3g} < {alpha}")
        elif (ev.p_permutation >= alpha > ev.permutation_floor) or (ev.p_empirical >= alpha > ev.empirical_floor):
            verdict = NO_EVIDENCE
            if ev.p_permutation >= alpha > ev.permutation_floor:
                reasons.append(f"{ev.signal}: no layer-specific similarity beyond what the null keeps "
                               f"(p_perm = {ev.p_permutation:.3g} >= {alpha})")
            if ev.p_empirical >= alpha > ev.empirical_floor:
                reasons.append(f"{ev.signal}: similarity within the range of unrelated pairs "
                               f"(p_emp = {ev.p_empirical:.3g} over {ev.n_null} pairs)")
        else:
            verdict = INCONCLUSIVE
            if perm_capped:
                reasons.append(f"capped: the curves are too short for the permutation test (smallest p "
                               f"{ev.permutation_floor:.3g}) to reach {alpha} after adjustment")
            if emp_capped:
                reasons.append(f"capped: the empirical null has {ev.n_null} unrelated pairs, so p_emp >= "
                               f"{ev.empirical_floor:.3g} and its adjusted value cannot go below {alpha}; "
                               f"at least {needed} pairs are needed (add controls or panel fingerprints)")
            if not reasons:
                reasons.append(f"{ev.signal}: p_perm = {ev.p_permutation:.3g}, p_emp = {ev.p_empirical:.3g}, "
                               f"but the adjusted max is {p_adj:.3g} >= {alpha}")
        out[name] = {"verdict": verdict, "primary_signal": ev.signal, "statistic": ev.statistic,
                     "pvalue_permutation": ev.p_permutation, "permutation_floor": ev.permutation_floor,
                     "pvalue_empirical": ev.p_empirical,
                     "pvalue_combined": max(ev.p_permutation, ev.p_empirical), "pvalue_adjusted": p_adj,
                     "n_null": ev.n_null, "min_null_pairs": needed, "reasons": reasons}
    return out


def measured_fpr(table: dict | None, alpha: float, signal: str | None = None) -> dict | None:
    """From a calibration table (forensics.lab.calibrate): the false-positive rate at `alpha` of the verdict
    rule, or with `signal` of that signal's permutation test alone; None where the table does not have it."""
    if not table:
        return None
    section = table.get("rule", {}) if signal is None else table.get("per_signal_permutation", {}).get(signal, {})
    entry = section.get(repr(alpha))
    if entry is None:
        return None
    return {"alpha": alpha, **entry, "design": table.get("design", {}).get("summary")}
