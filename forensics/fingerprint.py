"""One pass over a checkpoint: every weight signal plus the SHA-256 of every file (docs/fingerprint-format.md).

Four threads share it: this one reads, one hashes each chunk as it is read (forensics/sources/base.py), one decodes
each tensor, hands it to the collectors and takes its moments (`_Moments`), one reduces each layer's attention
spectra (forensics/signals/attention.py).
"""

from __future__ import annotations

import functools
import math
import resource
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from forensics import __version__, roles
from forensics.errors import ForensicsError
from forensics.schemas import FINGERPRINT_SCHEMA
from forensics.signals.attention import LayerCollector
from forensics.signals.weights import Moments, moments, pick_device
from forensics.sources import ModelInfo, Reads, open_model

SCHEMA = FINGERPRINT_SCHEMA


def fingerprint_model(path: str | Path, device: str | None = None, allow_nonfinite: bool = False,
                      progress: Callable[[int, int], None] | None = None,
                      collectors: Callable[[ModelInfo], list] | None = None) -> dict:
    """Fingerprint the model at `path`. `progress(done_bytes, total_bytes)` is called as bytes are read.

    `collectors(info)`, when given, makes more consumers of the same pass (e.g. signals.neurons' sketches), each
    with `wants(role-table target)` and `add(part, decode)`: every part of a tensor one wants is handed to it, as
    stored with its exact `decode` when the tensor is streamed, so that nothing they need is read a second time."""
    path = Path(path)
    started = time.perf_counter()
    done = 0
    total = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    reads = Reads(on_bytes)
    source = open_model(path, reads)
    planned = source.planned_files()
    total = sum(f.stat().st_size for f in planned)
    info = source.info()
    table, matches = roles.resolve(path, info, source.names())
    dev = pick_device(device)
    on_cpu = str(dev) == "cpu"
    # Per-layer attention spectra, reduced as soon as a layer's q, k, v, o and norm gain are in.
    attention = LayerCollector(info, roles.architecture_key(info.table or info.architecture), matches)
    stats = _Moments(path)
    # One BLAS thread: the attention spectra's many small factorisations ran 10-20x slower with OpenBLAS's threads
    # competing with each other and the hashing thread (Gemma3-270M: 2.1 s against 29 s on 2 cores).
    try:
        extra = collectors(info) if collectors else []

        def consume(ref, match, finish: Callable[[], object], decode, whole_only: bool, wanted: list) -> list:
            """On the moments' thread, one tensor at a time and in file order: the tensor decoded (`finish`), its
            parts to the attention spectra and the other collectors, and their moments."""
            parts = table.parts(ref.name, match, finish(), info)
            for part in parts:
                if not whole_only:
                    attention.add(part)
                for c in wanted:
                    c.add(part, decode)
            return [(p.role, p.layer, p.expert, moments(p.tensor, dev, decode)) for p in parts]

        with threadpool_limits(limits=1, user_api="blas"):
            for ref in source.tensors():
                match = matches.get(ref.name)
                if match is None:
                    continue
                # A tensor that the attention spectra do not need, stored in a format decoded element by element
                # (bf16, fp8), is decoded a piece at a time where it is used (the moments' chunks, the sketches'
                # coordinates): the whole float32 copy, twice a bf16 tensor, is never made. One in blocks of a
                # quantised format that nothing but its moments needs goes to them as stored (from its codes).
                # Any other is read here and decoded on the moments' thread, while this one reads the next.
                whole = (match.target not in roles.SPLITS and match.target not in roles.STACKED
                         and not attention.wants(match.target))
                wanted = [c for c in extra if c.wants(match.target)]
                streamed = whole and ref.decode is not None
                blocked = whole and not wanted and ref.load_blocks is not None and on_cpu
                stored = ref.load_blocks() if blocked else ref.load_stored() if streamed else None
                finish = (lambda s=stored: s) if stored is not None else ref.fetch()
                decode = ref.decode if streamed else None
                stats.submit(ref, functools.partial(consume, ref, match, finish, decode, streamed or blocked, wanted))
                stored = finish = None  # the moments' thread holds the tensor, and lets it go when done
            stats.wait()
            attention.finish()
    finally:
        stats.close()
        attention.close()
    per_role, nonfinite = stats.per_role, stats.nonfinite
    if nonfinite and not allow_nonfinite:
        first = nonfinite[0]
        raise ForensicsError(first["file"], f"non-finite weights in {len(nonfinite)} tensor(s), first "
                                            f"{first['tensor']} (NaN {first['nan']}, Inf {first['inf']}); "
                                            f"use --allow-nonfinite to fingerprint the finite values and record them")
    for f in planned:
        reads.open(f)
    files = reads.finish(path)

    layers_seen = {layer for entries in per_role.values() for layer, _ in entries}
    num_layers = max(info.num_layers or 0, max(layers_seen) + 1)
    signals = {}
    for role in sorted(per_role):
        signals.update(_signal(role, per_role[role], num_layers))
    signals.update(attention.signals(num_layers))
    return {
        "schema": SCHEMA,
        "tool": {"name": "llm-forensics", "version": __version__},
        "model": {
            "path": str(path),
            "format": info.format,
            "architecture": info.architecture,
            "num_layers": num_layers,
            "hidden_size": info.hidden_size,
            "files": files,
        },
        "signals": signals,
        "nonfinite": nonfinite,
        "run": {
            "device": str(dev),
            "elapsed_s": round(time.perf_counter() - started, 3),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "bytes_read": done,
            "bytes_read_per_file": reads.bytes_read(path),
        },
    }


