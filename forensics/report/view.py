"""The one place that reads the statistics results and the case description.

Figures and the dossier only see the dataclasses below. Two result shapes are read:

* ``llm-forensics.stats/1``, the output of ``forensics.stats.compare.compare_case`` (``candidates``, ``curves``);
* the simpler ``comparisons`` list shape (``{"models": {name: {"role", "fingerprint"}}, "comparisons": [...],
  "null": {"values": [...]}}``), for results written by other tools.

If either shape changes, adapt ``_from_stats1`` or ``_from_comparisons`` and nothing else. Every field may be missing;
the dossier then prints "n/a" rather than failing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from forensics.errors import ForensicsError

STATS_SCHEMA = "llm-forensics.stats/1"
ROLES = ("suspect", "candidate", "control", "panel")
ACTIVATION_KINDS = ("act_norm", "act_norm_std")
# Per-layer summaries of the attention heads' QK and OV spectra (forensics/signals/attention.py), one kind together.
SPECTRUM = "attention_spectrum"
SPECTRUM_SIGNALS = ("qk_spectrum", "ov_spectrum")
AGGREGATE = "aggregate"
# Reading order of signals in tables and figures: attention, norms, FFN, MoE, MLA, activations, then aggregates
# (docs/fingerprint-format.md); anything else follows alphabetically.
SIGNAL_ORDER = (
    "q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "o_bias", "q_norm", "k_norm", "attn_norm", "post_attn_norm",
    "mlp_norm", "post_mlp_norm", "gate", "up", "down", "router", "expert_gate", "expert_up", "expert_down",
    "shared_gate", "shared_up", "shared_down", "shared_router", "q_a", "q_b", "kv_a", "kv_b", *SPECTRUM_SIGNALS,
    "act_norm", "act_norm_std", "qkvo", "ffn",
)


def signal_sort_key(label: str) -> tuple[int, str]:
    """Cross labels such as ``gate~expert_gate`` sort with their first signal."""
    base = label.split("~")[0]
    return (SIGNAL_ORDER.index(base) if base in SIGNAL_ORDER else len(SIGNAL_ORDER), label)


def _first(d: Mapping | None, *keys, default=None):
    """The value of the first key present (and not None): tolerates the synonyms a statistics stage may use."""
    if not isinstance(d, Mapping):
        return default
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return default


def _num(x) -> float | None:
    if isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _int(x) -> int | None:
    v = _num(x)
    return int(v) if v is not None else None


def _interval(x) -> tuple[float, float] | None:
    if isinstance(x, Mapping):
        x = (_first(x, "low", "lo", "lower"), _first(x, "high", "hi", "upper"))
    if isinstance(x, Sequence) and not isinstance(x, str) and len(x) == 2:
        lo, hi = _num(x[0]), _num(x[1])
        if lo is not None and hi is not None:
            return lo, hi
    return None


def kind_of(signal: str) -> str:
    """Activation signals are named for their kind, the attention spectra share one; every other fingerprint signal
    is a weight std."""
    if signal in SPECTRUM_SIGNALS:
        return SPECTRUM
    return signal if signal in ACTIVATION_KINDS else "weight_std"


@dataclass(frozen=True)
class SignalResult:
    label: str
    kind: str  # weight_std | attention_spectrum | act_norm | act_norm_std | aggregate
    names: tuple[str, str]  # signal in the suspect's and in the candidate's fingerprint (differ for dense vs MoE)
    status: str  # compared | flat | too_short
    r: float | None = None
    spearman: float | None = None
    pvalue: float | None = None  # permutation p
    p_floor: float | None = None  # the smallest p the permutation test can give
    p_adjusted: float | None = None
    ci: tuple[float, float] | None = None
    null_percentile: float | None = None  # % of unrelated pairs below r, 0..100
    null_p: float | None = None
    alignment: str | None = None
    roles: tuple[str, ...] = ()  # members of an aggregate

    @property
    def flat(self) -> bool:
        return self.status == "flat"


@dataclass(frozen=True)
class Rate:
    """The decision rule's measured false-positive rate: ``count`` of ``n`` unrelated pairs flagged."""
    rate: float | None = None
    n: int | None = None
    count: int | None = None
    ci: tuple[float, float] | None = None
    design: str | None = None


