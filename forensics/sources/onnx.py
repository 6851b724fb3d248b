"""ONNX files: initializers named back to Hugging Face parameter names, int8 weights dequantised.

The .onnx file is read whole through `HashedFile` and parsed with the onnx package; tensors kept in external data
files next to it are read from those files, in file order, also through `HashedFile`.

Exporters rarely keep the parameter names of the weight matrices: torch's TorchScript exporter stores them as
`onnx::MatMul_N`, its dynamo exporter as `val_N`, and both store them transposed, as MatMul's (in, out) operand. The
name is recovered from the graph, in this order: the tensor's own name when it is a parameter path; the module path
the dynamo exporter records on the consuming node; the consuming node's name (`/bert/encoder/layer.0/attention/self/
query/MatMul`); the named bias added to the node's output. Quantised weights (onnxruntime's `quantize_dynamic`,
QDQ models, hand-written Cast/Mul dequantisation) are followed through their dequantisation nodes to the node that
uses them and dequantised as w = (q - zero_point) * scale.
"""

from __future__ import annotations

import ast
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from forensics.errors import ForensicsError
from forensics.sources.base import ModelInfo, Reads, Source, TensorRef

# Integer initializers of these types, with two or more dimensions, are quantised weights.
QUANT_TYPES = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT4,
               TensorProto.UINT4}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
# Names quantisers give a weight's integer copy and its parameters (onnxruntime: X_quantized, X_scale, X_zero_point).
QUANT_SUFFIXES = ("_quantized", "_q")
SCALE_SUFFIXES = ("_scale",)
ZERO_POINT_SUFFIXES = ("_zero_point", "_zp")
# Ops whose second input is a weight stored (in, out); Gemm says so in transB.
MATMUL_OPS = {"MatMul", "MatMulInteger", "Gemm"}
# Ops that use a weight tensor; an anonymous float initializer used by none of them is a graph constant (a mask,
# a folded shape), not a weight.
WEIGHT_OPS = MATMUL_OPS | {"Gather", "LayerNormalization", "Conv", "Add"}
# Top-level module names of Hugging Face encoders: whatever precedes them (`bert.`, `model.0.auto_model.`,
# a wrapper's `inner.`) is dropped, giving the plain parameter name.
HF_ROOTS = ("embeddings", "encoder", "pooler")
# Architecture, and its layer-0 query projection once named (its Reshape gives the head count).
ARCHITECTURES = (("bert", "encoder.layer.0.attention.self.query.weight"),)
LAYER = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")


@dataclass(frozen=True)
class Range:
    """Bytes of one tensor in an external data file."""

    path: Path
    offset: int
    length: int


@dataclass
class Weight:
    """One weight as stored: its initializer, how to dequantise it, the names it is known by."""

    init: TensorProto
    names: list[str]
    user: onnx.NodeProto | None = None  # the node that multiplies by it (or otherwise uses it)
    transpose: bool = False
    scale: TensorProto | None = None
    zero_point: TensorProto | None = None
    axis: int | None = None
    ranges: list[Range] = field(default_factory=list)


def hf_name(path: str) -> str:
    parts = path.split(".")
    for i, p in enumerate(parts):
        if p in HF_ROOTS:
            return ".".join(parts[i:])
    return path


def is_param_name(name: str) -> bool:
    """Parameter paths (`encoder.layer.0.attention.self.query.bias`), not exporter temporaries (`onnx::MatMul_7`)."""
    return "." in name and ":" not in name and "/" not in name


def strip_suffix(name: str, suffixes: tuple[str, ...]) -> str:
    for s in suffixes:
        if name.endswith(s):
            return name[: -len(s)]
    return name


