"""`compare_case`: every statistic of a case (suspect vs candidates, against controls and the panel) in one dict.

The dict is JSON-ready and a pure function of the fingerprints and the settings (seed included): `to_json` of it is
byte-identical from run to run. Each random draw (permutations, bootstrap) takes its own generator, seeded from the
settings' seed and the names of the candidate and signal, so adding a candidate does not change another's numbers.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from forensics.errors import ForensicsError
from forensics.stats.align import METHODS as ALIGN_METHODS
from forensics.stats.align import Aligner
from forensics.stats.bootstrap import block_bootstrap_ci
from forensics.stats.calibration import empirical_null
from forensics.stats.decision import decide as decide_routes
from forensics.stats.decision import error_rate, neuron_route, spectra_route, std_route
from forensics.stats.decision import rule_text as decision_rule
from forensics.stats.lineage import neuron_conclusions, neuron_rule, tamper_flag
from forensics.stats.multitest import METHODS as MULTITEST_METHODS
from forensics.stats.multitest import NAMES as MULTITEST_NAMES
from forensics.stats.multitest import adjust
from forensics.stats.neurons import unavailable
from forensics.stats.normalise import FLAT_CV, Curve, VariationCheck, curve, model_label, signal_names, \
    variation_check, zscore
from forensics.stats.permutation import TREND_DEGREE, NullCurves, PermutationResult, permutation_tests
from forensics.seeds import rng_for
from forensics.stats.similarity import AGGREGATES, pearson, spearman
from forensics.stats.verdict import PRIMARY_ORDER, PrimaryEvidence, decide, measured_fpr, rule_text

SCHEMA = "llm-forensics.stats/2"


@dataclass(frozen=True)
class Settings:
    alpha: float = 0.05
    n_permutations: int = 9999  # T; the permutation p cannot go below 1/(T+1) = 1e-4
    n_bootstrap: int = 1999
    confidence_level: float = 0.95
    multitest: str = "holm"  # holm | bh
    alignment: str = "dtw"  # for unequal depth: dtw | interp (equal depth is always layer by layer)
    flat_cv: float = FLAT_CV
    min_layers: int = 4  # fewer aligned layers than this: not compared
    trend_degree: int = TREND_DEGREE
    seed: int = 0
    untested: int = 0  # candidates of the family screened out before this comparison (a scan's): p = 1 in adjustments
    calibration: dict | None = field(default=None, compare=False)  # table written by forensics.lab.calibrate

    def __post_init__(self):
        problems = []
        if not 0 < self.alpha < 1:
            problems.append(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0 < self.confidence_level < 1:
            problems.append(f"confidence_level must be in (0, 1), got {self.confidence_level}")
        if self.untested < 0:
            problems.append("untested must not be negative")
        if self.untested and self.multitest != "holm":
            # Counting screened-out hypotheses at p = 1 keeps Holm's family-wise error whatever picked the tested
            # ones (Holm is monotone); Benjamini-Hochberg's false discovery rate has no such argument.
            problems.append("a comparison with screened-out candidates (untested) is adjusted by Holm only")
        if self.n_permutations < 1 or self.n_bootstrap < 1:
            problems.append("n_permutations and n_bootstrap must be positive")
        if self.multitest not in MULTITEST_METHODS:
            problems.append(f"multitest must be one of {sorted(MULTITEST_METHODS)}, got {self.multitest!r}")
        if self.alignment not in ALIGN_METHODS:
            problems.append(f"alignment must be one of {list(ALIGN_METHODS)}, got {self.alignment!r}")
        if self.min_layers < 4:
            problems.append("min_layers must be at least 4 (the permutation null needs 2 blocks of 2 layers)")
        if self.flat_cv < 0 or self.trend_degree < 0:
            problems.append("flat_cv and trend_degree must not be negative")
        if problems:
            raise ForensicsError(None, "invalid statistics settings: " + "; ".join(problems))

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "calibration"}


@dataclass(frozen=True)
class Model:
    name: str
    kind: str  # suspect | candidate | control | panel
    fp: dict


@dataclass(frozen=True)
class PairSignal:
    """One signal of one pair of models, before any test."""

    label: str
    names: tuple[str, str]  # signal names in the suspect-side and candidate-side fingerprints
    a: Curve
    b: Curve
    va: VariationCheck
    vb: VariationCheck
    status: str  # compared | flat | too_short
    aligner: Aligner | None
    r: float | None


class Cache:
    """Curves and variation checks, computed once per (model, signal)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.curves: dict[tuple[str, str], tuple[Curve, VariationCheck]] = {}

    def get(self, model: Model, name: str) -> tuple[Curve, VariationCheck]:
        key = (model.name, name)
        if key not in self.curves:
            c = curve(model.fp, name)
            self.curves[key] = (c, variation_check(c.raw, self.settings.flat_cv))
        return self.curves[key]


