"""The rescaling-invariant attention signals (forensics/signals/attention.py) on tiny real checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from forensics.fingerprint import fingerprint_model
from forensics.lab import transforms as T
from forensics.signals import attention as A
from forensics.stats.normalise import curve, variation_check
from tests.tiny import build_model, save, write_llama_gguf

SIGNALS = ("qk_spectrum", "ov_spectrum")


def full_svd_summary(layers: list[tuple], n_heads: int, n_kv: int) -> dict[str, list[float]]:
    """The definition, computed the slow way: per head the full d × d product and numpy's SVD of it."""
    out = {name: [] for name in SIGNALS}
    for q, k, v, o, g in layers:
        d = q.shape[1]
        dh = q.shape[0] // n_heads
        G = np.diag(np.ones(d) if g is None else g)
        per_head = {name: [] for name in SIGNALS}
        for h in range(n_heads):
            j = h // (n_heads // n_kv)
            qh, kj, vj = q[h * dh:(h + 1) * dh], k[j * dh:(j + 1) * dh], v[j * dh:(j + 1) * dh]
            oh = o[:, h * dh:(h + 1) * dh]
            for name, product in (("qk_spectrum", G @ qh.T @ kj @ G), ("ov_spectrum", oh @ vj @ G)):
                s = np.linalg.svd(product, compute_uv=False)[:dh]
                p = s / s.sum()
                p = p[p > 0]
                per_head[name].append(np.exp(-(p * np.log(p)).sum()) / dh)
        for name in SIGNALS:
            out[name].append(float(np.mean(per_head[name])))
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def attention_of(model, arch: str) -> list[tuple]:
    """Per layer (q, k, v, o, gain) in torch's (out, in) layout, read from the modules, not from the role table."""
    cfg = model.config
    n, d = cfg.num_attention_heads, cfg.hidden_size
    out = []
    if arch == "gpt2":
        for blk in model.transformer.h:
            q, k, v = np.split(_np(blk.attn.c_attn.weight).T, 3)
            out.append((q, k, v, _np(blk.attn.c_proj.weight).T, _np(blk.ln_1.weight)))
    elif arch == "gpt_neox":
        for blk in model.gpt_neox.layers:
            w = _np(blk.attention.query_key_value.weight).reshape(n, 3, d // n, d)
            q, k, v = (w[:, i].reshape(d, d) for i in range(3))
            out.append((q, k, v, _np(blk.attention.dense.weight), _np(blk.input_layernorm.weight)))
    elif arch == "bert":
        layers = model.encoder.layer
        for i, blk in enumerate(layers):
            s = blk.attention.self
            gain = _np(layers[i - 1].output.LayerNorm.weight) if i else None
            out.append((_np(s.query.weight), _np(s.key.weight), _np(s.value.weight),
                        _np(blk.attention.output.dense.weight), gain))
    elif arch == "phi3":
        for blk in model.model.layers:
            dh = d // n
            q, k, v = np.split(_np(blk.self_attn.qkv_proj.weight), [n * dh, (n + cfg.num_key_value_heads) * dh])
            out.append((q, k, v, _np(blk.self_attn.o_proj.weight), _np(blk.input_layernorm.weight)))
    else:
        plus_one = 1.0 if arch.startswith("gemma") else 0.0
        for blk in model.model.layers:
            a = blk.self_attn
            out.append((_np(a.q_proj.weight), _np(a.k_proj.weight), _np(a.v_proj.weight), _np(a.o_proj.weight),
                        _np(blk.input_layernorm.weight) + plus_one))
    return out


def values(fp: dict, name: str) -> np.ndarray:
    """Every layer's value, all present (assert_allclose would take NaN for NaN as equal)."""
    v = np.asarray(fp["signals"][name]["values"], dtype=np.float64)
    assert v.size == fp["model"]["num_layers"] and np.isfinite(v).all(), (name, v)
    return v


# ---- the shortcut against the definition ----------------------------------------------------------------------------

@pytest.mark.parametrize("d,n_heads,n_kv,dh", [(32, 4, 4, 8), (32, 4, 2, 8), (48, 6, 1, 16), (16, 2, 1, 24)])
def test_shortcut_equals_full_svd(d, n_heads, n_kv, dh):
    """GQA and MQA included, and a head wider than the residual stream (rank-deficient: the Cholesky fallback)."""
    rng = np.random.default_rng(d + n_heads + n_kv + dh)
    q, k = rng.standard_normal((n_heads * dh, d)), rng.standard_normal((n_kv * dh, d))
    v, o = rng.standard_normal((n_kv * dh, d)), rng.standard_normal((d, n_heads * dh))
    g = rng.uniform(0.3, 2.0, d)
    want = full_svd_summary([(q, k, v, o, g)], n_heads, n_kv)
    got_qk = A.qk_spectrum(q, k, n_heads, n_kv, g)
    got_ov = A.ov_spectrum(v, o, n_heads, n_kv, g)
    assert got_qk == pytest.approx(want["qk_spectrum"][0], rel=1e-10)
    assert got_ov == pytest.approx(want["ov_spectrum"][0], rel=1e-10)
    # The singular values themselves, head by head.
    for h in range(n_heads):
        j = h // (n_heads // n_kv)
        full = np.linalg.svd(np.diag(g) @ q[h * dh:(h + 1) * dh].T @ k[j * dh:(j + 1) * dh] @ np.diag(g),
                             compute_uv=False)[:min(d, dh)]
        fast = A.qk_singular_values(q, k, n_heads, n_kv, g)[h][:min(d, dh)]
        np.testing.assert_allclose(fast, full, rtol=1e-9, atol=1e-12 * full[0])


def test_effective_rank_fraction_bounds():
    assert A.effective_rank_fraction(np.ones((3, 8))) == pytest.approx(1.0)
    assert A.effective_rank_fraction(np.array([[5.0, 0, 0, 0]])) == pytest.approx(0.25)


# ---- invariance under the lab's output-preserving transforms --------------------------------------------------------

PRESERVING = {
    "rescale_qk_head": (lambda m: T.rescale_qk(m, seed=3), ("q", "k")),
    "rescale_qk_pair": (lambda m: T.rescale_qk(m, seed=4, granularity="pair"), ("q", "k")),
    "rescale_vo": (lambda m: T.rescale_vo(m, seed=5), ("v", "o")),
    "rescale_norm": (lambda m: T.rescale_norm(m, seed=6), ("q", "k", "v", "attn_norm")),
    "permute_heads": (lambda m: T.permute_heads(m, seed=7), ()),
}


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    model = build_model("llama", seed=11)
    fp = fingerprint_model(save(model, tmp_path_factory.mktemp("parent") / "m"), device="cpu")
    return model, fp


@pytest.mark.parametrize("name", sorted(PRESERVING))
def test_invariant_under_output_preserving_transforms(parent, tmp_path, name):
    model, fp = parent
    transform, moved = PRESERVING[name]
    child, _ = transform(model)
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the transform is output-preserving on this very model
        torch.testing.assert_close(child(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    fc = fingerprint_model(save(child, tmp_path / "child"), device="cpu")
    for signal in SIGNALS:
        np.testing.assert_allclose(values(fc, signal), values(fp, signal), rtol=1e-6)
    for role in moved:  # while the std curves these transforms target do move
        assert np.max(np.abs(values(fc, role) / values(fp, role) - 1)) > 0.05, role


def test_noise_moves_the_signals(parent, tmp_path):
    """Not a constant: a transform that changes the function changes the values (a little)."""
    model, fp = parent
    child, _ = T.add_noise(model, seed=1, scale=0.2)
    fc = fingerprint_model(save(child, tmp_path / "noised"), device="cpu")
    for signal in SIGNALS:
        assert not np.allclose(values(fc, signal), values(fp, signal), rtol=1e-6)


# ---- layouts, head grouping and formats -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text", "phi3", "gpt2", "gpt_neox", "bert"])
def test_fingerprint_matches_definition(tmp_path, arch):
    """Each layout the role table knows (fused qkv, GPT-2's (in, out) Conv1D, NeoX's per-head interleaving, BERT's
    post-norm gain from the previous layer, Gemma's 1 + weight) gives the definition's values."""
    model = build_model(arch, seed=2)
    cfg = model.config
    n_heads = cfg.num_attention_heads
    n_kv = n_heads if arch in ("gpt2", "gpt_neox", "bert") else cfg.num_key_value_heads
    fp = fingerprint_model(save(model, tmp_path / arch), device="cpu")
    want = full_svd_summary(attention_of(model, arch), n_heads, n_kv)
    for signal in SIGNALS:
        assert fp["signals"][signal]["kind"] == "attention_spectrum"
        np.testing.assert_allclose(values(fp, signal), want[signal], rtol=1e-5)


def test_gqa_grouping(tmp_path):
    """A GQA model and the same model written as full multi-head attention (each kv head repeated for every query
    head of its group) compute the same thing, and have the same per-head products: equal signals only if query
    head h is paired with kv head h // group."""
    gqa = build_model("llama", seed=5)
    cfg = gqa.config
    n, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    mha = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**{**cfg.to_diff_dict(), "num_key_value_heads": n})).eval()
    dh = cfg.hidden_size // n
    state = gqa.state_dict()
    for i in range(cfg.num_hidden_layers):
        for proj in ("k_proj", "v_proj"):
            key = f"model.layers.{i}.self_attn.{proj}.weight"
            state[key] = state[key].reshape(kv, dh, -1).repeat_interleave(n // kv, dim=0).reshape(n * dh, -1)
    mha.load_state_dict(state)
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(mha(input_ids=ids).logits, gqa(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    fa = fingerprint_model(save(gqa, tmp_path / "gqa"), device="cpu")
    fb = fingerprint_model(save(mha, tmp_path / "mha"), device="cpu")
    for signal in SIGNALS:
        np.testing.assert_allclose(values(fa, signal), values(fb, signal), rtol=1e-6)


def test_gguf_equals_safetensors(tmp_path):
    """llama.cpp's Q/K row permutation (undone by the reader, and inside each head anyway) changes nothing."""
    model = build_model("llama", seed=8)
    ggml = tmp_path / "m.gguf"
    write_llama_gguf(model, ggml)
    fg = fingerprint_model(ggml, device="cpu")
    fs = fingerprint_model(save(model, tmp_path / "st"), device="cpu")
    for signal in SIGNALS:
        np.testing.assert_allclose(values(fg, signal), values(fs, signal), rtol=1e-6)


def test_mla_has_no_attention_spectra(tmp_path):
    fp = fingerprint_model(save(build_model("deepseek_v2"), tmp_path / "mla"), device="cpu")
    assert not set(SIGNALS) & set(fp["signals"])
    assert "q_b" in fp["signals"] or "q" in fp["signals"]


def test_layers_that_differ_give_varying_curves(tmp_path):
    """Heads of lower rank in deeper layers: the curves follow, well above the flat-curve threshold."""
    model = build_model("llama", seed=9)
    with torch.no_grad():
        for i, blk in enumerate(model.model.layers):
            a = blk.self_attn
            dh = a.q_proj.weight.shape[0] // model.config.num_attention_heads
            keep = dh >> i  # 8, 4, 2 of each head's 8 q rows and of each value head's rows
            a.q_proj.weight.view(-1, dh, a.q_proj.weight.shape[1])[:, keep:] = 0
            a.v_proj.weight.view(-1, dh, a.v_proj.weight.shape[1])[:, keep:] = 0
    fp = fingerprint_model(save(model, tmp_path / "m"), device="cpu")
    for signal in SIGNALS:
        c = curve(fp, signal)
        assert len(c.raw) == model.config.num_hidden_layers
        assert np.all(np.diff(c.raw) < 0), c.raw
        assert not variation_check(c.raw).flat


def test_collector_waits_for_a_gain_stored_later(tmp_path):
    """Files need not store layers in order (safetensors sorts names: layer 10 before layer 2), and a post-norm layer
    needs the previous layer's output norm: fed in reverse, every layer waits for its gain and gets the same value."""
    from forensics import roles
    from forensics.sources import Reads, open_model

    path = save(build_model("bert", seed=4), tmp_path / "bert")
    source = open_model(path, Reads())
    info = source.info()
    table, matches = roles.resolve(path, info, source.names())
    loaded = [(ref.name, ref.load()) for ref in source.tensors() if ref.name in matches]  # files read in order
    out = []
    for order in (loaded, loaded[::-1]):
        collector = A.LayerCollector(info, "bert", matches)
        for name, tensor in order:
            for part in table.parts(name, matches[name], tensor, info):
                collector.add(part)
                assert len(collector.pending) <= info.num_layers
        collector.finish()
        collector.close()
        out.append(collector.signals(info.num_layers))
    assert out[0] == out[1] == {k: v for k, v in fingerprint_model(path, device="cpu")["signals"].items()
                                if k in SIGNALS}
