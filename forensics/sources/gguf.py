"""GGUF files (llama.cpp) through the `gguf` package, dequantised one tensor at a time.

`GGUFReader` parses the header (it maps the file but touches only the header pages); the tensor bytes themselves are
read in file order through `HashedFile` and handed to `gguf.quants.dequantize`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from gguf import GGUFReader, GGMLQuantizationType
from gguf.quants import dequantize, quant_shape_to_byte_shape

from forensics.errors import ForensicsError
from forensics.sources.base import ModelInfo, Reads, Source, TensorRef

# llama.cpp's converter reorders the rows of Q and K inside each head (rotary halves interleaved) for these
# architectures; undoing it restores the Hugging Face layout, which row-wise comparisons need. (A std over all
# elements is unchanged either way: it does not depend on row order.)
PERMUTED_QK = {"llama", "mistral"}


class _Reader(GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map.

    Parsing a vocabulary slices the map ~10^6 times; numpy.memmap's per-slice bookkeeping made that the slowest part
    of fingerprinting a small GGUF. The view shares the mapping (no copy).
    """

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, mapped: np.ndarray) -> None:
        self._data = mapped.view(np.ndarray)


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's `permute(weights, n_head, n_head_kv)` in convert_hf_to_gguf.py."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFFile(Source):
    def __init__(self, path: Path, reads: Reads):
        super().__init__(path, reads)
        try:
            self.reader = _Reader(path, "r")
        except Exception as e:  # the reader raises ValueError, IndexError, struct errors on a bad file
            raise ForensicsError(path, f"not a readable GGUF file: {type(e).__name__}: {e}") from e
        self.file = reads.open(path)
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > self.file.size:
                raise ForensicsError(path, f"truncated: tensor {t.name} needs bytes up to "
                                           f"{t.data_offset + t.n_bytes}, file has {self.file.size}")
        arch = self._field("general.architecture") or ""

        def meta(key):
            v = self._field(f"{arch}.{key}")
            return int(v) if v is not None else None

        heads = meta("attention.head_count")
        self._info = ModelInfo(
            architecture=arch, format="gguf", table="gguf",
            num_layers=meta("block_count"), hidden_size=meta("embedding_length"),
            num_heads=heads, num_kv_heads=meta("attention.head_count_kv") or heads,
            head_dim=meta("attention.key_length"),
            config={"gguf_architecture": arch, "file_type": self._field("general.file_type")},
        )

    def _field(self, key: str):
        f = self.reader.get_field(key)
        return None if f is None else f.contents()

    def info(self) -> ModelInfo:
        return self._info

    def tensors(self) -> Iterator[TensorRef]:
        for t in sorted(self.reader.tensors, key=lambda t: t.data_offset):
            qtype = GGMLQuantizationType(t.tensor_type)
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            yield TensorRef(t.name, shape, qtype.name,
                            lambda t=t, qtype=qtype, shape=shape: self._load(t, qtype, shape), self.path)

    def _load(self, t, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
        raw = np.frombuffer(self.file.read_at(t.data_offset, t.n_bytes), dtype=np.uint8)
        try:
            if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                         GGMLQuantizationType.F64):
                values = dequantize(raw, qtype) if qtype != GGMLQuantizationType.F64 else raw.view(np.float64)
            else:
                values = dequantize(raw.reshape(quant_shape_to_byte_shape(shape, qtype)), qtype)
        except NotImplementedError as e:
            raise ForensicsError(self.path, f"tensor {t.name}: quantisation type {qtype.name} is not supported "
                                            f"by the gguf package") from e
        w = torch.from_numpy(np.ascontiguousarray(values).reshape(shape))
        info = self._info
        if info.architecture in PERMUTED_QK and info.num_heads:
            if t.name.endswith("attn_q.weight"):
                w = unpermute(w, info.num_heads)
            elif t.name.endswith("attn_k.weight"):
                w = unpermute(w, info.num_kv_heads)
        return w
