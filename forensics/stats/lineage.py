"""Evidence that output-preserving edits cannot erase, set beside the std-curve verdict; and the tamper flag.

The verdict rule (verdict.py) reads std curves, which an evader can redraw at will without changing a single output
(rescale q by c and k by 1/c, up by d and down by 1/d, a norm gain by c and the projections it feeds by 1/c).
Neuron matching (neurons.py) and the attention spectra (signals/attention.py) do not move under those edits. Each
candidate therefore gets a second conclusion from neuron matching, with its own pre-specified rule, and:

* where the invariant evidence says "derived" while std curves of some roles show nothing, the **tamper flag**: the
  std profile of those roles appears altered in an output-preserving way;
* where the two conclusions disagree in either direction, a plain statement that they do.
"""

from __future__ import annotations

from forensics import roles
from forensics.stats.multitest import NAMES, adjust, best_adjusted
from forensics.stats.verdict import INCONCLUSIVE, NO_EVIDENCE

EVIDENCE, UNAVAILABLE = "EVIDENCE OF DERIVATION", "UNAVAILABLE"
# Std roles the flag checks: the matrices and the norms whose curves rescalings redraw.
STD_ROLES = roles.RESCALABLE
SPECTRA = ("qk_spectrum", "ov_spectrum")


def neuron_rule(alpha: float, method: str) -> str:
    return (f"Neuron matching: EVIDENCE OF DERIVATION if the exact joint p (sum over layers, T signed permutations "
            f"of the residual basis), adjusted across the candidates it applies to by {NAMES[method]}, is < {alpha}; "
            f"NO EVIDENCE if p >= {alpha} and the test could reach {alpha}; INCONCLUSIVE if T is too small for the "
            f"adjusted p to reach {alpha}; UNAVAILABLE where widths differ or no vocabulary is shared. The draws stop "
            f"once ceil({alpha} T) of them reach the observed statistic (p can then no longer fall below {alpha}).")


def neuron_conclusions(tests: dict[str, dict], alpha: float, method: str, untested: int = 0) -> dict[str, dict]:
    """Per candidate: the conclusion of its neuron test, with the adjusted p and the reason; `untested` candidates of
    the family were screened out (multitest.adjust)."""
    done = sorted(c for c, t in tests.items() if t.get("status") == "compared")
    adjusted = dict(zip(done, adjust([tests[c]["pvalue"] for c in done], method, untested)))
    out = {}
    for c, t in sorted(tests.items()):
        if c not in adjusted:
            out[c] = {"conclusion": UNAVAILABLE, "reason": t.get("reason", "not run")}
            continue
        p, p_adj = t["pvalue"], adjusted[c]
        capped = best_adjusted(t["floor"], len(done) + untested, method) >= alpha
        if p_adj < alpha:
            conclusion = EVIDENCE
            reason = (f"the embedding-aligned residual basis matches the candidate's neurons better than all "
                      f"{t['n_permutations']} random bases (p = {p:.3g}, adjusted {p_adj:.3g} < {alpha})")
        elif capped:
            conclusion = INCONCLUSIVE
            reason = (f"with T = {t['n_permutations']} the adjusted p cannot go below {alpha} "
                      f"(p = {p:.3g}); raise neurons.permutations")
        elif t.get("stopped"):
            conclusion = NO_EVIDENCE
            reason = (f"{t['hits']} of the first {t['draws']} random bases (of {t['n_permutations']}) matched the "
                      f"candidate's neurons as well, enough that p (= {p:.3g}) cannot fall below {alpha}: the draws "
                      f"stopped there (Besag-Clifford)")
        else:
            conclusion = NO_EVIDENCE
            reason = f"p = {p:.3g}, adjusted {p_adj:.3g} >= {alpha}"
        out[c] = {"conclusion": conclusion, "pvalue": p, "pvalue_adjusted": p_adj, "reason": reason}
    return out


def _role_label(signals: dict, role: str) -> str | None:
    for label in (role, f"expert_{role}", f"{role}~expert_{role}", f"expert_{role}~{role}"):
        if signals.get(label, {}).get("status") == "compared":
            return label
    return None


def tamper_flag(signals: dict, neuron: dict, alpha: float) -> dict:
    """Whether the std profile looks altered: invariant evidence of derivation, yet std roles that show none."""
    spectra = {s: signals[s]["pvalue_adjusted"] for s in SPECTRA
               if signals.get(s, {}).get("status") == "compared"}
    invariant = []
    if neuron.get("conclusion") == EVIDENCE:
        invariant.append(f"neuron matching (p = {neuron['pvalue']:.3g})")
    invariant += [f"{s} (adjusted p = {p:.3g})" for s, p in spectra.items() if p < alpha]
    quiet, checked = [], []
    for role in STD_ROLES:
        label = _role_label(signals, role)
        # A curve too short for its permutation test to reach alpha (6 layers: none; 12: p >= 0.042) shows nothing
        # either way: only a test that could have found the parent counts as finding none.
        if label is None or signals[label]["permutation"]["floor"] >= alpha:
            continue
        checked.append(role)
        if signals[label]["pvalue_adjusted"] >= alpha:
            quiet.append(role)
    raised = bool(neuron.get("conclusion") == EVIDENCE and quiet)
    out = {"raised": raised, "roles": quiet if raised else [], "checked_roles": checked, "invariant_evidence": invariant}
    if raised:
        which = "every std curve" if len(quiet) == len(checked) else f"the std curves of {', '.join(quiet)}"
        out["statement"] = (f"Tests that output-preserving edits cannot change ({'; '.join(invariant)}) find strong "
                            f"evidence of derivation, while {which} show none (adjusted p >= {alpha}). The std "
                            f"profile of {', '.join(quiet)} appears to have been altered in an output-preserving way "
                            f"(for example rescaled with a compensating rescale elsewhere).")
    return out
