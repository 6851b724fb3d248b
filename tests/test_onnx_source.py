"""ONNX files exported from a tiny BERT with torch's two exporters, quantised with onnxruntime, and the real models
B and C (slow)."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import transformers
from onnx import TensorProto, helper, numpy_helper

from forensics.errors import ForensicsError
from forensics.fingerprint import fingerprint_model
from forensics.sources import Reads, open_model
from tests import tiny

BERT = tiny.BERT_ROLES
MATRICES = ("q", "k", "v", "o", "up", "down")


class Encoder(torch.nn.Module):
    """What sentence-transformers exports: the encoder's hidden states from token ids."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, ids):
        return self.bert(input_ids=ids).last_hidden_state


def export(model, path: Path, dynamo: bool) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Encoder(model), (torch.zeros(1, 8, dtype=torch.long),), str(path), dynamo=dynamo,
                          input_names=["ids"], opset_version=17 if not dynamo else None, verbose=False)
    return path


@pytest.fixture(scope="module")
def quantization():
    """onnxruntime's quantisers (a test dependency), which write the quantised files real models ship."""
    return pytest.importorskip("onnxruntime.quantization")


@pytest.fixture(scope="module")
def bert():
    return tiny.build_model("bert")


@pytest.fixture(scope="module")
def legacy(bert, tmp_path_factory):
    return export(bert, tmp_path_factory.mktemp("onnx") / "legacy.onnx", dynamo=False)


@pytest.fixture(scope="module")
def dynamo(bert, tmp_path_factory):
    return export(bert, tmp_path_factory.mktemp("onnx") / "dynamo.onnx", dynamo=True)


def reference(model) -> dict[str, np.ndarray]:
    return {k.removeprefix("bert."): v.detach().double().numpy() for k, v in model.state_dict().items()}


def loaded(path: Path) -> dict[str, np.ndarray]:
    src = open_model(path, Reads())
    return {t.name: t.load().astype(np.float64) for t in src.tensors()}


def check_stds(fp: dict, ref: dict[str, np.ndarray], layers: int, rel: dict[str, float]) -> None:
    for role, param in BERT.items():
        values = fp["signals"][role]["values"]
        assert len(values) == layers
        for i in range(layers):
            want = float(np.std(ref[f"encoder.layer.{i}.{param}"]))
            assert values[i] == pytest.approx(want, rel=rel.get(role, 1e-6)), (role, i)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_fp32_export_matches_torch(exporter, bert, request):
    path = request.getfixturevalue(exporter)
    ref = reference(bert)
    fp = fingerprint_model(path, device="cpu")
    cfg = bert.config
    assert fp["model"]["format"] == "onnx" and fp["model"]["architecture"] == "bert"
    assert (fp["model"]["num_layers"], fp["model"]["hidden_size"]) == (cfg.num_hidden_layers, cfg.hidden_size)
    check_stds(fp, ref, cfg.num_hidden_layers, {})
    assert open_model(path, Reads()).info().num_heads == cfg.num_attention_heads
    # Names and orientation, element by element (a std cannot tell a matrix from its transpose).
    got = loaded(path)
    for i in range(cfg.num_hidden_layers):
        for param in BERT.values():
            name = f"encoder.layer.{i}.{param}"
            np.testing.assert_array_equal(got[name], ref[name], err_msg=name)


def test_identical_tensors_shared_through_identity(tmp_path):
    """Untrained norms and biases are identical; the TorchScript exporter stores one and aliases the rest."""
    model = transformers.BertModel(transformers.BertConfig(**tiny.ENCODER), add_pooling_layer=False).eval()
    path = export(model, tmp_path / "default_init.onnx", dynamo=False)
    assert any(n.op_type == "Identity" for n in onnx.load(path).graph.node)
    fp = fingerprint_model(path, device="cpu")
    check_stds(fp, reference(model), model.config.num_hidden_layers, {})


def quant_step(w: np.ndarray) -> float:
    """Worst-case 8-bit rounding step of a matrix (per-tensor range over 254 levels)."""
    return float(w.max() - w.min()) / 254


