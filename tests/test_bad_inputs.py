"""Each kind of bad input gives one clear error naming the file, a non-zero exit and no output."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from forensics.errors import ForensicsError
from forensics.fingerprint import fingerprint_model
from tests import tiny


@pytest.fixture()
def llama_dir(tmp_path):
    return tiny.save(tiny.build_model("llama"), tmp_path / "llama")


def rewrite_header(path, edit) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def fails(path, *words):
    with pytest.raises(ForensicsError) as e:
        fingerprint_model(path, device="cpu")
    msg = str(e.value)
    for w in words:
        assert w in msg, msg
    return msg


def test_truncated_safetensors(llama_dir):
    f = llama_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    fails(llama_dir, "model.safetensors", "out of range")


def test_absurd_header_size(llama_dir):
    f = llama_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 1 << 60) + data[8:])
    fails(llama_dir, "model.safetensors", "absurd")


def test_header_not_json(llama_dir):
    f = llama_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[9:20] = b"!" * 11
    f.write_bytes(bytes(data))
    fails(llama_dir, "model.safetensors", "not valid JSON")


def test_offsets_out_of_range(llama_dir):
    def edit(h):
        name = next(k for k in h if k != "__metadata__")
        b, e = h[name]["data_offsets"]
        h[name]["data_offsets"] = [b + 10 ** 9, e + 10 ** 9]
    rewrite_header(llama_dir / "model.safetensors", edit)
    fails(llama_dir, "model.safetensors", "out of range")


def test_overlapping_tensors(llama_dir):
    def edit(h):
        entries = sorted((v["data_offsets"][0], k) for k, v in h.items() if k != "__metadata__")
        (b0, first), (_, second) = entries[0], entries[1]
        span = h[second]["data_offsets"][1] - h[second]["data_offsets"][0]
        if h[second]["shape"] != h[first]["shape"]:
            h[second]["shape"], h[second]["dtype"] = h[first]["shape"], h[first]["dtype"]
            span = h[first]["data_offsets"][1] - b0
        h[second]["data_offsets"] = [b0, b0 + span]
    rewrite_header(llama_dir / "model.safetensors", edit)
    fails(llama_dir, "model.safetensors", "overlap")


def test_unknown_dtype(llama_dir):
    def edit(h):
        name = next(k for k in h if k != "__metadata__")
        h[name]["dtype"] = "F7"
    rewrite_header(llama_dir / "model.safetensors", edit)
    fails(llama_dir, "model.safetensors", "unknown dtype 'F7'")


def test_nan_weights_refused_by_default_and_recorded_when_allowed(tmp_path):
    model = tiny.build_model("llama")
    state = dict(model.state_dict())
    bad = state["model.layers.1.mlp.up_proj.weight"].clone()
    bad[0, :3] = float("nan")
    bad[1, 0] = float("inf")
    state["model.layers.1.mlp.up_proj.weight"] = bad
    path = tiny.save_raw(state, model.config.to_dict(), tmp_path / "nan")
    fails(path, "model.safetensors", "model.layers.1.mlp.up_proj.weight", "NaN 3", "Inf 1")
    fp = fingerprint_model(path, device="cpu", allow_nonfinite=True)
    assert fp["nonfinite"] == [{"tensor": "model.layers.1.mlp.up_proj.weight",
                                "file": str(path / "model.safetensors"), "nan": 3, "inf": 1}]
    finite = bad[torch.isfinite(bad)].double()
    assert fp["signals"]["up"]["values"][1] == pytest.approx(float(finite.std(unbiased=False)), rel=1e-9)


def test_nan_attention_weights_leave_their_layer_without_spectra(tmp_path):
    model = tiny.build_model("llama")
    state = dict(model.state_dict())
    bad = state["model.layers.1.self_attn.k_proj.weight"].clone()
    bad[-1, -1] = float("nan")  # in the last head block: every block before it is reduced first
    state["model.layers.1.self_attn.k_proj.weight"] = bad
    path = tiny.save_raw(state, model.config.to_dict(), tmp_path / "nan-k")
    spectra = fingerprint_model(path, device="cpu", allow_nonfinite=True)["signals"]
    for name in ("qk_spectrum", "ov_spectrum"):  # the layer's attention is left out whole, as before
        values = spectra[name]["values"]
        assert values[1] is None and all(v is not None for i, v in enumerate(values) if i != 1)


def test_missing_shard(tmp_path):
    path = tiny.save(tiny.build_model("llama"), tmp_path / "sharded", max_shard_size="20KB")
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    fails(path, victim.name, "missing shard")


def test_unreadable_file(llama_dir):
    # Running as root, permissions cannot make a file unreadable: a directory in its place can't be read either.
    f = llama_dir / "model.safetensors"
    f.unlink()
    f.mkdir()
    fails(llama_dir, "model.safetensors", "cannot open")


def test_unknown_architecture_lists_unmapped_names(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["model_type"] = "martian"
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    fails(llama_dir, "unknown architecture 'martian'", "model.layers.0.self_attn.q_proj.weight")


def test_known_architecture_with_foreign_tensor(tmp_path):
    model = tiny.build_model("llama")
    state = {**model.state_dict(), "model.layers.0.self_attn.mystery.weight": torch.ones(3)}
    path = tiny.save_raw(state, model.config.to_dict(), tmp_path / "odd")
    fails(path, "model.layers.0.self_attn.mystery.weight", "not in the role table")


def test_pickled_code_in_bin_is_refused(tmp_path):
    path = tmp_path / "evil"
    path.mkdir()
    shutil.copy(tiny.save(tiny.build_model("llama"), tmp_path / "ok") / "config.json", path / "config.json")
    torch.save({"weights": torch.ones(2), "payload": print}, path / "pytorch_model.bin")
    fails(path, "pytorch_model.bin", "cannot read PyTorch checkpoint safely")


def test_cli_error_exits_nonzero_and_writes_nothing(llama_dir, tmp_path):
    f = llama_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    out = tmp_path / "fp.json"
    r = subprocess.run([sys.executable, "-m", "forensics.cli", "fingerprint", str(llama_dir), "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "model.safetensors" in r.stderr and "error" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".fp.json*"))


def test_cli_writes_fingerprint_json(llama_dir, tmp_path):
    out = tmp_path / "fp.json"
    r = subprocess.run([sys.executable, "-m", "forensics.cli", "fingerprint", str(llama_dir), "-o", str(out),
                        "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    fp = json.loads(out.read_text())
    assert fp["schema"] == "llm-forensics.fingerprint/1"
    assert fp == {**fingerprint_model(llama_dir, device="cpu"), "run": fp["run"]}
