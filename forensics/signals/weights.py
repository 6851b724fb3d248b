"""Per-layer standard deviation of every weight role: the intrinsic fingerprint of the original analysis.

The std is the population std (ddof = 0) over all elements of a matrix, accumulated in float64 chunk by chunk and
merged with Chan's parallel formula, so memory stays at one tensor plus one float64 chunk whatever the model's size,
and the result matches numpy's float64 `std` to rounding.

On the CPU this is numpy alone: torch is imported only for a CUDA device, where its import (over a second and 250 MB
of resident memory) buys a GPU. For the 100-300 MB models `make bench-weights` measures, that import alone took
longer than reading and hashing the file.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from forensics.sources.base import Blocks

# 512 Ki elements: a 4 MiB float64 chunk and its decoded source stay in cache through the passes over them (0.83 ns
# an element against 1.80 with 32 MiB chunks).
CHUNK_ELEMENTS = 1 << 19
# The chunk buffer, one per thread, kept between tensors: a fresh array per tensor cost its page faults again.
_chunk = threading.local()


@dataclass
class Moments:
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    nan: int = 0
    inf: int = 0

    def merge(self, n: int, mean: float, m2: float) -> None:
        if n == 0:
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else float("nan")


def moments(a: np.ndarray | Blocks, device: str = "cpu",
            decode: Callable[[np.ndarray], np.ndarray] | None = None) -> Moments:
    """Float64 moments of every element of `a`, or with `decode` of `a`'s stored codes decoded by it (elementwise,
    a chunk at a time), or of a block-quantised tensor's values from its codes' exact sums (blocks whose sums are
    not given are decoded); NaN and Inf are counted and left out."""
    if isinstance(a, Blocks):
        return _block_moments(a)
    if device != "cpu":
        return _moments_torch(a if decode is None else decode(a), device)
    flat = a.reshape(-1)
    out = Moments()
    for start in range(0, flat.size, CHUNK_ELEMENTS):
        src = flat[start:start + CHUNK_ELEMENTS]
        _add_chunk(out, src if decode is None else decode(src))
    return out


def _block_moments(a: Blocks) -> Moments:
    """On the CPU whatever the device (the fingerprint pass hands over blocks only there). One thread: the sums are
    many numpy calls on chunk-sized arrays, and two threads of them measured no faster (the GIL and the caches are
    shared), while the hashing thread needs the other core."""
    out = Moments()
    step = max(1, CHUNK_ELEMENTS // a.per_block)
    for start in range(0, len(a.codes), step):
        blocks = a.codes[start:start + step]
        sums = a.sums(blocks)
        if sums is None:
            with np.errstate(invalid="ignore", over="ignore"):  # a NaN or infinite scale: counted below
                _add_chunk(out, a.decode(blocks).reshape(-1))
            continue
        n = len(blocks) * a.per_block
        mean = sums[0] / n
        out.merge(n, mean, max(sums[1] - sums[0] * mean, 0.0))
    return out


def _add_chunk(out: Moments, src: np.ndarray) -> None:
    """Merge one chunk of at most CHUNK_ELEMENTS values into `out`, through this thread's float64 buffer."""
    buf = getattr(_chunk, "buf", None)
    if buf is None or buf.size != CHUNK_ELEMENTS:
        buf = _chunk.buf = np.empty(CHUNK_ELEMENTS, np.float64)
    c = buf[:src.size]
    c[...] = src
    n = c.size
    mean = c.sum() / n
    # NaN/Inf anywhere make the sum non-finite: only then pay for counting and dropping them.
    if not math.isfinite(mean):
        out.nan += int(np.isnan(c).sum())
        out.inf += int(np.isinf(c).sum())
        c = c[np.isfinite(c)]
        n = c.size
        if not n:
            return
        mean = c.sum() / n
    c -= mean
    # einsum's own sum of products: one pass, no squares written back, and no BLAS (whose threads would make
    # the last bits depend on the machine's core count).
    out.merge(n, float(mean), float(np.einsum("i,i->", c, c)))


def _moments_torch(a: np.ndarray, device: str) -> Moments:
    """The same on a torch device, chunk by chunk from host memory."""
    import torch

    # torch.from_numpy wants writable memory; only a read-only array (an ONNX initializer's view) pays for a copy.
    flat = torch.from_numpy(a.reshape(-1) if a.flags.writeable else a.reshape(-1).copy())
    out = Moments()
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        c = flat[start:start + CHUNK_ELEMENTS].to(device=device).to(torch.float64)
        n = c.numel()
        mean = c.sum() / n
        if not bool(torch.isfinite(mean)):
            out.nan += int(torch.isnan(c).sum())
            out.inf += int(torch.isinf(c).sum())
            c = c[torch.isfinite(c)]
            n = c.numel()
            if not n:
                continue
            mean = c.sum() / n
        d = c - mean  # not in place: on the CPU (tests), a float64 chunk is the caller's own memory
        out.merge(n, float(mean), float(torch.dot(d, d)))
    return out


def pick_device(requested: str | None) -> str:
    """Where the statistics run: "cpu", "cuda", or another torch device named on purpose.

    "auto" asks torch only where a GPU driver is present (an NVIDIA driver's /proc/driver/nvidia or nvidia-smi, or
    ROCm's /dev/kfd): on a CPU-only machine, importing torch just to hear "no CUDA" would cost more than
    fingerprinting a small model.
    """
    if requested in (None, "auto"):
        driver = os.path.exists("/proc/driver/nvidia") or shutil.which("nvidia-smi") or os.path.exists("/dev/kfd")
        return "cuda" if driver and _torch_cuda() else "cpu"
    if requested == "cuda" and not _torch_cuda():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    return requested


def _torch_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()