@pytest.mark.parametrize("weight_type,per_channel", [("QInt8", False), ("QUInt8", True)])
def test_quantize_dynamic(weight_type, per_channel, quantization, legacy, bert, tmp_path):
    out = tmp_path / "q.onnx"
    quantization.quantize_dynamic(str(legacy), str(out), weight_type=getattr(quantization.QuantType, weight_type),
                                  per_channel=per_channel)
    assert any(n.op_type == "MatMulInteger" for n in onnx.load(out).graph.node)
    ref = reference(bert)
    fp = fingerprint_model(out, device="cpu")
    check_stds(fp, ref, bert.config.num_hidden_layers, {r: 0.02 for r in MATRICES})
    got = loaded(out)
    for i in range(bert.config.num_hidden_layers):
        for role in MATRICES:
            name = f"encoder.layer.{i}.{BERT[role]}"
            np.testing.assert_allclose(got[name], ref[name], atol=quant_step(ref[name]), rtol=0, err_msg=name)


def test_quantize_static_qdq_per_channel(quantization, legacy, bert, tmp_path):
    """DequantizeLinear with per-column scales (axis 1 of the stored (in, out) matrix)."""
    class Calibration(quantization.CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{"ids": rng.integers(0, 64, (1, 8))} for _ in range(2)])

        def get_next(self):
            return next(self.batches, None)

    out = tmp_path / "qdq.onnx"
    quantization.quantize_static(str(legacy), str(out), Calibration(), quant_format=quantization.QuantFormat.QDQ,
                                 per_channel=True, weight_type=quantization.QuantType.QInt8,
                                 op_types_to_quantize=["MatMul"])
    ref = reference(bert)
    got = loaded(out)
    for i in range(bert.config.num_hidden_layers):
        for role in MATRICES:
            name = f"encoder.layer.{i}.{BERT[role]}"
            w = ref[name]
            per_row_step = (np.abs(w).max(axis=1, keepdims=True) * 2 / 254)
            assert np.all(np.abs(got[name] - w) <= per_row_step * 0.5 + 1e-7), name


def cast_mul_int8(src: Path, dst: Path) -> dict[str, np.ndarray]:
    """Rewrite every MatMul weight as int8 with one scale per output column, dequantised by Cast and Mul nodes,
    and drop the exporter's metadata: the layout of model B. Returns the dequantised (in, out) matrices."""
    m = onnx.load(src)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    dequant, expected = [], {}
    for node in g.node:
        del node.metadata_props[:]
        if node.op_type == "MatMul" and node.input[1] in inits:
            name = node.input[1]
            w = numpy_helper.to_array(inits[name])
            scale = (np.abs(w).max(axis=0, keepdims=True) / 127).astype(np.float32)
            q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
            expected[name] = q.astype(np.float32) * scale
            g.initializer.remove(inits.pop(name))
            g.initializer.extend([numpy_helper.from_array(q, name + "_q"),
                                  numpy_helper.from_array(scale, name + "_scale")])
            dequant += [helper.make_node("Cast", [name + "_q"], [name + "_f"], to=TensorProto.FLOAT),
                        helper.make_node("Mul", [name + "_f", name + "_scale"], [name])]
    nodes = dequant + list(g.node)  # dequantisation first keeps the graph in topological order
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(m)
    onnx.save(m, dst)
    return expected


def test_anonymous_int8_named_by_bias(dynamo, bert, tmp_path):
    """`val_N` weights, no metadata, nodes called `node_MatMul_N`: only the bias added after names the layer."""
    out = tmp_path / "castmul.onnx"
    expected = cast_mul_int8(dynamo, out)
    assert all(not n.name.startswith("/") for n in onnx.load(out).graph.node)
    src = open_model(out, Reads())
    assert src.info().num_heads == bert.config.num_attention_heads
    got = {t.name: t.load() for t in src.tensors()}
    ref = reference(bert)
    dequantised = sorted(expected.values(), key=lambda a: a.tobytes())
    for i in range(bert.config.num_hidden_layers):
        for role in MATRICES:
            name = f"encoder.layer.{i}.{BERT[role]}"
            w = got[name]
            # It is one of the matrices written, transposed back, and it is the one for this layer and role.
            assert any(a.shape == w.T.shape and np.array_equal(a, w.T) for a in dequantised), name
            np.testing.assert_allclose(w, ref[name], atol=quant_step(ref[name]), rtol=0, err_msg=name)
    fp = fingerprint_model(out, device="cpu")
    check_stds(fp, ref, bert.config.num_hidden_layers, {r: 0.02 for r in MATRICES})


