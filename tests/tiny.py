"""Tiny real checkpoints, written with the real libraries (transformers, safetensors, torch, gguf)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
           shared_expert_intermediate_size=32)
MLA = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
           first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
           v_head_dim=8, n_group=1, topk_group=1)
ENCODER = {k: v for k, v in SMALL.items() if k != "num_key_value_heads"}

# config class, extra settings, whether it is an encoder
ARCHITECTURES = {
    "llama": ("LlamaConfig", {}, False),
    "mistral": ("MistralConfig", {}, False),
    "qwen2": ("Qwen2Config", {}, False),
    "qwen2_moe": ("Qwen2MoeConfig", MOE, False),
    "qwen3": ("Qwen3Config", {}, False),
    "qwen3_moe": ("Qwen3MoeConfig", MOE, False),
    "mixtral": ("MixtralConfig", MOE, False),
    "gemma": ("GemmaConfig", {}, False),
    "gemma2": ("Gemma2Config", {}, False),
    "gemma3_text": ("Gemma3TextConfig", {}, False),
    "phi3": ("Phi3Config", {}, False),
    "gpt2": ("GPT2Config", None, False),
    "gpt_neox": ("GPTNeoXConfig", {}, False),
    "bert": ("BertConfig", ENCODER, True),
    "roberta": ("RobertaConfig", ENCODER, True),
    "xlm-roberta": ("XLMRobertaConfig", ENCODER, True),
    "mpnet": ("MPNetConfig", ENCODER, True),
    "deepseek_v2": ("DeepseekV2Config", MLA, False),
    "deepseek_v3": ("DeepseekV3Config", MLA, False),
}


def build_model(arch: str, seed: int = 0) -> transformers.PreTrainedModel:
    cls_name, extra, encoder = ARCHITECTURES[arch]
    if extra is None:  # GPT-2 names its sizes differently
        kw = dict(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
    else:
        kw = {**(ENCODER if encoder else SMALL), **extra}
    config = getattr(transformers, cls_name)(**kw)
    torch.manual_seed(seed)
    model = (transformers.AutoModel if encoder else transformers.AutoModelForCausalLM).from_config(config)
    # Norm weights start at exactly 1 (std 0); give them spread so the oracle comparison means something.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def save(model: transformers.PreTrainedModel, path: Path, **kw) -> Path:
    model.save_pretrained(path, **kw)
    return path


def save_bin(model: transformers.PreTrainedModel, path: Path) -> Path:
    """The legacy PyTorch format: config.json + pytorch_model.bin (a zip written by torch.save)."""
    path.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(path / "config.json")
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, path / "pytorch_model.bin")
    return path


def save_raw(tensors: dict[str, torch.Tensor], config: dict, path: Path) -> Path:
    """A directory written with safetensors directly, for names no transformers class produces."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors")
    return path


def pangu_pro_moe(path: Path, layers: int = 3, experts: int = 4, seed: int = 0) -> Path:
    """Pangu Pro MoE tensor names as in its published modeling file (not shipped by transformers)."""
    g = torch.Generator().manual_seed(seed)
    h, inter, heads, kv = 32, 16, 4, 2
    hd = h // heads

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    t = {"model.embed_tokens.weight": r(64, h), "model.norm.weight": 1 + r(h), "lm_head.weight": r(64, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({
            p + "self_attn.q_proj.weight": r(heads * hd, h), p + "self_attn.q_proj.bias": r(heads * hd),
            p + "self_attn.k_proj.weight": r(kv * hd, h), p + "self_attn.k_proj.bias": r(kv * hd),
            p + "self_attn.v_proj.weight": r(kv * hd, h), p + "self_attn.v_proj.bias": r(kv * hd),
            p + "self_attn.o_proj.weight": r(h, heads * hd), p + "self_attn.o_proj.bias": r(h),
            p + "input_layernorm.weight": 1 + r(h), p + "post_attention_layernorm.weight": 1 + r(h),
            p + "mlp.gate.weight": r(experts, h), p + "mlp.router_scale": 1 + r(1, experts),
            p + "mlp.shared_expert.gate_proj.weight": r(inter, h), p + "mlp.shared_expert.up_proj.weight": r(inter, h),
            p + "mlp.shared_expert.down_proj.weight": r(h, inter),
        })
        for e in range(experts):
            q = f"{p}mlp.experts.{e}."
            t.update({q + "gate_proj.weight": r(inter, h), q + "up_proj.weight": r(inter, h),
                      q + "down_proj.weight": r(h, inter)})
    config = {"model_type": "PanguProMoE", "architectures": ["PanguProMoEForCausalLM"], "hidden_size": h,
              "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
              "num_experts": experts, "moe_intermediate_size": inter}
    return save_raw(t, config, path)

# signal -> parameter of encoder.layer.{i} in a BERT checkpoint
BERT_ROLES = {
    "q": "attention.self.query.weight", "k": "attention.self.key.weight", "v": "attention.self.value.weight",
    "o": "attention.output.dense.weight", "up": "intermediate.dense.weight", "down": "output.dense.weight",
    "q_bias": "attention.self.query.bias", "k_bias": "attention.self.key.bias", "v_bias": "attention.self.value.bias",
    "o_bias": "attention.output.dense.bias", "up_bias": "intermediate.dense.bias", "down_bias": "output.dense.bias",
    "attn_norm": "attention.output.LayerNorm.weight", "attn_norm_bias": "attention.output.LayerNorm.bias",
    "mlp_norm": "output.LayerNorm.weight", "mlp_norm_bias": "output.LayerNorm.bias",
}


MODELS = Path(__file__).resolve().parents[1] / "models"


def real_model(rel: str) -> Path:
    """A published model fetched by `make models`; the test is skipped, saying so, when it is absent."""
    import pytest

    path = MODELS / rel
    if not path.exists():
        pytest.skip(f"{path} not present (run make models)")
    return path


GGUF_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def llama_cpp_permute(w, n_head: int):
    """What convert_hf_to_gguf.py does to Llama's Q and K rows (interleaved RoPE pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path: Path, qtype=None, vocab=None) -> None:
    """`model` as llama.cpp's converter writes it: llama.cpp names, Q/K rows permuted, matrices quantised to
    `qtype` with gguf-py's own quantiser (None: float32); `vocab(writer)` adds tokenizer metadata."""
    import numpy as np
    from gguf import GGUFWriter
    from gguf.quants import quantize

    cfg = model.config
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if vocab is not None:
        vocab(w)
    outside = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.float().numpy()
        if name in outside:
            gname = outside[name]
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{layer}.{GGUF_NAMES[rest]}"
            if rest.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                a = llama_cpp_permute(a, cfg.num_attention_heads if "q_proj" in rest else cfg.num_key_value_heads)
        if qtype is not None and a.ndim == 2:
            w.add_tensor(gname, quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
