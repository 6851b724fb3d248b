"""What every checkpoint reader hands the engine: lazy tensors, and the files whose bytes it read.

Every byte a reader needs goes through a `HashedFile`, which hashes as it reads, so the SHA-256 of every input comes
out of the same pass that computes the statistics: a file is read once, front to back. A look-up before that pass
(the embedding rows an alignment needs, the norm gains) opens the model with `Reads(random=True)`: its files are read
only where asked, not hashed, and the bytes are counted, so a case can say how much it read beyond the one pass.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from forensics.errors import ForensicsError
from forensics.files import model_root, open_regular

CHUNK = 8 << 20
# Chunks of skipped bytes queued for the hashing thread at a time: one is hashed while the next is read.
MAX_PENDING = 2
# Buffers kept for reuse by the reads of one model (`Buffers`).
KEPT_BUFFERS = 4


class Buffers:
    """Reusable read buffers. A fresh buffer costs the kernel a page fault and a zeroed page for every page of it,
    which in a pass over a checkpoint cost as much as the copy out of the page cache (15 GB: ~4 s of CPU). A kept
    buffer is lent again only when nothing refers to it any more (no array viewing it, no hash queued on it), which
    CPython's reference count tells exactly; otherwise a new one is made."""

    def __init__(self, kept: int = KEPT_BUFFERS):
        self._kept: list[np.ndarray] = []
        self._limit = kept

    def take(self, nbytes: int) -> np.ndarray:
        # Idle: referred to by the list and getrefcount's own argument alone.
        idle = sorted((i for i in range(len(self._kept)) if sys.getrefcount(self._kept[i]) == 2),
                      key=lambda i: self._kept[i].size)
        fits = [i for i in idle if self._kept[i].size >= nbytes]
        if fits:
            return self._kept[fits[0]][:nbytes]
        fresh = np.empty(nbytes, np.uint8)
        if len(self._kept) < self._limit:
            self._kept.append(fresh)
        elif idle:  # the smallest idle one makes room for this larger one
            self._kept[idle[0]] = fresh
        return fresh[:nbytes]


@dataclass(frozen=True)
class FileRecord:
    path: str
    size: int
    sha256: str


