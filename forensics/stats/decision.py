"""One verdict per candidate, decided by one route fixed before the analysis; every other route only supports.

A route is a test of "the candidate is not the suspect's source" with an exact or calibrated null:

1. **neuron matching** (stats/neurons.py): the exact joint p over T signed permutations of the residual basis (or
   Besag and Clifford's sequential p over the first L, once p cannot fall below alpha);
2. **attention spectra**: for each compared spectrum (qk_spectrum, ov_spectrum) the intersection-union p of its
   block-permutation and empirical-null tests, max(p_perm, p_emp); the route's p is Bonferroni over the spectra;
3. **std curves** (verdict.py): max(p_perm, p_emp) of the primary std signal, the rule of 0.2.

Which route decides is fixed by the order above and by what the data's shapes allow, never by an outcome: the first
route that applies to the pair (same width and a shared vocabulary for neurons; a compared spectrum; an informative
std signal) and whose smallest possible p (its floor: 1/(T+1), the permutation floor, 1/(n+1) for n unrelated pairs)
can fall below alpha after adjustment across the candidates. Only the deciding routes' p-values are tested, one per
candidate, adjusted by Holm (or BH) across the candidates: the family-wise error of the verdicts is that of a single
pre-specified test per candidate, and no route is tried after another failed.

* **DERIVED**: the deciding route's adjusted p < alpha. The verdict names that route.
* **NO EVIDENCE**: every applicable route looked and found nothing — in each, a test whose floor is below alpha has
  p >= alpha (`Route.found_nothing`), a non-rejection that no floor explains. A single route that sees the parent
  (p < alpha, even one that does not decide, e.g. the attention spectra at their floor while std curves were
  redrawn) therefore makes NO EVIDENCE impossible, and so does a route that could not look.
* **INCONCLUSIVE** otherwise: a route could not look (its floors, not its data, keep it from alpha), or one sees
  something the deciding route does not confirm, or the deciding route is significant before adjustment only.
"""

from __future__ import annotations

from dataclasses import dataclass

from forensics.stats.multitest import NAMES, adjust, best_adjusted
from forensics.stats.verdict import DERIVED, INCONCLUSIVE, NO_EVIDENCE

ROUTES = ("neurons", "attention_spectra", "std_curves")
LABELS = {"neurons": "neuron matching", "attention_spectra": "attention spectra", "std_curves": "std curves"}
SPECTRA = ("qk_spectrum", "ov_spectrum")
DECIDED, SUPPORTS, SILENT, CAPPED, NOT_APPLICABLE = ("decided", "supports", "does not support", "cannot reach alpha",
                                                     "not applicable")


@dataclass(frozen=True)
class Route:
    """One route's evidence for one candidate: its tests, as groups of (p, floor) in `components`; none where the
    route does not apply (`what` says why).

    The route's p (and its floor, the smallest p it can give) combines them: the intersection-union max within a
    group, Bonferroni over groups. It *found nothing* when, in every group, some test whose floor is below alpha has
    p >= alpha — a non-rejection that no floor explains, which more permutations or unrelated pairs would not undo.
    """

    name: str
    what: str
    components: tuple = ()

    def _combined(self, i: int) -> float | None:
        if not self.components:
            return None
        return min(1.0, len(self.components) * min(max(t[i] for t in group) for group in self.components))

    @property
    def pvalue(self) -> float | None:
        return self._combined(0)

    @property
    def floor(self) -> float | None:
        return self._combined(1)

    def found_nothing(self, alpha: float) -> bool:
        return self.pvalue is not None and all(any(p >= alpha > f for p, f in group) for group in self.components)


def neuron_route(test: dict | None) -> Route:
    if not test or test.get("status") != "compared":
        return Route("neurons", (test or {}).get("reason", "not run"))
    drawn = f"the first {test['draws']} of " if test.get("stopped") else ""
    return Route("neurons", f"exact joint p over {drawn}{test['n_permutations']} signed permutations of the residual "
                            f"basis",
                 (((test["pvalue"], test["floor"]),),))


def spectra_route(signals: dict) -> Route:
    compared = {s: signals[s] for s in SPECTRA if signals.get(s, {}).get("status") == "compared"}
    if not compared:
        return Route("attention_spectra", "no attention spectrum was compared (flat, too short or absent)")
    parts = tuple(((e["permutation"]["pvalue"], e["permutation"]["floor"]),
                   (e["empirical_null"]["pvalue"], e["empirical_null"]["floor"])) for e in compared.values())
    return Route("attention_spectra", f"Bonferroni over {', '.join(compared)} of max(p_perm, p_emp)", parts)


def std_route(verdict: dict) -> Route:
    if verdict.get("primary_signal") is None:
        return Route("std_curves", "no informative std signal (every common signal flat, too short or absent)")
    return Route("std_curves", f"max(p_perm, p_emp) of the primary signal {verdict['primary_signal']}",
                 (((verdict["pvalue_permutation"], verdict["permutation_floor"]),
                   (verdict["pvalue_empirical"], 1 / (verdict["n_null"] + 1))),))


