"""`make bench-activations`: the layer-streamed activation pass on a Qwen2-7B-shaped checkpoint, on this machine.

The checkpoint (hidden 3584, FFN 18944, 28 layers, 28 query and 4 key/value heads with QKV biases, vocabulary 152064,
untied head; bf16, one safetensors shard per layer, 15.2 GB) is written once into out/bench-7b/ from seeded random
weights, one layer at a time. The pass then runs in a child process (`activations.stream: always`, float32 on a CPU),
whose peak RSS is printed beside the checkpoint's size: the whole model in float32 would need 30 GB; streamed, it
needs one block, the embeddings and the windows' hidden states. `--windows` and `--seq-len` set the pass (default
2 x 64 tokens: a 7B forward pass on 2 CPU cores costs about a minute per hundred tokens).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 3584, 18944, 28, 28, 4, 152064
TARGET_RSS_GB = 4.0


def write_model(path: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from tokenizers import ByteLevelBPETokenizer

    from forensics.lab.calibrate import corpus_text
    from shards import write_shards

    if (path / "model.safetensors.index.json").is_file():
        return
    tmp = path.with_suffix(".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(7)

    def w(*shape):
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    kv = HIDDEN // HEADS * KV_HEADS
    shards = [("embed", lambda: {"model.embed_tokens.weight": w(VOCAB, HIDDEN)})]
    for i in range(LAYERS):
        def layer(i=i):
            p = f"model.layers.{i}."
            return {p + "self_attn.q_proj.weight": w(HIDDEN, HIDDEN), p + "self_attn.q_proj.bias": w(HIDDEN),
                    p + "self_attn.k_proj.weight": w(kv, HIDDEN), p + "self_attn.k_proj.bias": w(kv),
                    p + "self_attn.v_proj.weight": w(kv, HIDDEN), p + "self_attn.v_proj.bias": w(kv),
                    p + "self_attn.o_proj.weight": w(HIDDEN, HIDDEN),
                    p + "mlp.gate_proj.weight": w(FFN, HIDDEN), p + "mlp.up_proj.weight": w(FFN, HIDDEN),
                    p + "mlp.down_proj.weight": w(HIDDEN, FFN),
                    p + "input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
                    p + "post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)}
        shards.append((f"layer{i:02d}", layer))
    shards.append(("head", lambda: {"model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
                                    "lm_head.weight": w(VOCAB, HIDDEN)}))
    write_shards(tmp, shards, save_file)
    (tmp / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "max_position_embeddings": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}))
    # A byte-level BPE trained on the embedded corpus (the weights are random: any tokenizer that reads text does).
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(corpus_text(), vocab_size=2048, show_progress=False)
    tokenizer.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    tmp.rename(path)


def run_pass(path: Path, windows: int, seq_len: int, queue) -> None:
    from forensics.signals.activations import activation_signals

    t = time.perf_counter()
    signals = activation_signals(path, None, batch_size=windows, seq_len=seq_len, num_batches=1, device="cpu",
                                 stream="always", show_progress=False)
    queue.put({"wall_s": time.perf_counter() - t, "values": len(signals["act_norm"]["values"]),
               "unavailable": signals["act_norm"].get("unavailable"), "streamed": signals["act_norm"].get("streamed"),
               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--cache", type=Path, default=ROOT / "out" / "bench-7b")
    args = p.parse_args()
    path = args.cache / "qwen2-7b-shaped"
    spawn = multiprocessing.get_context("spawn")
    t = time.perf_counter()
    writer = spawn.Process(target=write_model, args=(path,))
    writer.start()
    writer.join()
    if writer.exitcode:
        raise SystemExit(f"writing {path} failed")
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"checkpoint: {size / 1e9:.1f} GB bf16, {LAYERS} layers (written in {time.perf_counter() - t:.0f} s, "
          f"or reused)")
    queue = spawn.Queue()
    child = spawn.Process(target=run_pass, args=(path, args.windows, args.seq_len, queue))
    child.start()
    result = queue.get()
    child.join()
    rss_gb = result["peak_rss_gb"]
    print(json.dumps({**result, "checkpoint_gb": round(size / 1e9, 1),
                      "float32_model_gb": round(size * 2 / 1e9, 1), "target_rss_gb": TARGET_RSS_GB}, indent=1))
    print(f"streamed activation pass: {result['wall_s']:.0f} s, peak RSS {rss_gb:.2f} GB "
          f"({rss_gb / TARGET_RSS_GB:.2f} x the {TARGET_RSS_GB:.0f} GB target; the model in float32: "
          f"{size * 2 / 1e9:.0f} GB)")
    return 0 if result["values"] == LAYERS + 1 else 1


if __name__ == "__main__":
    sys.exit(main())
