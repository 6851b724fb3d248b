"""`make bench-weights`: our fingerprint pass (every weight signal and the SHA-256 of every file) against the hashing
floor and the naive transformers path, as ratios.

The floor is `openssl dgst -sha256` of the same files (SHA-NI, one core); `sha256sum` is shown beside it. Each
measurement runs in a fresh process (wall time from the outside, peak RSS from the process itself), on the real
decoders fetched by `make models` (G is the quantised Qwen2 of the original case's architecture), on a bf16
safetensors copy of SmolLM2 made from its GGUF (the usual format of evidence), on a 2.6 GB Llama-shaped bf16
checkpoint (bench/device_weights.py) and on the Qwen2-7B-shaped 15.2 GB sharded bf16 checkpoint of
bench/bench_activations.py (written once into out/bench-7b, shared with `make bench-activations`). The naive path is
skipped where the model in float32 would not fit in half of this machine's memory. The inputs are made in child
processes too: Linux carries a process's peak RSS across exec, so this process stays small. Beside the process's wall time, the pass's own (`run.elapsed_s` of the fingerprint), without
Python's start-up and imports. Every input is hashed
once before the timed runs, so all of them read from the page cache where it holds the files. Run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
WORK = ROOT / "out" / "bench"

NAIVE = r"""
import sys, resource, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
p = Path(sys.argv[1])
if p.is_file():
    m = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
else:
    m = AutoModelForCausalLM.from_pretrained(p)
stds = {n: float(t.double().std(unbiased=False)) for n, t in m.state_dict().items() if t.is_floating_point()}
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""
OURS = r"""
import sys, resource
from forensics.fingerprint import fingerprint_model
fp = fingerprint_model(sys.argv[1], device="cpu")
print(fp["run"]["elapsed_s"], file=sys.stderr)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def timed(cmd: list[str]) -> tuple[float, int | None, float | None]:
    """Wall time from the outside, the peak RSS the process printed last, and the pass's own time (stderr's last
    line, where the command prints one)."""
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    inner = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    try:
        elapsed = float(inner)
    except ValueError:
        elapsed = None
    return wall, int(last) if last.isdigit() else None, elapsed


def files_of(path: Path) -> list[str]:
    return [str(path)] if path.is_file() else [str(f) for f in sorted(path.iterdir()) if f.is_file()]


MAKE_COPY = r"""
import sys, torch
from forensics.lab.io import load_source  # dequantises the GGUF into a plain model
load_source(sys.argv[1]).model.to(torch.bfloat16).save_pretrained(sys.argv[2])
"""


def safetensors_copy(gguf: Path) -> Path:
    out = WORK / "smollm2-135m-bf16"
    if not (out / "model.safetensors").is_file():
        subprocess.run([sys.executable, "-c", MAKE_COPY, str(gguf), str(out)], check=True, capture_output=True)
    return out


def large_checkpoint() -> Path:
    out = WORK / "llama-2.6gb-bf16"
    subprocess.run([sys.executable, str(ROOT / "bench" / "device_weights.py"), str(out), "--build-only"],
                   check=True, capture_output=True)
    return out


def seven_b_checkpoint() -> Path:
    out = ROOT / "out" / "bench-7b" / "qwen2-7b-shaped"
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import bench_activations as b; " \
           f"from pathlib import Path; b.write_model(Path({str(out)!r}))"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return out


def fits_in_memory(size: int) -> bool:
    """Whether the naive path's float32 copy (about twice a 16-bit checkpoint) fits in half the machine's memory."""
    return 2 * size < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2


def best_of(n: int, cmd: list[str]) -> tuple[float, int | None, float | None]:
    runs = [timed(cmd) for _ in range(n)]
    inner = [r[2] for r in runs if r[2] is not None]
    return min(r[0] for r in runs), max((r[1] or 0) for r in runs), min(inner) if inner else None


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    gguf_e = MODELS / "E-smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf_f = MODELS / "F-gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"
    gguf_g = MODELS / "G-qwen2.5-coder-0.5b" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    missing = [str(p) for p in (gguf_e, gguf_f, gguf_g) if not p.is_file()]
    if missing:
        print(f"missing models (run `make models`): {missing}", file=sys.stderr)
        return 2
    WORK.mkdir(parents=True, exist_ok=True)
    cases = {"SmolLM2-135M GGUF Q4_1": gguf_e, "Gemma3-270M GGUF Q4_K_M": gguf_f,
             "Qwen2.5-Coder-0.5B GGUF Q4_K_M (G)": gguf_g,
             "SmolLM2-135M safetensors bf16": safetensors_copy(gguf_e),
             "Llama-shaped 2.6 GB safetensors bf16": large_checkpoint(),
             "Qwen2-7B-shaped 15.2 GB safetensors bf16, 30 shards": seven_b_checkpoint()}
    rows = []
    for label, path in cases.items():
        files = files_of(path)
        size = sum(Path(f).stat().st_size for f in files)
        subprocess.run(["openssl", "dgst", "-sha256", *files], check=True, capture_output=True)  # into the cache
        floor, _, _ = best_of(3, ["openssl", "dgst", "-sha256", *files])
        sha_wall, _, _ = best_of(3, ["sha256sum", *files])
        ours_wall, ours_rss, pass_s = best_of(3, [sys.executable, "-c", OURS, str(path)])
        row = {"model": label, "bytes": size,
               "ours_s": round(ours_wall, 3), "pass_s": round(pass_s, 3),
               "ours_peak_rss_mb": round(ours_rss / 2**20, 1),
               "openssl_s": round(floor, 3), "sha256sum_s": round(sha_wall, 3),
               "ours_over_openssl": round(ours_wall / floor, 2), "pass_over_openssl": round(pass_s / floor, 2),
               "ours_over_sha256sum": round(ours_wall / sha_wall, 2)}
        if fits_in_memory(size):
            naive_wall, naive_rss, _ = best_of(1, [sys.executable, "-c", NAIVE, str(path)])
            row.update({"naive_s": round(naive_wall, 3), "naive_peak_rss_mb": round(naive_rss / 2**20, 1),
                        "naive_over_ours_time": round(naive_wall / ours_wall, 2),
                        "ours_over_naive_memory": round(ours_rss / naive_rss, 3)})
        rows.append(row)
        print(json.dumps(row))
    print("\nmodel | GB | ours s | pass s | openssl s | sha256sum s | ours/openssl | pass/openssl | ours peak RSS MB | "
          "naive/ours time | ours/naive memory")
    for r in rows:
        print(f"{r['model']} | {r['bytes'] / 1e9:.2f} | {r['ours_s']} | {r['pass_s']} | {r['openssl_s']} | "
              f"{r['sha256sum_s']} | {r['ours_over_openssl']}x | {r['pass_over_openssl']}x | {r['ours_peak_rss_mb']} | "
              f"{r.get('naive_over_ours_time', 'not run')}"
              f"{'x' if 'naive_s' in r else ''} | {r.get('ours_over_naive_memory', 'not run')}")
    print("\ntimes: best of 3 wall-clock runs (naive: 1), each a fresh process including Python start-up (about 0.2 s "
          "of imports); pass: the fingerprint pass alone, as the process times it (what a 10-300 GB checkpoint is "
          "made of); the naive path is not run where its float32 copy would not fit in half of this machine's memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
