"""GGUF files (llama.cpp) through the `gguf` package, dequantised one tensor at a time.

Fingerprinting walks the header itself (`read_header`: the metadata scalars, any string array asked for by name such
as the vocabulary, and the tensor directory, with the gguf package's type tables); the tensor bytes are read in file
order through `HashedFile` and dequantised with the gguf package's own block decoders.
"""

from __future__ import annotations

import copy
import functools
import math
import mmap
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import gguf
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, quants

from forensics.errors import ForensicsError
from forensics.files import open_regular
from forensics.sources.base import Blocks, ModelInfo, Reads, Source, TensorRef
from forensics.sources.dtypes import bf16_to_f32

# llama.cpp's converter reorders the rows of Q and K inside each head (rotary halves interleaved) for these
# architectures; undoing it restores the Hugging Face layout, which row-wise comparisons need. (A std over all
# elements is unchanged either way: it does not depend on row order.)
PERMUTED_QK = {"llama", "mistral"}


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute(weights, n_head, n_head_kv)` in convert_hf_to_gguf.py."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Fixed-size metadata value types and their struct formats.
SCALARS = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
# Tensor types stored as plain numbers; every other type is blocks for the gguf package's decoders.
PLAIN = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}
# Elements decoded per call of a block decoder: enough to amortise the call, few enough for its temporaries to stay
# in cache. gguf.quants.dequantize calls it per 16 rows; this halved dequantisation on SmolLM2's and Gemma3's files.
DEQUANT_ELEMENTS = 1 << 18
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # outermost dimension first, as numpy and torch order them (GGUF lists them reversed)
    qtype: GGMLQuantizationType
    offset: int  # from the start of the file
    nbytes: int


def read_header(path: Path, keep: frozenset[str] = frozenset()) -> tuple[dict, list[TensorInfo]]:
    """(metadata scalars and strings, tensor directory) of a GGUF file; metadata arrays are skipped, except the string
    arrays named in `keep` (the vocabulary, for neuron matching), which come back as lists of str.

    GGUFReader makes a numpy view of every element of every metadata array: 0.9 s for SmolLM2's 49k-token vocabulary,
    3.9 s for Gemma3's 262k, most of a fingerprint's time. A fingerprint needs a few scalars, and skipping a string
    array costs one length read per string.
    """
    try:
        with open_regular(path) as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _walk(mm, keep)
    except struct.error as e:
        raise ForensicsError(path, f"not a readable GGUF file: truncated or corrupt header ({e})") from e
    except ValueError as e:  # our own checks, an unknown type code, a name that is not UTF-8, an empty file
        raise ForensicsError(path, f"not a readable GGUF file: {e}") from e
    except OSError as e:
        raise ForensicsError(path, f"cannot read: {e.strerror}") from e


def _walk(mm: mmap.mmap, keep: frozenset[str]) -> tuple[dict, list[TensorInfo]]:
    if mm[:4] != b"GGUF":
        raise ValueError(f"magic {mm[:4]!r}, expected b'GGUF'")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
    if version not in VERSIONS:
        raise ValueError(f"version {version}; versions {VERSIONS} in little-endian byte order are read")
    # Every entry takes at least 8 bytes: a corrupt count fails here, not after a long loop.
    if (n_tensors + n_kv) * 8 > len(mm):
        raise ValueError(f"header declares {n_tensors} tensors and {n_kv} metadata entries, more than a file of "
                         f"{len(mm)} bytes holds")
    pos, meta = 24, {}
    for _ in range(n_kv):
        key, pos = _string(mm, pos)
        (vtype,) = struct.unpack_from("<I", mm, pos)
        if vtype == GGUFValueType.ARRAY and key in keep:
            meta[key], pos = _string_array(mm, pos + 4)
        elif vtype == GGUFValueType.ARRAY:
            pos = _skip_array(mm, pos + 4)
        else:
            meta[key], pos = _value(mm, pos + 4, vtype)
    entries = []
    for _ in range(n_tensors):
        name, pos = _string(mm, pos)
        (n_dims,) = struct.unpack_from("<I", mm, pos)
        if n_dims > MAX_DIMS:
            raise ValueError(f"tensor {name}: {n_dims} dimensions (at most {MAX_DIMS})")
        dims = struct.unpack_from(f"<{n_dims}Q", mm, pos + 4)
        raw_type, offset = struct.unpack_from("<IQ", mm, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        entries.append((name, dims, raw_type, offset))
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment {alignment!r} is not a power of two")
    data_start = -(-pos // alignment) * alignment
    tensors, seen = [], set()
    for name, dims, raw_type, offset in entries:
        if name in seen:
            raise ValueError(f"tensor {name} listed twice")
        seen.add(name)
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ValueError(f"tensor {name}: unknown tensor type {raw_type}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        if dims and dims[0] % block:
            raise ValueError(f"tensor {name}: rows of {dims[0]} values do not fill {qtype.name} blocks of {block}")
        tensors.append(TensorInfo(name, tuple(reversed(dims)), qtype, data_start + offset,
                                  math.prod(dims) // block * type_size))
    return meta, tensors


def _string(mm: mmap.mmap, pos: int) -> tuple[str, int]:
    (n,) = _U64.unpack_from(mm, pos)
    end = pos + 8 + n
    if end > len(mm):
        raise ValueError(f"a string of {n} bytes at byte {pos} runs past the end of the file")
    return mm[pos + 8:end].decode("utf-8"), end


def _value(mm: mmap.mmap, pos: int, vtype: int):
    if vtype == GGUFValueType.STRING:
        return _string(mm, pos)
    if vtype not in SCALARS:
        raise ValueError(f"unknown metadata value type {vtype} at byte {pos}")
    fmt = "<" + SCALARS[vtype]
    return struct.unpack_from(fmt, mm, pos)[0], pos + struct.calcsize(fmt)


def _string_array(mm: mmap.mmap, pos: int) -> tuple[list[str], int]:
    itype, count = struct.unpack_from("<IQ", mm, pos)
    if itype != GGUFValueType.STRING:
        raise ValueError(f"metadata array at byte {pos} holds type {itype}, not strings")
    pos += 12
    if count > len(mm) - pos:
        raise ValueError(f"a metadata array of {count} elements at byte {pos} cannot fit in the file")
    out = []
    for _ in range(count):
        (n,) = _U64.unpack_from(mm, pos)
        if pos + 8 + n > len(mm):
            raise ValueError(f"a string of {n} bytes at byte {pos} runs past the end of the file")
        # A token may be a fragment of a UTF-8 sequence; replace what does not decode, as the gguf package does.
        out.append(mm[pos + 8:pos + 8 + n].decode("utf-8", errors="replace"))
        pos += 8 + n
    return out, pos


def _skip_array(mm: mmap.mmap, pos: int) -> int:
    itype, count = struct.unpack_from("<IQ", mm, pos)
    pos += 12
    if count > len(mm) - pos:  # every element takes a byte or more
        raise ValueError(f"a metadata array of {count} elements at byte {pos} cannot fit in the file")
    if itype == GGUFValueType.STRING:
        unpack = _U64.unpack_from
        for _ in range(count):
            pos += 8 + unpack(mm, pos)[0]
    elif itype == GGUFValueType.ARRAY:
        for _ in range(count):
            pos = _skip_array(mm, pos)
    elif itype in SCALARS:
        pos += count * struct.calcsize(SCALARS[itype])
    else:
        raise ValueError(f"unknown metadata array type {itype} at byte {pos}")
    if pos > len(mm):
        raise ValueError("a metadata array runs past the end of the file")
    return pos


_LOW4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_ONES = np.uint64(0x0101010101010101)
_SIGN = np.uint64(0xF0)
_U4 = np.uint64(4)


def _scales(blocks: np.ndarray) -> np.ndarray:
    """The float16 scale that opens every Q8_0 and Q5_0 block, as float32 (blocks, 1)."""
    return blocks.view(np.uint16)[:, :1].view(np.float16).astype(np.float32)


def _q8_0_codes(blocks: np.ndarray) -> list[np.ndarray]:
    return [blocks[:, 2:].view(np.int8)]


# A Q5_0 block (ggml's block_q5_0): its scale, the high bits of values 0-15 and of 16-31, and 16 bytes holding value
# j's low four bits in byte j's low half and value j + 16's in its high half.
_Q5_0 = np.dtype([("d", "<f2"), ("high0", "V2"), ("high1", "V2"), ("low", "V16")])


# Q4_0 and Q4_1 blocks: a float16 scale (and, for Q4_1, a float16 minimum), then 16 bytes holding value j's four bits
# in byte j's low half and value j + 16's in its high half, as Q5_0's low bits are.
_Q4_0 = np.dtype([("d", "<f2"), ("low", "V16")])
_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("low", "V16")])


def _nibbles(blocks: np.ndarray, layout: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The 4-bit codes (for Q5_0 the low four bits) of blocks of `layout` as uint8 (2, blocks, 16) (values 0-15,
    then 16-31), in a new array (the blocks are the read buffer, which stays as read), and the blocks' fields."""
    fields = np.ascontiguousarray(blocks).reshape(-1).view(layout)
    low = np.ascontiguousarray(fields["low"]).view(np.uint64)
    codes = np.empty((2, len(low)), np.uint64)
    np.bitwise_and(low, _LOW4, out=codes[0])
    np.right_shift(low, _U4, out=codes[1])
    codes[1] &= _LOW4
    return codes.view(np.uint8).reshape(2, len(fields), 16), fields


def _q5_0_codes(blocks: np.ndarray) -> list[np.ndarray]:
    """The int8 codes q - 16 of Q5_0 blocks, values 0-15 and 16-31 of each block apart (ggml's
    dequantize_row_q5_0). Eight codes at a time in uint64 lanes: a code with its high bit set is its low bits; one
    without is them less 16, the low bits with 0xF0 over them. Each half is worked on as one flat run: numpy's loops
    over rows of a few lanes (a strided copy, a bitwise op on a column) cost several times a flat pass."""
    nibbles, fields = _nibbles(blocks, _Q5_0)
    bits = np.empty((2, len(fields)), "V2")
    bits[0], bits[1] = fields["high0"], fields["high1"]
    codes = np.unpackbits(bits.view(np.uint8), bitorder="little").view(np.uint64).reshape(2, -1)
    codes ^= _ONES
    codes *= _SIGN
    codes |= nibbles.reshape(2, -1).view(np.uint64)
    return list(codes.view(np.int8).reshape(2, len(fields), 16))


def _q4_0_codes(blocks: np.ndarray) -> list[np.ndarray]:
    """The int8 codes q - 8 of Q4_0 blocks, values 0-15 and 16-31 apart (ggml's dequantize_row_q4_0)."""
    codes = _nibbles(blocks, _Q4_0)[0].view(np.int8)
    codes -= np.int8(8)
    return list(codes)


def _q4_1_values(blocks: np.ndarray) -> np.ndarray:
    """Q4_1's values d * q + m in float32, in gguf's order of operations (so to the bit)."""
    codes, fields = _nibbles(blocks, _Q4_1)
    d, m = (fields[k].astype(np.float32)[:, None] for k in ("d", "m"))
    out = _as_float(list(codes))
    out *= d
    out += m
    return out


def _q4_1_sums(blocks: np.ndarray) -> tuple[float, float] | None:
    """Q4_1: 32 values d * q + m, codes of 4 bits: the sums of the exact values from those of the codes."""
    codes, fields = _nibbles(blocks, _Q4_1)
    d, m = (fields[k].astype(np.float64) for k in ("d", "m"))
    if not (np.isfinite(d).all() and np.isfinite(m).all()):
        return None
    s1, s2 = _row_sums(codes.reshape(-1, 16).astype(np.float32))
    s1, s2 = s1.reshape(2, -1).sum(axis=0), s2.reshape(2, -1).sum(axis=0)
    return (float(d @ s1 + 32 * m.sum()),
            float((d * d) @ s2 + 2 * np.einsum("i,i,i->", d, m, s1) + 32 * (m @ m)))


def _as_float(parts: list[np.ndarray]) -> np.ndarray:
    """Integer code arrays (blocks, k_i) side by side as one float32 (blocks, sum of k_i), cast as they are written
    (one pass, where concatenating first is two)."""
    out = np.empty((len(parts[0]), sum(part.shape[1] for part in parts)), np.float32)
    at = 0
    for part in parts:
        out[:, at:at + part.shape[1]] = part
        at += part.shape[1]
    return out


# Formats whose every value is its block's scale times an integer code (ggml's Q8_0, Q5_0 and Q4_0; Q8_0 and Q5_0 are
# most of a Q4_K_M file of a model whose rows are not whole 256-value super-blocks). A float16 scale times a code of at most 8 bits
# is exact in float32, so these decoders give gguf's values to the bit, about twice as fast (measured on G's
# tensors), and the codes' sums give the exact moments without decoding.
SCALED_CODES = {GGMLQuantizationType.Q8_0: _q8_0_codes, GGMLQuantizationType.Q5_0: _q5_0_codes,
                GGMLQuantizationType.Q4_0: _q4_0_codes}


def _block_decoder(qtype: GGMLQuantizationType):
    """(blocks, bytes) uint8 -> (blocks, values) float32 for `qtype`: ours, to gguf's bit, for SCALED_CODES and
    Q4_1; else gguf's."""
    codes = SCALED_CODES.get(qtype)
    if codes is not None:
        return lambda blocks: _as_float(codes(blocks)) * _scales(blocks)
    if qtype == GGMLQuantizationType.Q4_1:
        return _q4_1_values
    decoder = getattr(quants, qtype.name, None)  # gguf names each block decoder class after its type
    if decoder is None:
        raise NotImplementedError(qtype.name)
    decoder.init_grid()  # the IQ types' lookup grids, built on first use
    return decoder.dequantize_blocks


def _row_sums(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sums and sums of squares of the rows of `q`, float32 integer codes (squared in place), as float64. Exact
    whatever the order of addition: float32 holds these integers (below 2**24) exactly. Products with a vector of
    ones: the fastest sums numpy has for short rows (einsum's sum of products took twice as long)."""
    ones = np.ones(q.shape[1], np.float32)
    s1 = (q @ ones).astype(np.float64)
    np.square(q, out=q)
    return s1, (q @ ones).astype(np.float64)


def _sub_block_sums(codes: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums and sums of squares of consecutive runs of `width` integer codes, as float64 (blocks, runs)."""
    s1, s2 = _row_sums(codes.reshape(-1, width).astype(np.float32))
    return s1.reshape(len(codes), -1), s2.reshape(len(codes), -1)


def _q4_k_sums(blocks: np.ndarray) -> tuple[float, float] | None:
    """Q4_K: 256 values in 8 runs of 32, value = d * scale * code - dmin * min, codes of 4 bits (32 bytes hold runs
    2c and 2c + 1, low and high halves); scales and mins as gguf unpacks them."""
    n = len(blocks)
    d = blocks.view(np.uint16)[:, :2].view(np.float16).astype(np.float64)
    if not np.isfinite(d).all():
        return None
    scale, low = quants.Q4_K.get_scale_min(blocks[:, 4:16])
    packed = np.ascontiguousarray(blocks[:, 16:]).view(np.uint64).reshape(n, 4, 1, 4)
    q = np.empty((n, 4, 2, 4), np.uint64)
    np.bitwise_and(packed, _LOW4, out=q[:, :, :1])
    np.right_shift(packed, _U4, out=q[:, :, 1:])
    q[:, :, 1:] &= _LOW4
    s1, s2 = _sub_block_sums(q.view(np.uint8).reshape(n, 256), 32)
    a, b = d[:, :1] * scale, d[:, 1:] * low
    return (float(np.einsum("ij,ij->", a, s1) - 32 * b.sum()),
            float(np.einsum("ij,ij->", a * a, s2) - 2 * np.einsum("ij,ij->", a * b, s1) + 32 * np.einsum("ij,ij->", b, b)))


# Q6_K's 16-value runs in the order `_q6_k_sums` lays the codes out, (low-bits half s, 128-value half h, quarter u,
# run within it c): run index 8h + 4s + 2u + c, as gguf's decoder orders the values.
_Q6_K_RUNS = np.array([8 * h + 4 * s + 2 * u + c for s in range(2) for h in range(2) for u in range(2)
                       for c in range(2)])
_LOW2 = np.uint64(0x0303030303030303)


def _q6_k_sums(blocks: np.ndarray) -> tuple[float, float] | None:
    """Q6_K: 256 values in 16 runs of 16, value = d * scale * (code - 32), codes of 6 bits: 4 in 128 bytes of
    nibbles, 2 in 64 bytes of crumbs; int8 scales, then d."""
    n = len(blocks)
    d = np.ascontiguousarray(blocks[:, 208:210]).view(np.float16)[:, 0].astype(np.float64)
    if not np.isfinite(d).all():
        return None
    low = np.ascontiguousarray(blocks[:, :128]).view(np.uint64)
    high = np.ascontiguousarray(blocks[:, 128:192]).view(np.uint64)
    q = np.empty((n, 2, 2, 2, 32), np.uint8)
    nibbles = q.reshape(n, 2, 128).view(np.uint64)
    np.bitwise_and(low, _LOW4, out=nibbles[:, 0])
    np.right_shift(low, _U4, out=nibbles[:, 1])
    nibbles[:, 1] &= _LOW4
    for s in range(2):
        for u in range(2):
            crumbs = (high >> np.uint64(4 * s + 2 * u)) & _LOW2
            crumbs <<= _U4
            q[:, s, :, u, :] |= crumbs.view(np.uint8).reshape(n, 2, 32)
    codes = q.reshape(n, 256).view(np.int8)
    codes -= np.int8(32)
    s1, s2 = _sub_block_sums(codes, 16)
    a = d[:, None] * blocks[:, 192:208].view(np.int8)[:, _Q6_K_RUNS].astype(np.float64)
    return float(np.einsum("ij,ij->", a, s1)), float(np.einsum("ij,ij->", a * a, s2))


def _code_sums(qtype: GGMLQuantizationType):
    """Blocks -> (sum, sum of squares) of their values in float64 from the scales and codes, or None where a scale
    is not finite (the caller then decodes those blocks and counts what is NaN or Inf). Each block's terms are exact
    in float64; for Q8_0, Q5_0 and Q4_0 they are also exactly the float32 values decoded, for Q4_1 and the K-quants
    those of the exact values, which float32 decoding may round (measured: within 1e-14 in the sums)."""
    if qtype in OWN_SUMS:
        return OWN_SUMS[qtype]
    codes = SCALED_CODES.get(qtype)
    if codes is None:
        return lambda blocks: None

    def sums(blocks: np.ndarray) -> tuple[float, float] | None:
        d = _scales(blocks)[:, 0].astype(np.float64)
        if not np.isfinite(d).all():
            return None
        s1, s2 = np.zeros(len(blocks)), np.zeros(len(blocks))
        for part in codes(blocks):
            a, b = _row_sums(part.astype(np.float32))
            s1 += a
            s2 += b
        return float(np.einsum("i,i->", d, s1)), float(np.einsum("i,i->", d * d, s2))
    return sums


# Formats with a minimum or a scale per run of values besides the block's: sums of their own.
OWN_SUMS = {GGMLQuantizationType.Q4_1: _q4_1_sums, GGMLQuantizationType.Q4_K: _q4_k_sums,
            GGMLQuantizationType.Q6_K: _q6_k_sums}


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """A tensor's bytes as numbers, flat: plain types as stored, BF16 and quantised blocks as float32."""
    if qtype in PLAIN:
        return raw.view(PLAIN[qtype])
    if qtype == GGMLQuantizationType.BF16:
        return bf16_to_f32(raw)
    decode = _block_decoder(qtype)
    block, type_size = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, type_size)
    out = np.empty((len(blocks), block), np.float32)
    step = max(1, DEQUANT_ELEMENTS // block)
    for start in range(0, len(blocks), step):
        out[start:start + step] = decode(blocks[start:start + step])
    return out.reshape(-1)


class GGUFFile(Source):
    def __init__(self, path: Path, reads: Reads):
        super().__init__(path, reads)
        self.meta, self.directory = read_header(path)
        self.file = reads.open(path)
        for t in self.directory:
            if t.offset + t.nbytes > self.file.size:
                raise ForensicsError(path, f"truncated: tensor {t.name} needs bytes up to "
                                           f"{t.offset + t.nbytes}, file has {self.file.size}")
        arch = self.meta.get("general.architecture") or ""

        def meta(key):
            v = self.meta.get(f"{arch}.{key}")
            return int(v) if v is not None else None

        heads = meta("attention.head_count")
        self._info = ModelInfo(
            architecture=arch, format="gguf", table="gguf",
            num_layers=meta("block_count"), hidden_size=meta("embedding_length"),
            num_heads=heads, num_kv_heads=meta("attention.head_count_kv") or heads,
            head_dim=meta("attention.key_length"),
            config={"gguf_architecture": arch, "file_type": self.meta.get("general.file_type")},
        )

    def info(self) -> ModelInfo:
        return self._info

    def tensors(self) -> Iterator[TensorRef]:
        for t in sorted(self.directory, key=lambda t: t.offset):
            # A row is a whole number of blocks (gguf quantises along rows); only q and k need the whole matrix.
            whole = (len(t.shape) != 2 or not t.shape[0] or t.nbytes % t.shape[0]
                     or t.name.endswith(("attn_q.weight", "attn_k.weight")))
            blocks = t.qtype not in PLAIN and t.qtype != GGMLQuantizationType.BF16
            yield TensorRef(t.name, t.shape, t.qtype.name, lambda t=t: self._read(t)(), self.path,
                            read_rows=None if whole else lambda ids, t=t: self._rows(t, ids),
                            load_blocks=(lambda t=t: self._blocks(t)) if blocks else None,
                            read_then_decode=lambda t=t: self._read(t))

    def _rows(self, t: TensorInfo, ids: np.ndarray) -> np.ndarray:
        width = t.nbytes // t.shape[0]
        rows = [self._dequantize(t, self.file.read_array(t.offset + int(r) * width, width)) for r in ids]
        return np.stack(rows) if rows else np.zeros((0, t.shape[1]), np.float32)

    def _dequantize(self, t: TensorInfo, raw: np.ndarray) -> np.ndarray:
        try:
            return dequantize(raw, t.qtype)
        except NotImplementedError as e:
            raise self._unsupported(t) from e

    def _unsupported(self, t: TensorInfo) -> ForensicsError:
        return ForensicsError(self.path, f"tensor {t.name}: quantisation type {t.qtype.name} is not supported by the "
                                         f"gguf package")

    def _blocks(self, t: TensorInfo) -> Blocks:
        """The tensor as stored, for its moments (row order, which `_decoded` restores for q and k, does not change
        them)."""
        try:
            decode = _block_decoder(t.qtype)
        except NotImplementedError as e:
            raise self._unsupported(t) from e
        block, type_size = GGML_QUANT_SIZES[t.qtype]
        codes = self.file.read_array(t.offset, t.nbytes).reshape(-1, type_size)
        return Blocks(t.shape, codes, block, _code_sums(t.qtype), decode)

    def _read(self, t: TensorInfo) -> Callable[[], np.ndarray]:
        raw = self.file.read_array(t.offset, t.nbytes)
        return lambda: self._decoded(t, raw)

    def _decoded(self, t: TensorInfo, raw: np.ndarray) -> np.ndarray:
        w = self._dequantize(t, raw).reshape(t.shape)
        info = self._info
        if info.architecture in PERMUTED_QK and info.num_heads:
            if t.name.endswith("attn_q.weight"):
                w = unpermute(w, info.num_heads)
            elif t.name.endswith("attn_k.weight"):
                w = unpermute(w, info.num_kv_heads)
        return w


class _PlainReader(gguf.GGUFReader):
    """gguf's reader over a plain ndarray view of its file mapping: slicing the np.memmap subclass runs Python code
    per slice, and the reader slices once per metadata element (Gemma3-270M's 262k-token vocabulary: 8.8 s a parse,
    which transformers does three times, for the config, the tokenizer and the weights)."""

    @property
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, mapping: np.ndarray) -> None:
        self._plain = np.asarray(mapping)


_INT_VALUES = frozenset({GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
                         GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64})
_FLOAT_VALUES = frozenset({GGUFValueType.FLOAT32, GGUFValueType.FLOAT64})


def _parse_value(original: Callable) -> Callable:
    """transformers' parse of one metadata element (`_gguf_parse_value`), the same values without its per-element
    list and array copies: Gemma3-270M's vocabulary is 786k elements, 2.0 s a parse against 0.75 s. What it does not
    cover (nested arrays) goes to `original`."""

    def parse(value, types):
        if isinstance(types, list):
            if len(types) == 1:
                kind = types[0]
            elif len(types) == 2 and types[0] == GGUFValueType.ARRAY:
                kind = types[1]
            else:
                return original(value, types)
        else:
            kind = types
        if kind == GGUFValueType.STRING:
            return value.tobytes().decode()
        if kind in _INT_VALUES:
            return int(value[0])
        if kind in _FLOAT_VALUES:
            return float(value[0])
        if kind == GGUFValueType.BOOL:
            return bool(value[0])
        return original(value, types)

    return parse


@contextmanager
def plain_reader():
    """While transformers loads a GGUF file, it parses the file with `_PlainReader` (it imports gguf.GGUFReader
    when it loads one), once: transformers parses a file for the config, the tokenizer and the weights, and one
    parse of Gemma3-270M's is 2-3 s. Its metadata, which it converts element by element for the config and again
    for the tokenizer, is converted once (`_parse_value`, each caller given its own copy), and its tensor-name map,
    which transformers builds again for every module (397 times for SmolLM2: 4 s), once per architecture and depth.
    The values are the same, only the slicing is faster and the parse and the map reused."""
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    original, original_map, parsed, converted = gguf.GGUFReader, gguf.get_tensor_name_map, {}, {}
    original_load, original_parse = hf_gguf.load_gguf_checkpoint, hf_gguf._gguf_parse_value

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in parsed:
            parsed[key] = _PlainReader(path, mode)
        return parsed[key]

    def load(path, return_tensors=False, model_to_load=None, torch_dtype=None):
        if return_tensors:
            return original_load(path, True, model_to_load, torch_dtype)
        key = os.fspath(path)
        if key not in converted:
            converted[key] = original_load(path, False)
        return copy.deepcopy(converted[key])

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(original_map)
    hf_gguf.load_gguf_checkpoint, hf_gguf._gguf_parse_value = load, _parse_value(original_parse)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original, original_map
        hf_gguf.load_gguf_checkpoint, hf_gguf._gguf_parse_value = original_load, original_parse