@dataclass(frozen=True)
class Candidate:
    name: str
    verdict: str
    rule: str | None
    fpr: Rate
    primary_signal: str | None = None
    statistic: float | None = None
    ci: tuple[float, float] | None = None
    p_permutation: float | None = None
    p_permutation_floor: float | None = None
    p_empirical: float | None = None
    n_null: int | None = None
    null_percentile: float | None = None
    p_adjusted: float | None = None
    reasons: tuple[str, ...] = ()
    signals: dict[str, SignalResult] = field(default_factory=dict)
    neurons: Mapping = field(default_factory=dict)  # the neuron-matching test and its conclusion (stats/neurons.py)
    tamper: Mapping = field(default_factory=dict)  # the tamper flag (stats/lineage.py)
    agreement: str | None = None  # set when the std-curve verdict and neuron matching disagree


@dataclass(frozen=True)
class Model:
    name: str
    role: str
    architecture: str | None = None
    num_layers: int | None = None
    path: str | None = None
    claimed_origin: str | None = None
    notes: str | None = None
    curves: dict[str, list[float | None]] = field(default_factory=dict)
    flat: frozenset[str] = frozenset()  # signals the statistics stage found flat


@dataclass(frozen=True)
class Case:
    id: str
    title: str | None = None
    analyst: str | None = None
    organisation: str | None = None
    parties: tuple[tuple[str, str], ...] = ()
    date: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class Null:
    """Similarities of unrelated pairs for one signal, and each candidate's observed value on it."""
    label: str
    values: list[float]
    observed: dict[str, float]
    n: int | None = None
    median: float | None = None
    maximum: float | None = None


@dataclass(frozen=True)
class Similarity:
    names: list[str]
    matrix: list[list[float | None]]
    computed_here: bool  # True when the results had no matrix and it was derived from the curves


@dataclass(frozen=True)
class DossierView:
    case: Case
    models: dict[str, Model]
    suspect: str
    candidates: list[Candidate]
    nulls: list[Null]
    similarity: Similarity
    signal_kinds: dict[str, list[str]]  # kind -> signal labels, in a stable order; aggregates under "aggregate"
    multitest: str | None = None
    null_members: tuple[str, ...] = ()  # the unrelated models (or pairs) the null distributions come from
    null_excluded: tuple[tuple[str, str], ...] = ()  # (model, why it was left out of the null)
    neuron_rule: str | None = None

    @classmethod
    def from_results(cls, results: Mapping, case: Mapping | None = None, case_id: str | None = None
                     ) -> DossierView:
        """``case`` describes the matter (id, title, analyst, organisation, parties, suspect/candidates/controls
        with name, path, claimed_origin, notes), as the case file gives it; without it, ``results["case"]``."""
        if not isinstance(results, Mapping):
            raise ForensicsError(None, "results must be a JSON object")
        case = case if case is not None else results.get("case") or {}
        reader = _from_stats1 if results.get("schema") == STATS_SCHEMA or "candidates" in results else \
            _from_comparisons
        models, suspect, candidates, nulls, extra = reader(results, case)
        for c in candidates:
            if c.name not in models:
                raise ForensicsError(None, f"results compare candidate {c.name!r}, which is not among the models")
        _add_case_models(models, case)
        # Suspect, candidates in the order compared, then the unrelated models: the order of every table and figure.
        rank = {suspect: 0, **{c.name: 1 + i for i, c in enumerate(candidates)}}
        roles = {"control": len(rank) + 1, "panel": len(rank) + 2}
        models = dict(sorted(models.items(), key=lambda kv: (rank.get(kv[0], roles.get(kv[1].role, len(rank) + 3)),
                                                              kv[0])))
        kinds: dict[str, list[str]] = {}
        for c in candidates:
            for s in c.signals.values():
                if s.label not in kinds.setdefault(s.kind, []):
                    kinds[s.kind].append(s.label)
        order = ["weight_std", SPECTRUM, *ACTIVATION_KINDS, AGGREGATE]
        kinds = {k: sorted(kinds[k], key=signal_sort_key)
                 for k in sorted(kinds, key=lambda k: order.index(k) if k in order else len(order))}
        return cls(case=_case(case, case_id), models=models, suspect=suspect, candidates=candidates, nulls=nulls,
                   similarity=_similarity(results.get("similarity"), models), signal_kinds=kinds, **extra)

    def curve_pair(self, label: str) -> dict[str, str]:
        """Model name -> which of its signals shows ``label`` (the suspect's side, or each candidate's side)."""
        out = {}
        for c in self.candidates:
            s = c.signals.get(label)
            if s is not None:
                out.setdefault(self.suspect, s.names[0])
                out[c.name] = s.names[1]
        return out