def signal_pairs(fa: dict, fb: dict) -> dict[str, tuple[str, str]]:
    """Label -> (signal in a, signal in b): every common signal, plus dense FFN vs experts (MoE upcycling)."""
    sa, sb = set(signal_names(fa)), set(signal_names(fb))
    pairs = {s: (s, s) for s in sa & sb}
    for base in AGGREGATES["ffn"]:
        expert = f"expert_{base}"
        if base in sa and base not in sb and expert in sb:
            pairs[f"{base}~{expert}"] = (base, expert)
        if expert in sa and expert not in sb and base in sb:
            pairs[f"{expert}~{base}"] = (expert, base)
    return dict(sorted(pairs.items()))


def slot(compared: set[str] | dict, base: str) -> str | None:
    """Which compared label fills an aggregate's role: the role itself, else its expert or cross counterpart."""
    for label in (base, f"expert_{base}", f"{base}~expert_{base}", f"expert_{base}~{base}"):
        if label in compared:
            return label
    return None


def pair_signal(cache: Cache, ma: Model, mb: Model, label: str, names: tuple[str, str]) -> PairSignal:
    s = cache.settings
    (a, va), (b, vb) = cache.get(ma, names[0]), cache.get(mb, names[1])
    if min(len(a.raw), len(b.raw)) < s.min_layers:
        return PairSignal(label, names, a, b, va, vb, "too_short", None, None)
    if va.flat or vb.flat:
        return PairSignal(label, names, a, b, va, vb, "flat", None, None)
    aligner = Aligner(a, b, s.alignment)
    if aligner.n_aligned < s.min_layers:
        return PairSignal(label, names, a, b, va, vb, "too_short", None, None)
    return PairSignal(label, names, a, b, va, vb, "compared", aligner, float(pearson(*aligner.pairs(b.raw))))


def pair_similarities(cache: Cache, ma: Model, mb: Model) -> dict[str, float]:
    """r of every compared signal of one pair, for the empirical null."""
    out = {}
    for label, names in signal_pairs(ma.fp, mb.fp).items():
        ps = pair_signal(cache, ma, mb, label, names)
        if ps.status == "compared":
            out[label] = ps.r
    return out


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".data")


def same_model(fa: dict, fb: dict) -> bool:
    """A weight file in common (SHA-256) or the very same signals: such a pair cannot serve as an unrelated pair.

    Only weight files count: unrelated models may ship the same tokenizer or README, and a copy may add some.
    """
    def hashes(fp: dict) -> frozenset:
        files = (fp.get("model") or {}).get("files") or []
        return frozenset(f.get("sha256") for f in files if isinstance(f, dict) and f.get("sha256")
                         and str(f.get("path", "")).endswith(WEIGHT_SUFFIXES))

    return bool(hashes(fa) & hashes(fb)) or fa.get("signals") == fb.get("signals")


def _scale(x: np.ndarray, y: np.ndarray) -> dict | None:
    """Absolute scale: the candidate/suspect ratio of raw values over aligned layers. Noise or a rescaling moves
    every layer by about one factor (small spread); unrelated models rarely do."""
    if np.any(x <= 0) or np.any(y <= 0):
        return None
    log_ratio = np.log(y / x)
    q1, med, q3 = np.percentile(log_ratio, [25, 50, 75])
    return {"ratio_median": float(np.exp(med)), "log_ratio_iqr": float(q3 - q1)}


