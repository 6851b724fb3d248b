"""Named transforms with their parameters, and the standard set of lab children for the bench.

`derive` runs one named transform on a loaded source and returns the child with its recipe step (and its own
tokenizer, when it has a new one); `make_set` writes the standard set. Two transforms need more than the model:
continued pre-training cuts its token windows from a corpus (the embedded one by default) with the source's own
tokenizer, and vocabulary replacement first trains a new tokenizer on that corpus and cuts the windows with it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from forensics.errors import ForensicsError
from forensics.lab import transforms as T
from forensics.lab.io import Source, read_recipe, recipe, save_child, step

Progress = Callable[[int, int], None]

# name -> (function, whether it takes a seed)
TRANSFORMS: dict[str, tuple[Callable, bool]] = {
    "train": (T.continue_pretraining, True),
    "upcycle": (T.upcycle, True),
    "prune": (T.prune_layers, False),
    "requantise": (T.requantise, False),
    "noise": (T.add_noise, True),
    "permute-heads": (T.permute_heads, True),
    "permute-neurons": (T.permute_neurons, True),
    "rescale-qk": (T.rescale_qk, True),
    "rescale-vo": (T.rescale_vo, True),
    "rescale-updown": (T.rescale_updown, True),
    "rescale-norm": (T.rescale_norm, True),
    "rotate-residual": (T.rotate_residual, True),
    "prune-width": (T.prune_width, True),
    "replace-vocabulary": (T.replace_vocabulary, True),
}
# The transforms that train, and what they take beyond their functions' own parameters: how to cut the token windows,
# and for a new vocabulary its size.
TRAIN_DEFAULTS = {"steps": 20, "seq_len": 64, "corpus": None}
TRAINING = {"train": TRAIN_DEFAULTS, "replace-vocabulary": {"vocab_size": 4096, **TRAIN_DEFAULTS}}
# Given by derive, not by the user.
SUPPLIED = ("seed", "progress", "windows", "tokenizer")


def effective_params(transform: str, params: dict) -> dict:
    """`params` completed with the transform's defaults, so a recipe states every parameter that was used."""
    if transform not in TRANSFORMS:
        raise ForensicsError(None, f"unknown transform {transform!r}; one of {', '.join(TRANSFORMS)}")
    fn = TRANSFORMS[transform][0]
    named = {n: p.default for n, p in inspect.signature(fn).parameters.items()
             if p.kind is p.KEYWORD_ONLY and n not in SUPPLIED}
    named.update(TRAINING.get(transform, {}))
    unknown = sorted(set(params) - set(named))
    if unknown:
        raise ForensicsError(None, f"{transform} takes no parameter {', '.join(unknown)}")
    full = {**named, **params}
    missing = sorted(n for n, v in full.items() if v is inspect.Parameter.empty)
    if missing:
        raise ForensicsError(None, f"{transform} needs {', '.join(missing)}")
    return full


def derive(source: Source, transform: str, params: dict, seed: int,
           progress: Progress | None = None) -> tuple[nn.Module, dict, object | None]:
    """Apply one named transform to the source model; returns the child, its recipe step, and the child's own
    tokenizer (None: it keeps the source's)."""
    params = effective_params(transform, params)
    fn, seeded = TRANSFORMS[transform]
    kwargs = dict(params)
    details, tokenizer = {}, None
    if transform in TRAINING:
        corpus, steps, seq_len = kwargs.pop("corpus"), kwargs.pop("steps"), kwargs.pop("seq_len")
        kwargs["windows"], tokenizer, details = _training_windows(source, corpus, kwargs.pop("vocab_size", None),
                                                                  steps, kwargs["batch_size"], seq_len, seed)
        if tokenizer is not None:
            kwargs["tokenizer"] = tokenizer
        kwargs["progress"] = progress
    if seeded:
        kwargs["seed"] = seed
    child, more = fn(source.model, **kwargs)
    return child, step(transform, params, seed if seeded else None, {**details, **more}), tokenizer


def _training_windows(source: Source, corpus_path: str | None, vocab_size: int | None, steps: int, batch_size: int,
                      seq_len: int, seed: int) -> tuple[np.ndarray, object | None, dict]:
    """`steps` × `batch_size` token windows of `seq_len` from the corpus, cut with the source's own tokenizer, or
    with a new one of `vocab_size` trained on the whole corpus; returns (windows, the new tokenizer or None, details).

    The corpus module's own bars stay off: they would nest inside the caller's (a few seconds of work at most).
    """
    from forensics.corpus import load_corpus

    if vocab_size is None and source.tokenizer is None:
        raise ForensicsError(source.path, "has no tokenizer, which continued pre-training needs to cut the corpus")
    if steps < 1 or batch_size < 1 or seq_len < 2:
        raise ForensicsError(None, f"training needs steps >= 1, batch size >= 1 and seq len >= 2; got {steps}, "
                                   f"{batch_size}, {seq_len}")
    corpus = load_corpus(corpus_path, show_progress=False)
    details = {"corpus": corpus.describe()}
    tokenizer = None
    if vocab_size is not None:
        tokenizer = T.new_tokenizer(corpus.texts, vocab_size=vocab_size, like=source.tokenizer)
        details["tokenizer"] = _describe_tokenizer(tokenizer, source.tokenizer)
    windows = corpus.sample_windows(source.tokenizer if tokenizer is None else tokenizer,
                                    num_windows=steps * batch_size, seq_len=seq_len, seed=seed, show_progress=False)
    details["windows"] = windows.describe()
    return windows.ids, tokenizer, details