# -- llm-forensics.stats/1 -------------------------------------------------------------------------------------------

def _from_stats1(results: Mapping, case: Mapping):
    suspect_name = str(_first(case.get("suspect"), "name", default="suspect"))
    rename = {"suspect": suspect_name}  # compare_case calls the suspect "suspect"; the dossier uses its case name
    models: dict[str, Model] = {}
    for name, m in (results.get("models") or {}).items():
        role = str(_first(m, "kind", "role", default="")).lower()
        if role not in ROLES:
            raise ForensicsError(None, f"model {name!r} has kind {role!r}; expected one of {', '.join(ROLES)}")
        curves, flat = {}, set()
        for sig, c in ((results.get("curves") or {}).get(name) or {}).items():
            layers, raw = c.get("layers") or [], c.get("raw") or []
            values: list[float | None] = [None] * (max(layers) + 1 if layers else 0)
            for layer, v in zip(layers, raw):
                values[int(layer)] = _num(v)
            curves[sig] = values
            if (c.get("variation") or {}).get("flat"):
                flat.add(sig)
        models[rename.get(name, name)] = Model(
            name=rename.get(name, name), role=role, architecture=m.get("architecture"),
            num_layers=_int(m.get("num_layers")), path=m.get("path"), curves=curves, flat=frozenset(flat))
    suspects = [m.name for m in models.values() if m.role == "suspect"]
    if len(suspects) != 1:
        raise ForensicsError(None, f"results must hold exactly one model of kind 'suspect', found {suspects}")

    rule, fpr = results.get("verdict_rule"), results.get("measured_false_positive_rate")
    neuron_rule = results.get("neuron_rule")
    candidates, null_by_label = [], {}
    for name, res in (results.get("candidates") or {}).items():
        signals = {label: _stats1_signal(label, e) for label, e in (res.get("signals") or {}).items()}
        v = res.get("verdict") or {}
        primary = v.get("primary_signal")
        p_entry = (res.get("signals") or {}).get(primary) or {}
        emp = p_entry.get("empirical_null") or {}
        candidates.append(Candidate(
            name=name, verdict=_verdict(v.get("verdict")), rule=_first(v, "rule", default=rule),
            fpr=_rate(_first(v, "measured_false_positive_rate", default=fpr)), primary_signal=primary,
            statistic=_num(_first(v, "statistic", default=p_entry.get("statistic"))),
            ci=_interval(p_entry.get("confidence_interval")),
            p_permutation=_num(v.get("pvalue_permutation")),
            p_permutation_floor=_floor(p_entry.get("permutation")),
            p_empirical=_num(v.get("pvalue_empirical")), n_null=_int(_first(v, "n_null", default=emp.get("n_null"))),
            null_percentile=_num(emp.get("percentile")), p_adjusted=_num(v.get("pvalue_adjusted")),
            reasons=tuple(str(r) for r in v.get("reasons") or ()), signals=signals,
            neurons=res.get("neurons") or {}, tamper=res.get("tamper") or {}, agreement=res.get("agreement")))
        if primary and primary not in null_by_label:
            null_by_label[primary] = emp
    nulls = []
    for label, emp in null_by_label.items():
        observed = {c.name: c.signals[label].r for c in candidates
                    if label in c.signals and c.signals[label].r is not None}
        values = [v for v in (_num(x) for x in emp.get("values") or []) if v is not None]
        nulls.append(Null(label=label, values=values, observed=observed, n=_int(emp.get("n_null")),
                          median=_num(emp.get("null_median")), maximum=_num(emp.get("null_max"))))
    null = results.get("null") or {}
    extra = {"multitest": (results.get("multitest") or {}).get("method"), "neuron_rule": neuron_rule,
             "null_members": tuple(str(m).removeprefix("control:") for m in null.get("members") or ()),
             "null_excluded": tuple((str(e.get("name")), str(e.get("reason"))) for e in null.get("excluded") or ()
                                    if isinstance(e, Mapping))}
    return models, suspects[0], candidates, nulls, extra


