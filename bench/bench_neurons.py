"""`make bench-neurons`: what neuron matching costs on a 7B pair, against the passes that read it, on this machine.

The pair is bench-case's: bench-activations' Qwen2-7B-shaped checkpoint (bf16, 15.2 GB, out/bench-7b/, written once
from seeded random weights) and its child with every layer's FFN neurons permuted, written once beside it. A derived
pair is the expensive case: its null draws never reach the observation, so the sequential stop never cuts them, and
all T are made (an unrelated pair's alignment is refused before any matching). `neuron_test` runs as it does alone:
the look-ups (embedding rows, the token alignment), one pass per model that reads and hashes every file and keeps its
FFN sketch, then the exact permutation test (28 suspect units of 16 neurons against 28 units of 18,944).

Printed: each stage's wall time, the matching's time per draw, its ratio to the two passes (#12: matching at a
fraction of the pass) and to `openssl dgst -sha256` of both models (the SHA-NI floor), the peak RSS, and a JSON line.
The page cache is emptied before the floor and before the test where this process may (as root); `--warm` keeps it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--permutations", type=int, default=199)
    ap.add_argument("--warm", action="store_true", help="keep the page cache as it is before the floor and the test")
    args = ap.parse_args(argv)

    from bench_case import drop_page_cache, write_pair

    parent, child = write_pair()

    files = [str(f) for d in (child, parent) for f in sorted(d.glob("*.safetensors"))]
    size = sum(Path(f).stat().st_size for f in files)
    cold = not args.warm and drop_page_cache()
    t = time.perf_counter()
    subprocess.run(["openssl", "dgst", "-sha256", *files], check=True, stdout=subprocess.DEVNULL)
    floor = time.perf_counter() - t

    from forensics import pipeline
    from forensics.signals import neurons as signals
    from forensics.stats import neurons as stats
    from forensics.stats.neurons import NeuronSettings

    stages: dict[str, float] = {}

    def timed(module, name: str, stage: str) -> None:
        inner = getattr(module, name)

        def run(*a, **k):
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - t
        setattr(module, name, run)

    # The pipeline imports these where it calls them, so the timed ones are those it runs.
    timed(signals, "read_sketch", "passes")
    timed(stats, "match_test", "matching")
    if cold:
        drop_page_cache()
    t = time.perf_counter()
    r = pipeline.neuron_test(child, parent, NeuronSettings(permutations=args.permutations))
    total = time.perf_counter() - t
    if r.get("status") != "compared":
        raise SystemExit(f"the pair was not compared: {r.get('reason')}")
    passes, matching = stages["passes"], stages["matching"]
    row = {"input_gb": round(size / 1e9, 2), "openssl_s": round(floor, 1), "total_s": round(total, 1),
           "look_ups_and_alignment_s": round(total - passes - matching, 1), "passes_s": round(passes, 1),
           "matching_s": round(matching, 1), "draws": r["draws"],
           "per_draw_s": round(matching / (r["draws"] + 1), 3),
           "matching_over_passes": round(matching / passes, 2), "matching_over_openssl": round(matching / floor, 2),
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "pvalue": r["pvalue"], "page_cache": "emptied before the floor and the test" if cold else "kept"}
    print(json.dumps(row))
    print(f"\nneuron_test on 2 x {size / 2e9:.1f} GB: {row['total_s']} s = look-ups and alignment "
          f"{row['look_ups_and_alignment_s']} s + two passes {row['passes_s']} s + matching {row['matching_s']} s "
          f"({row['draws']} draws and the observation, {row['per_draw_s']} s each); matching = "
          f"{row['matching_over_passes']}x the passes, {row['matching_over_openssl']}x openssl of both "
          f"({row['openssl_s']} s); peak RSS {row['peak_rss_gb']} GB; p = {r['pvalue']:.3g} (derived pair); page "
          f"cache {row['page_cache']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
