"""GGUF copies of a tiny Llama, written with the gguf package's own writer and quantisers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import quantize

from forensics.fingerprint import fingerprint_model
from forensics.sources.gguf import unpermute
from tests import tiny

GGUF_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What convert_hf_to_gguf.py does to Llama's Q and K rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path, qtype: Q = Q.F32, hidden: int = 32) -> None:
    cfg = model.config
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_context_length(64)
    w.add_feed_forward_length(cfg.intermediate_size)
    for name, t in model.state_dict().items():
        a = t.float().numpy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{layer}.{GGUF_NAMES[rest]}"
            if rest.startswith("self_attn.q_proj"):
                a = llama_cpp_permute(a, cfg.num_attention_heads)
            elif rest.startswith("self_attn.k_proj"):
                a = llama_cpp_permute(a, cfg.num_key_value_heads)
        if a.ndim == 2 and qtype != Q.F32:
            w.add_tensor(gname, quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


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
    w = torch.randn(32, 16, dtype=torch.float64)
    permuted = torch.from_numpy(llama_cpp_permute(w.numpy(), 4))
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute(permuted, 4), w)
    # Why the std curve does not depend on it: a row permutation keeps the multiset of elements.
    assert float(permuted.std(unbiased=False)) == pytest.approx(float(w.std(unbiased=False)), rel=1e-14)


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