def _signal_entry(ps: PairSignal, perm: PermutationResult | None, cand: str, null: list[float],
                  s: Settings) -> dict:
    entry = {"signals": list(ps.names), "status": ps.status,
             "variation": {"suspect": ps.va.as_dict(), "candidate": ps.vb.as_dict()},
             "n_layers": {"suspect": len(ps.a.raw), "candidate": len(ps.b.raw)}}
    if ps.status == "flat":
        entry["reason"] = (f"uninformative: a curve varies by less than {s.flat_cv:.2%} across layers (CV), so "
                           f"z-scoring would turn its rounding noise into a full-scale curve; not compared")
    if ps.status == "too_short":
        entry["reason"] = f"fewer than {s.min_layers} layers to compare; not compared"
    if ps.status != "compared":
        return entry
    al = ps.aligner.observed()
    alignment = al.as_dict()
    if ps.aligner.method != "layerwise":
        others = {}
        for method in ALIGN_METHODS:
            if method != ps.aligner.method:
                other = Aligner(ps.a, ps.b, method).observed()
                others[method] = {"statistic": float(pearson(other.x, other.y)), "mapping": other.mapping}
        alignment["alternatives"] = others
    ci = block_bootstrap_ci([(al.x, al.y)], s.n_bootstrap, s.confidence_level,
                            rng_for(s.seed, cand, ps.label, "bootstrap"))
    entry.update({
        "statistic": ps.r, "spearman": spearman(al.x, al.y), "alignment": alignment,
        "permutation": perm.as_dict(), "confidence_interval": ci.as_dict(),
        "empirical_null": empirical_null(ps.r, null).as_dict(), "scale": _scale(al.x, al.y),
    })
    return entry


def aggregate_roles(bases: tuple[str, ...], compared: dict[str, PairSignal]) -> tuple[list[str], list[str]]:
    """The compared labels an aggregate averages, and the ones it leaves out.

    One block order must serve every role, and one bootstrap draw too, so the roles must share their curves'
    lengths and the aligned length; the commonest such shape is kept (in practice every role has it).
    """
    found = [label for label in (slot(compared, base) for base in bases) if label is not None]
    if not found:
        return [], []
    shape = {label: (len(compared[label].a.raw), len(compared[label].b.raw), compared[label].aligner.n_aligned)
             for label in found}
    common = Counter(shape[label] for label in found).most_common(1)[0][0]
    roles = [label for label in found if shape[label] == common]
    return roles, [label for label in found if label not in roles]


def _permutations(cand: str, compared: dict[str, PairSignal], aggregates: dict[str, list[str]],
                  s: Settings) -> dict[str, PermutationResult]:
    """Every permutation test of one candidate: one set of null draws per permuted curve length.

    The longer of the two curves is the one permuted (more orders to draw; a 6-layer curve has none), the
    candidate's when they are equal: a choice made on lengths alone. r is symmetric, so the alignment is just built
    the other way round when the suspect's curve moves.
    """
    groups: dict[tuple[str, int], dict[str, tuple[Aligner, NullCurves]]] = {}
    for label, ps in compared.items():
        if len(ps.a.raw) > len(ps.b.raw):
            side, moved, aligner = "suspect", ps.a, Aligner(ps.b, ps.a, s.alignment)
        else:
            side, moved, aligner = "candidate", ps.b, ps.aligner
        groups.setdefault((side, len(moved.raw)), {})[label] = (aligner, NullCurves(moved, s.trend_degree))
    out = {}
    for (side, n), pairs in sorted(groups.items()):
        columns = {label: [label] for label in pairs}
        columns.update({agg: roles for agg, roles in aggregates.items() if roles[0] in pairs})
        out.update(permutation_tests(pairs, columns, s.n_permutations,
                                     rng_for(s.seed, cand, f"permutation/{side}/{n}"), permuted=side))
    return out


def _aggregate_entry(name: str, bases: tuple[str, ...], roles: list[str], left_out: list[str],
                     compared: dict[str, PairSignal], perm: PermutationResult, cand: str,
                     null_sims: list[dict[str, float]], s: Settings) -> dict:
    pairs = [compared[label] for label in roles]
    observed = [p.aligner.observed() for p in pairs]
    statistic = float(np.mean([p.r for p in pairs]))
    role_bases = [base for base in bases if slot(roles, base) is not None]
    null = []
    for sims in null_sims:
        labels = [slot(sims, base) for base in role_bases]
        if all(label is not None for label in labels):
            null.append(float(np.mean([sims[label] for label in labels])))
    ci = block_bootstrap_ci([(al.x, al.y) for al in observed], s.n_bootstrap, s.confidence_level,
                            rng_for(s.seed, cand, name, "bootstrap"))
    return {
        "status": "compared", "roles": roles, "left_out": left_out,
        "statistic": statistic, "role_statistics": {p.label: p.r for p in pairs},
        "spearman": float(np.mean([spearman(al.x, al.y) for al in observed])),
        "permutation": perm.as_dict(), "confidence_interval": ci.as_dict(),
        "empirical_null": empirical_null(statistic, null).as_dict(),
        "definition": f"mean of the roles' Pearson r ({', '.join(bases)}), as the original reported it",
    }


