"""The fingerprint engine on tiny real checkpoints of every architecture in the role table."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from forensics.fingerprint import fingerprint_model
from tests import tiny

LLAMA_LIKE = {
    "q": "model.layers.{i}.self_attn.q_proj.weight", "k": "model.layers.{i}.self_attn.k_proj.weight",
    "v": "model.layers.{i}.self_attn.v_proj.weight", "o": "model.layers.{i}.self_attn.o_proj.weight",
    "gate": "model.layers.{i}.mlp.gate_proj.weight", "up": "model.layers.{i}.mlp.up_proj.weight",
    "down": "model.layers.{i}.mlp.down_proj.weight", "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
}
ATTN = {k: LLAMA_LIKE[k] for k in "qkvo"}
BIASES = {r + "_bias": LLAMA_LIKE[r].replace("weight", "bias") for r in "qkv"}
QK_NORM = {"q_norm": "model.layers.{i}.self_attn.q_norm.weight", "k_norm": "model.layers.{i}.self_attn.k_norm.weight"}
SANDWICH = {"attn_norm": "model.layers.{i}.input_layernorm.weight",
            "post_attn_norm": "model.layers.{i}.post_attention_layernorm.weight",
            "mlp_norm": "model.layers.{i}.pre_feedforward_layernorm.weight",
            "post_mlp_norm": "model.layers.{i}.post_feedforward_layernorm.weight"}
MOE = {"router": "model.layers.{i}.mlp.gate.weight", "attn_norm": LLAMA_LIKE["attn_norm"],
       "mlp_norm": LLAMA_LIKE["mlp_norm"]}
BERT = {"q": "encoder.layer.{i}.attention.self.query.weight", "k": "encoder.layer.{i}.attention.self.key.weight",
        "v": "encoder.layer.{i}.attention.self.value.weight", "o": "encoder.layer.{i}.attention.output.dense.weight",
        "q_bias": "encoder.layer.{i}.attention.self.query.bias",
        "attn_norm": "encoder.layer.{i}.attention.output.LayerNorm.weight",
        "up": "encoder.layer.{i}.intermediate.dense.weight", "down": "encoder.layer.{i}.output.dense.weight",
        "mlp_norm": "encoder.layer.{i}.output.LayerNorm.weight"}
MPNET = {"q": "encoder.layer.{i}.attention.attn.q.weight", "k": "encoder.layer.{i}.attention.attn.k.weight",
         "v": "encoder.layer.{i}.attention.attn.v.weight", "o": "encoder.layer.{i}.attention.attn.o.weight",
         "o_bias": "encoder.layer.{i}.attention.attn.o.bias",
         "attn_norm": "encoder.layer.{i}.attention.LayerNorm.weight",
         "attn_norm_bias": "encoder.layer.{i}.attention.LayerNorm.bias",
         "up": "encoder.layer.{i}.intermediate.dense.weight", "down_bias": "encoder.layer.{i}.output.dense.bias",
         "mlp_norm": "encoder.layer.{i}.output.LayerNorm.weight"}
MLA = {"q_a": "model.layers.{i}.self_attn.q_a_proj.weight", "q_b": "model.layers.{i}.self_attn.q_b_proj.weight",
       "kv_a": "model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight",
       "kv_b": "model.layers.{i}.self_attn.kv_b_proj.weight", "o": "model.layers.{i}.self_attn.o_proj.weight"}

# For each architecture: signal -> the checkpoint tensor it must equal, in every layer.
EXPECTED = {
    "llama": LLAMA_LIKE, "mistral": LLAMA_LIKE, "gemma": LLAMA_LIKE,
    "qwen2": {**LLAMA_LIKE, **BIASES}, "qwen3": {**LLAMA_LIKE, **QK_NORM},
    "gemma2": {**ATTN, **SANDWICH}, "gemma3_text": {**ATTN, **SANDWICH, **QK_NORM},
    "qwen2_moe": {**ATTN, **BIASES, **MOE, "shared_up": "model.layers.{i}.mlp.shared_expert.up_proj.weight",
                  "shared_router": "model.layers.{i}.mlp.shared_expert_gate.weight"},
    "qwen3_moe": {**ATTN, **QK_NORM, **MOE},
    "mixtral": {**ATTN, "router": "model.layers.{i}.block_sparse_moe.gate.weight"},
    "bert": BERT, "roberta": BERT, "xlm-roberta": BERT, "mpnet": MPNET,
    "deepseek_v2": {**MLA, "attn_norm": LLAMA_LIKE["attn_norm"]},
    "deepseek_v3": {**MLA, "mlp_norm": LLAMA_LIKE["mlp_norm"]},
    "gpt2": {"o": "transformer.h.{i}.attn.c_proj.weight", "up": "transformer.h.{i}.mlp.c_fc.weight",
             "down": "transformer.h.{i}.mlp.c_proj.weight", "attn_norm": "transformer.h.{i}.ln_1.weight"},
    "gpt_neox": {"o": "gpt_neox.layers.{i}.attention.dense.weight",
                 "up": "gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight",
                 "mlp_norm": "gpt_neox.layers.{i}.post_attention_layernorm.weight"},
    "phi3": {"o": LLAMA_LIKE["o"], "down": LLAMA_LIKE["down"], "attn_norm": LLAMA_LIKE["attn_norm"]},
}
EXPERTS = {"qwen2_moe": "model.layers.{i}.mlp.experts.{e}.{p}_proj.weight",
           "qwen3_moe": "model.layers.{i}.mlp.experts.{e}.{p}_proj.weight",
           "mixtral": "model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"}


def oracle(t: torch.Tensor) -> float:
    return float(np.std(t.to(torch.float64).numpy()))


def checkpoint(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = tiny.save(tiny.build_model(arch), tmp_path_factory.mktemp(arch))
        return cache[arch]
    return get


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_every_role_every_layer_equals_numpy_oracle(arch, saved):
    path = saved(arch)
    fp = fingerprint_model(path, device="cpu")
    weights = checkpoint(path)
    n = fp["model"]["num_layers"]
    assert n == 3
    for signal, template in EXPECTED[arch].items():
        values = fp["signals"][signal]["values"]
        for i in range(n):
            name = template.format(i=i)
            if name not in weights:  # DeepSeek's first layer is dense: no MoE router there
                assert values[i] is None, (signal, i)
                continue
            assert values[i] == pytest.approx(oracle(weights[name]), rel=1e-9), (signal, i)


@pytest.mark.parametrize("arch", sorted(EXPERTS))
def test_moe_experts_kept_per_expert_with_their_mean(arch, saved):
    fp = fingerprint_model(saved(arch), device="cpu")
    weights = checkpoint(saved(arch))
    names = {"gate": ("gate", "w1"), "up": ("up", "w3"), "down": ("down", "w2")}
    for role, (p, w) in names.items():
        signal = fp["signals"]["expert_" + role]
        for i in range(3):
            want = [oracle(weights[EXPERTS[arch].format(i=i, e=e, p=p, w=w)]) for e in range(4)]
            assert signal["experts"][i] == pytest.approx(want, rel=1e-9)
            assert signal["values"][i] == pytest.approx(np.mean(want), rel=1e-9)


def test_shared_expert_kept_apart_from_routed_experts(saved):
    fp = fingerprint_model(saved("qwen2_moe"), device="cpu")
    weights = checkpoint(saved("qwen2_moe"))
    for role in ("gate", "up", "down"):
        want = [oracle(weights[f"model.layers.{i}.mlp.shared_expert.{role}_proj.weight"]) for i in range(3)]
        assert fp["signals"]["shared_" + role]["values"] == pytest.approx(want, rel=1e-9)
        assert fp["signals"]["shared_" + role]["values"] != fp["signals"]["expert_" + role]["values"]


def test_fused_qkv_of_gpt2_neox_and_phi3_split_into_roles(saved):
    w = checkpoint(saved("gpt2"))
    fp = fingerprint_model(saved("gpt2"), device="cpu")
    for i in range(3):
        q, k, v = np.split(w[f"transformer.h.{i}.attn.c_attn.weight"].double().numpy(), 3, axis=1)
        qb, _, vb = np.split(w[f"transformer.h.{i}.attn.c_attn.bias"].double().numpy(), 3)
        assert [fp["signals"][r]["values"][i] for r in ("q", "k", "v", "q_bias", "v_bias")] == pytest.approx(
            [np.std(q), np.std(k), np.std(v), np.std(qb), np.std(vb)], rel=1e-9)

    w = checkpoint(saved("gpt_neox"))
    fp = fingerprint_model(saved("gpt_neox"), device="cpu")
    for i in range(3):
        fused = w[f"gpt_neox.layers.{i}.attention.query_key_value.weight"].double().numpy()
        heads = fused.reshape(4, 3, 8, 32)  # (heads, q|k|v, head_dim, hidden): NeoX interleaves per head
        assert [fp["signals"][r]["values"][i] for r in "qkv"] == pytest.approx(
            [np.std(heads[:, j]) for j in range(3)], rel=1e-9)
        assert fp["signals"]["q"]["values"][i] != pytest.approx(np.std(fused[:32]), rel=1e-6)

    w = checkpoint(saved("phi3"))
    fp = fingerprint_model(saved("phi3"), device="cpu")
    for i in range(3):
        qkv = w[f"model.layers.{i}.self_attn.qkv_proj.weight"].double().numpy()
        q, k, v = qkv[:32], qkv[32:48], qkv[48:]  # 4 q heads, 2 kv heads of 8
        gate, up = np.split(w[f"model.layers.{i}.mlp.gate_up_proj.weight"].double().numpy(), 2)
        assert [fp["signals"][r]["values"][i] for r in ("q", "k", "v", "gate", "up")] == pytest.approx(
            [np.std(q), np.std(k), np.std(v), np.std(gate), np.std(up)], rel=1e-9)


def test_stacked_experts_of_transformers_5_equal_per_expert_files(saved, tmp_path):
    path = saved("qwen3_moe")
    weights = checkpoint(path)
    stacked = {}
    for name, t in weights.items():
        if ".mlp.experts." in name:
            continue
        stacked[name] = t
    for i in range(3):
        e = f"model.layers.{i}.mlp.experts."
        stacked[e + "gate_up_proj"] = torch.stack(
            [torch.cat([weights[f"{e}{x}.gate_proj.weight"], weights[f"{e}{x}.up_proj.weight"]]) for x in range(4)])
        stacked[e + "down_proj"] = torch.stack([weights[f"{e}{x}.down_proj.weight"] for x in range(4)])
    other = tiny.save_raw(stacked, json.loads((path / "config.json").read_text()), tmp_path / "stacked")
    a, b = fingerprint_model(path, device="cpu"), fingerprint_model(other, device="cpu")
    assert a["signals"] == b["signals"]


def test_pangu_pro_moe_names_from_its_modeling_file(tmp_path):
    path = tiny.pangu_pro_moe(tmp_path / "pangu")
    fp = fingerprint_model(path, device="cpu")
    w = checkpoint(path)
    assert fp["model"]["architecture"] == "PanguProMoE"
    for i in range(3):
        assert fp["signals"]["o_bias"]["values"][i] == pytest.approx(
            oracle(w[f"model.layers.{i}.self_attn.o_proj.bias"]), rel=1e-9)
        assert fp["signals"]["expert_down"]["experts"][i][2] == pytest.approx(
            oracle(w[f"model.layers.{i}.mlp.experts.2.down_proj.weight"]), rel=1e-9)
        assert fp["signals"]["router_bias"]["values"][i] is not None


def test_sharded_equals_unsharded_and_bin_equals_safetensors(tmp_path):
    model = tiny.build_model("llama")
    one = tiny.save(model, tmp_path / "one")
    sharded = tiny.save(model, tmp_path / "sharded", max_shard_size="20KB")
    legacy = tiny.save_bin(model, tmp_path / "bin")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    fps = [fingerprint_model(p, device="cpu") for p in (one, sharded, legacy)]
    assert fps[0]["signals"] == fps[1]["signals"] == fps[2]["signals"]
    assert fps[2]["model"]["format"] == "pytorch"
    # The shards share one hashing queue: every file's digest is still its own.
    listed = {f["path"]: f["sha256"] for f in fps[1]["model"]["files"]}
    assert listed == {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sharded.iterdir()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_low_precision_dtypes_read_exactly(tmp_path, dtype):
    model = tiny.build_model("llama")
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    path = tiny.save_raw(state, model.config.to_dict(), tmp_path / "m")
    fp = fingerprint_model(path, device="cpu")
    for i in range(3):
        want = oracle(state[f"model.layers.{i}.mlp.up_proj.weight"])
        assert fp["signals"]["up"]["values"][i] == pytest.approx(want, rel=1e-9)


def test_streamed_bf16_moments_equal_those_of_the_same_values_in_float32(tmp_path, monkeypatch):
    """FFN tensors stored as bf16 are decoded a chunk at a time inside their moments; the attention tensors whole.
    The same values stored as float32 (exactly representable) take neither path: every signal is bit-for-bit equal,
    over several chunks, and a NaN is counted the same way."""
    from forensics.signals import weights

    monkeypatch.setattr(weights, "CHUNK_ELEMENTS", 1000)
    model = tiny.build_model("llama")
    state = {k: v.bfloat16() for k, v in model.state_dict().items()}
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    bf16 = tiny.save_raw(state, model.config.to_dict(), tmp_path / "bf16")
    f32 = tiny.save_raw({k: v.float() for k, v in state.items()}, model.config.to_dict(), tmp_path / "f32")
    a, b = (fingerprint_model(p, device="cpu", allow_nonfinite=True) for p in (bf16, f32))
    assert a["signals"] == b["signals"] and "qk_spectrum" in a["signals"]
    assert [(e["tensor"], e["nan"]) for e in a["nonfinite"]] == [("model.layers.1.mlp.up_proj.weight", 1)]
    assert a["nonfinite"] == [{**e, "file": e["file"].replace("f32", "bf16")} for e in b["nonfinite"]]


def test_every_file_hashed_and_inputs_left_untouched(saved):
    path = saved("qwen2")
    before = {f.name: (f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest()) for f in path.iterdir()}
    fp = fingerprint_model(path, device="cpu")
    listed = {f["path"]: f for f in fp["model"]["files"]}
    assert set(listed) == set(before)
    for name, (mtime, digest) in before.items():
        assert listed[name]["sha256"] == digest
        assert listed[name]["size"] == (path / name).stat().st_size
        assert (path / name).stat().st_mtime_ns == mtime
    assert fp["run"]["bytes_read"] == sum(f["size"] for f in fp["model"]["files"])


def test_fingerprint_is_deterministic(saved):
    a = fingerprint_model(saved("llama"), device="cpu")
    b = fingerprint_model(saved("llama"), device="cpu")
    a.pop("run"), b.pop("run")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
