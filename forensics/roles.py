"""The one table from each architecture's tensor names to canonical (layer, role, expert).

Adding an architecture means adding rows: a name pattern (with `{L}` for the layer number and `{E}` for the expert)
and the role it holds. A fused tensor (GPT-2's c_attn, NeoX's per-head interleaved query_key_value, Phi-3's qkv_proj,
transformers 5's stacked experts) names a split from `SPLITS`, which cuts it into its roles. Tensors outside the layers
(embeddings, final norm, LM head) are listed as ignored so that anything else is reported as unmapped, never silently
dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Callable

import numpy as np

from forensics.errors import ForensicsError
from forensics.sources.base import ModelInfo

# The one fingerprinted role kept out of the comparisons (docs/fingerprint-format.md repeats this).
ROUTER_BIAS_WHY = ("DeepSeek's e_score_correction_bias is moved by the load-balancing rule during training, not by "
                   "gradient descent, and Pangu's router_scale shares this row: the curve records how the experts "
                   "were balanced, which any continued training rewrites, not where the weights came from")


class Group(str, Enum):
    ATTENTION = "attention"
    BIAS = "bias"
    NORM = "norm"
    FFN = "ffn"
    MOE = "moe"
    MLA = "mla"


class Role(str, Enum):
    """Every canonical role a layer tensor can hold, in the reading order of the dossier's tables and figures.

    Each row says the role's group, whether its std curve enters the comparisons (`compared`; when not, `why_not`
    says why, and docs/fingerprint-format.md repeats it), whether output-preserving rescalings redraw it
    (`rescalable`: the roles the tamper flag checks) and, for FFN matrices, the unit and part neuron matching reads.
    """

    def __new__(cls, value: str, group: Group, spec: dict | None = None):
        spec = spec or {}
        obj = str.__new__(cls, value)
        obj._value_ = value
        obj.group = group
        obj.compared = spec.get("compared", True)
        obj.why_not = spec.get("why_not", "")
        obj.rescalable = spec.get("rescalable", False)
        obj.unit, obj.part = spec.get("unit"), spec.get("part")
        return obj

    Q = "q", Group.ATTENTION, {"rescalable": True}
    K = "k", Group.ATTENTION, {"rescalable": True}
    V = "v", Group.ATTENTION, {"rescalable": True}
    O = "o", Group.ATTENTION, {"rescalable": True}
    Q_BIAS = "q_bias", Group.BIAS
    K_BIAS = "k_bias", Group.BIAS
    V_BIAS = "v_bias", Group.BIAS
    O_BIAS = "o_bias", Group.BIAS
    Q_NORM = "q_norm", Group.NORM
    K_NORM = "k_norm", Group.NORM
    ATTN_NORM = "attn_norm", Group.NORM, {"rescalable": True}
    ATTN_NORM_BIAS = "attn_norm_bias", Group.NORM
    POST_ATTN_NORM = "post_attn_norm", Group.NORM
    MLP_NORM = "mlp_norm", Group.NORM, {"rescalable": True}
    MLP_NORM_BIAS = "mlp_norm_bias", Group.NORM
    POST_MLP_NORM = "post_mlp_norm", Group.NORM
    GATE = "gate", Group.FFN, {"rescalable": True, "unit": "dense", "part": "gate"}
    UP = "up", Group.FFN, {"rescalable": True, "unit": "dense", "part": "up"}
    DOWN = "down", Group.FFN, {"rescalable": True, "unit": "dense", "part": "down"}
    UP_BIAS = "up_bias", Group.BIAS
    DOWN_BIAS = "down_bias", Group.BIAS
    ROUTER = "router", Group.MOE
    ROUTER_BIAS = "router_bias", Group.MOE, {"compared": False, "why_not": ROUTER_BIAS_WHY}
    EXPERT_GATE = "expert_gate", Group.MOE, {"unit": "expert", "part": "gate"}
    EXPERT_UP = "expert_up", Group.MOE, {"unit": "expert", "part": "up"}
    EXPERT_DOWN = "expert_down", Group.MOE, {"unit": "expert", "part": "down"}
    SHARED_GATE = "shared_gate", Group.MOE, {"unit": "shared", "part": "gate"}
    SHARED_UP = "shared_up", Group.MOE, {"unit": "shared", "part": "up"}
    SHARED_DOWN = "shared_down", Group.MOE, {"unit": "shared", "part": "down"}
    SHARED_ROUTER = "shared_router", Group.MOE
    Q_A = "q_a", Group.MLA
    Q_B = "q_b", Group.MLA
    KV_A = "kv_a", Group.MLA
    KV_B = "kv_b", Group.MLA
    Q_A_NORM = "q_a_norm", Group.MLA
    KV_A_NORM = "kv_a_norm", Group.MLA


# Roles whose std curves enter the comparisons, and the experts' roles (fingerprinted per expert, then averaged).
COMPARED = tuple(r.value for r in Role if r.compared)
EXPERT_ROLES = frozenset(r.value for r in Role if r.unit == "expert")
# Attention matrices, then FFN matrices, then norms: the order the tamper flag has always listed them in.
RESCALABLE = tuple(r.value for g in (Group.ATTENTION, Group.FFN, Group.NORM) for r in Role
                   if r.rescalable and r.group == g)


@dataclass(frozen=True)
class Part:
    """One canonical piece of a checkpoint tensor."""

    layer: int
    role: str
    expert: int | None
    tensor: np.ndarray


# --- rows shared by many architectures (suffix after the layer prefix) -------------------------------------------

_ATTN = {
    "self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k",
    "self_attn.v_proj.weight": "v", "self_attn.o_proj.weight": "o",
    "self_attn.q_proj.bias": "q_bias", "self_attn.k_proj.bias": "k_bias",
    "self_attn.v_proj.bias": "v_bias", "self_attn.o_proj.bias": "o_bias",
}
_QK_NORM = {"self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm"}
_PRE_NORMS = {"input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "mlp_norm"}
_SANDWICH_NORMS = {
    "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "post_attn_norm",
    "pre_feedforward_layernorm.weight": "mlp_norm", "post_feedforward_layernorm.weight": "post_mlp_norm",
}
_MLP = {"mlp.gate_proj.weight": "gate", "mlp.up_proj.weight": "up", "mlp.down_proj.weight": "down"}
# Per-expert names as written by transformers < 5 and by most published checkpoints.
_EXPERTS = {
    "mlp.experts.{E}.gate_proj.weight": "expert_gate", "mlp.experts.{E}.up_proj.weight": "expert_up",
    "mlp.experts.{E}.down_proj.weight": "expert_down",
}
# transformers >= 5 keeps the experts of a layer stacked in two 3-D tensors.
_STACKED_EXPERTS = {"mlp.experts.gate_up_proj": "stacked_gate_up", "mlp.experts.down_proj": "stacked_down"}
_SHARED_EXPERT = {
    "mlp.shared_expert.gate_proj.weight": "shared_gate", "mlp.shared_expert.up_proj.weight": "shared_up",
    "mlp.shared_expert.down_proj.weight": "shared_down", "mlp.shared_expert_gate.weight": "shared_router",
}
_DEEPSEEK_SHARED = {
    "mlp.shared_experts.gate_proj.weight": "shared_gate", "mlp.shared_experts.up_proj.weight": "shared_up",
    "mlp.shared_experts.down_proj.weight": "shared_down",
}
_MLA = {
    "self_attn.q_a_proj.weight": "q_a", "self_attn.q_b_proj.weight": "q_b",
    "self_attn.q_a_layernorm.weight": "q_a_norm", "self_attn.q_proj.weight": "q",
    "self_attn.kv_a_proj_with_mqa.weight": "kv_a", "self_attn.kv_b_proj.weight": "kv_b",
    "self_attn.kv_a_layernorm.weight": "kv_a_norm", "self_attn.o_proj.weight": "o",
}
_ROUTER = {"mlp.gate.weight": "router"}

_BERT = {
    "attention.self.query.weight": "q", "attention.self.key.weight": "k", "attention.self.value.weight": "v",
    "attention.self.query.bias": "q_bias", "attention.self.key.bias": "k_bias", "attention.self.value.bias": "v_bias",
    "attention.output.dense.weight": "o", "attention.output.dense.bias": "o_bias",
    "attention.output.LayerNorm.weight": "attn_norm", "attention.output.LayerNorm.bias": "attn_norm_bias",
    "intermediate.dense.weight": "up", "intermediate.dense.bias": "up_bias",
    "output.dense.weight": "down", "output.dense.bias": "down_bias",
    "output.LayerNorm.weight": "mlp_norm", "output.LayerNorm.bias": "mlp_norm_bias",
}
# MPNet (sentence-transformers' all-mpnet-base-v2): BERT's post-norm block with its own attention names; the relative
# position bias is one tensor for the whole encoder.
_MPNET = {
    "attention.attn.q.weight": "q", "attention.attn.k.weight": "k", "attention.attn.v.weight": "v",
    "attention.attn.q.bias": "q_bias", "attention.attn.k.bias": "k_bias", "attention.attn.v.bias": "v_bias",
    "attention.attn.o.weight": "o", "attention.attn.o.bias": "o_bias",
    "attention.LayerNorm.weight": "attn_norm", "attention.LayerNorm.bias": "attn_norm_bias",
    "intermediate.dense.weight": "up", "intermediate.dense.bias": "up_bias",
    "output.dense.weight": "down", "output.dense.bias": "down_bias",
    "output.LayerNorm.weight": "mlp_norm", "output.LayerNorm.bias": "mlp_norm_bias",
}
_GPT2 = {
    "attn.c_attn.weight": "split_c_attn", "attn.c_attn.bias": "split_c_attn_bias",
    "attn.c_proj.weight": "o", "attn.c_proj.bias": "o_bias",
    "ln_1.weight": "attn_norm", "ln_1.bias": "attn_norm_bias", "ln_2.weight": "mlp_norm", "ln_2.bias": "mlp_norm_bias",
    "mlp.c_fc.weight": "up", "mlp.c_fc.bias": "up_bias", "mlp.c_proj.weight": "down", "mlp.c_proj.bias": "down_bias",
}
_NEOX = {
    "attention.query_key_value.weight": "split_neox_qkv", "attention.query_key_value.bias": "split_neox_qkv_bias",
    "attention.dense.weight": "o", "attention.dense.bias": "o_bias",
    "input_layernorm.weight": "attn_norm", "input_layernorm.bias": "attn_norm_bias",
    "post_attention_layernorm.weight": "mlp_norm", "post_attention_layernorm.bias": "mlp_norm_bias",
    "mlp.dense_h_to_4h.weight": "up", "mlp.dense_h_to_4h.bias": "up_bias",
    "mlp.dense_4h_to_h.weight": "down", "mlp.dense_4h_to_h.bias": "down_bias",
}
_PHI3 = {
    "self_attn.qkv_proj.weight": "split_qkv_rows", "self_attn.o_proj.weight": "o",
    "mlp.gate_up_proj.weight": "split_gate_up_rows", "mlp.down_proj.weight": "down", **_PRE_NORMS,
}
# llama.cpp's names (gguf-py tensor_mapping), used for every GGUF architecture.
_GGUF = {
    "attn_q.weight": "q", "attn_k.weight": "k", "attn_v.weight": "v", "attn_output.weight": "o",
    "attn_q.bias": "q_bias", "attn_k.bias": "k_bias", "attn_v.bias": "v_bias", "attn_output.bias": "o_bias",
    "attn_qkv.weight": "split_qkv_rows", "attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm",
    "attn_norm.weight": "attn_norm", "attn_norm.bias": "attn_norm_bias",
    "ffn_norm.weight": "mlp_norm", "ffn_norm.bias": "mlp_norm_bias",
    "post_attention_norm.weight": "post_attn_norm", "post_ffw_norm.weight": "post_mlp_norm",
    "attn_output_norm.weight": "attn_norm", "attn_output_norm.bias": "attn_norm_bias",
    "layer_output_norm.weight": "mlp_norm", "layer_output_norm.bias": "mlp_norm_bias",
    "ffn_gate.weight": "gate", "ffn_up.weight": "up", "ffn_down.weight": "down",
    "ffn_up.bias": "up_bias", "ffn_down.bias": "down_bias",
    "ffn_gate_inp.weight": "router", "ffn_gate_exps.weight": "stacked_gate", "ffn_up_exps.weight": "stacked_up",
    "ffn_down_exps.weight": "stacked_down", "ffn_gate_shexp.weight": "shared_gate",
    "ffn_up_shexp.weight": "shared_up", "ffn_down_shexp.weight": "shared_down",
    "ffn_gate_inp_shexp.weight": "shared_router",
}
_GGUF_IGNORE = (r"token_embd\.weight", r"token_types\.weight", r"position_embd\.weight", r"output_norm\.(weight|bias)",
                r"output\.weight", r"rope_freqs\.weight", r"token_embd_norm\.(weight|bias)", r"cls\..*")

_DECODER_IGNORE = (r"(model\.)?embed_tokens\.weight", r"(model\.)?norm\.weight", r"lm_head\.weight",
                   r".*rotary_emb\.inv_freq")

_HF = r"(?:model\.|model\.language_model\.|language_model\.model\.)?layers\.{L}\."


@dataclass(frozen=True)
class Architecture:
    name: str
    prefix: str  # regex before the suffix; holds {L}
    rows: dict[str, str]
    ignore: tuple[str, ...]


def _arch(name: str, prefix: str, ignore: tuple[str, ...], *row_groups: dict[str, str]) -> Architecture:
    rows: dict[str, str] = {}
    for group in row_groups:
        rows.update(group)
    return Architecture(name, prefix, rows, ignore)


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    _arch("llama", _HF, _DECODER_IGNORE, _ATTN, _PRE_NORMS, _MLP),
    _arch("qwen3", _HF, _DECODER_IGNORE, _ATTN, _QK_NORM, _PRE_NORMS, _MLP),
    _arch("gemma2", _HF, _DECODER_IGNORE, _ATTN, _SANDWICH_NORMS, _MLP),
    _arch("gemma3", _HF, _DECODER_IGNORE, _ATTN, _QK_NORM, _SANDWICH_NORMS, _MLP),
    _arch("phi3", _HF, _DECODER_IGNORE, _PHI3),
    _arch("mixtral", _HF, _DECODER_IGNORE, _ATTN, _PRE_NORMS, {
        "block_sparse_moe.gate.weight": "router",
        "block_sparse_moe.experts.{E}.w1.weight": "expert_gate",
        "block_sparse_moe.experts.{E}.w3.weight": "expert_up",
        "block_sparse_moe.experts.{E}.w2.weight": "expert_down",
    }, _ROUTER, _STACKED_EXPERTS),
    _arch("qwen2_moe", _HF, _DECODER_IGNORE, _ATTN, _PRE_NORMS, _MLP, _ROUTER, _EXPERTS, _STACKED_EXPERTS,
          _SHARED_EXPERT),
    _arch("qwen3_moe", _HF, _DECODER_IGNORE, _ATTN, _QK_NORM, _PRE_NORMS, _MLP, _ROUTER, _EXPERTS, _STACKED_EXPERTS),
    _arch("deepseek_v2", _HF, _DECODER_IGNORE, _MLA, _PRE_NORMS, _MLP, _ROUTER, _EXPERTS, _STACKED_EXPERTS,
          _DEEPSEEK_SHARED, {"mlp.gate.e_score_correction_bias": "router_bias"}),
    # Pangu Pro MoE (modeling_pangu_moe.py): Qwen2-MoE-like with biased o_proj and a per-expert router scale.
    _arch("pangu_pro_moe", _HF, _DECODER_IGNORE, _ATTN, _PRE_NORMS, _MLP, _ROUTER, _EXPERTS, _STACKED_EXPERTS,
          _SHARED_EXPERT, {"mlp.router_scale": "router_bias"}),
    _arch("gpt2", r"(?:transformer\.)?h\.{L}\.", (r"(transformer\.)?(wte|wpe)\.weight", r"(transformer\.)?ln_f\.(weight|bias)",
                                                   r"lm_head\.weight", r".*\.attn\.(masked_)?bias"), _GPT2),
    _arch("gpt_neox", r"(?:gpt_neox\.)?layers\.{L}\.",
          (r"(gpt_neox\.)?embed_in\.weight", r"(gpt_neox\.)?final_layer_norm\.(weight|bias)", r"embed_out\.weight",
           r".*rotary_emb\.inv_freq", r".*attention\.(masked_)?bias"), _NEOX),
    _arch("bert", r"(?:bert\.|roberta\.|model\.|0\.auto_model\.)?encoder\.layer\.{L}\.",
          (r"(bert\.|roberta\.|model\.|0\.auto_model\.)?embeddings\..*", r"(bert\.|roberta\.|model\.|0\.auto_model\.)?pooler\..*",
           r"(cls|lm_head)\..*"), _BERT),
    _arch("mpnet", r"(?:mpnet\.|0\.auto_model\.)?encoder\.layer\.{L}\.",
          (r"(mpnet\.|0\.auto_model\.)?embeddings\..*", r"(mpnet\.|0\.auto_model\.)?pooler\..*",
           r"(mpnet\.|0\.auto_model\.)?encoder\.relative_attention_bias\.weight", r"lm_head\..*"), _MPNET),
    _arch("gguf", r"blk\.{L}\.", _GGUF_IGNORE, _GGUF),
)}

# The token embedding of each table entry (neuron matching aligns residual streams through its rows).
EMBEDDINGS = {
    "gpt2": r"(transformer\.)?wte\.weight",
    "gpt_neox": r"(gpt_neox\.)?embed_in\.weight",
    "bert": r"(bert\.|roberta\.|model\.|0\.auto_model\.)?embeddings\.word_embeddings\.weight",
    "mpnet": r"(mpnet\.|0\.auto_model\.)?embeddings\.word_embeddings\.weight",
    "gguf": r"token_embd\.weight",
}
DECODER_EMBEDDING = r"(model\.|model\.language_model\.|language_model\.model\.)?embed_tokens\.weight"
# Which norm's gain scales the input of the FFN and of attention. Pre-norm blocks: their own attn_norm / mlp_norm.
# Post-norm blocks (BERT): the FFN reads the attention's output LayerNorm ("attn_norm"), attention reads the previous
# layer's output LayerNorm ("mlp_norm" of layer - 1).
POST_NORM = {"bert", "mpnet"}
# Tables whose FFN matrices are stored (in, out) (GPT-2's Conv1D) rather than torch's (out, in).
IN_OUT_LAYOUT = {"gpt2"}
# Architectures without grouped-query attention: a num_key_value_heads in their config does not apply.
MHA_TABLES = {"gpt2", "gpt_neox", "bert", "mpnet"}
# Tables with multi-head latent attention, whose q and o sizes follow from LoRA ranks, not from heads x head_dim.
MLA_TABLES = {"deepseek_v2"}
# Gemma's RMSNorm multiplies by (1 + weight) in Hugging Face checkpoints; llama.cpp's converter stores 1 + weight.
NORM_PLUS_ONE = {"gemma", "gemma2", "gemma3", "gemma3_text"}

# config.json's model_type (or GGUF's general.architecture) -> table entry.
ALIASES = {
    "mistral": "llama", "qwen2": "llama", "gemma": "llama", "gemma3_text": "gemma3",
    "deepseek_v3": "deepseek_v2", "PanguProMoE": "pangu_pro_moe", "pangu_moe": "pangu_pro_moe",
    "roberta": "bert", "xlm-roberta": "bert", "xlm_roberta": "bert",
}


def _split_rows(t: np.ndarray, sizes: list[int], roles: tuple[str, ...]) -> list[tuple[str, np.ndarray]]:
    if sum(sizes) != t.shape[0]:
        raise ValueError(f"fused tensor has {t.shape[0]} rows, config implies {sum(sizes)}")
    return list(zip(roles, np.split(t, np.cumsum(sizes)[:-1], axis=0)))


def _qkv_sizes(info: ModelInfo) -> list[int]:
    hd = info.head_dim or info.hidden_size // info.num_heads
    kv = info.num_kv_heads or info.num_heads
    return [info.num_heads * hd, kv * hd, kv * hd]


def _neox(t: np.ndarray, info: ModelInfo, roles: tuple[str, ...]) -> list[tuple[str, np.ndarray]]:
    # NeoX interleaves per head: rows are [head0: q k v][head1: q k v]...
    per_head = t.reshape(info.num_heads, 3, -1, *t.shape[1:])
    return [(r, per_head[:, i].reshape(-1, *t.shape[1:])) for i, r in enumerate(roles)]


def _stacked(t: np.ndarray, roles: tuple[str, ...]) -> list[tuple[str, int, np.ndarray]]:
    # (experts, rows, cols); gate_up stacks gate then up along the rows (transformers' chunk(2, dim=-1)).
    out = []
    for e in range(t.shape[0]):
        for role, piece in zip(roles, np.split(t[e], len(roles), axis=0)):
            out.append((role, e, piece))
    return out


SPLITS: dict[str, Callable[[np.ndarray, ModelInfo], list[tuple[str, np.ndarray]]]] = {
    "split_qkv_rows": lambda t, i: _split_rows(t, _qkv_sizes(i), ("q", "k", "v")),
    "split_gate_up_rows": lambda t, i: _split_rows(t, [t.shape[0] // 2] * 2, ("gate", "up")),
    # GPT-2's Conv1D stores (in, out): q, k, v are column blocks.
    "split_c_attn": lambda t, i: list(zip(("q", "k", "v"), np.split(t, 3, axis=-1))),
    "split_c_attn_bias": lambda t, i: list(zip(("q_bias", "k_bias", "v_bias"), np.split(t, 3, axis=-1))),
    "split_neox_qkv": lambda t, i: _neox(t, i, ("q", "k", "v")),
    "split_neox_qkv_bias": lambda t, i: _neox(t, i, ("q_bias", "k_bias", "v_bias")),
}
STACKED: dict[str, tuple[str, ...]] = {
    "stacked_gate_up": ("expert_gate", "expert_up"), "stacked_down": ("expert_down",),
    "stacked_gate": ("expert_gate",), "stacked_up": ("expert_up",),
}


@dataclass(frozen=True)
class Match:
    layer: int
    target: str  # a role, a SPLITS key or a STACKED key
    expert: int | None


class RoleTable:
    """Resolves tensor names of one architecture; built once per architecture."""

    def __init__(self, arch: Architecture):
        self.arch = arch
        prefix = arch.prefix.replace("{L}", r"(?P<layer>\d+)")
        self._rows = [
            (re.compile(prefix + re.escape(suffix).replace(r"\{E\}", r"(?P<expert>\d+)")), target)
            for suffix, target in arch.rows.items()
        ]
        self._ignore = [re.compile(p) for p in arch.ignore]

    def match(self, name: str) -> Match | None:
        for rx, target in self._rows:
            m = rx.fullmatch(name)
            if m:
                expert = m.groupdict().get("expert")
                return Match(int(m["layer"]), target, int(expert) if expert is not None else None)
        return None

    def ignored(self, name: str) -> bool:
        return any(rx.fullmatch(name) for rx in self._ignore)

    def parts(self, name: str, match: Match, tensor: np.ndarray, info: ModelInfo) -> list[Part]:
        try:
            if match.target in SPLITS:
                parts = [Part(match.layer, role, None, piece) for role, piece in SPLITS[match.target](tensor, info)]
            elif match.target in STACKED:
                parts = [Part(match.layer, role, e, piece) for role, e, piece in _stacked(tensor, STACKED[match.target])]
            else:
                parts = [Part(match.layer, match.target, match.expert, tensor)]
        except (ValueError, TypeError) as e:  # numpy's word for a shape that does not divide as the config says
            raise ForensicsError(None, f"cannot split fused tensor {name} {tuple(tensor.shape)}: {e}") from e
        for part in parts:
            check_shape(name, part, info, self.arch.name)
        return parts


def expected_shape(role: str, info: ModelInfo, table_key: str) -> tuple[int | None, ...] | None:
    """The shape the model's config gives a core role's tensor, None where it states no size; None for roles whose
    shape is not checked. Orientation as stored: (out, in), or (in, out) for IN_OUT_LAYOUT tables."""
    h, heads = info.hidden_size, info.num_heads
    hd = info.head_dim or (h // heads if h and heads and h % heads == 0 else None)
    kv = heads if table_key in MHA_TABLES else info.num_kv_heads or heads
    q_rows = heads * hd if heads and hd else None
    kv_rows = kv * hd if kv and hd else None
    # GGUF files of every llama.cpp architecture share one table, and some fuse what it names ffn_up (Phi-3 stores
    # gate and up in it), so the FFN width is checked only where config.json or the E5S1 header gives it.
    inter = None if table_key == "gguf" else info.intermediate_size
    shapes = {"attn_norm": (h,), "attn_norm_bias": (h,), "mlp_norm": (h,), "mlp_norm_bias": (h,),
              "post_attn_norm": (h,), "post_mlp_norm": (h,),
              "gate": (inter, h), "up": (inter, h), "down": (h, inter), "up_bias": (inter,), "down_bias": (h,)}
    if table_key not in MLA_TABLES:
        shapes.update({"q": (q_rows, h), "k": (kv_rows, h), "v": (kv_rows, h), "o": (h, q_rows),
                       "q_bias": (q_rows,), "k_bias": (kv_rows,), "v_bias": (kv_rows,), "o_bias": (h,),
                       "q_norm": (hd,), "k_norm": (hd,)})
    shape = shapes.get(role)
    if shape is not None and len(shape) == 2 and table_key in IN_OUT_LAYOUT:
        shape = shape[::-1]
    return shape


def check_shape(name: str, part: Part, info: ModelInfo, table_key: str) -> None:
    """Refuse a core tensor whose shape contradicts the config (a 0-dim bias, a matrix of the wrong width): its
    statistics would describe something other than the layer the dossier says they do."""
    want = expected_shape(part.role, info, table_key)
    if want is None:
        return
    got = tuple(part.tensor.shape)
    if len(got) != len(want) or 0 in got or any(w is not None and g != w for g, w in zip(got, want)):
        shown = "(" + ", ".join("?" if w is None else str(w) for w in want) + ("," if len(want) == 1 else "") + ")"
        raise ForensicsError(None, f"tensor {name} ({part.role}, layer {part.layer}) has shape {got}; the model's "
                                   f"config implies {shown}")


def architecture_key(model_type: str) -> str:
    return ALIASES.get(model_type, model_type)


@lru_cache(maxsize=None)
def table_for(architecture: str) -> RoleTable | None:
    arch = ARCHITECTURES.get(architecture_key(architecture))
    return RoleTable(arch) if arch else None


def resolve(path, info: ModelInfo, names: list[str]) -> tuple[RoleTable, dict[str, Match]]:
    """Map every tensor name, or fail listing the names nobody knows."""
    architecture = info.architecture
    table = table_for(info.table or architecture)
    if table is None:
        raise ForensicsError(path, f"unknown architecture {architecture!r}; known: "
                                   f"{', '.join(sorted(set(ARCHITECTURES) | set(ALIASES)))}. "
                                   f"Unmapped tensor names: {_sample(names)}")
    matches, unmapped = {}, []
    for name in names:
        m = table.match(name)
        if m is not None:
            matches[name] = m
        elif not table.ignored(name):
            unmapped.append(name)
    if unmapped:
        raise ForensicsError(path, f"architecture {architecture!r}: {len(unmapped)} tensor name(s) not in the role "
                                   f"table (forensics/roles.py): {_sample(unmapped)}")
    if not matches:
        raise ForensicsError(path, f"architecture {architecture!r}: no layer tensors found")
    return table, matches


def _sample(names: list[str], n: int = 12) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" … (+{len(names) - n} more)" if len(names) > n else "")