def _stats1_signal(label: str, e: Mapping) -> SignalResult:
    names = tuple(e.get("signals") or (label, label))
    is_aggregate = "roles" in e
    perm, emp = e.get("permutation") or {}, e.get("empirical_null") or {}
    return SignalResult(
        label=label, kind=AGGREGATE if is_aggregate else kind_of(names[0]),
        names=(str(names[0]), str(names[-1])), status=str(e.get("status") or "compared"),
        r=_num(e.get("statistic")), spearman=_num(e.get("spearman")), pvalue=_num(perm.get("pvalue")),
        p_floor=_floor(perm), p_adjusted=_num(e.get("pvalue_adjusted")),
        ci=_interval(e.get("confidence_interval")), null_percentile=_num(emp.get("percentile")),
        null_p=_num(emp.get("pvalue")),
        alignment=(e.get("alignment") or {}).get("method") if isinstance(e.get("alignment"), Mapping) else
        e.get("alignment"), roles=tuple(e.get("roles") or ()))


# -- the "comparisons" list shape -------------------------------------------------------------------------------------

def _from_comparisons(results: Mapping, case: Mapping):
    models: dict[str, Model] = {}
    kinds: dict[str, str] = {}
    for name, m in (results.get("models") or {}).items():
        role = str(m.get("role", "")).lower()
        if role not in ROLES:
            raise ForensicsError(None, f"model {name!r} has role {m.get('role')!r}; expected one of "
                                       f"{', '.join(ROLES)}")
        fp = m.get("fingerprint") or {}
        info = fp.get("model") or {}
        curves = {}
        for sig, entry in (fp.get("signals") or {}).items():
            if isinstance(entry, Mapping) and isinstance(entry.get("values"), Sequence):
                curves[sig] = [_num(v) for v in entry["values"]]
                kinds.setdefault(sig, str(entry.get("kind") or kind_of(sig)))
        models[name] = Model(name=name, role=role, architecture=info.get("architecture"),
                             num_layers=_int(info.get("num_layers")), path=info.get("path"), curves=curves)
    suspects = [m.name for m in models.values() if m.role == "suspect"]
    if len(suspects) != 1:
        raise ForensicsError(None, f"results must name exactly one model with role 'suspect', found {suspects}")
    candidates = []
    for c in results.get("comparisons") or []:
        name = _first(c, "candidate", "name")
        if not name:
            raise ForensicsError(None, "a comparison has no 'candidate'")
        signals = {}
        for label, s in (c.get("signals") or {}).items():
            signals[label] = SignalResult(
                label=label, kind=kinds.get(label, kind_of(label)), names=(label, label),
                status="flat" if s.get("flat") else str(s.get("status") or "compared"),
                r=_num(_first(s, "r", "pearson", "statistic")), spearman=_num(_first(s, "spearman", "rho")),
                pvalue=_num(_first(s, "pvalue", "p", "p_value")),
                p_floor=_floor({"n_resamples": _first(s, "permutations", "n_permutations")}),
                p_adjusted=_num(_first(s, "p_adjusted", "p_adj", "pvalue_adjusted")), ci=_interval(s.get("ci")),
                null_percentile=_num(s.get("null_percentile")), null_p=_num(s.get("null_p")),
                alignment=s.get("alignment"))
        agg = c.get("aggregate") or {}
        floors = {s.p_floor for s in signals.values() if s.p_floor}
        candidates.append(Candidate(
            name=str(name), verdict=_verdict(c.get("verdict")), rule=c.get("rule"), fpr=_rate(c.get("fpr")),
            primary_signal=_first(agg, "signal", "label"),
            statistic=_num(_first(agg, "statistic", "r", "mean_r", "similarity")), ci=_interval(agg.get("ci")),
            p_permutation=_num(_first(agg, "pvalue", "p", "p_value")),
            p_permutation_floor=floors.pop() if len(floors) == 1 else None, p_empirical=_num(agg.get("null_p")),
            n_null=_int(agg.get("n_null")), null_percentile=_num(agg.get("null_percentile")),
            p_adjusted=_num(agg.get("p_adjusted")),
            reasons=tuple(str(r) for r in c.get("reasons") or ()), signals=signals))
    nulls = []
    null = results.get("null")
    if isinstance(null, Sequence) and not isinstance(null, str):
        null = {"values": null}
    values = [v for v in (_num(x) for x in (null or {}).get("values") or []) if v is not None]
    if values:
        nulls.append(Null(label=str(_first(null, "statistic", "label", default="aggregate similarity")),
                          values=values, observed={c.name: c.statistic for c in candidates
                                                   if c.statistic is not None}, n=len(values)))
    pairs = tuple(" / ".join(map(str, p)) if isinstance(p, Sequence) and not isinstance(p, str) else str(p)
                  for p in (null or {}).get("pairs") or ())
    multitest = results.get("multitest")
    return models, suspects[0], candidates, nulls, {"null_members": pairs,
                                                    "multitest": multitest if isinstance(multitest, str) else None}


