"""safetensors files, single or sharded; read front to back through `HashedFile`.

The header is checked here (sizes, offsets, dtypes) so that a corrupt file gets a message that says what is wrong,
and then by the safetensors library itself (`safe_open`), whose reading of the format is the reference.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors import SafetensorError, safe_open

from forensics.errors import ForensicsError
from forensics.sources.base import HashedFile, TensorRef
from forensics.sources.dtypes import bf16_to_f32, fp8_to_f32

# The safetensors library refuses headers above 100 MB; so do we, before allocating anything.
MAX_HEADER = 100_000_000

# Storage dtype of each safetensors dtype (little-endian, as the format specifies); `DECODE` widens the ones numpy
# cannot compute with to float32, exactly.
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "F8_E4M3": np.dtype("u1"), "F8_E5M2": np.dtype("u1"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
DECODE = {
    "BF16": bf16_to_f32,
    "F8_E4M3": lambda raw: fp8_to_f32(raw, "e4m3fn"),
    "F8_E5M2": lambda raw: fp8_to_f32(raw, "e5m2"),
}


def read_header(f: HashedFile) -> tuple[int, dict]:
    """Return (start of the data section, {name: entry}) after checking every entry against the file."""
    path = f.path
    if f.size < 8:
        raise ForensicsError(path, f"truncated: {f.size} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", bytes(f.read_at(0, 8)))
    if n > MAX_HEADER:
        raise ForensicsError(path, f"corrupt safetensors header: declared header size {n} bytes is absurd "
                                   f"(limit {MAX_HEADER})")
    if 8 + n > f.size:
        raise ForensicsError(path, f"truncated: header declares {n} bytes but the file has {f.size}")
    try:
        header = json.loads(bytes(f.read_at(8, n)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ForensicsError(path, f"corrupt safetensors header: not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise ForensicsError(path, "corrupt safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    data_start, data_len = 8 + n, f.size - 8 - n
    spans = []
    for name, e in header.items():
        try:
            dtype, shape, (begin, end) = e["dtype"], [int(s) for s in e["shape"]], e["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise ForensicsError(path, f"corrupt safetensors header: entry {name!r} is malformed") from err
        if dtype not in DTYPES:
            raise ForensicsError(path, f"tensor {name!r} has unknown dtype {dtype!r}")
        need = math.prod(shape) * DTYPES[dtype].itemsize
        if not (isinstance(begin, int) and isinstance(end, int)) or begin < 0 or end - begin != need:
            raise ForensicsError(path, f"corrupt safetensors header: tensor {name!r} offsets {begin}..{end} "
                                       f"do not hold {need} bytes of {dtype}{shape}")
        if end > data_len:
            raise ForensicsError(path, f"tensor {name!r}: offsets {begin}..{end} out of range "
                                       f"(data section has {data_len} bytes; file truncated or header corrupt)")
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ForensicsError(path, f"corrupt safetensors header: tensors {n0!r} and {n1!r} overlap")
    try:
        with safe_open(f.real, framework="numpy") as st:
            if set(st.keys()) != set(header):
                raise ForensicsError(path, "safetensors library lists different tensors than the header")
    except SafetensorError as e:
        raise ForensicsError(path, f"rejected by the safetensors library: {e}") from e
    return data_start, header


def tensors(f: HashedFile, data_start: int, header: dict, only: set[str] | None = None) -> Iterator[TensorRef]:
    """Tensors of one file in on-disk order; `only` restricts to a shard's share of an index."""
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if only is not None and name not in only:
            continue
        begin, end = e["data_offsets"]

        def load_stored(begin=begin, end=end, dtype=e["dtype"], shape=e["shape"]) -> np.ndarray:
            return np.frombuffer(f.read_array(data_start + begin, end - begin), dtype=DTYPES[dtype]).reshape(shape)

        decode = DECODE.get(e["dtype"])
        rows = _row_reader(f, data_start + begin, e["dtype"], e["shape"]) if len(e["shape"]) == 2 else None
        if decode is None:
            yield TensorRef(name, tuple(e["shape"]), e["dtype"], load_stored, f.path, read_rows=rows)
        else:
            yield TensorRef(name, tuple(e["shape"]), e["dtype"], lambda s=load_stored, d=decode: d(s()), f.path,
                            load_stored, decode, rows)


def _row_reader(f: HashedFile, start: int, dtype: str, shape: list[int]):
    """Rows `ids` (sorted, unique) of the matrix stored at `start`, each read alone, decoded as `load()` would."""
    width, kind, decode = shape[1] * DTYPES[dtype].itemsize, DTYPES[dtype], DECODE.get(dtype)

    def rows(ids: np.ndarray) -> np.ndarray:
        out = np.stack([np.frombuffer(f.read_array(start + int(r) * width, width), dtype=kind) for r in ids]) \
            if len(ids) else np.zeros((0, shape[1]), kind)
        return out if decode is None else decode(out)
    return rows


def shards(index_path: Path, raw: bytes, root: Path) -> dict[str, list[str]]:
    """{shard file name: [tensor names]} from the bytes of a model.safetensors.index.json (or
    pytorch_model.bin.index.json); every shard must lie inside `root`, the model directory."""
    try:
        weight_map = json.loads(raw)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f for f in weight_map.values()):
            raise TypeError("weight_map is not an object of tensor name -> shard file name")
    except (ValueError, KeyError, TypeError) as e:
        raise ForensicsError(index_path, f"not a valid shard index: {e}") from e
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        shard = index_path.parent / file
        real = shard.resolve()
        if not real.is_relative_to(root):
            raise ForensicsError(index_path, f"shard entry {file!r} (for {len(names)} tensor(s), e.g. {names[0]}) "
                                             f"resolves to {real}, outside the model directory {root}: refused")
        if not shard.exists():
            raise ForensicsError(shard, f"missing shard: listed in {index_path.name} "
                                        f"for {len(names)} tensors but not on disk")
    return by_file