class _Moments:
    """Each tensor's decoding, collection and moments on a worker thread while the next tensor is read: the copy out
    of the page cache, the hashing and the statistics then share both cores. One tensor is in flight at a time
    (`submit` waits for the one before), so two at most are held, and the collectors see the tensors in file order
    from one thread."""

    def __init__(self, path: Path):
        self.path = path
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moments")
        self.pending: tuple | None = None
        self.per_role: dict[str, dict[tuple[int, int | None], Moments]] = defaultdict(dict)
        self.nonfinite: list[dict] = []

    def submit(self, ref, work: Callable[[], list]) -> None:
        """`work()` gives (role, layer, expert, Moments) for each of `ref`'s parts."""
        self.wait()
        self.pending = (self.pool.submit(work), ref)

    def wait(self) -> None:
        if self.pending is None:
            return
        work, ref = self.pending
        self.pending = None
        found = work.result()
        for role, layer, expert, m in found:
            self.per_role[role][(layer, expert)] = m
        nan, inf = sum(m.nan for *_, m in found), sum(m.inf for *_, m in found)
        if nan or inf:
            self.nonfinite.append({"tensor": ref.name, "file": str(ref.file or self.path), "nan": nan, "inf": inf})

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _signal(role: str, entries: dict[tuple[int, int | None], Moments], num_layers: int) -> dict:
    if role not in roles.EXPERT_ROLES:
        values = [None] * num_layers
        for (layer, _), m in entries.items():
            values[layer] = _num(m.std)
        return {role: {"kind": "weight_std", "role": role, "values": values}}
    experts: list[list[float | None] | None] = [None] * num_layers
    by_layer: dict[int, dict[int, float]] = defaultdict(dict)
    for (layer, expert), m in entries.items():
        by_layer[layer][expert] = m.std
    for layer, stds in by_layer.items():
        experts[layer] = [_num(stds.get(e, float("nan"))) for e in range(max(stds) + 1)]
    means = [None if e is None else _num(float(np.mean([v for v in e if v is not None]))) for e in experts]
    return {role: {"kind": "weight_std", "role": role.removeprefix("expert_"), "values": means, "experts": experts}}


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None