# -- shared -----------------------------------------------------------------------------------------------------------

def _floor(test) -> float | None:
    """The smallest p a resampling test can give: as recorded, else 1/(T+1) for T resamples."""
    if not isinstance(test, Mapping):
        return None
    floor = _num(test.get("floor"))
    n = _int(test.get("n_resamples"))
    return floor if floor is not None else 1 / (n + 1) if n else None


def _verdict(v) -> str:
    return str(v or "INCONCLUSIVE").upper().replace("_", " ")


def _rate(fpr) -> Rate:
    if fpr is None:
        return Rate()
    if not isinstance(fpr, Mapping):
        return Rate(rate=_num(fpr))
    n = _int(_first(fpr, "n", "pairs", "n_pairs", "trials"))
    count = _int(_first(fpr, "false_positives", "count", "k"))
    rate = _num(_first(fpr, "rate", "fpr", "value", "estimate"))
    if rate is None and n and count is not None:
        rate = count / n
    design = fpr.get("design")
    return Rate(rate=rate, n=n, count=count, ci=_interval(fpr.get("ci")),
                design=str(design) if design is not None else None)


def _case(c: Mapping, case_id: str | None) -> Case:
    parties = c.get("parties") or []
    if isinstance(parties, Mapping):
        pairs = tuple((str(k), str(v)) for k, v in parties.items())
    else:
        pairs = tuple((str(_first(p, "role", default="")), str(_first(p, "name", default="")))
                      if isinstance(p, Mapping) else ("", str(p)) for p in parties)
    cid = _first(c, "id", "case_id", default=case_id)
    if not cid:
        raise ForensicsError(None, "the case has no id")
    return Case(id=str(cid), title=c.get("title"), analyst=c.get("analyst"), organisation=c.get("organisation"),
                parties=pairs, date=_first(c, "date"), description=_first(c, "description", "summary"))


