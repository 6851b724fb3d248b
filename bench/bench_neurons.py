"""`make bench-neurons`: what neuron matching costs on a 7B-sized pair (Llama-2-7B shapes), on this machine.

Two independently drawn checkpoints with Llama-2-7B's shapes (hidden 4096, FFN 11008, 32 layers, vocabulary 32000;
fp16, sharded safetensors, ~13.5 GB each) are written once into a cache folder, then `neuron_test` runs on the pair as
a case would: each model read twice from disk (embedding rows, then the FFN sketches), one tensor at a time, then the
exact permutation test. Independent weights are the expensive case: no early stop in the matching helps.

Prints the wall time of each stage, the peak RSS (it must stay far below one model's size: the two models are never
held whole), and the ratio to `sha256sum` of the same files (the least any tool that reads the evidence pays).
`--layers N` writes and tests an N-layer model of the same widths instead (quicker; the reading time scales with N,
the matching with N^2).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HIDDEN, FFN, VOCAB, HEADS = 4096, 11008, 32000, 32


def write_model(path: Path, layers: int, seed: int) -> None:
    """A Llama-shaped fp16 checkpoint, one shard per layer, written without holding more than one layer."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models

    from shards import write_shards

    if (path / "model.safetensors.index.json").is_file():
        return
    tmp = path.with_suffix(".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    def layer(i: int) -> dict:
        p = f"model.layers.{i}."
        return {
            p + "self_attn.q_proj.weight": w(HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": w(HIDDEN, HIDDEN),
            p + "self_attn.v_proj.weight": w(HIDDEN, HIDDEN), p + "self_attn.o_proj.weight": w(HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": w(FFN, HIDDEN), p + "mlp.up_proj.weight": w(FFN, HIDDEN),
            p + "mlp.down_proj.weight": w(HIDDEN, FFN),
            p + "input_layernorm.weight": np.ones(HIDDEN, np.float16),
            p + "post_attention_layernorm.weight": np.ones(HIDDEN, np.float16),
        }

    # Made lazily and in this order, so the draws (and the files) are those of one seeded stream.
    write_shards(tmp, [("embed", lambda: {"model.embed_tokens.weight": w(VOCAB, HIDDEN)}),
                       *((f"layer{i:02d}", lambda i=i: layer(i)) for i in range(layers)),
                       ("head", lambda: {"model.norm.weight": np.ones(HIDDEN, np.float16),
                                         "lm_head.weight": w(VOCAB, HIDDEN)})], save_file)
    (tmp / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS, "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "torch_dtype": "float16"}))
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0")).save(str(tmp / "tokenizer.json"))
    tmp.rename(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--permutations", type=int, default=199)
    ap.add_argument("--cache", type=Path, default=Path("out/bench-neurons"))
    args = ap.parse_args(argv)

    from forensics import pipeline
    from forensics.signals import neurons as S
    from forensics.stats.neurons import NeuronSettings

    a, b = args.cache / f"a-{args.layers}", args.cache / f"b-{args.layers}"
    t0 = time.perf_counter()
    # Written in child processes, so that the peak RSS printed below is the test's own.
    for path, seed in ((a, 1), (b, 2)):
        writer = multiprocessing.get_context("spawn").Process(target=write_model, args=(path, args.layers, seed))
        writer.start()
        writer.join()
        if writer.exitcode:
            raise SystemExit(f"writing {path} failed")
    size = sum(f.stat().st_size for d in (a, b) for f in d.iterdir())
    print(f"pair: 2 x {args.layers} layers of Llama-2-7B width, {size / 1e9:.1f} GB on disk "
          f"(written in {time.perf_counter() - t0:.0f} s, or reused)")

    files = [str(f) for d in (a, b) for f in sorted(d.glob("*.safetensors"))]
    t = time.perf_counter()
    subprocess.run(["sha256sum", *files], check=True, stdout=subprocess.DEVNULL)
    sha = time.perf_counter() - t

    stages = {}
    orig = {name: getattr(S, name) for name in ("read_embedding_rows", "read_sketch")}

    def timed(name):
        def run(*a, **k):
            t = time.perf_counter()
            out = orig[name](*a, **k)
            stages[name] = stages.get(name, 0.0) + time.perf_counter() - t
            return out
        return run

    S.read_embedding_rows, S.read_sketch = timed("read_embedding_rows"), timed("read_sketch")
    settings = NeuronSettings(permutations=args.permutations)
    t = time.perf_counter()
    r = pipeline.neuron_test(a, b, settings)
    total = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    read = stages["read_embedding_rows"] + stages["read_sketch"]
    matching = total - read
    print(f"sha256sum of both models: {sha:.1f} s")
    print(f"neuron_test: {total:.1f} s in all = reading {read:.1f} s (embeddings {stages['read_embedding_rows']:.1f} s, "
          f"FFN sketches {stages['read_sketch']:.1f} s) + alignment and matching {matching:.1f} s "
          f"(T = {args.permutations}: {matching / (args.permutations + 1):.2f} s per draw)")
    print(f"peak RSS {peak:.2f} GB (one model on disk: {size / 2e9:.1f} GB)")
    print(f"ratio to sha256sum: {total / sha:.1f}x; p = {r['pvalue']:.3g} (independent pair)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
