"""The dossier's reading of the results: typed results (forensics.results) and the case file, arranged for rendering.

Figures and the dossier only see the dataclasses below. They hold numbers the statistics stage computed, picked out
and ordered for the page; nothing here computes a statistic. Results that do not match forensics.results fail where
they are read, naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import ValidationError

from forensics import roles
from forensics.errors import ForensicsError
from forensics.results import CaseResults, NeuronTest, SignalTest, Tamper
from forensics.results import Rate as RateRecord

ROLES = ("suspect", "candidate", "control", "panel")
ACTIVATION_KINDS = ("act_norm", "act_norm_std")
# Per-layer summaries of the attention heads' QK and OV spectra (forensics/signals/attention.py), one kind together.
SPECTRUM = "attention_spectrum"
SPECTRUM_SIGNALS = ("qk_spectrum", "ov_spectrum")
AGGREGATE = "aggregate"
ROUTE_LABELS = {"neurons": "neuron matching", "attention_spectra": "attention spectra", "std_curves": "std curves"}
# Reading order of signals in tables and figures: the role table's order (attention, norms, FFN, MoE, MLA), the
# spectra, activations, then aggregates (docs/fingerprint-format.md); anything else follows alphabetically.
SIGNAL_ORDER = (*(r.value for r in roles.Role), *SPECTRUM_SIGNALS, *ACTIVATION_KINDS, "qkvo", "ffn")


def signal_sort_key(label: str) -> tuple[int, str]:
    """Cross labels such as ``gate~expert_gate`` sort with their first signal."""
    base = label.split("~")[0]
    return (SIGNAL_ORDER.index(base) if base in SIGNAL_ORDER else len(SIGNAL_ORDER), label)


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
class RouteView:
    """One test's part in a verdict: decided, supports, does not support, cannot reach alpha, not applicable."""
    name: str
    label: str
    role: str
    p: float | None
    floor: float | None
    what: str


@dataclass(frozen=True)
class Candidate:
    name: str
    verdict: str
    rule: str | None
    fpr: Rate
    route: str | None = None  # the test that decided (stats/decision.py)
    p: float | None = None  # its p, and below its p adjusted across the candidates
    error_rate: str | None = None
    routes: tuple[RouteView, ...] = ()
    # The std-curve test in detail (the deciding test of 0.2; now one route of the verdict).
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
    neurons: NeuronTest | None = None  # the neuron-matching test and its conclusion (stats/neurons.py)
    tamper: Tamper | None = None  # the tamper flag (stats/lineage.py)


@dataclass(frozen=True)
class Model:
    name: str
    role: str
    architecture: str | None = None
    num_layers: int | None = None
    path: str | None = None
    claimed_origin: str | None = None
    notes: str | None = None
    curves: dict[str, list[float | None]] = field(default_factory=dict)  # raw values, indexed by layer
    z: dict[str, list[float | None] | None] = field(default_factory=dict)  # z-scored by the statistics; None: flat
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
class Heatmap:
    """The statistics stage's r for every candidate (rows) and compared signal (columns)."""
    candidates: list[str]
    signals: list[str]
    matrix: list[list[float | None]]


@dataclass(frozen=True)
class DossierView:
    case: Case
    models: dict[str, Model]
    suspect: str
    candidates: list[Candidate]
    nulls: list[Null]
    heatmap: Heatmap
    signal_kinds: dict[str, list[str]]  # kind -> signal labels, in a stable order; aggregates under "aggregate"
    multitest: str | None = None
    null_members: tuple[str, ...] = ()  # the unrelated models the null distributions come from
    null_excluded: tuple[tuple[str, str], ...] = ()  # (model, why it was left out of the null)
    neuron_rule: str | None = None

    @classmethod
    def from_results(cls, results: CaseResults | bytes | str | Mapping, case: Mapping | None = None,
                     case_id: str | None = None) -> DossierView:
        """``case`` is the case file as a mapping (id, title, analyst, organisation, parties, suspect, candidates,
        controls with name, path, claimed_origin, notes); without it the dossier names the models as the results
        do and the case by ``case_id``."""
        results = read_results(results)
        case = case or {}
        suspect = str((case.get("suspect") or {}).get("name") or "suspect")
        rename = {"suspect": suspect}  # compare_case calls the suspect "suspect"; the dossier uses its case name
        models = {}
        for name, m in results.models.items():
            curves = results.curves.get(name, {})
            models[rename.get(name, name)] = Model(
                name=rename.get(name, name), role=m.kind, architecture=m.architecture, num_layers=m.num_layers,
                path=m.path, curves={sig: _by_layer(c.layers, c.raw) for sig, c in curves.items()},
                z={sig: None if c.z is None else _by_layer(c.layers, c.z) for sig, c in curves.items()},
                flat=frozenset(sig for sig, c in curves.items() if c.variation.flat))
        candidates, nulls = [], {}
        for name, res in results.candidates.items():
            v, std = res.verdict, res.verdict.std
            primary = res.signals.get(std.primary_signal) if std.primary_signal else None
            emp = primary.empirical_null if primary else None
            candidates.append(Candidate(
                name=name, verdict=v.verdict, rule=v.rule, fpr=_rate(v.measured_false_positive_rate), route=v.route,
                p=v.pvalue, error_rate=v.error_rate,
                routes=tuple(RouteView(n, ROUTE_LABELS[n], v.routes[n].role, v.routes[n].pvalue, v.routes[n].floor,
                                       v.routes[n].what) for n in ROUTE_LABELS if n in v.routes),
                primary_signal=std.primary_signal, statistic=std.statistic,
                ci=_interval(primary.confidence_interval) if primary else None,
                p_permutation=std.pvalue_permutation, p_permutation_floor=std.permutation_floor,
                p_empirical=std.pvalue_empirical, n_null=std.n_null,
                null_percentile=emp.percentile if emp else None, p_adjusted=v.pvalue_adjusted,
                reasons=tuple(v.reasons), signals={label: _signal(label, e) for label, e in res.signals.items()},
                neurons=res.neurons, tamper=res.tamper))
            if emp is not None and std.primary_signal not in nulls:
                nulls[std.primary_signal] = emp
        null_views = []
        for label, emp in nulls.items():
            observed = {c.name: c.signals[label].r for c in candidates
                        if label in c.signals and c.signals[label].r is not None}
            null_views.append(Null(label=label, values=[x for x in emp.values if x is not None], observed=observed,
                                   n=emp.n_null, median=emp.null_median, maximum=emp.null_max))
        _add_case_models(models, case)
        # Suspect, candidates in the order compared, then the unrelated models: the order of every table and figure.
        rank = {suspect: 0, **{c.name: 1 + i for i, c in enumerate(candidates)}}
        later = {"control": len(rank) + 1, "panel": len(rank) + 2}
        models = dict(sorted(models.items(), key=lambda kv: (rank.get(kv[0], later.get(kv[1].role, len(rank) + 3)),
                                                              kv[0])))
        kinds: dict[str, list[str]] = {}
        for c in candidates:
            for sig in c.signals.values():
                if sig.label not in kinds.setdefault(sig.kind, []):
                    kinds[sig.kind].append(sig.label)
        order = ["weight_std", SPECTRUM, *ACTIVATION_KINDS, AGGREGATE]
        kinds = {k: sorted(kinds[k], key=signal_sort_key)
                 for k in sorted(kinds, key=lambda k: order.index(k) if k in order else len(order))}
        cid = case.get("id") or case_id
        if not cid:
            raise ForensicsError(None, "the case has no id")
        return cls(case=_case(case, str(cid)), models=models, suspect=suspect, candidates=candidates,
                   nulls=null_views, heatmap=_heatmap(candidates, kinds), signal_kinds=kinds,
                   multitest=results.multitest.method, neuron_rule=results.neuron_rule,
                   null_members=tuple(m.removeprefix("control:") for m in results.null.members),
                   null_excluded=tuple((e.name, e.reason) for e in results.null.excluded))

    def curve_pair(self, label: str) -> dict[str, str]:
        """Model name -> which of its signals shows ``label`` (the suspect's side, or each candidate's side)."""
        out = {}
        for c in self.candidates:
            s = c.signals.get(label)
            if s is not None:
                out.setdefault(self.suspect, s.names[0])
                out[c.name] = s.names[1]
        return out