def rule_text(alpha: float, method: str) -> str:
    return (
        f"One verdict per candidate, decided by the first route, in the order neuron matching, attention spectra, "
        f"std curves, that applies to the pair and whose smallest possible p can reach {alpha} after "
        f"{NAMES[method]} adjustment across the candidates; only that route's p is tested. DERIVED if its adjusted "
        f"p < {alpha}. NO EVIDENCE if every applicable route looked and found nothing (a test of it that could reach "
        f"{alpha} has p >= {alpha}). INCONCLUSIVE otherwise: a route could not look, or one sees what the deciding "
        f"route does not confirm. The other routes are reported as supporting (p < {alpha}) or not, never as a "
        f"second conclusion. A raw correlation alone never gives DERIVED."
    )


def error_rate(route: str | None, fpr: dict | None) -> str:
    """What is known of the verdict's false-positive rate, in one sentence."""
    if route == "neurons":
        return ("exact: under the null (independently initialised models, whose residual dimensions are "
                "exchangeable) P(p <= alpha) <= alpha for any number of permutations, so the verdict's false-positive "
                "rate is at most alpha by construction")
    if not fpr or fpr.get("rate") is None:
        return "not measured: no calibration table holds this rule at this alpha"
    ci = fpr.get("ci95")
    interval = f", 95 % CI {ci[0]:.2%}-{ci[1]:.2%}" if ci and None not in ci else ""
    return (f"measured: {fpr.get('hits', '?')} of {fpr.get('n', '?')} unrelated pairs ({fpr['rate']:.2%}{interval}) "
            f"on {fpr.get('design') or 'the calibration design'}")


def _fmt(p: float) -> str:
    return f"{p:.3g}"


def decide(routes: dict[str, dict[str, Route]], alpha: float, method: str, untested: int = 0) -> dict[str, dict]:
    """`routes`: candidate -> route name -> Route; `untested`: candidates of the family screened out before this
    comparison (a scan's), counted at p = 1. Returns the verdict of each candidate (JSON-ready)."""
    m = len(routes) + untested
    deciding = {}
    for c, rs in routes.items():
        deciding[c] = next((n for n in ROUTES if rs[n].pvalue is not None and
                            best_adjusted(rs[n].floor, m, method) < alpha), None)
    tested = sorted(c for c, n in deciding.items() if n is not None)
    adjusted = dict(zip(tested, adjust([routes[c][deciding[c]].pvalue for c in tested], method, untested)))
    out = {}
    for c in sorted(routes):
        rs, route = routes[c], deciding[c]
        applicable = [n for n in ROUTES if rs[n].pvalue is not None]
        seeing = [n for n in applicable if rs[n].pvalue < alpha]
        rows = {}
        for name in ROUTES:
            r = rs[name]
            if r.pvalue is None:
                role = NOT_APPLICABLE
            elif name == route:
                role = DECIDED
            elif name in seeing:
                role = SUPPORTS
            elif r.found_nothing(alpha):
                role = SILENT
            else:
                role = CAPPED
            rows[name] = {"role": role, "pvalue": r.pvalue, "floor": r.floor, "what": r.what,
                          "components": [list(map(list, g)) for g in r.components]}
        if route is not None and adjusted[c] < alpha:
            verdict = DERIVED
            reasons = [f"{LABELS[route]} decided: p = {_fmt(rs[route].pvalue)}, adjusted {_fmt(adjusted[c])} < "
                       f"{alpha}"]
            reasons += [f"{LABELS[n]} supports it (p = {_fmt(rs[n].pvalue)})" for n in seeing if n != route]
        elif applicable and all(rs[n].found_nothing(alpha) for n in applicable):
            verdict = NO_EVIDENCE
            reasons = ["every applicable route looked and found nothing: " + "; ".join(
                f"{LABELS[n]} p = {_fmt(rs[n].pvalue)}" for n in applicable)]
        else:
            verdict = INCONCLUSIVE
            reasons = []
            if route is None:
                reasons.append(f"no route can reach {alpha} after adjustment across {m} candidate(s)")
            else:
                reasons.append(f"{LABELS[route]} decided: p = {_fmt(rs[route].pvalue)}, adjusted "
                               f"{_fmt(adjusted[c])} >= {alpha}")
            reasons += [f"{LABELS[n]} sees something (p = {_fmt(rs[n].pvalue)})" for n in seeing if n != route]
            for n in ROUTES:
                if rows[n]["role"] == NOT_APPLICABLE:
                    reasons.append(f"{LABELS[n]} not applicable: {rs[n].what}")
                elif rows[n]["role"] == CAPPED:
                    reasons.append(f"{LABELS[n]} could not look: p = {_fmt(rs[n].pvalue)} with smallest possible "
                                   f"p {_fmt(rs[n].floor)} (adjusted at best "
                                   f"{_fmt(best_adjusted(rs[n].floor, m, method))})")
        out[c] = {"verdict": verdict, "route": route, "reasons": reasons, "routes": rows,
                  "pvalue": rs[route].pvalue if route else None, "pvalue_adjusted": adjusted.get(c)}
    return out
