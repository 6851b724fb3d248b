"""The CPU fingerprint path is numpy alone: what the loaders return, the float64 moments, the GGUF header walk, and a
whole `forensics fingerprint` run in a fresh process that never imports torch or transformers."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType

from forensics.errors import ForensicsError
from forensics.signals import weights
from forensics.sources import Reads, open_model
from forensics.sources.dtypes import bf16_to_f32, fp8_to_f32
from forensics.sources.gguf import read_header
from tests import tiny
from tests.test_e5s1_source import write_e5s1
from tests.test_onnx_source import export

ROOT = Path(__file__).resolve().parents[1]
NO_TORCH = r"""
import json, sys
from forensics.cli import main
codes = [main(["fingerprint", p, "-o", p + ".fp.json", "--device", "cpu"]) for p in sys.argv[1:]]
print(json.dumps({"codes": codes, "imported": [m for m in ("torch", "transformers") if m in sys.modules]}))
"""


def test_fingerprint_command_never_imports_torch(tmp_path):
    """safetensors (bf16), GGUF (Q8_0), ONNX and E5S1 all fingerprint in a process where torch was never loaded."""
    llama = tiny.build_model("llama")
    bert = tiny.build_model("bert")
    st = tiny.save_raw({k: v.bfloat16() for k, v in llama.state_dict().items()}, llama.config.to_dict(),
                       tmp_path / "st")
    tiny.write_llama_gguf(llama, tmp_path / "m.gguf", Q.Q8_0)
    export(bert, tmp_path / "m.onnx", dynamo=False)
    write_e5s1(tmp_path / "e5.bin", bert)
    paths = [str(st), str(tmp_path / "m.gguf"), str(tmp_path / "m.onnx"), str(tmp_path / "e5.bin")]
    r = subprocess.run([sys.executable, "-c", NO_TORCH, *paths], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result == {"codes": [0, 0, 0, 0], "imported": []}
    for p in paths:
        assert json.loads(Path(p + ".fp.json").read_text())["signals"]["q"]["values"][0] > 0


def test_auto_device_asks_torch_only_where_a_gpu_driver_is(monkeypatch):
    monkeypatch.setattr(weights, "_torch_cuda", lambda: pytest.fail("torch was asked on a machine with no driver"))
    monkeypatch.setattr(weights.os.path, "exists", lambda p: False)
    monkeypatch.setattr(weights.shutil, "which", lambda name: None)
    assert weights.pick_device("auto") == weights.pick_device(None) == "cpu"
    assert weights.pick_device("cpu") == "cpu"


def test_chunked_moments_equal_float64_oracle_and_count_nonfinite(monkeypatch):
    """Chan's merge across many chunks, on values whose mean dwarfs their spread (where a one-pass formula fails)."""
    monkeypatch.setattr(weights, "CHUNK_ELEMENTS", 1000)
    a = (3 + 0.01 * np.random.default_rng(0).standard_normal((101, 97))).astype(np.float32)
    m = weights.moments(a)
    assert (m.n, m.nan, m.inf) == (a.size, 0, 0)
    assert m.std == pytest.approx(float(np.std(a.astype(np.float64))), rel=1e-12)
    assert m.mean == pytest.approx(float(np.mean(a.astype(np.float64))), rel=1e-14)
    b = a.copy()
    b[5, :3], b[60, 7], b[100, 96] = np.nan, np.inf, -np.inf
    m = weights.moments(b[:, ::2])  # a strided view, as a fused tensor's column split gives
    finite = b[:, ::2][np.isfinite(b[:, ::2])].astype(np.float64)
    assert (m.nan, m.inf, m.n) == (2, 1, finite.size)
    assert m.std == pytest.approx(float(np.std(finite)), rel=1e-12)
    assert np.isnan(b[5, 0]) and np.isnan(b[5, 2])  # the caller's array is left as it was


def test_bf16_and_fp8_decode_bit_for_bit_as_torch():
    codes = np.arange(256, dtype=np.uint8)
    for fmt, dtype in (("e4m3fn", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)):
        want = torch.from_numpy(codes.copy()).view(dtype).float().numpy()
        got = fp8_to_f32(codes, fmt)
        nan = np.isnan(want)
        assert np.array_equal(nan, np.isnan(got)), fmt
        assert np.array_equal(want[~nan].view(np.uint32), got[~nan].view(np.uint32)), fmt
    halves = np.arange(1 << 16, dtype=np.uint16)
    want = torch.from_numpy(halves.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    assert np.array_equal(want.view(np.uint32), bf16_to_f32(halves).view(np.uint32))


@pytest.mark.parametrize("dtype,want", [(torch.bfloat16, np.float32), (torch.float16, np.float16),
                                        (torch.float32, np.float32), (torch.float8_e4m3fn, np.float32),
                                        (torch.int64, np.int64)])
@pytest.mark.parametrize("fmt", ["safetensors", "pytorch"])
def test_loaders_return_c_contiguous_arrays_of_the_contract_dtype(tmp_path, dtype, want, fmt):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(6, 10, generator=g) * 4).to(dtype)
    if fmt == "safetensors":
        path = tiny.save_raw({"w": t}, {"model_type": "llama"}, tmp_path / "m")
    else:
        path = tmp_path / "m"
        path.mkdir()
        (path / "config.json").write_text('{"model_type": "llama"}')
        torch.save({"w": t}, path / "pytorch_model.bin")
    reads = Reads()
    (ref,) = open_model(path, reads).tensors()
    a = ref.load()
    reads.finish(path)
    assert isinstance(a, np.ndarray) and a.flags.c_contiguous and a.dtype == want and a.shape == (6, 10)
    expect = t.float().numpy() if dtype.is_floating_point else t.numpy()
    assert np.array_equal(a.astype(expect.dtype), expect)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