def read_results(results: CaseResults | bytes | str | Mapping) -> CaseResults:
    """results.json as typed results; one message naming the first fields that do not match the schema."""
    if isinstance(results, CaseResults):
        return results
    try:
        return CaseResults.from_json(results) if isinstance(results, (bytes, str)) else \
            CaseResults.model_validate(results)
    except ValueError as e:
        if isinstance(e, ValidationError):
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()[:5])
        else:
            problems = str(e)
        raise ForensicsError(None, f"results do not match the results schema (docs/results.schema.json): "
                                   f"{problems}") from e


def _by_layer(layers: list[int], values: list[float | None]) -> list[float | None]:
    out: list[float | None] = [None] * (max(layers) + 1 if layers else 0)
    for layer, v in zip(layers, values):
        out[layer] = v
    return out


def _interval(ci) -> tuple[float, float] | None:
    if ci is None or ci.low is None or ci.high is None:
        return None
    return ci.low, ci.high


def _signal(label: str, e: SignalTest) -> SignalResult:
    names = e.names(label)
    perm, emp = e.permutation, e.empirical_null
    return SignalResult(
        label=label, kind=AGGREGATE if e.is_aggregate else kind_of(names[0]), names=names, status=e.status,
        r=e.statistic, spearman=e.spearman, pvalue=perm.pvalue if perm else None,
        p_floor=perm.floor if perm else None, p_adjusted=e.pvalue_adjusted, ci=_interval(e.confidence_interval),
        null_percentile=emp.percentile if emp else None, null_p=emp.pvalue if emp else None,
        alignment=e.alignment.method if e.alignment else None, roles=tuple(e.roles or ()))


def _rate(fpr: RateRecord | None) -> Rate:
    if fpr is None:
        return Rate()
    ci = tuple(fpr.ci95) if fpr.ci95 and None not in fpr.ci95 else None
    return Rate(rate=fpr.rate, n=fpr.n, count=fpr.hits, ci=ci, design=fpr.design)


def _case(c: Mapping, case_id: str) -> Case:
    parties = tuple((str(p.get("role") or ""), str(p.get("name") or "")) for p in c.get("parties") or ())
    return Case(id=case_id, title=c.get("title"), analyst=c.get("analyst"), organisation=c.get("organisation"),
                parties=parties, date=c.get("date"), description=c.get("description"))


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
        base = models.pop(f"control:{name}", None) or models.get(name) or Model(name=name, role=role)
        models[name] = Model(name=name, role=base.role, architecture=base.architecture,
                             num_layers=base.num_layers, path=str(ref.get("path") or base.path or "") or None,
                             claimed_origin=ref.get("claimed_origin"), notes=ref.get("notes"), curves=base.curves,
                             z=base.z, flat=base.flat)


def _heatmap(candidates: list[Candidate], kinds: dict[str, list[str]]) -> Heatmap:
    signals = [label for labels in kinds.values() for label in labels
               if any(c.signals.get(label) and c.signals[label].status == "compared" for c in candidates)]
    matrix = [[c.signals[label].r if label in c.signals else None for label in signals] for c in candidates]
    return Heatmap(candidates=[c.name for c in candidates], signals=signals, matrix=matrix)
