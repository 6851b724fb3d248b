"""Transforms that make a derived model from a source model, as a suspected copier would.

Each transform is a pure function: it takes a decoder (a transformers causal LM of a supported family) and returns a
new model plus a dict of details worth recording (e.g. the training losses); the input model is never modified. All
randomness comes from a `torch.Generator` seeded with the transform's `seed`, so a (model, parameters, seed) triple
always gives the same weights. Transforms compose: the output of one is a valid input to the next.

Output-preserving ("evasion") transforms use exact symmetries of the Llama block, so the derived model computes the
same function while its weights, row order and per-layer statistics differ:

* attention heads: permuting kv heads, and the query heads within each kv group, consistently across q/k/v/o;
* FFN neurons: permuting gate/up rows with the matching down columns;
* q·c with k/c per kv head (or per RoPE frequency pair), since RoPE rotates each pair and commutes with its scale;
* v·c with o/c per value channel, since attention mixes value vectors linearly;
* up·d with down/d per neuron, since SwiGLU's output is linear in the up projection;
* an RMSNorm gain ·c with the next projections' input columns /c, since the norm's output is linear in its gain;
* a rotation Q of the residual stream, once the norm gains are folded into the projections that read them, since an
  RMSNorm with unit gain commutes with any orthogonal map.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers.initialization import no_init_weights

from forensics.errors import ForensicsError

# Families whose blocks are exactly: RMSNorm (output = gain · normalised x) → q/k/v/o attention with rotate-half
# RoPE → RMSNorm → SwiGLU gate/up/down. Gemma's (1 + gain) norm and Qwen3's q/k norms break the rescaling identities.
DECODERS = ("llama", "mistral", "qwen2")
MOE_ARCHS = ("mixtral", "qwen2_moe")

Progress = Callable[[int, int], None]


def _where(model: nn.Module) -> str | None:
    return getattr(model, "name_or_path", None) or None


def _check_decoder(model: nn.Module) -> None:
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in DECODERS:
        raise ForensicsError(_where(model), f"the lab transforms {', '.join(DECODERS)} decoders; this model is "
                                            f"{kind or type(model).__name__}")


def _layers(model: nn.Module) -> nn.ModuleList:
    _check_decoder(model)
    return model.model.layers


def _heads(config) -> tuple[int, int, int]:
    """(query heads, kv heads, head dim)."""
    n_q, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    return n_q, n_kv, getattr(config, "head_dim", None) or config.hidden_size // n_q


def _clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()


def _rows(units: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of the rows of `units` when each unit is `width` consecutive rows."""
    return (units[:, None] * width + torch.arange(width)).reshape(-1)


@torch.no_grad()
def _take_rows(linear: nn.Linear, index: torch.Tensor) -> None:
    linear.weight.copy_(linear.weight[index])
    if linear.bias is not None:
        linear.bias.copy_(linear.bias[index])


@torch.no_grad()
def _take_cols(linear: nn.Linear, index: torch.Tensor) -> None:
    linear.weight.copy_(linear.weight[:, index])


@torch.no_grad()
def _scale_rows(linear: nn.Linear, scale: torch.Tensor) -> None:
    linear.weight.mul_(scale[:, None])
    if linear.bias is not None:
        linear.bias.mul_(scale)


@torch.no_grad()
def _scale_cols(linear: nn.Linear, scale: torch.Tensor) -> None:
    linear.weight.mul_(scale[None, :])


def _build(model: nn.Module, config, state: dict[str, torch.Tensor], cls: type | None = None) -> nn.Module:
    """A new model of `cls` (default: the source's class) for `config`, holding exactly `state` (not initialised
    first: every weight is loaded, and random initialisation was half of an upcycling's time)."""
    with no_init_weights():
        out = (cls or type(model))(config)
    out.tie_weights()  # part of the initialisation skipped
    out.load_state_dict(state, strict=True)
    out.name_or_path = model.name_or_path
    return out.eval()