def test_row_look_ups_equal_the_whole_matrix_rows_and_read_only_them(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(50, 12, generator=g) * 4).to(dtype)
    path = tiny.save_raw({"w": t}, {"model_type": "llama"}, tmp_path / "m")
    ids = np.array([7, 3, 3, 49, 0])
    reads = Reads(random=True)
    (ref,) = open_model(path, reads).tensors()
    header = reads.bytes_read(path)["model.safetensors"]
    rows = ref.rows(ids)
    assert reads.bytes_read(path)["model.safetensors"] - header == 4 * 12 * t.element_size()  # 4 distinct rows
    assert np.array_equal(rows, ref.load()[ids], equal_nan=True) and rows.dtype == ref.load().dtype
    with pytest.raises(IndexError):
        ref.rows(np.array([50]))


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0, Q.Q5_0])
def test_gguf_row_look_ups_equal_the_dequantised_rows(tmp_path, qtype):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path / "m.gguf"
    tiny.write_llama_gguf(transformers.LlamaForCausalLM(cfg).eval(), path, None if qtype == Q.F32 else qtype)
    ids = np.array([5, 63, 0, 5])
    refs = {r.name: r for r in open_model(path, Reads(random=True)).tensors()}
    emb = refs["token_embd.weight"]
    assert emb.read_rows is not None and refs["blk.0.attn_q.weight"].read_rows is None  # q is un-permuted whole
    assert np.array_equal(emb.rows(ids), emb.load()[ids])


def test_gguf_header_walk_equals_gguf_reader(tmp_path):
    def vocab(w):
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"tok{i}" for i in range(64)])
        w.add_token_merges(["t o", "to k"])
        w.add_token_scores([0.5] * 64)

    path = tmp_path / "m.gguf"
    tiny.write_llama_gguf(tiny.build_model("llama"), path, Q.Q4_1, vocab=vocab)
    meta, tensors = read_header(path)
    reader = GGUFReader(path)
    scalars = {k: f.contents() for k, f in reader.fields.items()
               if not k.startswith("GGUF.") and f.types[0] != GGUFValueType.ARRAY}
    assert meta == scalars and "tokenizer.ggml.tokens" not in meta
    kept, _ = read_header(path, keep=frozenset({"tokenizer.ggml.tokens"}))
    assert kept["tokenizer.ggml.tokens"] == reader.get_field("tokenizer.ggml.tokens").contents() == \
        [f"tok{i}" for i in range(64)]
    assert [(t.name, t.shape, t.qtype, t.offset, t.nbytes) for t in tensors] == \
        [(t.name, tuple(reversed(t.shape.tolist())), t.tensor_type, t.data_offset, t.n_bytes) for t in reader.tensors]


@pytest.mark.parametrize("patch,message", [
    ((0, b"GGUX"), "magic"),
    ((4, struct.pack("<I", 7)), "version 7"),
    ((8, struct.pack("<Q", 1 << 60)), "more than a file"),
])
def test_corrupt_gguf_header_is_refused_at_once(tmp_path, patch, message):
    path = tmp_path / "m.gguf"
    tiny.write_llama_gguf(tiny.build_model("llama"), path)
    data = bytearray(path.read_bytes())
    at, raw = patch
    data[at:at + len(raw)] = raw
    path.write_bytes(bytes(data))
    with pytest.raises(ForensicsError) as e:
        read_header(path)
    assert "m.gguf" in str(e.value) and message in str(e.value)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_torch_device_path_equals_numpy(dtype):
    """The code a CUDA device runs, exercised on torch's CPU device: same moments, caller's array untouched."""
    a = (1 + 0.1 * np.random.default_rng(1).standard_normal((64, 48))).astype(dtype)
    a[3, 4], a[7, 1] = np.nan, np.inf
    a.flags.writeable = False  # as an ONNX initializer's view is
    before = a.copy()
    want, got = weights.moments(a), weights._moments_torch(a, "cpu")
    assert (got.n, got.nan, got.inf) == (want.n, want.nan, want.inf) == (a.size - 2, 1, 1)
    assert got.std == pytest.approx(want.std, rel=1e-12) and got.mean == pytest.approx(want.mean, rel=1e-12)
    assert np.array_equal(a, before, equal_nan=True)