class HashedFile:
    """A read-only file read front to back; every byte that passes is hashed.

    `read_at` must be called with non-decreasing offsets: bytes skipped over are still read and hashed (never kept),
    so `finish` can give the SHA-256 of the whole file without a second pass. Hashing runs on a worker thread
    (hashlib releases the GIL), overlapping the statistics; a buffer is never written again once read, so the
    worker can hash it while the caller computes on it.
    """

    def __init__(self, path: Path, hasher: ThreadPoolExecutor, on_bytes: Callable[[int], None] | None = None,
                 root: Path | None = None, pending: deque[Future] | None = None, random: bool = False,
                 buffers: Buffers | None = None):
        self.path = path
        self.random = random  # read where asked, nothing hashed (a look-up, not the pass)
        self._f = open_regular(path, root)
        self.real = Path(self._f.name)  # the resolved path, for libraries that open the file by name again
        self.size = os.fstat(self._f.fileno()).st_size
        self._pos = 0
        self._sha = hashlib.sha256()
        self._hasher = hasher
        # Shared by the files of one model (one hashing thread, first in first out), so that the wait before a new
        # buffer also covers the last shard's last tensor.
        self._pending: deque[Future] = deque() if pending is None else pending
        self._on_bytes = on_bytes
        self._buffers = buffers or Buffers(0)
        self.record: FileRecord | None = None
        self.bytes_read = 0

    def _read_into(self, view: memoryview) -> None:
        """Read into `view`, queueing each chunk for the hashing thread as it comes in, without a wait: the chunks
        share the caller's buffer, which it holds while it computes on it, and hashing them overlaps that work."""
        self.bytes_read += len(view)
        for start in range(0, len(view), CHUNK):
            piece = view[start:start + CHUNK]
            got = 0
            while got < len(piece):
                try:
                    n = self._f.readinto(piece[got:])
                except OSError as e:
                    raise ForensicsError(self.path, f"read failed at byte {self._pos + got}: {e.strerror}") from e
                if not n:
                    raise ForensicsError(self.path, f"truncated: file ends at byte {self._pos + got}, "
                                                    f"expected at least {self._pos + len(view) - start}")
                got += n
            if not self.random:
                self._pending.append(self._hasher.submit(self._sha.update, piece))
            self._pos += len(piece)
            if self._on_bytes:
                self._on_bytes(len(piece))

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            self._pending.popleft().result()

    def skip_to(self, offset: int) -> None:
        if self.random:
            self._f.seek(offset)
            self._pos = offset
            return
        if offset < self._pos:
            raise ForensicsError(self.path, f"internal: read order went backwards ({offset} < {self._pos})")
        while self._pos < offset:
            self._drain(MAX_PENDING - 1)  # a skipped chunk's buffer is held by its hash alone
            self._read_into(memoryview(self._buffers.take(min(CHUNK, offset - self._pos))))

    def read_at(self, offset: int, nbytes: int) -> bytearray:
        buf = bytearray(self._start(offset, nbytes))
        self._read_into(memoryview(buf))
        return buf

    def read_array(self, offset: int, nbytes: int) -> np.ndarray:
        """`read_at` into a uint8 array, for tensor payloads: a kept buffer no longer in use (`Buffers`), else an
        uninitialised one (a bytearray is zero-filled first, one more write of every byte)."""
        nbytes = self._start(offset, nbytes)
        buf = self._buffers.take(nbytes)
        self._read_into(memoryview(buf))
        return buf

    def _start(self, offset: int, nbytes: int) -> int:
        if offset + nbytes > self.size:
            raise ForensicsError(self.path, f"truncated: needs bytes {offset}..{offset + nbytes} "
                                            f"but the file has {self.size}")
        self.skip_to(offset)
        # The last read's hash is finished before a new buffer is taken, so no earlier buffer outlives its read by
        # much (two large tensors were held at a time otherwise).
        self._drain(0)
        return nbytes

    def read_all(self) -> bytearray:
        start = 0 if self.random else self._pos
        return self.read_at(start, self.size - start)

    def close(self) -> None:
        while self._pending:
            self._pending.popleft().result()
        self._f.close()

    def finish(self) -> FileRecord:
        if self.random:
            raise ForensicsError(self.path, "internal: a look-up read (random access) does not hash the file")
        if self.record is None:
            self.skip_to(self.size)
            if self._f.read(1):
                raise ForensicsError(self.path, "file grew while it was being read")
            self._f.close()
            while self._pending:
                self._pending.popleft().result()
            self.record = FileRecord(str(self.path), self.size, self._sha.hexdigest())
        return self.record


class Reads:
    """The files a source opened, in order; the engine finishes them all (and so hashes all) at the end."""

    def __init__(self, on_bytes: Callable[[int], None] | None = None, random: bool = False):
        self.on_bytes = on_bytes
        self.random = random
        self.root: Path | None = None  # every file opened must lie inside it; set by the Source reading the model
        self._files: dict[Path, HashedFile] = {}
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self._pending: deque[Future] = deque()
        self._buffers = Buffers()

    def open(self, path: Path) -> HashedFile:
        if path not in self._files:
            self._files[path] = HashedFile(path, self._hasher, self.on_bytes, self.root, self._pending, self.random,
                                           self._buffers)
        return self._files[path]

    def bytes_read(self, root: Path) -> dict[str, int]:
        """Bytes read so far per file (relative to the model's root, as `finish` names them)."""
        return {_relative(path, root): f.bytes_read for path, f in self._files.items()}

    def finish(self, root: Path) -> list[dict]:
        records = []
        for path, f in self._files.items():
            r = f.finish()
            records.append({"path": _relative(path, root), "size": r.size, "sha256": r.sha256})
        self._hasher.shutdown()
        return sorted(records, key=lambda r: r["path"])

    def close(self) -> None:
        """Stop without hashing the rest: for a pass that needs some tensors, not the files' SHA-256."""
        for f in self._files.values():
            f.close()
        self._hasher.shutdown()


def _relative(path: Path, root: Path) -> str:
    return os.path.relpath(path, root) if root.is_dir() else path.name


