"""`make bench-scan`: how long a scan against a registry of 10,000 references takes on this machine.

The registry is synthetic, and says so in every entry's name and declared source: each reference is a real
fingerprint from the default registry (`make registry`, the models `make models` fetched) with every per-layer value
multiplied by a seeded log-normal factor (sd 0.2), declared a base, so all pairs of them are unrelated. It is written
once to out/bench/scan-10k.sqlite. Synthetic references carry no neuron record (a record is made from weights), so
the figure covers the screen of all references and the full verdict rule on the best-screened 20, not neuron
matching (whose cost is `make bench-neurons`').

Prints the wall time of the scan (suspect fingerprint cached), its parts, and its ratio to the 60 s target.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from forensics.evidence.registry import Declared, Entry, Registry, canonical  # noqa: E402
from forensics.pipeline import Store, fingerprint, scan  # noqa: E402
from forensics.stats.compare import Settings  # noqa: E402

TARGET_S = 60.0


def synthetic(fp: dict, rng: np.random.Generator) -> dict:
    signals = {}
    for name, entry in fp["signals"].items():
        values = entry.get("values") if isinstance(entry, dict) else None
        if isinstance(values, list):
            noise = rng.lognormal(0.0, 0.2, len(values))
            entry = {**entry, "values": [None if v is None else float(v) * float(f) for v, f in zip(values, noise)]}
        signals[name] = entry
    return {**fp, "signals": signals}


def build(path: Path, source: Path, n: int) -> None:
    if path.is_file():
        with Registry(path) as reg:
            if len(reg.names()) == n:
                return
        path.unlink()
    with Registry(source) as reg:
        real = reg.entries()
    rng = np.random.default_rng(20261201)
    entries = []
    for i in range(n):
        base = real[i % len(real)]
        fp = synthetic(base.fp(), rng)
        entries.append(Entry(f"synthetic-{i:05d}-{base.name}", canonical(fp),
                             Declared(source=f"synthetic (bench/bench_scan.py): {base.name}, curves jittered",
                                      base=True)))
    tmp = path.with_suffix(".partial")
    tmp.unlink(missing_ok=True)
    with Registry.create(tmp) as reg:
        reg.add(entries)
    tmp.rename(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--references", type=int, default=10_000)
    p.add_argument("--suspect", type=Path, default=ROOT / "models" / "lab" / "upcycled")
    p.add_argument("--source", type=Path, default=ROOT / "out" / "registry" / "default.sqlite")
    p.add_argument("--registry", type=Path, default=ROOT / "out" / "bench" / "scan-10k.sqlite")
    args = p.parse_args()
    args.registry.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    build(args.registry, args.source, args.references)
    made = time.perf_counter() - t
    store = Store(ROOT / "out" / ".cache")
    fingerprint(args.suspect, "cpu", args.suspect.name, store)  # cached: the bench times the scan, not the read
    settings = Settings(alpha=0.01, n_permutations=9999, n_bootstrap=999, seed=0)
    t = time.perf_counter()
    results, _, ranking, scanned, _ = scan(args.suspect, args.registry, settings, "cpu", store)
    wall = time.perf_counter() - t
    derived = [r["reference"] for r in ranking if r["verdict"] == "DERIVED"]
    print(json.dumps({"references": scanned["references"], "fully_compared": scanned["fully_compared"],
                      "null_pairs": scanned["null_pairs"], "registry_bytes": scanned["bytes"],
                      "build_s": round(made, 1), "scan_s": round(wall, 1), "target_s": TARGET_S,
                      "ratio_to_target": round(wall / TARGET_S, 3), "derived": derived,
                      "top": [r["reference"] for r in ranking[:5]]}, indent=1))
    print(f"scan of {scanned['references']} references: {wall:.1f} s ({wall / TARGET_S:.2f} x the {TARGET_S:.0f} s "
          f"target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