def fp16_behind_cast_and_transpose(src: Path, dst: Path) -> None:
    """Store every MatMul weight as torch does, (out, in), in float16, read through Cast and Transpose nodes."""
    m = onnx.load(src)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    added = []
    for k, node in enumerate(n for n in g.node if n.op_type == "MatMul" and n.input[1] in inits):
        w = numpy_helper.to_array(inits[node.input[1]])
        g.initializer.remove(inits.pop(node.input[1]))
        g.initializer.append(numpy_helper.from_array(w.T.astype(np.float16), f"w{k}"))
        added += [helper.make_node("Cast", [f"w{k}"], [f"w{k}_f32"], to=TensorProto.FLOAT),
                  helper.make_node("Transpose", [f"w{k}_f32"], [node.input[1]], perm=[1, 0])]
    nodes = added + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(m)
    onnx.save(m, dst)


def test_fp16_weights_behind_cast_and_transpose(legacy, bert, tmp_path):
    out = tmp_path / "fp16.onnx"
    fp16_behind_cast_and_transpose(legacy, out)
    ref = reference(bert)
    got = loaded(out)
    for i in range(bert.config.num_hidden_layers):
        for role in MATRICES:
            name = f"encoder.layer.{i}.{BERT[role]}"
            np.testing.assert_array_equal(got[name], ref[name].astype(np.float16).astype(np.float64), err_msg=name)


def save_external(src: Path, dst: Path, params_last: bool = False) -> Path:
    m = onnx.load(src)
    for t in m.graph.initializer:  # as raw bytes, which onnx moves out (onnxruntime writes scales as float_data)
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
    if params_last:  # quantisation parameters stored after every weight that needs them
        inits = list(m.graph.initializer)
        inits.sort(key=lambda t: t.name.endswith(("_scale", "_zero_point")))
        del m.graph.initializer[:]
        m.graph.initializer.extend(inits)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(m, dst, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
                    size_threshold=0)
    return dst


def test_external_data(legacy, tmp_path):
    out = save_external(legacy, tmp_path / "ext" / "model.onnx")
    assert onnx.load(out, load_external_data=False).graph.initializer[0].data_location == TensorProto.EXTERNAL
    fp, base = fingerprint_model(out, device="cpu"), fingerprint_model(legacy, device="cpu")
    assert fp["signals"] == base["signals"]
    files = {f["path"]: f["sha256"] for f in fp["model"]["files"]}
    assert files == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out, out.parent / "weights.bin")}
    assert fp["run"]["bytes_read"] == out.stat().st_size + (out.parent / "weights.bin").stat().st_size


@pytest.mark.parametrize("params_last", [False, True])
def test_external_data_quantised(params_last, quantization, legacy, tmp_path):
    q = tmp_path / "q.onnx"
    quantization.quantize_dynamic(str(legacy), str(q), weight_type=quantization.QuantType.QUInt8, per_channel=True)
    out = save_external(q, tmp_path / "ext" / "model.onnx", params_last)
    assert fingerprint_model(out, device="cpu")["signals"] == fingerprint_model(q, device="cpu")["signals"]


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.999])
def test_truncated(keep, legacy, tmp_path):
    bad = tmp_path / "cut.onnx"
    data = legacy.read_bytes()
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ForensicsError) as e:
        fingerprint_model(bad, device="cpu")
    assert "cut.onnx" in str(e.value)


def test_not_onnx(tmp_path):
    bad = tmp_path / "junk.onnx"
    bad.write_bytes(b"\xff" * 64 + b"not a protobuf")
    with pytest.raises(ForensicsError, match="junk.onnx.*not a readable ONNX"):
        fingerprint_model(bad, device="cpu")


def test_external_data_missing_or_short(legacy, tmp_path):
    out = save_external(legacy, tmp_path / "ext" / "model.onnx")
    weights = out.parent / "weights.bin"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ForensicsError, match="weights.bin.*truncated"):
        fingerprint_model(out, device="cpu")
    weights.unlink()
    with pytest.raises(ForensicsError, match="weights.bin.*missing"):
        fingerprint_model(out, device="cpu")


# --- the real models (make models) ----------------------------------------------------------------------------

real = tiny.real_model


@pytest.mark.slow
@pytest.mark.parametrize("rel,layers", [("B-minilm-int8/model.onnx", 6), ("C-paraphrase-minilm-l3/model.onnx", 3)])
def test_real_onnx_every_role_every_layer(rel, layers):
    path = real(rel)
    fp = fingerprint_model(path, device="cpu")
    assert fp["model"]["architecture"] == "bert" and fp["model"]["num_layers"] == layers
    assert set(fp["signals"]) == set(BERT) | {"qk_spectrum", "ov_spectrum"}
    for role, s in fp["signals"].items():
        assert all(v is not None and v > 0 for v in s["values"]), role
    info = open_model(path, Reads()).info()
    assert (info.hidden_size, info.num_heads) == (384, 12)
