"""GGUF copies of a tiny Llama, written with the gguf package's own writer and quantisers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from forensics.fingerprint import fingerprint_model
from forensics.sources.gguf import unpermute
from tests import tiny
from tests.tiny import llama_cpp_permute

def write_gguf(model, path, qtype: Q = Q.F32) -> None:
    tiny.write_llama_gguf(model, path, None if qtype == Q.F32 else qtype)


def llama(hidden=32, inter=64):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_f32_gguf_equals_safetensors_and_qk_permutation_is_undone(tmp_path):
    model = tiny.build_model("llama")
    st = tiny.save(model, tmp_path / "st")
    write_gguf(model, tmp_path / "m.gguf")
    a = fingerprint_model(st, device="cpu")["signals"]
    b = fingerprint_model(tmp_path / "m.gguf", device="cpu")["signals"]
    for signal in ("q", "k", "v", "o", "gate", "up", "down", "attn_norm", "mlp_norm"):
        assert b[signal]["values"] == pytest.approx(a[signal]["values"], rel=1e-12), signal


def test_unpermute_inverts_llama_cpp_and_std_ignores_row_order():
    w = np.random.default_rng(0).standard_normal((32, 16))
    permuted = llama_cpp_permute(w, 4)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(unpermute(permuted, 4), w)
    # Why the std curve does not depend on it: a row permutation keeps the multiset of elements.
    assert float(permuted.std()) == pytest.approx(float(w.std()), rel=1e-14)


# gguf-py cannot write K-quants (its quantiser stops at the legacy types); they are read in the slow tests on the
# real Gemma3 file, which is mostly Q4_K / Q6_K.
@pytest.mark.parametrize("qtype,tolerance", [(Q.Q8_0, 0.01), (Q.Q4_0, 0.06), (Q.Q4_1, 0.06), (Q.Q5_0, 0.03)])
def test_quantised_gguf_within_quantisation_error(tmp_path, qtype, tolerance):
    model = llama(hidden=256, inter=512)
    st = tiny.save(model, tmp_path / "st")
    write_gguf(model, tmp_path / "q.gguf", qtype)
    a = fingerprint_model(st, device="cpu")["signals"]
    b = fingerprint_model(tmp_path / "q.gguf", device="cpu")["signals"]
    for signal in ("q", "k", "v", "o", "gate", "up", "down"):
        assert b[signal]["values"] == pytest.approx(a[signal]["values"], rel=tolerance), signal
        assert b[signal]["values"] != a[signal]["values"]  # it really is a lossy copy


def test_truncated_gguf_is_refused_with_its_name(tmp_path):
    from forensics.errors import ForensicsError
    write_gguf(tiny.build_model("llama"), tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ForensicsError) as e:
        fingerprint_model(tmp_path / "cut.gguf", device="cpu")
    assert "cut.gguf" in str(e.value)


def test_the_plain_reader_parses_what_gguf_parses_and_is_put_back(tmp_path):
    """transformers loads GGUF files through `plain_reader` (a faster view of the same mapping): every field and every
    tensor reads the same as with gguf's own reader, and gguf's reader is restored afterwards, also on an error."""
    import gguf

    from forensics.sources.gguf import _PlainReader, plain_reader

    path = tmp_path / "m.gguf"
    tiny.write_llama_gguf(tiny.build_model("llama"), path, Q.Q8_0,
                          vocab=lambda w: w.add_token_list([f"t{i}" for i in range(256)]))
    ours, theirs = _PlainReader(path), gguf.GGUFReader(path)
    assert list(ours.fields) == list(theirs.fields)
    for name, field in theirs.fields.items():
        assert ours.fields[name].contents() == field.contents(), name
    assert [(t.name, t.tensor_type, t.data.tobytes()) for t in ours.tensors] == \
        [(t.name, t.tensor_type, t.data.tobytes()) for t in theirs.tensors]
    original = gguf.GGUFReader
    with pytest.raises(RuntimeError), plain_reader():
        assert gguf.GGUFReader is _PlainReader
        raise RuntimeError
    assert gguf.GGUFReader is original