def _add_case_models(models: dict[str, Model], case: Mapping) -> None:
    """Fill in what the case file says about each model (path as given, claimed origin, notes); controls that the
    results do not list are added so the dossier names every model of the case."""
    refs = [("suspect", case.get("suspect"))] + [(role, m) for role, key in (("candidate", "candidates"),
                                                                              ("control", "controls"))
                                                  for m in case.get(key) or []]
    for role, ref in refs:
        if not isinstance(ref, Mapping) or not ref.get("name"):
            continue
        name = str(ref["name"])
        base = models.get(name) or models.get(f"control:{name}") or Model(name=name, role=role)
        models.pop(f"control:{name}", None)
        models[name] = Model(name=name, role=base.role, architecture=base.architecture,
                             num_layers=base.num_layers, path=str(ref.get("path") or base.path or "") or None,
                             claimed_origin=ref.get("claimed_origin"), notes=ref.get("notes"), curves=base.curves,
                             flat=base.flat)


def z_score(values: Sequence[float | None]) -> list[float | None] | None:
    """Curve standardised over layers; None when it is flat or too short to have a shape."""
    finite = [v for v in values if v is not None]
    if len(finite) < 2:
        return None
    mean = sum(finite) / len(finite)
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite))
    if sd <= 1e-12 * max(1.0, abs(mean)):
        return None
    return [None if v is None else (v - mean) / sd for v in values]


def resample(values: Sequence[float | None], n: int) -> list[float | None]:
    """Linear interpolation onto ``n`` points of relative depth 0..1 (for models with different layer counts)."""
    m = len(values)
    if m == n:
        return list(values)
    out = []
    for i in range(n):
        x = i * (m - 1) / (n - 1) if n > 1 else 0.0
        lo = int(math.floor(x))
        hi = min(lo + 1, m - 1)
        a, b = values[lo], values[hi]
        out.append(None if a is None or b is None else a + (b - a) * (x - lo))
    return out


def curve_similarity(a: Sequence[float | None], b: Sequence[float | None]) -> float | None:
    """Pearson r of two curves after aligning them by relative depth; None if either is flat."""
    n = max(len(a), len(b))
    if n < 3:
        return None
    xa, xb = z_score(resample(a, n)), z_score(resample(b, n))
    if xa is None or xb is None:
        return None
    pairs = [(u, v) for u, v in zip(xa, xb) if u is not None and v is not None]
    if len(pairs) < 3:
        return None
    ma = sum(u for u, _ in pairs) / len(pairs)
    mb = sum(v for _, v in pairs) / len(pairs)
    cov = sum((u - ma) * (v - mb) for u, v in pairs)
    va = sum((u - ma) ** 2 for u, _ in pairs)
    vb = sum((v - mb) ** 2 for _, v in pairs)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else None


def _similarity(s, models: Mapping[str, Model]) -> Similarity:
    if isinstance(s, Mapping) and s.get("matrix") is not None:
        given = [str(x) for x in _first(s, "models", "names", default=list(models))]
        matrix = [[_num(v) for v in row] for row in s["matrix"]]
        if len(matrix) != len(given) or any(len(row) != len(given) for row in matrix):
            raise ForensicsError(None, "results similarity matrix is not square over its list of models")
        return Similarity(names=given, matrix=matrix, computed_here=False)
    # Without a matrix from the statistics stage: mean r over the non-flat weight signals both models have.
    names = [n for n, m in models.items() if m.curves]
    matrix = []
    for a in names:
        row = []
        for b in names:
            if a == b:
                row.append(1.0)
                continue
            ma, mb = models[a], models[b]
            shared = [k for k in ma.curves if k in mb.curves and kind_of(k) == "weight_std"
                      and k not in ma.flat and k not in mb.flat]
            rs = [r for r in (curve_similarity(ma.curves[k], mb.curves[k]) for k in shared) if r is not None]
            row.append(sum(rs) / len(rs) if rs else None)
        matrix.append(row)
    return Similarity(names=names, matrix=matrix, computed_here=True)