def _curves(cache: Cache, model: Model) -> dict:
    out = {}
    for name in signal_names(model.fp):
        c, v = cache.get(model, name)
        out[name] = {"layers": c.layers.tolist(), "raw": c.raw.tolist(),
                     "z": None if v.flat else zscore(c.raw).tolist(),
                     "variation": v.as_dict()}
    return out


def _check_fingerprint(fp: dict, what: str) -> None:
    if not isinstance(fp, dict):
        raise ForensicsError(None, f"{what} is not a fingerprint object")
    signal_names(fp)


def compare_case(suspect_fp: dict, candidates: dict[str, dict], controls: dict[str, dict] | None = None,
                 panel: list[dict] | None = None, settings: Settings | None = None,
                 neurons: dict[str, dict] | None = None,
                 null_pairs: list[tuple[str, dict, str, dict]] | None = None) -> dict:
    """Compare the suspect with every candidate; controls and the panel supply the empirical null.

    Controls are models the case declares unrelated to the suspect and to every candidate; panel fingerprints are
    reference models unrelated to each other. A panel entry with the same weights as a case model is left out (it
    would put a related pair into the null), and the reason is recorded. `neurons` holds each candidate's neuron
    test (stats/neurons.py), read beside the verdict with the tamper flag (stats/lineage.py). `null_pairs` (name,
    fingerprint, name, fingerprint), when given, is the whole empirical null instead: a scan's, where the suspect's
    relation to every reference is the question, so no pair involving a case model may enter it.
    """
    s = settings or Settings()
    if not candidates:
        raise ForensicsError(None, "the case names no candidate model to compare the suspect with")
    _check_fingerprint(suspect_fp, "the suspect")
    case = [Model("suspect", "suspect", suspect_fp)]
    for name, fp in sorted(candidates.items()):
        _check_fingerprint(fp, f"candidate {name!r}")
        if name == "suspect" or ":" in name:
            raise ForensicsError(None, f"candidate name {name!r} cannot be used: the results call the suspect "
                                       f"'suspect' and prefix other models with 'control:' or 'panel:'")
        case.append(Model(name, "candidate", fp))
    null_members, excluded = [], []
    for name, fp in sorted((controls or {}).items()):
        _check_fingerprint(fp, f"control {name!r}")
        for m in case:
            if same_model(fp, m.fp):
                raise ForensicsError(model_label(fp), f"control {name!r} is the same model as {m.kind} "
                                                      f"{m.name!r}; a model cannot be unrelated to itself")
        null_members.append(Model(f"control:{name}", "control", fp))
    for i, fp in enumerate(panel or []):
        _check_fingerprint(fp, f"panel entry {i}")
        name = f"panel:{model_label(fp) or i}"
        if any(m.name == name for m in null_members) or any(e["name"] == name for e in excluded):
            name = f"{name}#{i}"  # two panel files describing models at the same path
        clash = next((m for m in case + null_members if same_model(fp, m.fp)), None)
        if clash is not None:
            excluded.append({"name": name, "reason": f"same model as {clash.kind} {clash.name!r}"})
        else:
            null_members.append(Model(name, "panel", fp))

    cache = Cache(s)
    # Unrelated pairs: within the controls and panel, and each case model against each of them.
    if null_pairs is None:
        pairs = [(a, b) for i, a in enumerate(null_members) for b in null_members[i + 1:]]
        pairs += [(m, c) for m in case for c in null_members]
    else:
        pairs = [(Model(f"registry:{a}", "panel", fa), Model(f"registry:{b}", "panel", fb))
                 for a, fa, b, fb in null_pairs]
    null_sims = [pair_similarities(cache, a, b) for a, b in pairs]

    suspect = case[0]
    results, family = {}, []
    for cand in case[1:]:
        labels = signal_pairs(suspect.fp, cand.fp)
        matched = {n for pair in labels.values() for n in pair}
        pair_signals = {label: pair_signal(cache, suspect, cand, label, names) for label, names in labels.items()}
        compared = {label: ps for label, ps in pair_signals.items() if ps.status == "compared"}
        aggregates, left_out = {}, {}
        for agg, bases in AGGREGATES.items():
            roles, dropped = aggregate_roles(bases, compared)
            if roles:
                aggregates[agg], left_out[agg] = roles, dropped
        perms = _permutations(cand.name, compared, aggregates, s)
        entries = {}
        for label, ps in pair_signals.items():
            null = [sims[label] for sims in null_sims if label in sims]
            entries[label] = _signal_entry(ps, perms.get(label), cand.name, null, s)
        for agg, roles in aggregates.items():
            entries[agg] = _aggregate_entry(agg, AGGREGATES[agg], roles, left_out[agg], compared, perms[agg],
                                            cand.name, null_sims, s)
        family += [(cand.name, label) for label, e in sorted(entries.items()) if e["status"] == "compared"]
        results[cand.name] = {
            "signals": entries,
            "unmatched": {"suspect_only": sorted(set(signal_names(suspect.fp)) - matched),
                          "candidate_only": sorted(set(signal_names(cand.fp)) - matched)},
        }

    # Each screened-out candidate stands for as many signal tests as the most any compared candidate had.
    per_candidate = max(Counter(c for c, _ in family).values(), default=0)
    adjusted = adjust([results[c]["signals"][label]["permutation"]["pvalue"] for c, label in family], s.multitest,
                      s.untested * per_candidate)
    for (c, label), p in zip(family, adjusted):
        entry = results[c]["signals"][label]
        entry["pvalue_adjusted"] = p
        entry["permutation"]["measured_false_positive_rate"] = measured_fpr(s.calibration, s.alpha, label)

    evidence = {}
    for c, res in results.items():
        primary = next((sig for sig in PRIMARY_ORDER if res["signals"].get(sig, {}).get("status") == "compared"),
                       None)
        if primary is None:
            evidence[c] = None
            continue
        e = res["signals"][primary]
        evidence[c] = PrimaryEvidence(primary, e["statistic"], e["permutation"]["pvalue"],
                                      e["empirical_null"]["pvalue"], e["empirical_null"]["n_null"],
                                      e["permutation"]["floor"])
    std_rule = rule_text(s.alpha, s.multitest)
    fpr = measured_fpr(s.calibration, s.alpha)
    std = decide(evidence, s.alpha, s.multitest, s.untested)
    tests = {c: (neurons or {}).get(c, unavailable("not run")) for c in results}
    conclusions = neuron_conclusions(tests, s.alpha, s.multitest, s.untested)
    routes = {c: {"neurons": neuron_route(tests[c]), "attention_spectra": spectra_route(results[c]["signals"]),
                  "std_curves": std_route(std[c])} for c in results}
    rule = decision_rule(s.alpha, s.multitest)
    for c, verdict in decide_routes(routes, s.alpha, s.multitest, s.untested).items():
        res = results[c]
        own = dict(std[c])
        conclusion = own.pop("verdict")
        verdict["routes"]["std_curves"].update({**own, "conclusion": conclusion, "rule": std_rule,
                                                "measured_false_positive_rate": fpr})
        verdict["routes"]["neurons"].update(conclusions[c])
        res["verdict"] = {**verdict, "rule": rule,
                          "measured_false_positive_rate": fpr if verdict["route"] != "neurons" else None,
                          "error_rate": error_rate(verdict["route"], fpr)}
        if neurons is not None:
            res["neurons"] = {**tests[c], **conclusions[c]}
            res["tamper"] = tamper_flag(res["signals"], res["neurons"], s.alpha)

    return jsonable({
        "schema": SCHEMA,
        "settings": s.as_dict(),
        "verdict_rule": rule,
        "std_rule": std_rule,
        "neuron_rule": neuron_rule(s.alpha, s.multitest) if neurons is not None else None,
        "measured_false_positive_rate": fpr,
        "multitest": {"method": MULTITEST_NAMES[s.multitest], "family": "every compared candidate x signal "
                      "permutation p (aggregates included)" + (
                          f", and {s.untested} screened-out candidates at p = 1 for as many signals as the most "
                          f"any compared one had" if s.untested else ""),
                      "m": len(family) + s.untested * per_candidate},
        "models": {m.name: {"kind": m.kind, "path": model_label(m.fp),
                            "architecture": (m.fp.get("model") or {}).get("architecture"),
                            "num_layers": (m.fp.get("model") or {}).get("num_layers")} for m in case + null_members},
        "null": {"members": [m.name for m in null_members] if null_pairs is None else
                 sorted({m.name for pair in pairs for m in pair}), "excluded": excluded, "n_pairs": len(pairs)},
        "curves": {m.name: _curves(cache, m) for m in case},
        "candidates": results,
    })


def jsonable(obj):
    """Plain JSON types only; non-finite floats become null (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def to_json(results: dict) -> str:
    """Canonical text: sorted keys, shortest round-trip floats; the same results give the same bytes."""
    return json.dumps(results, sort_keys=True, indent=1, allow_nan=False) + "\n"