@dataclass(frozen=True)
class Blocks:
    """A block-quantised tensor of `shape` as stored: `codes`, (blocks, bytes per block) uint8, of `per_block` values
    each. `sums(blocks)` gives the exact sum and sum of squares of their values from the scales and codes, or None
    where a scale is not finite (or the format has no such sums); `decode(blocks)` gives the values, (blocks,
    per_block) float32. A statistic that needs only moments then never makes the tensor's float32 copy."""

    shape: tuple[int, ...]
    codes: np.ndarray
    per_block: int
    sums: Callable[[np.ndarray], tuple[float, float] | None]
    decode: Callable[[np.ndarray], np.ndarray]

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass
class TensorRef:
    """One tensor as listed in a checkpoint; `load()` reads (and hashes) its bytes only when called.

    `load()` gives a C-contiguous numpy array of `shape`: float16, float32 and float64 as stored; bfloat16 and fp8
    decoded exactly to float32; quantised formats dequantised to float32; integers as integers. numpy, not torch,
    so that the CPU path never pays torch's import time and memory (forensics/signals/weights.py).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    load: Callable[[], np.ndarray] = field(repr=False)
    file: Path | None = None
    # For a storage format decoded one element at a time (bfloat16, fp8): the array as stored, and the exact decoder,
    # so that a statistic that streams can decode chunk by chunk instead of holding the whole float32 tensor.
    load_stored: Callable[[], np.ndarray] | None = field(default=None, repr=False)
    decode: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)
    # For a matrix whose rows lie whole and in order on disk: rows `ids` (sorted, unique) as `load()` would give them,
    # each read alone, so that a look-up of a few thousand embedding rows does not read a 1 GB table.
    read_rows: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)
    # For a block-quantised format (GGUF): the tensor as stored, `Blocks`, whose moments need no float32 copy.
    load_blocks: Callable[[], Blocks] | None = field(default=None, repr=False)
    # For a format whose decoding costs more than its read (GGUF's blocks): the bytes read now, their decoding
    # returned to be run later (see `fetch`).
    read_then_decode: Callable[[], Callable[[], np.ndarray]] | None = field(default=None, repr=False)

    def fetch(self) -> Callable[[], np.ndarray]:
        """Read (and hash) the bytes now; the call returned decodes them as `load()` would, on any thread, so that a
        pass reads the next tensor while another thread decodes this one."""
        if self.read_then_decode is not None:
            return self.read_then_decode()
        if self.decode is not None:
            stored, decode = self.load_stored(), self.decode
            return lambda: decode(stored)
        tensor = self.load()
        return lambda: tensor

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of the matrix (any order, repeats allowed)."""
        if self.read_rows is None:
            return self.load()[ids]
        unique, where = np.unique(np.asarray(ids, dtype=np.int64), return_inverse=True)
        if len(unique) and (unique[0] < 0 or unique[-1] >= self.shape[0]):
            raise IndexError(f"row {unique[-1] if unique[-1] >= self.shape[0] else unique[0]} of a "
                             f"{self.shape[0]}-row matrix")
        return self.read_rows(unique)[where]


@dataclass
class ModelInfo:
    """What the role table needs to know about a model besides its tensor names."""

    architecture: str
    format: str
    table: str = ""  # role-table entry when it differs from the architecture (all GGUF files share llama.cpp names)
    num_layers: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None  # the dense FFN's width, where the format states it
    config: dict = field(default_factory=dict)


class Source:
    """A checkpoint on disk: a Hugging Face directory, or a single GGUF / ONNX / other file."""

    def __init__(self, path: Path, reads: Reads):
        self.path = path
        self.reads = reads
        self.root = reads.root = model_root(path)

    def info(self) -> ModelInfo:
        raise NotImplementedError

    def tensors(self) -> Iterator[TensorRef]:
        """Tensors in the order their bytes lie on disk, so loading them in turn reads each file once."""
        raise NotImplementedError

    def names(self) -> list[str]:
        return [t.name for t in self.tensors()]

    def planned_files(self) -> list[Path]:
        """Every file this model's evidence consists of (weights, config, tokenizer): all are hashed."""
        return [self.path]