class ONNXFile(Source):
    def __init__(self, path: Path, reads: Reads):
        super().__init__(path, reads)
        self.file = reads.open(path)
        self.model = onnx.ModelProto()
        try:
            # What onnx.load_model_from_string does, minus its copy of the bytes into an immutable `bytes`.
            self.model.ParseFromString(self.file.read_all())
        except (DecodeError, RuntimeError, ValueError) as e:
            raise ForensicsError(path, f"not a readable ONNX file: {type(e).__name__}: {e}") from e
        g = self.model.graph
        self.inits = {t.name: t for t in g.initializer}
        if not self.inits:
            raise ForensicsError(path, "ONNX graph has no initializers: no weights to fingerprint")
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in g.node:
            for i, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, i))
            for name in node.output:
                self.producer[name] = node
        self._check_graph()
        self.weights = self._weights()
        self._info = self._model_info()
        self._last: tuple[int, np.ndarray] | None = None

    # --- graph -----------------------------------------------------------------------------------------------------

    def _check_graph(self) -> None:
        """A file cut short can still parse as a smaller graph; a node reading an undefined value gives it away."""
        g = self.model.graph
        defined = set(self.inits) | set(self.producer) | {i.name for i in g.input}
        for node in g.node:
            for name in node.input:
                if name and name not in defined:
                    raise ForensicsError(self.path, f"corrupt or truncated ONNX graph: node {node.name or node.op_type}"
                                                    f" reads {name!r}, which nothing defines")

    def _const_ints(self, name: str) -> list[int | None] | None:
        """Value of a small integer constant (a Reshape target), element by element; None where only known at run
        time (a dimension taken from the input's shape), None overall when even its length is unknown."""
        if name in self.inits:
            return [int(v) for v in numpy_helper.to_array(self.inits[name]).reshape(-1)]
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return [int(v) for v in numpy_helper.to_array(a.t).reshape(-1)]
            return None
        if node.op_type in ("Cast", "Identity"):
            return self._const_ints(node.input[0])
        if node.op_type == "Unsqueeze":
            return self._const_ints(node.input[0]) or [None]
        if node.op_type == "Shape":
            attrs = {a.name: a.i for a in node.attribute}
            if "start" in attrs and "end" in attrs and attrs["start"] >= 0 and attrs["end"] >= 0:
                return [None] * (attrs["end"] - attrs["start"])
            return None
        if node.op_type == "Concat":
            out: list[int | None] = []
            for piece in node.input:
                values = self._const_ints(piece)
                if values is None:
                    return None
                out.extend(values)
            return out
        return None

    def _forward(self, start: onnx.NodeProto, through: set[str], depth: int) -> Iterator[onnx.NodeProto]:
        """Nodes reached from `start`'s output, passing only through ops in `through` (breadth first)."""
        frontier, seen = [start], {id(start)}
        for _ in range(depth):
            nxt = []
            for node in frontier:
                for out in node.output:
                    for c, _ in self.consumers.get(out, ()):
                        if id(c) in seen:
                            continue
                        seen.add(id(c))
                        yield c
                        if c.op_type in through:
                            nxt.append(c)
            frontier = nxt

    def _aliases(self, name: str) -> list[str]:
        """TorchScript export stores identical tensors once and hands the copies out through Identity nodes."""
        return [n.output[0] for n, _ in self.consumers.get(name, ()) if n.op_type == "Identity"]

    def _param(self, name: str | None, init_name: str, suffixes: tuple[str, ...]) -> TensorProto | None:
        if name:
            return self.inits.get(name)
        base = strip_suffix(init_name, QUANT_SUFFIXES)
        for s in suffixes:
            if base + s in self.inits:
                return self.inits[base + s]
        return None

    def _dequant_chain(self, w: Weight) -> str:
        """Follow a quantised initializer through its dequantisation; return the value that carries the weight."""
        init, value = w.init, w.init.name
        scale = zero = None
        for _ in range(4):
            uses = self.consumers.get(value, ())
            if len(uses) != 1:
                break
            node, idx = uses[0]
            others = [i for i in node.input if i and i != value]
            if node.op_type == "Cast":
                value = node.output[0]
            elif node.op_type == "Sub" and idx == 0 and others and others[0] in self.inits:
                zero, value = others[0], node.output[0]
            elif node.op_type == "Mul" and others and others[0] in self.inits:
                scale, value = others[0], node.output[0]
                break
            elif node.op_type == "DequantizeLinear" and idx == 0:
                scale = node.input[1]
                zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
                w.axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                value = node.output[0]
                break
            elif node.op_type == "MatMulInteger" and idx == 1:
                zero = node.input[3] if len(node.input) > 3 and node.input[3] else None
                break
            else:
                break
        w.scale = self._param(scale, init.name, SCALE_SUFFIXES)
        w.zero_point = self._param(zero, init.name, ZERO_POINT_SUFFIXES)
        if w.scale is None:
            ops = sorted({n.op_type for n, _ in self.consumers.get(init.name, ())}) or ["nothing"]
            raise ForensicsError(self.path, f"quantised tensor {init.name} ({TensorProto.DataType.Name(init.data_type)}"
                                            f" {list(init.dims)}, used by {', '.join(ops)}): cannot find its scale "
                                            f"(no DequantizeLinear or Mul after it, no initializer named "
                                            f"{strip_suffix(init.name, QUANT_SUFFIXES)}_scale)")
        return value

    def _user(self, value: str) -> tuple[onnx.NodeProto | None, int, bool]:
        """The node that uses a weight value (matrix products first), its input slot, and whether Transpose nodes
        lie between (Cast nodes, as in fp16 weights cast for an fp32 graph, are passed through too)."""
        flipped = False
        for _ in range(4):
            uses = self.consumers.get(value, ())
            if len(uses) != 1 or uses[0][0].op_type not in ("Transpose", "Cast"):
                break
            node = uses[0][0]
            if node.op_type == "Transpose":
                perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
                if perm and perm[0] != [1, 0]:
                    break
                flipped = not flipped
            value = node.output[0]
        uses = self.consumers.get(value, ())
        for ops in (MATMUL_OPS, WEIGHT_OPS):
            for node, idx in uses:
                if node.op_type in ops:
                    return node, idx, flipped
        return None, -1, flipped

    def _module_of(self, node: onnx.NodeProto) -> str | None:
        """Module path of the layer a node belongs to."""
        for p in node.metadata_props:
            if p.key == "pkg.torch.onnx.name_scopes":  # dynamo exporter: [..., 'bert.encoder.layer.0...query', op]
                try:
                    scopes = ast.literal_eval(p.value)
                except (ValueError, SyntaxError):
                    scopes = []
                if len(scopes) >= 2 and scopes[-2]:
                    return scopes[-2]
        parts = node.name.strip("/").split("/")
        if node.name.startswith("/") and len(parts) >= 2:  # TorchScript exporter: /bert/encoder/.../query/MatMul
            return ".".join(parts[:-1])
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            bias = self._named(node.input[2])
            if bias and bias.endswith(".bias"):
                return bias[: -len(".bias")]
        for nxt in self._forward(node, {"Cast", "Mul"}, 3):  # the bias added to the product names the layer
            if nxt.op_type == "Add":
                for i in nxt.input:
                    bias = self._named(i)
                    if bias and bias.endswith(".bias"):
                        return bias[: -len(".bias")]
        return None

    def _named(self, value: str) -> str | None:
        """A value's parameter name when it is (an alias of) a named initializer."""
        if value in self.inits and is_param_name(value):
            return value
        node = self.producer.get(value)
        if node is not None and node.op_type == "Identity" and node.input[0] in self.inits and is_param_name(value):
            return value
        return None

    def _weights(self) -> list[Weight]:
        weights = []
        for init in self.inits.values():
            if len(init.dims) == 0:
                continue
            quantised = init.data_type in QUANT_TYPES and len(init.dims) >= 2
            if not quantised and init.data_type not in FLOAT_TYPES:
                continue
            w = Weight(init, [])
            value = self._dequant_chain(w) if quantised else init.name
            node, idx, flipped = self._user(value)
            w.user = node
            if node is not None and idx == 1 and node.op_type in MATMUL_OPS:
                # A (in, out) operand, which torch stores as (out, in); Gemm may say transB, Transpose nodes flip it.
                trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
                w.transpose = (not trans_b) != flipped
            else:
                w.transpose = flipped
            own = strip_suffix(init.name, QUANT_SUFFIXES) if quantised else init.name
            if value != init.name and is_param_name(value):
                w.names = [value]  # the dequantised value carries the parameter's name
            elif is_param_name(own):
                w.names = [own]
            if not quantised:
                w.names += [a for a in self._aliases(init.name) if is_param_name(a)]
            if not w.names and node is not None:
                module = self._module_of(node) if node.op_type in MATMUL_OPS else None
                if module:
                    w.names = [module + ".weight"]
                elif node.op_type in MATMUL_OPS or node.op_type == "Gather":
                    w.names = [init.name]  # an unnamed weight: the role table reports it, it is not dropped
            if not w.names:
                continue  # a constant of the graph (mask, folded shape), not a parameter
            w.names = [hf_name(n) for n in w.names]
            w.ranges = [r for t in (init, w.scale, w.zero_point) if t is not None for r in self._ranges(t)]
            weights.append(w)
        params = {t.name for w in weights for t in (w.scale, w.zero_point) if t is not None}
        weights = [w for w in weights if w.init.name not in params]
        names = Counter(n for w in weights for n in w.names)
        dup = [n for n, c in names.items() if c > 1]
        if dup:
            raise ForensicsError(self.path, f"several initializers map to one parameter name: {', '.join(dup[:5])}")
        # Embedded tensors first (already in memory), then external data in file order.
        return sorted(weights, key=lambda w: max(((1, str(r.path), r.offset + r.length) for r in w.ranges),
                                                 default=(0, "", 0)))

    def _ranges(self, t: TensorProto) -> list[Range]:
        if t.data_location != TensorProto.EXTERNAL:
            return []
        kv = {e.key: e.value for e in t.external_data}
        loc = kv.get("location", "")
        rel = Path(loc)
        if not loc or rel.is_absolute() or ".." in rel.parts:
            raise ForensicsError(self.path, f"tensor {t.name}: external data location {loc!r} is not a file "
                                            f"next to the model")
        path = self.root / rel  # beside the model file, the link resolved if the user named one
        real = path.resolve()
        if not real.is_relative_to(self.root):
            raise ForensicsError(self.path, f"tensor {t.name}: external data location {loc!r} resolves to {real}, "
                                            f"outside the model directory {self.root}: refused")
        if not path.exists():
            raise ForensicsError(path, f"external data file of {self.path.name} (tensor {t.name}) is missing")
        offset = int(kv.get("offset", 0))
        length = int(kv["length"]) if "length" in kv else path.stat().st_size - offset
        return [Range(path, offset, length)]

    def _model_info(self) -> ModelInfo:
        names = {n: w for w in self.weights for n in w.names}
        arch, query = next(((a, q) for a, q in ARCHITECTURES if q in names), ("unknown", None))
        layers = {int(m.group(1)) for n in names for m in [LAYER.search(n)] if m}
        hidden = heads = None
        if query is not None:
            w = names[query]
            dims = list(w.init.dims)
            hidden = dims[0] if w.transpose else dims[-1]
            heads = self._heads(w, hidden)
        return ModelInfo(
            architecture=arch, format="onnx", num_layers=max(layers) + 1 if layers else None, hidden_size=hidden,
            num_heads=heads,
            config={"producer": f"{self.model.producer_name} {self.model.producer_version}".strip(),
                    "opset": {o.domain or "ai.onnx": o.version for o in self.model.opset_import},
                    "quantised": any(w.scale is not None for w in self.weights)},
        )

    def _heads(self, query: Weight, hidden: int) -> int | None:
        """Heads from the Reshape that splits the query projection into (..., heads, head_dim)."""
        if query.user is None:
            return None
        for nxt in self._forward(query.user, {"Add", "Mul", "Div", "Cast"}, 5):
            if nxt.op_type != "Reshape":
                continue
            shape = self._const_ints(nxt.input[1])
            if not shape or len(shape) < 2:
                return None
            h, d = shape[-2], shape[-1]
            if h is not None and h > 0 and (d == -1 or (d is not None and h * d == hidden)):
                return h
            if h == -1 and d is not None and d > 0 and hidden % d == 0:
                return hidden // d
            return None
        return None

    # --- tensors ---------------------------------------------------------------------------------------------------

    def info(self) -> ModelInfo:
        return self._info

    def planned_files(self) -> list[Path]:
        external = sorted({r.path for w in self.weights for r in w.ranges})
        return [self.path, *external]

    def tensors(self) -> Iterator[TensorRef]:
        data = ExternalData(self.reads, [r for w in self.weights for r in w.ranges])
        for i, w in enumerate(self.weights):
            dims = [int(d) for d in w.init.dims]
            shape = tuple(reversed(dims)) if w.transpose and len(dims) == 2 else tuple(dims)
            dtype = TensorProto.DataType.Name(w.init.data_type).lower()
            for name in w.names:
                yield TensorRef(name, shape, dtype, lambda i=i, w=w: self._load(i, w, data),
                                w.ranges[0].path if w.ranges else self.path)
            data.done(w.ranges)

    def _load(self, i: int, w: Weight, data: ExternalData) -> np.ndarray:
        if self._last is not None and self._last[0] == i:  # aliases of one initializer share its bytes
            return self._last[1]
        q = self._array(w.init, data)
        if w.scale is None:
            a = q if q.dtype in (np.float32, np.float64) else q.astype(np.float32)
        else:
            a = self._dequantise(w, q, data)
        if w.transpose:
            if a.ndim != 2:
                raise ForensicsError(self.path, f"tensor {w.init.name}: a matrix product's weight with shape "
                                                f"{list(a.shape)}, expected 2-D")
            a = a.T
        a = np.ascontiguousarray(a)
        self._last = (i, a)
        return a

    def _dequantise(self, w: Weight, q: np.ndarray, data: ExternalData) -> np.ndarray:
        scale = self._array(w.scale, data).astype(np.float32)
        zero = self._array(w.zero_point, data).astype(np.float32) if w.zero_point is not None else np.float32(0)
        try:
            scale, zero = (self._expand(p, q.shape, w.axis) for p in (scale, zero))
            return (q.astype(np.float32) - zero) * scale
        except ValueError as e:
            raise ForensicsError(self.path, f"quantised tensor {w.init.name} {list(q.shape)}: scale "
                                            f"{list(np.shape(scale))} does not fit it ({e})") from e

    @staticmethod
    def _expand(p: np.ndarray, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
        """Per-tensor, per-axis (DequantizeLinear's axis) or blocked scales, spread to the weight's shape."""
        p = np.asarray(p)
        if p.size == 1:
            return p.reshape(())
        if p.ndim == 1 and axis is not None:
            view = [1] * len(shape)
            view[axis] = p.shape[0]
            p = p.reshape(view)
        if p.ndim == len(shape):
            for ax, (n, m) in enumerate(zip(p.shape, shape)):
                if n not in (1, m) and m % n == 0:
                    p = np.repeat(p, m // n, axis=ax)
        return np.broadcast_to(p, shape)

    def _array(self, t: TensorProto, data: ExternalData) -> np.ndarray:
        if t.data_location == TensorProto.EXTERNAL:
            embedded = TensorProto()
            embedded.CopyFrom(t)
            del embedded.external_data[:]
            embedded.data_location = TensorProto.DEFAULT
            embedded.raw_data = bytes(data.read(self._ranges(t)[0]))
            t = embedded
        try:
            a = numpy_helper.to_array(t)
        except (ValueError, TypeError) as e:
            raise ForensicsError(self.path, f"tensor {t.name}: stored data does not match its type and shape "
                                            f"{list(t.dims)}: {e}") from e
        if a.dtype.kind == "f" and a.dtype not in (np.float32, np.float64):  # float16, bfloat16
            a = a.astype(np.float32)
        elif a.dtype.kind not in "fiub":  # int4 and other ml_dtypes integers
            a = a.astype(np.int8)
        return a


class ExternalData:
    """Byte ranges of external data files, read strictly forward through `HashedFile`.

    A range passed over on the way to another is kept while a tensor still to come needs it (a scale stored before
    or after the weights it belongs to, or a weight whose scale lies further on).
    """

    def __init__(self, reads: Reads, ranges: list[Range]):
        self.reads = reads
        self.pending = Counter(ranges)
        self.by_file: dict[Path, list[Range]] = defaultdict(list)
        for r in sorted(set(ranges), key=lambda r: r.offset):
            self.by_file[r.path].append(r)
        self.pos: dict[Path, int] = defaultdict(int)
        self.kept: dict[Range, bytearray] = {}

    def read(self, r: Range) -> bytearray:
        if r in self.kept:
            return self.kept[r]
        f = self.reads.open(r.path)
        for other in self.by_file[r.path]:
            if other.offset >= r.offset:
                break
            if other.offset >= self.pos[r.path] and other.offset + other.length <= r.offset \
                    and self.pending[other] > 0 and other not in self.kept:
                self.kept[other] = f.read_at(other.offset, other.length)
                self.pos[r.path] = other.offset + other.length
        buf = f.read_at(r.offset, r.length)
        self.pos[r.path] = r.offset + r.length
        if self.pending[r] > 1:
            self.kept[r] = buf
        return buf

    def done(self, ranges: list[Range]) -> None:
        for r in ranges:
            self.pending[r] -= 1
            if self.pending[r] <= 0:
                self.kept.pop(r, None)