def _describe_tokenizer(new, old) -> dict:
    """What the new vocabulary is, and how many of its spellings the source's vocabulary also has (their embeddings
    are new all the same, so matching tokens by spelling finds no alignment)."""
    vocab = new.get_vocab()
    return {"kind": "byte-level BPE trained on the corpus", "size": len(vocab),
            "special_tokens": list(new.all_special_tokens),
            "shared_spellings": None if old is None else len(vocab.keys() & old.get_vocab().keys()),
            "sha256": hashlib.sha256(new.backend_tokenizer.to_str().encode()).hexdigest()}


@dataclass(frozen=True)
class Child:
    name: str
    transform: str
    params: dict = field(default_factory=dict)


def standard_set(num_layers: int, train_steps: int = TRAIN_DEFAULTS["steps"],
                 corpus: str | None = None) -> list[Child]:
    """The bench's children of one source, in the order they are made.

    The pruned child drops a block of a tenth of the layers ending two before the last, where ShortGPT-style
    pruning finds the least-needed layers; on SmolLM2-135M (layers 25-27 of 30) it still writes grammatical text
    without healing, where a fifth of the layers leaves it incoherent. The width-pruned child keeps three quarters of
    the residual dimensions and of the FFN neurons and every head, roughly Minitron's width pruning of Llama-3.1-8B
    (hidden 4096 -> 3072, FFN 14336 -> 9216, heads kept); it is not healed either. The vocabulary-replaced child
    trains as long as the trained one, so that the two differ by the new vocabulary alone.
    """
    width = max(1, num_layers // 10)
    end = max(width, num_layers - 2)
    drop = list(range(end - width, end))
    return [
        Child("trained", "train", {"steps": train_steps, "corpus": corpus}),
        Child("upcycled", "upcycle", {"arch": "mixtral", "experts": 4, "top_k": 2, "noise": 0.01}),
        Child("pruned", "prune", {"drop": drop}),
        Child("int4", "requantise", {"bits": 4, "granularity": "block", "block_size": 32}),
        Child("noised", "noise", {"scale": 0.01}),
        Child("head-permuted", "permute-heads"),
        Child("neuron-permuted", "permute-neurons"),
        Child("qk-rescaled", "rescale-qk"),
        Child("vo-rescaled", "rescale-vo"),
        Child("updown-rescaled", "rescale-updown"),
        Child("norm-rescaled", "rescale-norm"),
        Child("rotated", "rotate-residual"),
        Child("width-pruned", "prune-width", {"hidden_keep": 0.75, "ffn_keep": 0.75, "heads_keep": 1.0}),
        Child("vocab-replaced", "replace-vocabulary", {"vocab_size": 4096, "steps": train_steps, "corpus": corpus}),
    ]


def _up_to_date(out: Path, source: Source, child: Child, seed: int) -> bool:
    """A child already written from the same source bytes with the same transform, parameters, seed and versions."""
    old = read_recipe(out)
    seeded = TRANSFORMS[child.transform][1]
    want = recipe(source, [step(child.transform, effective_params(child.transform, child.params),
                                seed if seeded else None)])
    return old is not None and _request(old) == _request(json.loads(json.dumps(want)))


def _request(r: dict) -> dict:
    """A recipe without what running it found (its steps' details)."""
    return {**r, "steps": [{k: v for k, v in s.items() if k != "details"} for s in r.get("steps", [])]}


def make_set(source: Source, out: Path, *, seed: int = 0, only: list[str] | None = None,
             train_steps: int = TRAIN_DEFAULTS["steps"], corpus: str | None = None,
             on_start: Callable[[Child], None] | None = None,
             on_done: Callable[[Child, float, bool], None] | None = None,
             progress: Progress | None = None) -> list[tuple[Child, float, bool]]:
    """Write the standard set under `out` (one directory per child), skipping children already up to date.

    Returns (child, seconds, skipped) per child. `on_start`/`on_done` report each child; `progress` gets training
    steps.
    """
    children = standard_set(source.model.config.num_hidden_layers, train_steps, corpus)
    if only:
        unknown = sorted(set(only) - {c.name for c in children})
        if unknown:
            raise ForensicsError(None, f"no lab child named {', '.join(unknown)}; the set is "
                                       f"{', '.join(c.name for c in children)}")
        children = [c for c in children if c.name in only]
    results = []
    for child in children:
        if on_start:
            on_start(child)
        start = time.perf_counter()
        skipped = _up_to_date(out / child.name, source, child, seed)
        if not skipped:
            model, entry, tokenizer = derive(source, child.transform, child.params, seed, progress)
            save_child(model, out / child.name, source, [entry], tokenizer=tokenizer, force=True)
            del model
        results.append((child, time.perf_counter() - start, skipped))
        if on_done:
            on_done(child, results[-1][1], skipped)
    return results
