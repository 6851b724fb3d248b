"""GPU check of the weight signals: the same fingerprint on CUDA and on the CPU, with timings.

Builds a Llama-shaped bf16 safetensors checkpoint of about 2 GB (random weights; only the reading and the arithmetic
are being checked), fingerprints it with --device cpu and --device cuda, and prints the largest relative difference
between the two, the wall times, the bytes per second and the peak RSS against the largest tensor.
Usage: python bench/device_weights.py [DIR] [--hidden 2048 --layers 24]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

RUN = r"""
import json, resource, sys, time
from forensics.fingerprint import fingerprint_model
t = time.perf_counter()
fp = fingerprint_model(sys.argv[1], device=sys.argv[2])
fp["run"]["wall_in_process_s"] = time.perf_counter() - t
fp["run"]["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(fp))
"""


def build(path: Path, hidden: int, layers: int, vocab: int = 32000) -> int:
    if (path / "model.safetensors").is_file():
        return (path / "model.safetensors").stat().st_size
    path.mkdir(parents=True, exist_ok=True)
    inter = int(hidden * 2.75) // 64 * 64
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g).bfloat16()}
    for i in range(layers):
        p = f"model.layers.{i}."
        scale = 0.02 * (1 + i / layers)  # a depth trend, as in trained models
        for name, shape in (("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden, hidden)),
                            ("self_attn.v_proj", (hidden, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                            ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
                            ("mlp.down_proj", (hidden, inter))):
            tensors[p + name + ".weight"] = (torch.randn(*shape, generator=g) * scale).bfloat16()
        tensors[p + "input_layernorm.weight"] = (1 + 0.1 * torch.randn(hidden, generator=g)).bfloat16()
        tensors[p + "post_attention_layernorm.weight"] = (1 + 0.1 * torch.randn(hidden, generator=g)).bfloat16()
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128, "num_key_value_heads": hidden // 128, "vocab_size": vocab}))
    return (path / "model.safetensors").stat().st_size


def fingerprint(path: Path, device: str) -> tuple[dict, float]:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", RUN, str(path), device], capture_output=True, text=True, check=True)
    return json.loads(out.stdout), time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("dir", nargs="?", default="/tmp/forensics-device-weights")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--build-only", action="store_true", help="only write the checkpoint (for make bench-weights)")
    args = ap.parse_args()
    path = Path(args.dir)
    size = build(path, args.hidden, args.layers)
    if args.build_only:
        return 0
    print(f"checkpoint: {size / 1e9:.2f} GB bf16, torch {torch.__version__}, "
          f"cuda: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    t = time.perf_counter()
    h = hashlib.sha256()
    with open(path / "model.safetensors", "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    sha_s = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run(["sha256sum", str(path / "model.safetensors")], capture_output=True, check=True)
    sha_cli_s = time.perf_counter() - t
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    fps = {}
    for d in devices:
        fp, wall = fingerprint(path, d)
        fps[d] = fp
        run = fp["run"]
        print(f"{d:4s}: wall {wall:.2f} s (in process {run['wall_in_process_s']:.2f} s, "
              f"{size / run['wall_in_process_s'] / 1e9:.2f} GB/s), peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB, "
              f"device {run['device']}")
    largest = 32000 * args.hidden * 2
    print(f"hashlib sha256 alone: {sha_s:.2f} s; sha256sum: {sha_cli_s:.2f} s; largest tensor {largest / 2**30:.2f} GiB")
    if "cuda" in fps:
        worst = 0.0
        for name, sig in fps["cpu"]["signals"].items():
            for a, b in zip(sig["values"], fps["cuda"]["signals"][name]["values"]):
                if a is not None:
                    worst = max(worst, abs(a - b) / abs(a) if a else abs(b))
        same_hashes = fps["cpu"]["model"]["files"] == fps["cuda"]["model"]["files"]
        print(f"cpu vs cuda: largest relative difference {worst:.2e} over "
              f"{sum(len(s['values']) for s in fps['cpu']['signals'].values())} values; file hashes equal: "
              f"{same_hashes}; agree to 1e-9: {worst < 1e-9 and same_hashes}")
        return 0 if worst < 1e-9 and same_hashes and not math.isnan(worst) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