def _orthogonal(g: torch.Generator, n: int) -> torch.Tensor:
    """A Haar-random n × n orthogonal matrix in float64: QR of a Gaussian, with the columns' signs set by R's diagonal
    (without that, the QR routine's sign convention would bias the draw)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def _top(score: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """Indices of the `k` largest scores, ties broken at random, in ascending order (so kept units keep their order)."""
    shuffle = torch.randperm(score.numel(), generator=g)
    order = shuffle[torch.argsort(score[shuffle], descending=True, stable=True)]
    return order[:k].sort().values


def _factors(g: torch.Generator, units: int, layer_spread: float, unit_spread: float) -> torch.Tensor:
    """Positive scale factors: one per-layer factor times per-unit jitter (log-normal, geometric mean 1).

    The layer factor's log has magnitude in [spread/2, spread] and a random sign, never near 0, and the jitter's
    geometric mean is 1, so the layer factor sets each layer's overall scale: every layer's weight std moves, and
    moving the per-layer std profile is what the attack is for.
    """
    magnitude = layer_spread * (0.5 + 0.5 * torch.rand((), generator=g, dtype=torch.float64))
    sign = 1.0 if torch.rand((), generator=g) < 0.5 else -1.0
    jitter = unit_spread * torch.randn(units, generator=g, dtype=torch.float64)
    return torch.exp(sign * magnitude + jitter - jitter.mean()).float()


def _check_spreads(model: nn.Module, layer_spread: float, unit_spread: float) -> None:
    if not (0 <= layer_spread <= 5 and 0 <= unit_spread <= 5):
        raise ForensicsError(_where(model), f"scale spreads are natural-log widths in [0, 5]; got layer "
                                            f"{layer_spread}, unit {unit_spread}")


# ---- output-preserving transforms ----------------------------------------------------------------------------------

def permute_heads(model: nn.Module, *, seed: int) -> tuple[nn.Module, dict]:
    """Permute kv heads, and the query heads inside each kv group, in every layer (GQA-consistent)."""
    out = _clone(model)
    n_q, n_kv, d = _heads(out.config)
    group = n_q // n_kv
    g = torch.Generator().manual_seed(seed)
    for layer in _layers(out):
        attn = layer.self_attn
        kv_order = torch.randperm(n_kv, generator=g)
        # New kv head j is old kv head kv_order[j]; its query heads come from the old group, in a new order.
        q_order = torch.cat([kv_order[j] * group + torch.randperm(group, generator=g) for j in range(n_kv)])
        _take_rows(attn.q_proj, _rows(q_order, d))
        _take_rows(attn.k_proj, _rows(kv_order, d))
        _take_rows(attn.v_proj, _rows(kv_order, d))
        _take_cols(attn.o_proj, _rows(q_order, d))
    return out, {}


def permute_neurons(model: nn.Module, *, seed: int) -> tuple[nn.Module, dict]:
    """Permute the FFN's hidden neurons in every layer: gate and up rows, down columns."""
    out = _clone(model)
    g = torch.Generator().manual_seed(seed)
    for layer in _layers(out):
        mlp = layer.mlp
        order = torch.randperm(mlp.gate_proj.out_features, generator=g)
        _take_rows(mlp.gate_proj, order)
        _take_rows(mlp.up_proj, order)
        _take_cols(mlp.down_proj, order)
    return out, {}


