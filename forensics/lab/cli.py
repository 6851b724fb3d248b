"""`forensics lab ...`: one subcommand per transform, and `make-set` for the bench's standard set of children.

The main CLI mounts this with `add_parser(subparsers)`; the parser it adds dispatches to `run`.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from forensics.errors import ForensicsError
from forensics.progress import quiet_transformers

err = Console(stderr=True)
TRAIN_STEPS = 20


def _layer_list(text: str) -> list[int]:
    """'3,5,7-9' -> [3, 5, 7, 8, 9]."""
    out: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m[2] is not None and int(m[2]) < int(m[1])):
            raise argparse.ArgumentTypeError(f"not a list of layer numbers like 3,5,7-9: {text!r}")
        out.extend(range(int(m[1]), int(m[2] or m[1]) + 1))
    return out


def _spreads(p: argparse.ArgumentParser) -> list[str]:
    p.add_argument("--layer-spread", type=float, default=0.5,
                   help="each layer's common factor is exp(±s), s uniform in [spread/2, spread] (default: %(default)s)")
    p.add_argument("--unit-spread", type=float, default=0.25,
                   help="log-normal width of the per-unit factors around it (default: %(default)s)")
    return ["layer_spread", "unit_spread"]


def _train(p):
    p.add_argument("--corpus", help="text corpus (.txt, .jsonl, .jsonl.zst, .parquet; default: the embedded corpus)")
    p.add_argument("--steps", type=int, default=TRAIN_STEPS, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=2, help="sequences per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default: %(default)s)")
    return ["corpus", "steps", "batch_size", "seq_len", "lr"]


def _upcycle(p):
    p.add_argument("--arch", choices=["mixtral", "qwen2_moe"], default="mixtral",
                   help="MoE architecture of the child (default: %(default)s)")
    p.add_argument("--experts", type=int, default=4, help="experts per layer (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=2, help="experts routed per token (default: %(default)s)")
    p.add_argument("--noise", type=float, default=0.01,
                   help="Gaussian noise on each expert copy, relative to the dense matrix's std (default: %(default)s)")
    p.add_argument("--router-std", type=float, default=0.02, help="std of the new router (default: %(default)s)")
    return ["arch", "experts", "top_k", "noise", "router_std"]


def _prune(p):
    p.add_argument("--drop", type=_layer_list, required=True, help="layers to remove, e.g. 20-25 or 3,7,11")
    return ["drop"]


def _requantise(p):
    p.add_argument("--bits", type=int, choices=[4, 8], default=4, help="(default: %(default)s)")
    p.add_argument("--granularity", choices=["tensor", "row", "block"], default="block",
                   help="one scale per matrix, per row or per block of a row (default: %(default)s)")
    p.add_argument("--block-size", type=int, default=32, help="(default: %(default)s)")
    return ["bits", "granularity", "block_size"]


def _noise(p):
    p.add_argument("--scale", type=float, default=0.01,
                   help="noise std relative to each tensor's own std (default: %(default)s)")
    p.add_argument("--absolute", action="store_true",
                   help="one sigma (scale x the median std of the layer matrices) for every layer matrix, which "
                        "changes the shape of the std curves rather than scaling them")
    return ["scale", "absolute"]


def _prune_width(p):
    p.add_argument("--hidden-keep", type=float, default=0.75,
                   help="fraction of the residual (hidden) dimensions kept, the same in every layer "
                        "(default: %(default)s)")
    p.add_argument("--ffn-keep", type=float, default=1.0,
                   help="fraction of each layer's FFN neurons kept (default: %(default)s)")
    p.add_argument("--heads-keep", type=float, default=1.0,
                   help="fraction of each layer's kv heads kept, each with its group of query heads "
                        "(default: %(default)s)")
    p.add_argument("--rule", choices=["norm", "random"], default="norm",
                   help="keep the units of largest weight norm (embedding column; gate, up and down norms; v and o "
                        "norms), or a seeded random subset (default: %(default)s)")
    return ["hidden_keep", "ffn_keep", "heads_keep", "rule"]


def _replace_vocabulary(p):
    p.add_argument("--vocab-size", type=int, default=4096,
                   help="size of the new byte-level BPE vocabulary, trained on the corpus (default: %(default)s)")
    return ["vocab_size", *_train(p)]


def _rescale_qk(p):
    p.add_argument("--granularity", choices=["head", "pair"], default="head",
                   help="one factor per kv head, or per kv head and RoPE frequency pair (default: %(default)s)")
    return ["granularity", *_spreads(p)]


# name -> (help, argument adder returning the parameter names it defines, whether it takes a seed). Defaults are
# written out here so that building the parser imports no torch; tests check they match the transforms' own.
SUBCOMMANDS = {
    "train": ("continued pre-training with AdamW on a text corpus", _train, True),
    "upcycle": ("dense FFN -> MoE: noisy expert copies behind a new random router (Mixtral or Qwen2-MoE)", _upcycle,
                True),
    "prune": ("drop layers", _prune, False),
    "requantise": ("round-trip weights through symmetric int8/int4 and save them dequantised", _requantise, False),
    "noise": ("add Gaussian noise relative to each tensor's std", _noise, True),
    "permute-heads": ("permute attention heads (GQA-consistent); outputs unchanged", lambda p: [], True),
    "permute-neurons": ("permute FFN neurons; outputs unchanged", lambda p: [], True),
    "rescale-qk": ("q·c, k/c per kv head; outputs unchanged", _rescale_qk, True),
    "rescale-vo": ("v·c, o/c per value channel; outputs unchanged", _spreads, True),
    "rescale-updown": ("up·d, down/d per FFN neuron; outputs unchanged", _spreads, True),
    "rescale-norm": ("RMSNorm gain·c, next projections' input columns /c; outputs unchanged", _spreads, True),
    "rotate-residual": ("rotate the residual stream by a random orthogonal matrix (norm gains folded into the "
                        "projections, lm_head untied); outputs unchanged", lambda p: [], True),
    "prune-width": ("keep a fraction of the residual dimensions, and optionally of the FFN neurons and kv heads "
                    "(rounded, at least 1; the kept indices go into recipe.json); outputs change, not healed",
                    _prune_width, True),
    "replace-vocabulary": ("new byte-level BPE tokenizer trained on a corpus, token embeddings re-initialised, then "
                           "brief continued pre-training with it", _replace_vocabulary, True),
}
def add_parser(subparsers) -> argparse.ArgumentParser:
    lab = subparsers.add_parser(
        "lab", help="make derived checkpoints on purpose, to test what the forensic signals detect",
        description="Derive labelled checkpoints from a source model (a model directory or a .gguf file). Each "
                    "child is a Hugging Face checkpoint directory with a recipe.json that records the source's "
                    "SHA-256, the transform, its parameters and seed, and the label 'made by the llm-forensics lab'. "
                    "The same arguments give byte-identical files.")
    sub = lab.add_subparsers(dest="lab_command", required=True, metavar="COMMAND")
    for name, (text, adder, seeded) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        _io_arguments(p, seeded)
        p.set_defaults(lab_params=adder(p))
    ms = sub.add_parser("make-set", help="write the bench's standard set of children of one source",
                        description="Write one child per standard transform under OUT/NAME (trained, upcycled, "
                                    "pruned, int4, noised, head-permuted, neuron-permuted, qk-rescaled, vo-rescaled, "
                                    "updown-rescaled, norm-rescaled, rotated, width-pruned, vocab-replaced). "
                                    "Children already written from the same source with the same settings are "
                                    "kept.")
    ms.add_argument("--source", required=True, help="model directory or .gguf file")
    ms.add_argument("--out", required=True, help="directory to hold the children")
    ms.add_argument("--seed", type=int, default=0, help="seed for every child (default: %(default)s)")
    ms.add_argument("--only", nargs="+", metavar="NAME", help="make only these children")
    ms.add_argument("--train-steps", type=int, default=TRAIN_STEPS,
                    help="steps of the trained and vocab-replaced children (default: %(default)s)")
    ms.add_argument("--corpus", help="corpus for the trained and vocab-replaced children (default: the embedded "
                                     "corpus)")
    lab.set_defaults(func=run)
    return lab


def _io_arguments(p: argparse.ArgumentParser, seeded: bool) -> None:
    p.add_argument("--source", required=True, help="model directory or .gguf file")
    p.add_argument("--out", required=True, help="child directory to write")
    p.add_argument("--force", action="store_true", help="replace --out if it is an earlier lab child")
    if seeded:
        p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err)


def run(args: argparse.Namespace) -> int:
    from forensics.lab.io import load_source

    if args.lab_command != "make-set" and Path(args.out).exists() and not args.force:  # before any work
        raise ForensicsError(args.out, "already exists; pass --force to replace it")
    with quiet_transformers(), _progress() as bar:
        task = bar.add_task(f"loading {Path(args.source).name}", total=None)
        source = load_source(args.source)
        bar.update(task, total=1, completed=1)
        if args.lab_command == "make-set":
            return _make_set(args, source, bar)
        return _one(args, source, bar)


def _one(args: argparse.Namespace, source, bar: Progress) -> int:
    from forensics.lab.io import save_child
    from forensics.lab.recipes import derive

    params = {name: getattr(args, name) for name in args.lab_params}
    task = bar.add_task(args.lab_command, total=None)
    child, entry, tokenizer = derive(source, args.lab_command, params, getattr(args, "seed", 0),
                                     progress=lambda done, total: bar.update(task, completed=done, total=total))
    bar.update(task, total=1, completed=1)
    saving = bar.add_task(f"writing {args.out}", total=None)
    save_child(child, args.out, source, [entry], tokenizer=tokenizer, force=args.force)
    bar.update(saving, total=1, completed=1)
    err.print(f"wrote {args.out}")
    return 0


def _make_set(args: argparse.Namespace, source, bar: Progress) -> int:
    from forensics.lab.recipes import TRAINING, make_set, standard_set

    count = len(args.only) if args.only else len(standard_set(source.model.config.num_hidden_layers))
    overall = bar.add_task("lab children", total=count)
    training = bar.add_task("training", total=None, visible=False)

    def on_start(child):
        bar.update(overall, description=f"lab children: {child.name}")
        bar.update(training, visible=child.transform in TRAINING, completed=0)

    def on_done(child, seconds, skipped):
        bar.update(overall, advance=1)
        bar.update(training, visible=False)

    start = time.perf_counter()
    results = make_set(source, Path(args.out), seed=args.seed, only=args.only, train_steps=args.train_steps,
                       corpus=args.corpus, on_start=on_start, on_done=on_done,
                       progress=lambda done, total: bar.update(training, completed=done, total=total))
    bar.stop()
    table = Table("child", "transform", "seconds", "")
    for child, seconds, skipped in results:
        table.add_row(child.name, child.transform, f"{seconds:.1f}", "up to date, kept" if skipped else "written")
    err.print(table)
    err.print(f"{len(results)} children under {args.out} in {time.perf_counter() - start:.0f} s")
    return 0
