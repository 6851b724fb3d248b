"""`make bench-case`: a whole case on a 7B pair, against the hashing floor of both models, on this machine.

The candidate is bench-activations' Qwen2-7B-shaped checkpoint (bf16, 15.2 GB, out/bench-7b/, written once from
seeded random weights); the suspect is its child with every layer's FFN neurons permuted (an edit that changes no
output), written once beside it, shard by shard. The case (`activations: enabled: false`: the forward pass of a 7B
model on a CPU is bench-activations' subject; neuron matching on, T = 199) runs in a child process, so that its
peak RSS is its own. Printed: the wall time against `openssl dgst -sha256` of both models' files (the SHA-NI floor,
one core) and the bytes the case read of each file, from its manifest (`bytes_read`: the one pass, the look-ups
before it, anything read again), against the files' sizes.

The two models (30 GB) do not fit in this machine's page cache, so how much of them the previous run left there
decided both times (the floor took 45 s in one run and 74 s in the next). Where it may (as root), the bench empties
the page cache before the floor and before the case, so that both read the whole input from the disk, as a 10-300
GB checkpoint is read; `--warm` keeps it. The line printed says which was done.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TARGET_WALL_RATIO = 2.0  # #12: a whole case within twice the hashing floor of both models


def write_child(parent: Path, child: Path, seed: int = 11) -> None:
    """`parent` with each layer's FFN neurons permuted (gate and up rows, down columns), one shard at a time."""
    import torch
    from safetensors.torch import load_file, save_file

    if (child / "model.safetensors.index.json").is_file():
        return
    tmp = child.with_suffix(".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    for f in sorted(parent.iterdir()):
        if f.suffix != ".safetensors":
            shutil.copyfile(f, tmp / f.name)
            continue
        tensors = load_file(f)
        for name in [n for n in tensors if n.endswith("mlp.gate_proj.weight")]:
            prefix = name.removesuffix("gate_proj.weight")
            perm = torch.randperm(tensors[name].shape[0], generator=gen)
            for part in ("gate_proj", "up_proj"):
                tensors[f"{prefix}{part}.weight"] = tensors[f"{prefix}{part}.weight"][perm].contiguous()
            tensors[f"{prefix}down_proj.weight"] = tensors[f"{prefix}down_proj.weight"][:, perm].contiguous()
        save_file(tensors, str(tmp / f.name), metadata={"format": "pt"})
        del tensors
    tmp.rename(child)


def write_pair() -> tuple[Path, Path]:
    """bench-activations' 7B checkpoint and its neuron-permuted child (written once, each in a process of its own, so
    that the caller's peak RSS is its own): (parent, child)."""
    from bench_activations import write_model

    parent = ROOT / "out" / "bench-7b" / "qwen2-7b-shaped"
    child = ROOT / "out" / "bench-7b" / "qwen2-7b-shaped-permuted"
    t = time.perf_counter()
    for make, args_, target in ((write_model, (parent,), parent), (write_child, (parent, child), child)):
        writer = multiprocessing.get_context("spawn").Process(target=make, args=args_)
        writer.start()
        writer.join()
        if writer.exitcode:
            raise SystemExit(f"writing {target} failed")
    print(f"pair written in {time.perf_counter() - t:.0f} s (or reused)")
    return parent, child


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (clean pages only, after a sync); False where this process may not."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        return False
    return True


def run(case: Path, out: Path, result: dict) -> None:
    """The case, in this (child) process; its peak RSS goes into `result`."""
    import os

    os.environ.setdefault("FORENSICS_KEY_DIR", str(out / "keys"))
    from forensics.pipeline import run_case

    t = time.perf_counter()
    run_case(case, out_root=out, device="cpu", argv=["bench_case"])
    result["wall_s"] = time.perf_counter() - t
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench-case")
    ap.add_argument("--permutations", type=int, default=199)
    ap.add_argument("--warm", action="store_true", help="keep the page cache as it is before the floor and the case")
    args = ap.parse_args(argv)

    parent, child = write_pair()

    files = [str(f) for d in (child, parent) for f in sorted(d.iterdir())]
    size = sum(Path(f).stat().st_size for f in files)
    cold = not args.warm and drop_page_cache()
    t = time.perf_counter()
    subprocess.run(["openssl", "dgst", "-sha256", *files], check=True, stdout=subprocess.DEVNULL)
    floor = time.perf_counter() - t

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    case = args.out / "case.yaml"
    case.write_text(json.dumps({
        "id": "bench-7b-pair", "title": "Bench: a 7B-shaped model against its neuron-permuted child",
        "analyst": "make bench-case", "suspect": {"name": "child", "path": str(child)},
        "candidates": [{"name": "parent", "path": str(parent)}], "activations": {"enabled": False},
        "statistics": {"permutations": 999, "bootstrap": 200, "alpha": 0.01, "seed": 1},
        "neurons": {"enabled": True, "permutations": args.permutations}}))
    if cold:
        drop_page_cache()
    with multiprocessing.Manager() as manager:
        result = manager.dict()
        proc = multiprocessing.get_context("spawn").Process(target=run, args=(case, args.out, result))
        proc.start()
        proc.join()
        if proc.exitcode:
            raise SystemExit("the case failed")
        result = dict(result)

    manifest = json.loads((args.out / "bench-7b-pair" / "manifest.json").read_text())
    weights = [r for r in manifest["inputs"] if r["kind"] == "weights"]
    read = {kind: sum(r["bytes_read"][kind] for r in weights) for kind in ("pass", "look-up", "again")}
    verdict = json.loads((args.out / "bench-7b-pair" / "results.json").read_text())["candidates"]["parent"]
    row = {"input_gb": round(size / 1e9, 2), "case_s": round(result["wall_s"], 1), "openssl_s": round(floor, 1),
           "case_over_openssl": round(result["wall_s"] / floor, 2), "target": TARGET_WALL_RATIO,
           "read_over_input": round(sum(read.values()) / size, 3),
           "pass_gb": round(read["pass"] / 1e9, 2), "look_up_gb": round(read["look-up"] / 1e9, 3),
           "again_gb": round(read["again"] / 1e9, 2), "peak_rss_gb": round(result["peak_rss_gb"], 2),
           "verdict": verdict["verdict"]["verdict"], "decided_by": verdict["verdict"]["route"],
           "page_cache": "emptied before the floor and the case" if cold else "kept"}
    print(json.dumps(row))
    print(f"\ncase on 2 x {size / 2e9:.1f} GB: {row['case_s']} s, openssl of both {row['openssl_s']} s "
          f"({row['case_over_openssl']}x; target <= {TARGET_WALL_RATIO}x); read {row['read_over_input']}x the input "
          f"(pass {row['pass_gb']} GB, look-ups {row['look_up_gb']} GB, again {row['again_gb']} GB); peak RSS "
          f"{row['peak_rss_gb']} GB; verdict {row['verdict']} by {row['decided_by']}; page cache "
          f"{row['page_cache']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