def rescale_qk(model: nn.Module, *, seed: int, layer_spread: float = 0.5, unit_spread: float = 0.25,
               granularity: str = "head") -> tuple[nn.Module, dict]:
    """q rows ·c and k rows /c, c per kv head ("head") or per kv head and RoPE frequency pair ("pair").

    A kv head is shared by its whole query group, so every query head of a group takes the group's factor. RoPE
    rotates dimension i with i + head_dim/2 (transformers' rotate_half), so one factor per such pair commutes with it.
    """
    _check_spreads(model, layer_spread, unit_spread)
    if granularity not in ("head", "pair"):
        raise ForensicsError(_where(model), f"granularity is 'head' or 'pair', not {granularity!r}")
    out = _clone(model)
    n_q, n_kv, d = _heads(out.config)
    if granularity == "pair" and getattr(out.config, "partial_rotary_factor", 1.0) != 1.0:
        raise ForensicsError(_where(model), "per-pair q/k scaling needs RoPE on the whole head "
                                            "(partial_rotary_factor is not 1); use granularity 'head'")
    g = torch.Generator().manual_seed(seed)
    for layer in _layers(out):
        if granularity == "head":
            per_kv = _factors(g, n_kv, layer_spread, unit_spread)[:, None].expand(n_kv, d)
        else:
            half = _factors(g, n_kv * (d // 2), layer_spread, unit_spread).reshape(n_kv, d // 2)
            per_kv = torch.cat([half, half], dim=1)
        attn = layer.self_attn
        _scale_rows(attn.q_proj, per_kv.repeat_interleave(n_q // n_kv, dim=0).reshape(-1))
        _scale_rows(attn.k_proj, 1 / per_kv.reshape(-1))
    return out, {}


def rescale_vo(model: nn.Module, *, seed: int, layer_spread: float = 0.5,
               unit_spread: float = 0.25) -> tuple[nn.Module, dict]:
    """v rows ·c and the matching o columns /c, c per value channel of each kv head."""
    _check_spreads(model, layer_spread, unit_spread)
    out = _clone(model)
    n_q, n_kv, d = _heads(out.config)
    g = torch.Generator().manual_seed(seed)
    for layer in _layers(out):
        per_kv = _factors(g, n_kv * d, layer_spread, unit_spread).reshape(n_kv, d)
        attn = layer.self_attn
        _scale_rows(attn.v_proj, per_kv.reshape(-1))
        _scale_cols(attn.o_proj, 1 / per_kv.repeat_interleave(n_q // n_kv, dim=0).reshape(-1))
    return out, {}


def rescale_updown(model: nn.Module, *, seed: int, layer_spread: float = 0.5,
                   unit_spread: float = 0.25) -> tuple[nn.Module, dict]:
    """up rows ·d and down columns /d, d per FFN neuron."""
    _check_spreads(model, layer_spread, unit_spread)
    out = _clone(model)
    g = torch.Generator().manual_seed(seed)
    for layer in _layers(out):
        mlp = layer.mlp
        d = _factors(g, mlp.up_proj.out_features, layer_spread, unit_spread)
        _scale_rows(mlp.up_proj, d)
        _scale_cols(mlp.down_proj, 1 / d)
    return out, {}


def rescale_norm(model: nn.Module, *, seed: int, layer_spread: float = 0.5,
                 unit_spread: float = 0.25) -> tuple[nn.Module, dict]:
    """Each RMSNorm gain ·c per channel, and the input columns of the projections it feeds /c.

    input_layernorm feeds q, k, v; post_attention_layernorm feeds gate, up; the final norm feeds lm_head, but when
    lm_head is tied to the input embeddings its columns cannot change without changing the embeddings, so the final
    norm is then left as it is.
    """
    _check_spreads(model, layer_spread, unit_spread)
    out = _clone(model)
    hidden = out.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _layers(out):
            attn, mlp = layer.self_attn, layer.mlp
            for norm, fed in ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                              (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
                c = _factors(g, hidden, layer_spread, unit_spread)
                norm.weight.mul_(c)
                for linear in fed:
                    _scale_cols(linear, 1 / c)
        head = out.get_output_embeddings()
        if head.weight is out.get_input_embeddings().weight:
            return out, {"final_norm": "unchanged: lm_head is tied to the input embeddings"}
        c = _factors(g, hidden, layer_spread, unit_spread)
        out.model.norm.weight.mul_(c)
        _scale_cols(head, 1 / c)
    return out, {"final_norm": "rescaled, with lm_head's columns"}


# Per layer: the projections that read the residual stream through each norm, and those that write into it.
READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def rotate_residual(model: nn.Module, *, seed: int) -> tuple[nn.Module, dict]:
    """Rotate the residual stream by a random orthogonal Q (SliceGPT, QuaRot): the stream h becomes Qᵀh.

    First every RMSNorm gain is folded into the projections that read the norm's output (W → W·diag(gain), gain → 1),
    since only a unit-gain RMSNorm commutes with Q (rms(Qᵀh) = rms(h)). Then readers (q, k, v, gate, up, lm_head)
    W → W·Q, writers (o, down) W → Qᵀ·W with their biases b → Qᵀ·b, and the token embedding E → E·Q. lm_head is
    untied from the embedding, which it can no longer equal. Computed in float64, so the outputs change only by the
    final rounding.
    """
    layers = _layers(model)
    g = torch.Generator().manual_seed(seed)
    q = _orthogonal(g, model.config.hidden_size)
    state = dict(model.state_dict())

    def fold_and_rotate(norm: str, readers: Sequence[str]) -> None:
        gain = state[norm].double()
        for name in readers:
            w = state[name]
            state[name] = ((w.double() * gain[None, :]) @ q).to(w.dtype)
        state[norm] = torch.ones_like(state[norm])

    for i in range(len(layers)):
        p = f"model.layers.{i}."
        for norm, readers in READERS.items():
            fold_and_rotate(p + norm + ".weight", [p + r + ".weight" for r in readers])
        for name in WRITERS:
            for part in (".weight", ".bias"):
                if p + name + part in state:
                    t = state[p + name + part]
                    state[p + name + part] = (q.T @ t.double()).to(t.dtype)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    fold_and_rotate("model.norm.weight", ["lm_head.weight"])  # the state names lm_head even when it is tied
    embed = state["model.embed_tokens.weight"]
    state["model.embed_tokens.weight"] = (embed.double() @ q).to(embed.dtype)
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = False
    return _build(model, config, state), {"lm_head": "untied from the input embeddings" if tied else "was untied"}


# ---- non-preserving transforms -------------------------------------------------------------------------------------

def add_noise(model: nn.Module, *, seed: int, scale: float = 0.01, absolute: bool = False) -> tuple[nn.Module, dict]:
    """Every parameter += scale · (its own std) · N(0, 1).

    With `absolute`, every layer matrix instead gets one common sigma = scale · (median std of the layer matrices):
    std' = sqrt(std² + sigma²) is then not a constant rescaling, so the std curve's shape really changes (relative
    noise scales every std by about one factor, which no curve statistic can see; the calibration uses this)."""
    if not 0 <= scale <= 10:
        raise ForensicsError(_where(model), f"noise scale is relative to each tensor's std, in [0, 10]; got {scale}")
    out = _clone(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if absolute:
            mats = [p for name, p in out.named_parameters() if ".layers." in name and p.ndim >= 2]
            sigma = scale * float(np.median([float(p.std()) for p in mats]))
            for p in mats:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * sigma)
            return out, {"sigma": sigma, "matrices": len(mats)}
        for _, p in out.named_parameters():  # a tied parameter is listed once, so it gets one draw
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (scale * p.std()))
    return out, {}


def quantise_dequantise(w: torch.Tensor, *, bits: int, granularity: str, block_size: int) -> torch.Tensor:
    """Symmetric round-to-nearest onto {-q..q}·scale, q = 2^(bits-1) - 1, one scale per tensor, per row or per block
    of a row (a row runs along the last axis, so stacked experts are matrices side by side)."""
    levels = 2 ** (bits - 1) - 1
    width = {"tensor": w.numel(), "row": w.shape[-1]}.get(granularity, block_size)
    rows = w.reshape(-1, width)
    scale = rows.abs().amax(dim=-1, keepdim=True) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row or block stays zero
    return (torch.round(rows / scale).clamp(-levels, levels) * scale).reshape(w.shape)


def requantise(model: nn.Module, *, bits: int = 4, granularity: str = "block",
               block_size: int = 32) -> tuple[nn.Module, dict]:
    """Round-trip every weight matrix (embeddings and stacked experts included) through int8/int4; norms and biases
    stay float, as in llama.cpp. Works on any model, so it composes with the other transforms (e.g. after upcycle)."""
    where = _where(model)
    if bits not in (4, 8):
        raise ForensicsError(where, f"bits is 4 or 8, not {bits}")
    if granularity not in ("tensor", "row", "block"):
        raise ForensicsError(where, f"granularity is 'tensor', 'row' or 'block', not {granularity!r}")
    if block_size < 1:
        raise ForensicsError(where, f"block size must be positive, got {block_size}")
    out = _clone(model)
    worst = 0.0
    count = 0
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.ndim < 2:
                continue
            if granularity == "block" and p.shape[-1] % block_size:
                raise ForensicsError(where, f"{name} has {p.shape[-1]} columns, not a multiple of the block size "
                                            f"{block_size}")
            q = quantise_dequantise(p, bits=bits, granularity=granularity, block_size=block_size)
            worst = max(worst, float((q - p).abs().max()))
            p.copy_(q)
            count += 1
    return out, {"matrices": count, "max_abs_error": worst}


def prune_layers(model: nn.Module, *, drop: Sequence[int]) -> tuple[nn.Module, dict]:
    """Remove the given layers; the rest keep their weights and order, renumbered from 0."""
    layers = _layers(model)
    n = len(layers)
    drop = sorted(set(int(i) for i in drop))
    bad = [i for i in drop if not 0 <= i < n]
    if bad:
        raise ForensicsError(_where(model), f"no layer {', '.join(map(str, bad))}: the model has layers 0..{n - 1}")
    keep = [i for i in range(n) if i not in drop]
    if not drop or not keep:
        raise ForensicsError(_where(model), f"drop at least one and at most {n - 1} of the {n} layers")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    renumber = {f"model.layers.{old}.": f"model.layers.{new}." for new, old in enumerate(keep)}
    state = {}
    for name, t in model.state_dict().items():
        if name.startswith("model.layers."):
            prefix = ".".join(name.split(".")[:3]) + "."
            if prefix not in renumber:
                continue
            name = renumber[prefix] + name[len(prefix):]
        state[name] = t.clone()
    return _build(model, config, state), {"kept": keep}

def _kept(model: nn.Module, what: str, fraction: float, n: int) -> int:
    if not 0 < fraction <= 1:
        raise ForensicsError(_where(model), f"the fraction of {what} kept is in (0, 1]; got {fraction}")
    return max(1, round(fraction * n))


def prune_width(model: nn.Module, *, seed: int, hidden_keep: float = 0.75, ffn_keep: float = 1.0,
                heads_keep: float = 1.0, rule: str = "norm") -> tuple[nn.Module, dict]:
    """Width pruning (Minitron, Sheared-LLaMA): keep a fraction of the residual dimensions, of each layer's FFN
    neurons and of each layer's kv heads (each with its group of query heads), rounded to the nearest count, at least 1.

    Rule "norm" keeps the largest by a weight norm: a residual dimension by its token-embedding column, an FFN neuron
    by ‖gate row‖·‖up row‖·‖down column‖, a kv head by ‖its v rows‖·‖its query heads' o columns‖ (all on the source's
    weights); rule "random" keeps a seeded random subset. Ties are broken by the seed. Kept units stay in their order.
    One set of residual dimensions serves every layer, since they all read and write the same stream. The child
    computes a different function (RMSNorm now averages over fewer dimensions, and the dropped units are gone).
    """
    layers = _layers(model)
    where = _where(model)
    if rule not in ("norm", "random"):
        raise ForensicsError(where, f"rule is 'norm' or 'random', not {rule!r}")
    config = copy.deepcopy(model.config)
    n_q, n_kv, d = _heads(config)
    group = n_q // n_kv
    hidden, inter = config.hidden_size, config.intermediate_size
    n_hidden = _kept(model, "hidden dimensions", hidden_keep, hidden)
    n_ffn = _kept(model, "FFN neurons", ffn_keep, inter)
    n_heads = _kept(model, "kv heads", heads_keep, n_kv)
    if (n_hidden, n_ffn, n_heads) == (hidden, inter, n_kv):
        raise ForensicsError(where, f"these fractions keep all {hidden} hidden dimensions, {inter} FFN neurons and "
                                    f"{n_kv} kv heads: nothing to prune")
    g = torch.Generator().manual_seed(seed)
    state = dict(model.state_dict())

    def score(*norms: torch.Tensor) -> torch.Tensor:
        return torch.stack(norms).prod(0) if rule == "norm" else torch.zeros(norms[0].shape)

    keep_h = _top(score(state["model.embed_tokens.weight"].norm(dim=0)), n_hidden, g)
    kept_ffn, kept_kv = [], []
    for i in range(len(layers)):
        p = f"model.layers.{i}."
        w = {name: state[f"{p}{name}.weight"] for name in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                                                             "self_attn.v_proj", "self_attn.o_proj")}
        ffn = _top(score(w["mlp.gate_proj"].norm(dim=1), w["mlp.up_proj"].norm(dim=1), w["mlp.down_proj"].norm(dim=0)),
                   n_ffn, g)
        # a kv head's v rows, and the o columns of its query heads (consecutive: head h reads kv head h // group)
        v_norm = w["self_attn.v_proj"].reshape(n_kv, d, -1).norm(dim=(1, 2))
        o_norm = w["self_attn.o_proj"].reshape(-1, n_kv, group * d).norm(dim=(0, 2))
        kv = _top(score(v_norm, o_norm), n_heads, g)
        kept_ffn.append(ffn.tolist())
        kept_kv.append(kv.tolist())
        q_rows, kv_rows = _rows(_rows(kv, group), d), _rows(kv, d)
        cut = {"self_attn.q_proj": (q_rows, keep_h), "self_attn.k_proj": (kv_rows, keep_h),
               "self_attn.v_proj": (kv_rows, keep_h), "self_attn.o_proj": (keep_h, q_rows),
               "mlp.gate_proj": (ffn, keep_h), "mlp.up_proj": (ffn, keep_h), "mlp.down_proj": (keep_h, ffn)}
        for name, (rows, cols) in cut.items():
            state[p + name + ".weight"] = state[p + name + ".weight"][rows][:, cols]
            if p + name + ".bias" in state:
                state[p + name + ".bias"] = state[p + name + ".bias"][rows]
        for norm in READERS:
            state[p + norm + ".weight"] = state[p + norm + ".weight"][keep_h]
    state["model.norm.weight"] = state["model.norm.weight"][keep_h]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = state[name][:, keep_h]
    config.hidden_size, config.intermediate_size = n_hidden, n_ffn
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = n_heads * group, n_heads, d
    # null: every unit of that kind was kept (listing each layer's full range would only bulk up recipe.json)
    return _build(model, config, state), {"kept_hidden": keep_h.tolist(),
                                          "kept_ffn": kept_ffn if n_ffn < inter else None,
                                          "kept_kv_heads": kept_kv if n_heads < n_kv else None}


def _moe_config(model: nn.Module, arch: str, experts: int, top_k: int):
    src = model.config
    where = _where(model)
    if getattr(src, "mlp_bias", False):
        raise ForensicsError(where, "the source FFN has biases, which neither MoE target has")
    qkv_bias = model.model.layers[0].self_attn.q_proj.bias is not None
    o_bias = model.model.layers[0].self_attn.o_proj.bias is not None
    _, n_kv, d = _heads(src)
    common = dict(
        vocab_size=src.vocab_size, hidden_size=src.hidden_size, num_hidden_layers=src.num_hidden_layers,
        num_attention_heads=src.num_attention_heads, num_key_value_heads=n_kv, head_dim=d,
        hidden_act=src.hidden_act, max_position_embeddings=src.max_position_embeddings, rms_norm_eps=src.rms_norm_eps,
        rope_parameters=copy.deepcopy(src.rope_parameters), tie_word_embeddings=src.tie_word_embeddings,
        initializer_range=src.initializer_range, bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id,
        pad_token_id=src.pad_token_id, num_experts_per_tok=top_k,
    )
    if arch == "mixtral":
        if qkv_bias or o_bias:
            raise ForensicsError(where, "the source attention has biases, which Mixtral lacks; use --arch qwen2_moe")
        return transformers.MixtralConfig(**common, intermediate_size=src.intermediate_size,
                                          num_local_experts=experts,
                                          sliding_window=getattr(src, "sliding_window", None))
    if o_bias:
        raise ForensicsError(where, "the source o_proj has a bias, which Qwen2-MoE lacks")
    return transformers.Qwen2MoeConfig(
        **common, intermediate_size=src.intermediate_size, moe_intermediate_size=src.intermediate_size,
        shared_expert_intermediate_size=src.intermediate_size, num_experts=experts, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=qkv_bias,
        use_sliding_window=getattr(src, "use_sliding_window", False),
        sliding_window=getattr(src, "sliding_window", None), max_window_layers=src.num_hidden_layers)


def upcycle(model: nn.Module, *, seed: int, arch: str = "mixtral", experts: int = 4, top_k: int = 2,
            noise: float = 0.01, router_std: float = 0.02) -> tuple[nn.Module, dict]:
    """Sparse upcycling: every dense FFN becomes `experts` copies of itself, each plus `noise` · std Gaussian noise,
    behind a new random router (std `router_std`); attention, norms and embeddings are copied unchanged.

    Mixtral: with top-k weights renormalised to sum to 1, noiseless experts reproduce the dense model exactly.
    Qwen2-MoE adds an always-on shared expert behind a sigmoid gate: the shared expert is a further noisy copy, its gate
    is zero (sigmoid 1/2), and the routed experts' down projections are halved, so again noiseless copies reproduce
    the dense model exactly.
    """
    where = _where(model)
    _check_decoder(model)
    if arch not in MOE_ARCHS:
        raise ForensicsError(where, f"MoE architecture is one of {', '.join(MOE_ARCHS)}, not {arch!r}")
    if not 1 <= top_k <= experts:
        raise ForensicsError(where, f"need 1 <= top_k <= experts, got top_k {top_k} with {experts} experts")
    if noise < 0 or router_std <= 0:
        raise ForensicsError(where, f"noise must be >= 0 and router std > 0, got {noise} and {router_std}")
    config = _moe_config(model, arch, experts, top_k)
    g = torch.Generator().manual_seed(seed)

    def jitter(w: torch.Tensor) -> torch.Tensor:
        return w + torch.randn(w.shape, generator=g, dtype=w.dtype) * (noise * w.std())

    state = {n: t.clone() for n, t in model.state_dict().items() if ".mlp." not in n}
    routed_share = 1.0 if arch == "mixtral" else 0.5
    for i, layer in enumerate(model.model.layers):
        gate, up, down = (layer.mlp.gate_proj.weight.detach(), layer.mlp.up_proj.weight.detach(),
                          layer.mlp.down_proj.weight.detach())
        p = f"model.layers.{i}.mlp."
        state[p + "gate.weight"] = torch.randn(experts, gate.shape[1], generator=g, dtype=gate.dtype) * router_std
        gate_up, downs = [], []
        for _ in range(experts):
            gate_up.append(torch.cat([jitter(gate), jitter(up)]))
            downs.append(jitter(down) * routed_share)
        state[p + "experts.gate_up_proj"] = torch.stack(gate_up)
        state[p + "experts.down_proj"] = torch.stack(downs)
        if arch == "qwen2_moe":
            state[p + "shared_expert.gate_proj.weight"] = jitter(gate)
            state[p + "shared_expert.up_proj.weight"] = jitter(up)
            state[p + "shared_expert.down_proj.weight"] = jitter(down)
            state[p + "shared_expert_gate.weight"] = torch.zeros(1, gate.shape[1], dtype=gate.dtype)
    cls = transformers.MixtralForCausalLM if arch == "mixtral" else transformers.Qwen2MoeForCausalLM
    return _build(model, config, state, cls), {}


def continue_pretraining(model: nn.Module, windows: np.ndarray, *, seed: int, batch_size: int = 2, lr: float = 1e-4,
                         weight_decay: float = 0.01, max_grad_norm: float = 1.0,
                         progress: Progress | None = None) -> tuple[nn.Module, dict]:
    """Causal-LM training with AdamW on `windows` (token ids, one row per sequence), in order, `batch_size` rows per
    step; a final partial batch is dropped. `seed` drives any dropout; the global RNG is left as it was. Upcycled
    mixtures of experts train too (the calibration trains them after upcycling)."""
    where = _where(model)
    if getattr(model.config, "model_type", None) not in MOE_ARCHS:
        _check_decoder(model)
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ForensicsError(where, f"training windows must be a 2-D array of token ids, got shape {windows.shape}")
    if batch_size < 1 or windows.shape[0] < batch_size:
        raise ForensicsError(where, f"{windows.shape[0]} windows do not fill one batch of {batch_size}")
    if windows.min() < 0 or windows.max() >= model.config.vocab_size:
        raise ForensicsError(where, f"token ids outside the model's vocabulary of {model.config.vocab_size}")
    if lr <= 0:
        raise ForensicsError(where, f"learning rate must be positive, got {lr}")
    steps = windows.shape[0] // batch_size
    out = _clone(model)
    out.train()
    # fused: one pass over each tensor instead of several, a third of the step time on CPU
    optimizer = torch.optim.AdamW(out.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    ids = torch.as_tensor(windows[:steps * batch_size], dtype=torch.long).reshape(steps, batch_size, -1)
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(steps):
            loss = out(input_ids=ids[step], labels=ids[step], use_cache=False).loss
            if not torch.isfinite(loss):
                raise ForensicsError(where, f"training diverged at step {step + 1}: loss {loss.item()}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(out.parameters(), max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 6))
            if progress:
                progress(step + 1, steps)
    return out.eval(), {"steps": steps, "losses": losses}


def new_tokenizer(texts: Iterable[str], *, vocab_size: int, like=None) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's scheme: all 256 bytes are tokens, so any text encodes) trained on `texts`.

    It keeps `like`'s special tokens, spelled and assigned as there (BOS, EOS, PAD, UNK), so the child's config names
    the same roles; without `like`, "<|endoftext|>" is both BOS and EOS. The tokenizers library's BPE training is
    deterministic: the same texts give the same vocabulary and merges.
    """
    if like is not None:
        specials = list(like.all_special_tokens)
        roles = {k: v for k, v in like.special_tokens_map.items() if isinstance(v, str)}
    else:
        specials, roles = ["<|endoftext|>"], {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    smallest = 256 + len(specials)
    if vocab_size <= smallest:
        raise ForensicsError(None, f"a byte-level vocabulary needs more than {smallest} tokens (256 bytes and "
                                   f"{len(specials)} special), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **roles)


def replace_vocabulary(model: nn.Module, tokenizer, windows: np.ndarray, *, seed: int, batch_size: int = 2,
                       lr: float = 1e-4, weight_decay: float = 0.01, max_grad_norm: float = 1.0,
                       progress: Progress | None = None) -> tuple[nn.Module, dict]:
    """A new vocabulary: the token embedding (and lm_head, when untied) re-initialised for `tokenizer`, seeded normal
    with mean 0 and the std of the source's own matrix; every layer and norm kept; then continue_pretraining on
    `windows`, which must be cut with `tokenizer`, so the new embeddings start to fit the layers."""
    _check_decoder(model)
    vocab = len(tokenizer)
    g = torch.Generator().manual_seed(seed)
    state = dict(model.state_dict())

    def fresh(like: torch.Tensor) -> torch.Tensor:
        return torch.randn(vocab, like.shape[1], generator=g, dtype=like.dtype) * like.std()

    state["model.embed_tokens.weight"] = fresh(state["model.embed_tokens.weight"])
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    state["lm_head.weight"] = state["model.embed_tokens.weight"] if tied else fresh(state["lm_head.weight"])
    config = copy.deepcopy(model.config)
    config.vocab_size = vocab
    # Every special-token id the config names (bos, eos, pad; unk from a GGUF) was an id in the old vocabulary.
    for name in [k for k in config.to_dict() if k.endswith("_token_id")]:
        setattr(config, name, getattr(tokenizer, name, None))
    child, details = continue_pretraining(_build(model, config, state), windows, seed=seed, batch_size=batch_size,
                                          lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                                          progress=progress)
    return child, {"vocab_size": vocab, **details}
