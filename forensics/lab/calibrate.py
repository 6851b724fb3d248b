"""`make calibrate`: how often the statistics are wrong, measured on models whose lineage is known.

Design (docs/calibration.md has the numbers and the argument):

* Base models: narrow Llama- and Qwen2-style decoders with real-model depth (24 layers, hidden 32), initialised
  from different seeds and trained for a few hundred AdamW steps on the same English text, bytes as tokens (the
  first 80 % of the embedded corpus, forensics/corpus: Austen, the Jargon File, pydoc topics), with different data
  orders. Same architecture, same recipe, same data: the hardest case for a lineage test, since the depth trend
  comes from the recipe and is shared. Every pair of bases of one architecture is an unrelated pair.
* Derived children of a base: noised (Gaussian, one absolute sigma for every layer), int8 (per-tensor absmax) and
  int4 (per-row absmax) rounding, layer-pruned (a quarter of the layers dropped), and, for the first few bases,
  fine-tuned on the held-out last 20 % of the corpus, continued-trained on the same text with a new data order,
  and (Llama only) MoE-upcycled into a Mixtral whose experts start as noisy copies of the dense FFN and which is
  then trained.
* Training and every child's transform are the lineage lab's own (forensics.lab.transforms: continue_pretraining,
  add_noise, requantise, prune_layers, upcycle); every model is saved as safetensors and fingerprinted through the
  pipeline (forensics.pipeline), the text is the embedded corpus (forensics.corpus).
* Each pair is run through compare_case with the other bases of its architecture as controls, exactly as a case
  with declared unrelated models would be. For unrelated pairs we also record a plain layer-shuffle permutation
  test (scipy.stats.permutation_test, 'pairings') of the same statistic, the null the original would have used.

Run: python -m forensics.lab.calibrate [--small] [--markdown docs/calibration.md] [--table PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
from scipy import stats

from forensics import __version__
from forensics.pipeline import neuron_code
from forensics.stats.compare import Settings
from forensics.stats.normalise import curve
from forensics.stats.similarity import QKVO, pearson
from forensics.stats.decision import LABELS, ROUTES, Route
from forensics.stats.decision import decide as decide_routes
from forensics.stats.verdict import DERIVED, PrimaryEvidence, decide

SCHEMA = "llm-forensics.calibration/1"
ALPHAS = (0.01, 0.05)
UNTRAINED = ("noised", "int8", "int4", "pruned", "rotated", "width-pruned", "neuron-permuted", "head-permuted",
             "qk-rescaled", "vo-rescaled", "updown-rescaled", "norm-rescaled")
TRAINED = ("fine-tuned", "continued", "moe-upcycled", "vocab-replaced")
ALIGNMENT_GROUPS = ("unrelated", "unrelated, different widths", *UNTRAINED, *TRAINED)
NEW_VOCABULARY = 320  # tokens of the vocab-replaced child's byte-level BPE (256 bytes, one special, 63 merges)


@dataclass(frozen=True)
class Design:
    name: str
    archs: tuple[str, ...]
    bases: int  # per architecture; every pair of them is an unrelated pair
    trained_children: int  # bases per architecture that also get trained children
    steps: int
    finetune_steps: int
    continued_steps: int
    moe_steps: int
    layers: int = 24
    hidden: int = 32
    intermediate: int = 64
    heads: int = 4
    batch: int = 8
    seq: int = 32
    lr: float = 2e-3
    n_permutations: int = 9999
    n_bootstrap: int = 199  # the interval does not enter the verdict; kept small to save time
    neuron_permutations: int = 199  # T of neuron matching: floor 1/200, below both alphas


FULL = Design("full", ("llama", "qwen2"), bases=21, trained_children=10, steps=300, finetune_steps=100,
              continued_steps=200, moe_steps=100)
# CI: enough to run every code path and catch a grossly broken null, in well under two minutes on two cores.
SMALL = Design("small", ("llama",), bases=7, trained_children=1, steps=40, finetune_steps=10, continued_steps=20,
               moe_steps=10, n_permutations=999, neuron_permutations=39)


def corpus_text() -> str:
    """The embedded corpus (forensics.corpus), its documents in order."""
    from forensics.corpus import load_corpus

    return "\n".join(load_corpus(show_progress=False).texts)


# --- models (worker side: torch and transformers are imported only here) ---------------------------------------

def _model(arch: str, d: Design, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](
        vocab_size=256, hidden_size=d.hidden, intermediate_size=d.intermediate, num_hidden_layers=d.layers,
        num_attention_heads=d.heads, num_key_value_heads=d.heads, max_position_embeddings=d.seq,
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    return {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}[arch](config)


def _windows(data: np.ndarray, steps: int, seed: int, d: Design) -> np.ndarray:
    """`steps` batches of random windows of `data` (bytes as tokens), in the order lab training reads them."""
    starts = np.random.default_rng(seed).integers(0, len(data) - d.seq - 1, steps * d.batch)
    return np.stack([data[s:s + d.seq + 1] for s in starts])


def _train(model, data: np.ndarray, steps: int, lr: float, seed: int, d: Design):
    from forensics.lab.transforms import continue_pretraining

    return continue_pretraining(model, _windows(data, steps, seed, d), seed=seed, batch_size=d.batch, lr=lr)


def byte_tokenizer():
    """The bases' tokenizer: byte-level BPE without merges, token id = byte value (the bases read bytes as tokens).
    Saved with every model, so neuron matching can align two models through the tokens they both spell."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from forensics.sources.vocabulary import byte_level_alphabet

    tok = Tokenizer(models.BPE(vocab=byte_level_alphabet(), merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _fingerprint(folder: Path, name: str) -> dict:
    from forensics import pipeline

    fp = pipeline.fingerprint(folder, "cpu", name, show_progress=False)
    fp["model"]["path"] = name  # the temporary folder means nothing to a reader
    fp["run"] = {}  # timings vary from run to run
    return fp


def neuron_summary(suspect: Path, candidate: Path, d: Design, seed: int) -> dict:
    """Neuron matching of one pair as the pipeline runs it, kept as the case's results keep it."""
    from forensics import pipeline
    from forensics.stats.neurons import NeuronSettings

    result = pipeline.neuron_test(suspect, candidate, NeuronSettings(permutations=d.neuron_permutations, seed=seed))
    result.pop("inputs", None)  # file paths of a temporary folder
    return result


def model_dir(store: Path, name: str) -> Path:
    """Where a model the cross-family pairs need is kept (bases and width-pruned children)."""
    return store / "models" / name.replace("/", "--")


KEPT = ("width-pruned",)  # children besides the bases that unrelated pairs use


def build_family(task: tuple[str, int, int, Design, str]) -> dict:
    """Train one base model and make its children with the lineage lab's transforms; returns {name: fingerprint},
    each child's neuron test against the base, and the base's final loss. The base and the children named in
    `KEPT` stay in `store` for the pairs across families."""
    import torch
    import transformers

    from forensics.lab import transforms as T

    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    arch, index, seed, d, store = task
    store = Path(store)
    raw = corpus_text()
    text = np.frombuffer(raw.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    split = int(len(text) * 0.8)
    pretrain, heldout = text[:split], text[split:]
    base_name = f"{arch}-{index:02d}"
    tokenizer = byte_tokenizer()
    out, neurons = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, trace = _train(_model(arch, d, seed), pretrain, d.steps, d.lr, seed, d)
        base_dir = _save(base, tokenizer, model_dir(store, base_name))
        out[base_name] = _fingerprint(base_dir, base_name)
        # The first and last layers stay (pruning studies drop redundant middle and late layers).
        dropped = np.random.default_rng(seed + 2).choice(np.arange(1, d.layers - 1), size=d.layers // 4,
                                                         replace=False)

        def new_vocabulary():
            """A byte-level BPE trained on the held-out text, embeddings re-initialised, then trained briefly."""
            new_tok = T.new_tokenizer([raw[:split]], vocab_size=NEW_VOCABULARY)
            ids = np.asarray(new_tok(raw[:split])["input_ids"], dtype=np.int64)
            model = T.replace_vocabulary(base, new_tok, _windows(ids, d.finetune_steps, seed + 8, d), seed=seed + 8,
                                         batch_size=d.batch, lr=d.lr / 2)[0]
            return model, new_tok

        # Children train at half the base's learning rate, as fine-tuning usually does.
        children = {
            # Half the median weight std as one absolute sigma: the curve's shape is really perturbed.
            "noised": lambda: T.add_noise(base, seed=seed + 1, scale=0.5, absolute=True)[0],
            "int8": lambda: T.requantise(base, bits=8, granularity="tensor")[0],
            "int4": lambda: T.requantise(base, bits=4, granularity="row")[0],
            "pruned": lambda: T.prune_layers(base, drop=dropped.tolist())[0],
            "rotated": lambda: T.rotate_residual(base, seed=seed + 7)[0],
            "width-pruned": lambda: T.prune_width(base, seed=seed + 7, hidden_keep=0.75, ffn_keep=0.75)[0],
            # The output-preserving edits that redraw std curves or reorder units (the lab's defaults).
            "neuron-permuted": lambda: T.permute_neurons(base, seed=seed + 9)[0],
            "head-permuted": lambda: T.permute_heads(base, seed=seed + 9)[0],
            "qk-rescaled": lambda: T.rescale_qk(base, seed=seed + 9)[0],
            "vo-rescaled": lambda: T.rescale_vo(base, seed=seed + 9)[0],
            "updown-rescaled": lambda: T.rescale_updown(base, seed=seed + 9)[0],
            "norm-rescaled": lambda: T.rescale_norm(base, seed=seed + 9)[0],
        }
        if index < d.trained_children:
            children["fine-tuned"] = lambda: _train(base, heldout, d.finetune_steps, d.lr / 2, seed + 3, d)[0]
            children["continued"] = lambda: _train(base, pretrain, d.continued_steps, d.lr / 2, seed + 4, d)[0]
            if arch == "llama":
                children["moe-upcycled"] = lambda: _train(T.upcycle(base, seed=seed + 5, experts=4)[0], pretrain,
                                                          d.moe_steps, d.lr / 2, seed + 6, d)[0]
            children["vocab-replaced"] = new_vocabulary
        for transform, make in children.items():
            name = f"{base_name}/{transform}"
            made = make()
            model, tok = made if isinstance(made, tuple) else (made, tokenizer)
            folder = _save(model, tok, model_dir(store, name) if transform in KEPT else work / transform)
            out[name] = _fingerprint(folder, name)
            neurons[name] = neuron_summary(folder, base_dir, d, seed)
            if transform not in KEPT:
                shutil.rmtree(folder)
    return {"fingerprints": out, "neurons": neurons, "base_loss": trace["losses"][-1]}


# --- analysis -------------------------------------------------------------------------------------------------

def shuffle_pvalue(suspect: dict, candidate: dict, n_resamples: int, seed: int) -> float:
    """The naive null: shuffle the candidate's layers (jointly over Q/K/V/O), mean r as the statistic."""
    xs, ys = [], []
    for role in QKVO:
        a, b = curve(suspect, role), curve(candidate, role)
        xs.append(a.raw)
        ys.append(b.raw)
    x, y = np.array(xs), np.array(ys)

    def statistic(order, axis=-1):
        return pearson(x, y[:, order].swapaxes(0, -2)).mean(axis=-1)

    res = stats.permutation_test((np.arange(y.shape[1]),), statistic, permutation_type="pairings",
                                 vectorized=True, n_resamples=n_resamples, alternative="greater",
                                 rng=np.random.default_rng(seed))
    return float(res.pvalue)


def analyse_pair(task: tuple[str, str, str, str, list[str], dict[str, dict], Design, int, dict | str]) -> dict:
    """One case: `suspect` against `candidate`, with `controls` as the declared unrelated models; `neurons` is the
    pair's neuron test, or the store where both models are kept for it to be run here."""
    kind, transform, suspect, candidate, controls, fps, d, seed, neurons = task
    from forensics import pipeline

    if not isinstance(neurons, dict):
        neurons = neuron_summary(model_dir(Path(neurons), suspect), model_dir(Path(neurons), candidate), d, seed)
    settings = Settings(n_permutations=d.n_permutations, n_bootstrap=d.n_bootstrap, seed=seed)
    res, _ = pipeline.compare(fps[suspect], {candidate: fps[candidate]}, {c: fps[c] for c in controls}, [],
                              settings, {candidate: neurons})
    cand = res.candidates[candidate]
    v, std = cand.verdict, cand.verdict.std
    row = {"kind": kind, "transform": transform, "suspect": suspect, "candidate": candidate,
           "verdict": v.verdict, "route": v.route, "primary": std.primary_signal, "statistic": std.statistic,
           "p_perm": std.pvalue_permutation, "p_emp": std.pvalue_empirical, "p_combined": std.pvalue_combined,
           "n_null": std.n_null, "perm_floor": std.permutation_floor, 
           "alignment": (cand.neurons.alignment.how if cand.neurons and cand.neurons.alignment else None),
           "routes": {n: {"what": r.what, "components": r.components} for n, r in v.routes.items()},
           "signals": {label: e.permutation.pvalue for label, e in cand.signals.items() if e.compared}}
    if kind == "unrelated" and transform == "none":
        row["p_shuffle"] = shuffle_pvalue(fps[suspect], fps[candidate], d.n_permutations, seed)
    return row


# --- metrics --------------------------------------------------------------------------------------------------

def rate(hits: int, n: int) -> dict:
    ci = stats.binomtest(hits, n).proportion_ci(confidence_level=0.95, method="exact") if n else None
    return {"rate": hits / n if n else None, "hits": hits, "n": n,
            "ci95": [float(ci.low), float(ci.high)] if ci else None}


def pooled(a: dict, b: dict) -> dict:
    """Two rates over disjoint sets of pairs as one: the counts add, the interval is recomputed."""
    return rate(a["hits"] + b["hits"], a["n"] + b["n"])


def auroc(derived: list[float], unrelated: list[float]) -> float:
    """P(score of a derived pair > score of an unrelated pair), ties counted half (Mann-Whitney U / n1 n2)."""
    u = stats.mannwhitneyu(derived, unrelated, alternative="greater").statistic
    return float(u / (len(derived) * len(unrelated)))


def route_p(row: dict, name: str) -> float | None:
    """The route's own p for the pair (stats/decision.py), None where it does not apply."""
    r = row["routes"].get(name)
    return Route(name, r["what"], tuple(tuple(map(tuple, g)) for g in r["components"])).pvalue if r else None


def _route_rates(rows: list[dict]) -> dict:
    out = {}
    for name in ROUTES:
        ps = [p for p in (route_p(r, name) for r in rows) if p is not None]
        out[name] = {"applies": rate(len(ps), len(rows)),
                     **{repr(a): rate(sum(p < a for p in ps), len(ps)) for a in ALPHAS}}
    return out


def summarise(rows: list[dict], d: Design, timing: dict, losses: list[float]) -> dict:
    null = [r for r in rows if r["kind"] == "unrelated" and r["transform"] == "none"]
    widths = [r for r in rows if r["kind"] == "unrelated" and r["transform"] != "none"]
    derived = [r for r in rows if r["kind"] == "derived"]
    tested = [r for r in null if r["p_perm"] is not None]
    table = {
        "schema": SCHEMA,
        "design": {
            "summary": (f"{len(null)} unrelated same-architecture pairs of {d.layers}-layer "
                        f"{'/'.join(d.archs)} models (hidden {d.hidden}, {d.steps} AdamW steps each, different "
                        f"seeds, same text, a byte-level tokenizer), one candidate per case, the other bases of the "
                        f"architecture as controls, and {len(widths)} unrelated pairs of different widths (a base's "
                        f"width-pruned child against another base); {d.n_permutations} permutations, neuron "
                        f"matching with {d.neuron_permutations}"),
            **asdict(d),
            "final_training_loss_mean": float(np.mean(losses)),
            "timing": timing,
        },
        "rule": {repr(a): rate(sum(derived_at(r, a) for r in null), len(null)) for a in ALPHAS},
        "rule_widths": {repr(a): rate(sum(derived_at(r, a) for r in widths), len(widths)) for a in ALPHAS},
        "routes": {"unrelated": _route_rates(null), "unrelated_widths": _route_rates(widths),
                   **{t: _route_rates([r for r in derived if r["transform"] == t]) for t in UNTRAINED + TRAINED
                      if any(r["transform"] == t for r in derived)}},
        "alignment": {t: {how: sum(str(r["alignment"]) == how for r in group)
                          for how in sorted({str(r["alignment"]) for r in group})}
                      for t, group in (("unrelated", null), ("unrelated, different widths", widths),
                                       *((t, [r for r in derived if r["transform"] == t]) for t in UNTRAINED + TRAINED))
                      if group},
        "std_rule": {repr(a): rate(sum(std_derived_at(r, a) for r in null), len(null)) for a in ALPHAS},
        "permutation": {repr(a): rate(sum(r["p_perm"] < a for r in tested), len(tested)) for a in ALPHAS},
        "empirical_null": {repr(a): rate(sum(r["p_emp"] < a for r in tested), len(tested)) for a in ALPHAS},
        "layer_shuffle": {repr(a): rate(sum(r["p_shuffle"] < a for r in null), len(null)) for a in ALPHAS},
        "by_architecture": {arch: _false_positives([r for r in tested if r["candidate"].split("-")[0] == arch])
                            for arch in d.archs},
        "per_signal_permutation": {},
        "tpr": {},
        "auroc": {},
        "histogram": {
            "edges": np.linspace(0, 1, 11).tolist(),
            "primary_permutation": np.histogram([r["p_perm"] for r in tested], bins=10, range=(0, 1))[0].tolist(),
            "layer_shuffle": np.histogram([r["p_shuffle"] for r in null], bins=10, range=(0, 1))[0].tolist(),
        },
        "verdicts": {kind: {v: sum(r["verdict"] == v for r in rows if r["kind"] == kind)
                            for v in sorted({r["verdict"] for r in rows})} for kind in ("unrelated", "derived")},
        "deciding_routes": {kind: {str(n): sum(r["route"] == n for r in rows if r["kind"] == kind)
                                   for n in sorted({str(r["route"]) for r in rows}) if n != "None"} | {
            "none": sum(r["route"] is None for r in rows if r["kind"] == kind)} for kind in ("unrelated", "derived")},
    }
    labels = sorted({label for r in null for label in r["signals"]})
    for label in labels:
        ps = [r["signals"][label] for r in null if label in r["signals"]]
        table["per_signal_permutation"][label] = {repr(a): rate(sum(p < a for p in ps), len(ps)) for a in ALPHAS}
    for transform in UNTRAINED + TRAINED:
        group = [r for r in derived if r["transform"] == transform]
        if group:
            table["tpr"][transform] = {repr(a): rate(sum(derived_at(r, a) for r in group), len(group))
                                       for a in ALPHAS}
    both = [r for r in derived if r["p_perm"] is not None]
    table["auroc"] = {
        "statistic_r": auroc([r["statistic"] for r in both], [r["statistic"] for r in tested]),
        "permutation_p": auroc([-r["p_perm"] for r in both], [-r["p_perm"] for r in tested]),
        "combined_p": auroc([-r["p_combined"] for r in both], [-r["p_combined"] for r in tested]),
        "n_derived": len(both), "n_unrelated": len(tested),
    }
    table["statistic_quantiles"] = {
        kind: dict(zip(("min", "median", "q95", "max"),
                       np.quantile([r["statistic"] for r in group], [0, 0.5, 0.95, 1]).tolist()))
        for kind, group in (("unrelated", tested), ("derived", both))}
    return table


def _false_positives(rows: list[dict]) -> dict:
    return {"rule": {repr(a): rate(sum(derived_at(r, a) for r in rows), len(rows)) for a in ALPHAS},
            "permutation": {repr(a): rate(sum(r["p_perm"] < a for r in rows), len(rows)) for a in ALPHAS}}


def derived_at(row: dict, alpha: float) -> bool:
    """The product's verdict rule (stats/decision.py) at `alpha`, re-applied to a pair's recorded route evidence so
    one run serves every alpha (the tests themselves do not depend on alpha)."""
    routes = {n: Route(n, r["what"], tuple(tuple(map(tuple, g)) for g in r["components"]))
              for n, r in row["routes"].items()}
    return decide_routes({"candidate": routes}, alpha, "holm")["candidate"]["verdict"] == DERIVED


def std_derived_at(row: dict, alpha: float) -> bool:
    """The std-curve route's own rule (the verdict rule of 0.2) at `alpha`."""
    if row["primary"] is None:
        return False
    ev = PrimaryEvidence(row["primary"], row["statistic"], row["p_perm"], row["p_emp"], row["n_null"],
                         row["perm_floor"])
    return decide({"candidate": ev}, alpha, "holm")["candidate"]["verdict"] == DERIVED


def markdown(t: dict) -> str:
    d = t["design"]

    def cell(entry: dict) -> str:
        if not entry["n"]:
            return "n/a (no pair)"
        lo, hi = entry["ci95"]
        return f"{entry['rate']:.3f} ({entry['hits']}/{entry['n']}; {lo:.3f}-{hi:.3f})"

    lines = [
        "# Calibration of the lineage statistics",
        "",
        f"Generated by `make calibrate` (`python -m forensics.lab.calibrate`, design `{d['name']}`): "
        f"{_timing(d['timing'])}. Design and argument: forensics/lab/calibrate.py and "
        "docs/statistics.md. Every number below is a proportion with its exact (Clopper-Pearson) 95 % interval; "
        "the unrelated pairs share models, so they are not independent and the intervals are optimistic.",
        "",
        f"* {d['summary']}.",
        f"* Mean final training loss of the bases: {d['final_training_loss_mean']:.3f} nats/byte "
        f"(uniform over bytes: {math.log(256):.3f}).",
        f"* Derived children of every base: `noised` (Gaussian noise, one absolute sigma of half the median weight "
        f"std on every layer matrix), `int8` (per-tensor absmax rounding), `int4` (per-row absmax rounding), "
        f"`pruned` ({d['layers'] // 4} of {d['layers']} layers dropped at random, first and last kept); of the first "
        f"{d['trained_children']} bases of each architecture also `fine-tuned` ({d['finetune_steps']} steps on "
        f"held-out text, the last 20 % of the corpus), `continued` ({d['continued_steps']} more steps on the "
        f"training text, new order), both at half the learning rate, and for Llama `moe-upcycled` (Mixtral with 4 "
        f"experts, top 2, each expert the dense FFN plus 1 % noise, then {d['moe_steps']} steps). Output-preserving "
        f"and width edits of every base: `rotated` (a random orthogonal rotation of the residual stream, gains "
        f"folded), `width-pruned` (a quarter of the residual dimensions and of each layer's FFN neurons dropped, by "
        f"weight norm), and the lab's output-preserving reorderings and rescalings at their defaults "
        f"(`neuron-permuted`, `head-permuted`, `qk-rescaled`, `vo-rescaled`, `updown-rescaled`, `norm-rescaled`); "
        f"of the first {d['trained_children']} also `vocab-replaced` (a new {NEW_VOCABULARY}-token "
        f"byte-level BPE, embeddings re-initialised, {d['finetune_steps']} steps). The suspect is the child, the "
        f"candidate its base.",
        "",
        "## False-positive rate on unrelated pairs",
        "",
        "The verdict rule is the one of docs/statistics.md §5, with all three routes (neuron matching, attention "
        "spectra, std curves) as a case runs them. Each route's own rate counts the pairs it applies to; neuron "
        "matching applies only where a near-exact alignment of the residual streams exists (docs/statistics.md, "
        "step 1), which unrelated models are not expected to have.",
        "",
        "| test | FPR at alpha = 0.01 | FPR at alpha = 0.05 |",
        "|---|---|---|",
        f"| verdict rule (DERIVED), same width | {cell(t['rule']['0.01'])} | {cell(t['rule']['0.05'])} |",
        f"| verdict rule (DERIVED), different widths | {cell(t['rule_widths']['0.01'])} | "
        f"{cell(t['rule_widths']['0.05'])} |",
        "| verdict rule (DERIVED), every unrelated pair | "
        + " | ".join(cell(pooled(t["rule"][a], t["rule_widths"][a])) for a in ("0.01", "0.05")) + " |",
        *[f"| {LABELS[name]} route alone (p < alpha; applies to {cell(e['applies'])}) | {cell(e['0.01'])} | "
          f"{cell(e['0.05'])} |" for name, e in _in_order(t["routes"]["unrelated"], ROUTES)],
        *[f"| {LABELS[name]} route alone, different widths (applies to {cell(e['applies'])}) | {cell(e['0.01'])} | "
          f"{cell(e['0.05'])} |" for name, e in _in_order(t["routes"]["unrelated_widths"], ROUTES)],
        f"| std-curve route's own rule (the verdict rule of 0.2) | {cell(t['std_rule']['0.01'])} | "
        f"{cell(t['std_rule']['0.05'])} |",
        f"| block-permutation test alone (primary signal) | {cell(t['permutation']['0.01'])} | "
        f"{cell(t['permutation']['0.05'])} |",
        f"| empirical null alone (primary signal) | {cell(t['empirical_null']['0.01'])} | "
        f"{cell(t['empirical_null']['0.05'])} |",
        f"| plain layer shuffle (the naive null, for comparison) | {cell(t['layer_shuffle']['0.01'])} | "
        f"{cell(t['layer_shuffle']['0.05'])} |",
        "",
        "Per architecture:",
        "",
        "| architecture | rule at 0.01 | rule at 0.05 | block permutation at 0.01 | block permutation at 0.05 |",
        "|---|---|---|---|---|",
        *[f"| {arch} | {cell(e['rule']['0.01'])} | {cell(e['rule']['0.05'])} | {cell(e['permutation']['0.01'])} | "
          f"{cell(e['permutation']['0.05'])} |" for arch, e in t["by_architecture"].items()],
        "",
        "Block-permutation test per signal (raw p, before any adjustment):",
        "",
        "| signal | FPR at 0.01 | FPR at 0.05 |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {cell(e['0.01'])} | {cell(e['0.05'])} |"
              for label, e in t["per_signal_permutation"].items()]
    lines += ["", "## True-positive rate per transform (verdict rule)", "",
              "| transform | TPR at alpha = 0.01 | TPR at alpha = 0.05 |", "|---|---|---|"]
    lines += [f"| {name} | {cell(t['tpr'][name]['0.01'])} | {cell(t['tpr'][name]['0.05'])} |"
              for name in UNTRAINED + TRAINED if name in t["tpr"]]
    lines += ["", "Each route alone on the derived pairs (p < alpha, over the pairs it applies to):", "",
              "| transform | route | applies to | TPR at 0.01 | TPR at 0.05 |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {LABELS[route]} | {cell(e['applies'])} | {cell(e['0.01'])} | {cell(e['0.05'])} |"
              for name in UNTRAINED + TRAINED if name in t["routes"]
              for route, e in _in_order(t["routes"][name], ROUTES)]
    lines += ["", "Residual alignment neuron matching used (None: no near-exact map, the route does not apply):", "",
              "| pairs | alignments |", "|---|---|"]
    lines += [f"| {group} | " + ", ".join(f"{how}: {n}" for how, n in counts.items()) + " |"
              for group, counts in _in_order(t["alignment"], ALIGNMENT_GROUPS)]
    a = t["auroc"]
    lines += ["", "## AUROC, derived vs unrelated", "",
              f"Over {a['n_derived']} derived and {a['n_unrelated']} unrelated pairs:", "",
              f"* the original's number alone (mean Pearson r over Q/K/V/O): {a['statistic_r']:.3f}",
              f"* block-permutation p: {a['permutation_p']:.3f}",
              f"* combined p of the verdict rule, max(p_perm, p_emp): {a['combined_p']:.3f}", "",
              "The primary statistic (mean r over Q/K/V/O) ranges over " + "; ".join(
                  f"{kind} pairs: min {q['min']:.3f}, median {q['median']:.3f}, 95th percentile {q['q95']:.3f}, "
                  f"max {q['max']:.3f}" for kind, q in _in_order(t["statistic_quantiles"], ("unrelated", "derived"))) + ".",
              "", "## p-values under the null (unrelated pairs)", "",
              "Counts per tenth of [0, 1]; a valid test is flat or leans right (conservative), never left.", "",
              "| bin | block permutation | layer shuffle |", "|---|---|---|"]
    edges = t["histogram"]["edges"]
    for i, (p, s) in enumerate(zip(t["histogram"]["primary_permutation"], t["histogram"]["layer_shuffle"])):
        lines.append(f"| {edges[i]:.1f}-{edges[i + 1]:.1f} | {p} | {s} |")
    counts = [f"{kind}: " + ", ".join(f"{v} {n}" for v, n in t["verdicts"][kind].items())
              for kind in ("unrelated", "derived")]
    routes = [f"{kind}: " + ", ".join(f"{n} {k}"
                                      for n, k in _in_order(t["deciding_routes"][kind], (*ROUTES, "none")))
              for kind in ("unrelated", "derived")]
    lines += ["", "Verdict counts at alpha = 0.05: " + "; ".join(counts) + ".", "",
              "Deciding route at alpha = 0.05 (none: no route could reach alpha): " + "; ".join(routes) + ".", ""]
    return "\n".join(lines)


def _in_order(entries: dict, order) -> list[tuple]:
    """A table section in the report's order, not the JSON file's (sorted) one."""
    return [(k, entries[k]) for k in order if k in entries]


def families(d: Design, pool, cache: Path) -> tuple[list[dict], int, Path]:
    """Every family, how many had to be built, and the store of kept models: families already in `cache` are reused
    (keyed by the design's training parameters, the corpus, the package version and the neuron-matching code, so a
    cached fingerprint or neuron test is always the one this design and this code would produce)."""
    # The file name carries the architecture and index; the key carries everything else a family depends on.
    training = {k: v for k, v in asdict(d).items()
                if k not in ("name", "archs", "bases", "n_permutations", "n_bootstrap")}
    key = hashlib.sha256(json.dumps([training, corpus_text(), __version__, neuron_code()],
                                    sort_keys=True).encode()).hexdigest()[:16]
    store = cache / key
    tasks = [(arch, i, 1000 * (k + 1) + i, d, str(store)) for k, arch in enumerate(d.archs) for i in range(d.bases)]
    paths = [store / f"{arch}-{i:02d}.json" for arch, i, *_ in tasks]
    # A family is reused only with the models the pairs across families read (a cache may have lost them).
    todo = [(t, p) for t, p in zip(tasks, paths)
            if not (p.exists() and all(model_dir(store, n).is_dir() for n in _kept_names(t[0], t[1])))]
    built = {}
    # Each family is stored as soon as it is built, so an interrupted run resumes where it stopped.
    for (task, path), fam in zip(todo, pool.imap(build_family, [t for t, _ in todo])):
        built[task[:2]] = fam
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(fam, sort_keys=True))
    fams = [built[t[:2]] if t[:2] in built else json.loads(p.read_text()) for t, p in zip(tasks, paths)]
    return fams, len(todo), store


def _kept_names(arch: str, index: int) -> list[str]:
    base = f"{arch}-{index:02d}"
    return [base] + [f"{base}/{child}" for child in KEPT]


def _timing(t: dict) -> str:
    if t["families_built"]:
        built = f"building {t['families_built']} model families took {t['build_s'] / 60:.1f} min"
        if t["families_cached"]:
            built += f" ({t['families_cached']} more came from the cache)"
    else:
        built = f"all {t['families_cached']} model families came from the cache"
    return f"{built}, the analysis {t['analysis_s'] / 60:.1f} min, with {t['workers']} worker processes"


def run(d: Design, workers: int, cache: Path | None = None) -> dict:
    started = time.perf_counter()
    # One pool for both phases: a spawned worker pays for importing torch and transformers once.
    with multiprocessing.get_context("spawn").Pool(workers) as pool, tempfile.TemporaryDirectory() as tmp:
        fams, n_built, store = families(d, pool, cache or Path(tmp))
        built_s = time.perf_counter() - started
        fps = {name: fp for fam in fams for name, fp in fam["fingerprints"].items()}
        tested = {name: test for fam in fams for name, test in fam["neurons"].items()}
        bases = {arch: [f"{arch}-{i:02d}" for i in range(d.bases)] for arch in d.archs}
        cases = []
        for names in bases.values():
            for a, b in combinations(names, 2):
                cases.append(("unrelated", "none", a, b, [n for n in names if n not in (a, b)], str(store)))
            # Different widths: each base's width-pruned child against the next base of its architecture.
            for a, b in zip(names, names[1:] + names[:1]):
                cases.append(("unrelated", "width-pruned", f"{a}/width-pruned", b,
                              [n for n in names if n not in (a, b)], str(store)))
            for base in names:
                for child in sorted(n for n in fps if n.startswith(base + "/")):
                    cases.append(("derived", child.split("/")[1], child, base, [n for n in names if n != base],
                                  tested[child]))
        tasks = [(kind, transform, sus, cand, controls, {n: fps[n] for n in (sus, cand, *controls)}, d, 7 + i, neurons)
                 for i, (kind, transform, sus, cand, controls, neurons) in enumerate(cases)]
        rows = pool.map(analyse_pair, tasks, chunksize=4)
    timing = {"build_s": round(built_s, 1), "analysis_s": round(time.perf_counter() - started - built_s, 1),
              "families_built": n_built, "families_cached": len(fams) - n_built, "workers": workers}
    return summarise(rows, d, timing, [f["base_loss"] for f in fams])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Measure false- and true-positive rates of the lineage statistics.")
    p.add_argument("--small", action="store_true", help="the CI design: one architecture, 7 bases, short training")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--markdown", type=Path, help="write the report here (make calibrate: docs/calibration.md)")
    p.add_argument("--table", type=Path, help="write the JSON table here (make calibrate: "
                                              "forensics/reference/calibration_table.json, which verdicts quote)")
    p.add_argument("--cache", type=Path, help="keep trained families' fingerprints here and reuse them")
    p.add_argument("--render", type=Path, metavar="TABLE",
                   help="no run: write the report (--markdown) from a table an earlier run wrote")
    args = p.parse_args(argv)
    if args.render:
        table = json.loads(args.render.read_text())
    else:
        table = run(SMALL if args.small else FULL, args.workers, args.cache)
    text = json.dumps(table, indent=1, sort_keys=True) + "\n"
    table = json.loads(text)  # the report is rendered from what the file holds, so --render gives the same bytes
    if args.table:
        args.table.write_text(text)
    if args.markdown:
        args.markdown.write_text(markdown(table))
    if not (args.table or args.markdown):
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
