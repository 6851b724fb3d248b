"""`make device-check`: the activation pass of a real model on a GPU, its speed, and its agreement with the CPU.

    python bench/device_check.py MODEL [--batches 20] [--batch-size 8] [--seq-len 1024] [--ref-batches 2]

Loads MODEL as the tool does on a GPU (bf16, device_map="auto"), runs the activation pass over the embedded corpus
with the original's 8 x 1024 shapes for a bounded number of batches (one more, untimed, first to warm up), and
prints tokens/s and achieved TFLOP/s, counted as 2 x parameters x tokens (the matrix products; attention's own
products and the embedding lookup are left out, so this slightly under-counts). Then it runs the first
`--ref-batches` batches again on the CPU in fp32 and reports how well the two layer-wise z-scored curves agree
(Pearson r, and the largest difference in z).

A model too large to carry to the GPU machine can be checked by its architecture instead: `--save-skeleton DIR`
writes only its config and tokenizer (a few MB), and `--random-weights` on that DIR builds the model with seeded
random weights, on the CPU first and then copied to the GPU, so both runs see the same weights.

With `--device cpu` and small settings the same script runs on a machine without a GPU (as the tests do).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from forensics.corpus import load_corpus
from forensics.signals.activations import Runnable, find_blocks, load_runnable, norm_statistics
from forensics.stats.normalise import zscore


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="model directory or .gguf file (or a skeleton directory with --random-weights)")
    p.add_argument("--corpus", help="corpus file (default: the embedded corpus)")
    p.add_argument("--device", default="cuda", help="device of the timed pass (default cuda)")
    p.add_argument("--batches", type=int, default=20, help="timed batches (default 20)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--ref-batches", type=int, default=2, help="batches compared with a CPU fp32 pass (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-weights", action="store_true",
                   help="build MODEL's architecture with seeded random weights (MODEL: config + tokenizer)")
    p.add_argument("--save-skeleton", metavar="DIR", help="write MODEL's config and tokenizer to DIR and stop")
    p.add_argument("--json", metavar="FILE", help="also write the results here")
    return p.parse_args(argv)


def save_skeleton(model: Path, out: Path) -> None:
    kw = {"local_files_only": True}
    root = model
    if model.is_file():
        root, kw["gguf_file"] = model.parent, model.name
    out.mkdir(parents=True, exist_ok=True)
    transformers.AutoConfig.from_pretrained(root, **kw).save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(root, **kw).save_pretrained(out)


def random_runnables(skeleton: Path, device: torch.device, seed: int) -> tuple[Runnable, Runnable]:
    """The same seeded weights twice: fp32 on the CPU, and bf16 on `device`."""
    config = transformers.AutoConfig.from_pretrained(skeleton, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(skeleton, local_files_only=True)
    torch.manual_seed(seed)
    cpu = transformers.AutoModel.from_config(config, dtype=torch.float32).eval()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dev = copy.deepcopy(cpu).to(device=device, dtype=dtype).eval()
    text = config.get_text_config()
    n, positions = int(text.num_hidden_layers), getattr(text, "max_position_embeddings", None)
    return (Runnable(cpu, tokenizer, find_blocks(cpu, n), torch.float32, positions),
            Runnable(dev, tokenizer, find_blocks(dev, n), dtype, positions))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def agreement(a: list[float], b: list[float]) -> dict:
    za, zb = zscore(np.asarray(a)), zscore(np.asarray(b))
    return {"pearson_r": float(np.corrcoef(za, zb)[0, 1]), "max_abs_dz": float(np.max(np.abs(za - zb))),
            "max_rel_diff": float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / np.abs(np.asarray(b))))}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = Path(args.model)
    if args.save_skeleton:
        save_skeleton(model, Path(args.save_skeleton))
        print(f"wrote config and tokenizer of {model} to {args.save_skeleton}")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch", file=sys.stderr)
        return 2

    started = time.perf_counter()
    if args.random_weights:
        cpu_run, dev_run = random_runnables(model, device, args.seed)
    else:
        cpu_run, dev_run = None, load_runnable(model, str(device))
    load_s = time.perf_counter() - started
    seq_len = min(args.seq_len, dev_run.max_positions or args.seq_len)
    corpus = load_corpus(args.corpus)
    windows = corpus.sample_windows(dev_run.tokenizer, num_windows=args.batch_size * (args.batches + 1),
                                    seq_len=seq_len, seed=args.seed)
    warm, timed = windows.split(args.batch_size)

    norm_statistics(dev_run, warm, args.batch_size, model, show_progress=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    t0 = time.perf_counter()
    norm_statistics(dev_run, timed, args.batch_size, model)
    synchronize(device)
    elapsed = time.perf_counter() - t0

    params = sum(p.numel() for p in dev_run.model.parameters())
    tokens = timed.count * timed.seq_len
    result = {
        "model": str(model), "weights": "random (seeded)" if args.random_weights else "as stored",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dev_run.dtype).removeprefix("torch."), "parameters": params,
        "batch_size": args.batch_size, "seq_len": seq_len, "timed_batches": args.batches, "tokens": tokens,
        "load_s": round(load_s, 2), "pass_s": round(elapsed, 3), "tokens_per_s": round(tokens / elapsed, 1),
        "achieved_tflops": round(2 * params * tokens / elapsed / 1e12, 3),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda" else None,
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    print(json.dumps(result))

    ref, _ = timed.split(args.batch_size * args.ref_batches)
    if cpu_run is None:
        cpu_run = load_runnable(model, "cpu")
    dev_means, dev_stds = norm_statistics(dev_run, ref, args.batch_size, model, show_progress=False)
    cpu_means, cpu_stds = norm_statistics(cpu_run, ref, args.batch_size, model)
    check = {"reference_tokens": ref.count * ref.seq_len, "act_norm": agreement(dev_means, cpu_means),
             "act_norm_std": agreement(dev_stds, cpu_stds)}
    print(json.dumps(check))
    print(f"\n{result['device']} {result['dtype']}: {result['tokens_per_s']:,.0f} tokens/s, "
          f"{result['achieved_tflops']:.1f} TFLOP/s (2 x {params / 1e6:.1f}M params x tokens), "
          f"{tokens} tokens in {elapsed:.2f} s")
    print(f"{result['dtype']} on {args.device} vs float32 on cpu, z-scored curves over {check['reference_tokens']} "
          f"tokens: act_norm r = {check['act_norm']['pearson_r']:.6f} (max |dz| {check['act_norm']['max_abs_dz']:.4f})"
          f", act_norm_std r = {check['act_norm_std']['pearson_r']:.6f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"speed": result, "agreement": check}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
