"""The lab's transforms on tiny real decoders: output-preserving ones keep the logits, the others do what they say."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from forensics.errors import ForensicsError
from forensics.lab import transforms as T

SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {"llama-tied": (transformers.LlamaConfig, {"tie_word_embeddings": True}),
            "llama-untied": (transformers.LlamaConfig, {"tie_word_embeddings": False}),
            "qwen2-biased": (transformers.Qwen2Config, {"tie_word_embeddings": False})}


def decoder(family: str = "llama-tied", seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny decoder with every parameter random, norms and biases included (they start at exactly 1 and 0,
    which would let a wrong rescaling or permutation of them go unnoticed)."""
    cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cls(**SIZES, **extra))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, SIZES["vocab_size"], (3, 16), generator=torch.Generator().manual_seed(seed))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def layer(model, i: int):
    return model.model.layers[i]


PRESERVING = {
    "permute_heads": lambda m, s: T.permute_heads(m, seed=s),
    "permute_neurons": lambda m, s: T.permute_neurons(m, seed=s),
    "rescale_qk_head": lambda m, s: T.rescale_qk(m, seed=s),
    "rescale_qk_pair": lambda m, s: T.rescale_qk(m, seed=s, granularity="pair"),
    "rescale_vo": lambda m, s: T.rescale_vo(m, seed=s),
    "rescale_updown": lambda m, s: T.rescale_updown(m, seed=s),
    "rescale_norm": lambda m, s: T.rescale_norm(m, seed=s),
    "rotate_residual": lambda m, s: T.rotate_residual(m, seed=s),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", PRESERVING)
def test_evasion_transforms_keep_the_logits_and_change_the_weights(name, family):
    model = decoder(family)
    before = snapshot(model)
    ids = batch()
    child, _ = PRESERVING[name](model, 7)
    torch.testing.assert_close(logits(child, ids), logits(model, ids), atol=1e-4, rtol=0)
    after = child.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved, "the transform left every weight as it was"
    for k, v in model.state_dict().items():  # pure: the source is untouched
        assert torch.equal(v, before[k]), k


def test_head_permutation_moves_whole_heads_and_keeps_each_query_head_with_its_kv_head():
    model = decoder("qwen2-biased")
    child, _ = T.permute_heads(model, seed=3)
    n_q, n_kv, d = 4, 2, 16
    group = n_q // n_kv
    moved = 0
    for i in range(SIZES["num_hidden_layers"]):
        old, new = layer(model, i).self_attn, layer(child, i).self_attn
        for h in range(n_q):
            block = new.q_proj.weight[h * d:(h + 1) * d]
            sources = [s for s in range(n_q) if torch.equal(block, old.q_proj.weight[s * d:(s + 1) * d])]
            assert len(sources) == 1, f"layer {i}: new q head {h} is not one whole old head"
            s = sources[0]
            moved += s != h
            kv_new, kv_old = h // group, s // group
            for proj in ("k_proj", "v_proj"):
                assert torch.equal(getattr(new, proj).weight[kv_new * d:(kv_new + 1) * d],
                                   getattr(old, proj).weight[kv_old * d:(kv_old + 1) * d])
                assert torch.equal(getattr(new, proj).bias[kv_new * d:(kv_new + 1) * d],
                                   getattr(old, proj).bias[kv_old * d:(kv_old + 1) * d])
            assert torch.equal(new.q_proj.bias[h * d:(h + 1) * d], old.q_proj.bias[s * d:(s + 1) * d])
            assert torch.equal(new.o_proj.weight[:, h * d:(h + 1) * d], old.o_proj.weight[:, s * d:(s + 1) * d])
    assert moved > 0


def test_neuron_permutation_moves_gate_up_rows_with_down_columns():
    model = decoder()
    child, _ = T.permute_neurons(model, seed=3)
    for i in range(SIZES["num_hidden_layers"]):
        old, new = layer(model, i).mlp, layer(child, i).mlp
        # each new gate row is exactly one old row; that row's up row and down column must follow it
        match = (new.gate_proj.weight[:, None, :] == old.gate_proj.weight[None, :, :]).all(-1)
        assert (match.sum(1) == 1).all()
        order = match.float().argmax(1)
        assert sorted(order.tolist()) == list(range(SIZES["intermediate_size"]))
        assert not torch.equal(order, torch.arange(SIZES["intermediate_size"]))
        assert torch.equal(new.up_proj.weight, old.up_proj.weight[order])
        assert torch.equal(new.down_proj.weight, old.down_proj.weight[:, order])


AFFECTED = {
    "rescale_qk_head": ["self_attn.q_proj", "self_attn.k_proj"],
    "rescale_qk_pair": ["self_attn.q_proj", "self_attn.k_proj"],
    "rescale_vo": ["self_attn.v_proj", "self_attn.o_proj"],
    "rescale_updown": ["mlp.up_proj", "mlp.down_proj"],
    "rescale_norm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"],
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", AFFECTED)
def test_rescalings_move_the_per_layer_std_of_every_matrix_they_touch(name, seed):
    model = decoder(seed=seed)
    child, _ = PRESERVING[name](model, seed)
    for i in range(SIZES["num_hidden_layers"]):
        for path in AFFECTED[name]:
            old = layer(model, i).get_submodule(path).weight.detach()
            new = layer(child, i).get_submodule(path).weight.detach()
            ratio = float(new.std() / old.std())
            assert abs(np.log(ratio)) > 0.1, f"layer {i} {path}: std ratio {ratio:.3f}"


def test_final_norm_is_rescaled_only_when_lm_head_is_untied():
    tied, untied = decoder("llama-tied"), decoder("llama-untied")
    child, details = T.rescale_norm(tied, seed=0)
    assert torch.equal(child.model.norm.weight, tied.model.norm.weight)
    assert torch.equal(child.model.embed_tokens.weight, tied.model.embed_tokens.weight)
    assert child.lm_head.weight is child.model.embed_tokens.weight
    assert "tied" in details["final_norm"]
    child, _ = T.rescale_norm(untied, seed=0)
    assert not torch.equal(child.model.norm.weight, untied.model.norm.weight)
    assert not torch.equal(child.lm_head.weight, untied.lm_head.weight)
    assert torch.equal(child.model.embed_tokens.weight, untied.model.embed_tokens.weight)


READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


@pytest.mark.parametrize("family", ["llama-tied", "qwen2-biased"])
def test_rotation_folds_the_gains_and_turns_every_residual_matrix_by_one_random_orthogonal_q(family):
    model = decoder(family)
    child, details = T.rotate_residual(model, seed=2)
    assert ("untied" in details["lm_head"]) and not child.config.tie_word_embeddings
    assert child.lm_head.weight is not child.model.embed_tokens.weight
    e, e_new = model.model.embed_tokens.weight.detach().double(), child.model.embed_tokens.weight.detach().double()
    q = torch.linalg.lstsq(e, e_new).solution  # E·Q = E_child: the vocabulary outnumbers the dimensions
    torch.testing.assert_close(q.T @ q, torch.eye(SIZES["hidden_size"], dtype=torch.float64), atol=1e-5, rtol=0)
    assert float(q.abs().max()) < 0.8, "Q is near a signed permutation: the embedding columns were not mixed"

    def close(got, want):
        torch.testing.assert_close(got.detach().double(), want, atol=1e-5, rtol=0)

    def assert_uncorrelated(a, b, what):
        r = float(torch.corrcoef(torch.stack([a.detach().reshape(-1), b.detach().reshape(-1)]))[0, 1])
        assert abs(r) < 0.3, f"{what}: child still correlates with the parent (r = {r:.2f})"

    for i in range(SIZES["num_hidden_layers"]):
        old, new = layer(model, i), layer(child, i)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert torch.equal(getattr(new, norm).weight, torch.ones(SIZES["hidden_size"]))
        for path in READERS:
            gain = (old.input_layernorm if path.startswith("self_attn") else old.post_attention_layernorm).weight
            w = old.get_submodule(path).weight.detach().double() * gain.detach().double()[None, :]
            close(new.get_submodule(path).weight, w @ q)
            assert_uncorrelated(new.get_submodule(path).weight, old.get_submodule(path).weight, f"layer {i} {path}")
            if old.get_submodule(path).bias is not None:  # on the output side: untouched
                assert torch.equal(new.get_submodule(path).bias, old.get_submodule(path).bias)
        for path in WRITERS:
            close(new.get_submodule(path).weight, q.T @ old.get_submodule(path).weight.detach().double())
            assert_uncorrelated(new.get_submodule(path).weight, old.get_submodule(path).weight, f"layer {i} {path}")
    assert torch.equal(child.model.norm.weight, torch.ones(SIZES["hidden_size"]))
    head = model.lm_head.weight.detach().double() * model.model.norm.weight.detach().double()[None, :]
    close(child.lm_head.weight, head @ q)
    again, _ = T.rotate_residual(model, seed=2)
    other, _ = T.rotate_residual(model, seed=3)
    assert torch.equal(again.model.embed_tokens.weight, child.model.embed_tokens.weight)
    assert not torch.equal(other.model.embed_tokens.weight, child.model.embed_tokens.weight)


def test_width_pruning_keeps_exactly_the_recorded_slices():
    model = decoder("qwen2-biased")
    child, kept = T.prune_width(model, seed=0, hidden_keep=0.5, ffn_keep=0.75, heads_keep=0.5)
    h = torch.tensor(kept["kept_hidden"])
    assert len(h) == 32 and h.equal(h.sort().values)
    config = child.config
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim) == (32, 96, 2, 1, 16)
    d, group = 16, 2
    for i in range(SIZES["num_hidden_layers"]):
        old, new = layer(model, i), layer(child, i)
        f, kv = torch.tensor(kept["kept_ffn"][i]), torch.tensor(kept["kept_kv_heads"][i])
        assert len(f) == 96 and len(kv) == 1
        heads = (kv[:, None] * group + torch.arange(group)).reshape(-1)  # the kv head's own query heads
        q_rows = (heads[:, None] * d + torch.arange(d)).reshape(-1)
        kv_rows = (kv[:, None] * d + torch.arange(d)).reshape(-1)
        for path, rows, cols in (("self_attn.q_proj", q_rows, h), ("self_attn.k_proj", kv_rows, h),
                                 ("self_attn.v_proj", kv_rows, h), ("self_attn.o_proj", h, q_rows),
                                 ("mlp.gate_proj", f, h), ("mlp.up_proj", f, h), ("mlp.down_proj", h, f)):
            want = old.get_submodule(path)
            got = new.get_submodule(path)
            assert torch.equal(got.weight, want.weight[rows][:, cols]), f"layer {i} {path}"
            if want.bias is not None:
                assert torch.equal(got.bias, want.bias[rows]), f"layer {i} {path} bias"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert torch.equal(getattr(new, norm).weight, getattr(old, norm).weight[h])
    assert torch.equal(child.model.embed_tokens.weight, model.model.embed_tokens.weight[:, h])
    assert torch.equal(child.lm_head.weight, model.lm_head.weight[:, h])
    assert torch.equal(child.model.norm.weight, model.model.norm.weight[h])
    out = logits(child, batch())
    assert out.shape == (3, 16, SIZES["vocab_size"]) and torch.isfinite(out).all()
    assert not torch.allclose(out, logits(model, batch()), atol=1e-2), "width pruning is not output-preserving"


def test_width_pruning_by_norm_keeps_the_largest_and_random_follows_the_seed():
    model = decoder("llama-tied")
    child, kept = T.prune_width(model, seed=0, hidden_keep=0.75, ffn_keep=0.5)
    assert child.lm_head.weight is child.model.embed_tokens.weight and kept["kept_kv_heads"] is None
    norms = model.model.embed_tokens.weight.detach().norm(dim=0)
    assert kept["kept_hidden"] == sorted(norms.argsort(descending=True)[:48].tolist())
    mlp = layer(model, 0).mlp
    score = mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0)
    assert kept["kept_ffn"][0] == sorted(score.argsort(descending=True)[:64].tolist())
    assert T.prune_width(model, seed=5, hidden_keep=0.75, ffn_keep=0.5)[1] == kept  # no ties: the seed is idle
    a = T.prune_width(model, seed=1, hidden_keep=0.75, rule="random")[1]
    b = T.prune_width(model, seed=2, hidden_keep=0.75, rule="random")[1]
    assert a["kept_hidden"] != b["kept_hidden"] and a["kept_ffn"] is None
    assert a == T.prune_width(model, seed=1, hidden_keep=0.75, rule="random")[1]


@pytest.mark.parametrize("params,problem", [({"hidden_keep": 0}, r"\(0, 1\]"), ({"ffn_keep": 1.5}, r"\(0, 1\]"),
                                            ({"hidden_keep": 1.0}, "nothing to prune"),
                                            ({"rule": "magnitude"}, "rule")])
def test_width_pruning_rejects_impossible_fractions(params, problem):
    with pytest.raises(ForensicsError, match=problem):
        T.prune_width(decoder(), seed=0, **params)


TEXT = ("the cat sat on the mat . the dog ate the bone . a bird sang in the tree and the cat watched it . "
        "rain fell on the town , and the river rose over the old stone bridge . ") * 4


@pytest.mark.parametrize("family", ["llama-tied", "qwen2-biased"])
def test_new_vocabulary_gets_fresh_embeddings_and_keeps_the_layers_close(family):
    model = decoder(family)
    model.config.unk_token_id = 3  # as a GGUF source's config has: an id in the old vocabulary
    tokenizer = T.new_tokenizer([TEXT], vocab_size=300)
    assert len(tokenizer) == 300 and tokenizer.eos_token == "<|endoftext|>"
    stream = np.asarray(tokenizer(TEXT)["input_ids"])
    windows = stream[:4 * 16].reshape(4, 16)
    child, details = T.replace_vocabulary(model, tokenizer, windows, seed=0, batch_size=2)
    assert details["vocab_size"] == 300 and details["steps"] == 2 and all(np.isfinite(details["losses"]))
    assert child.config.vocab_size == 300
    assert (child.config.bos_token_id, child.config.eos_token_id, child.config.pad_token_id,
            child.config.unk_token_id) == (0, 0, None, None)  # "<|endoftext|>" is both; the new vocabulary has no unk
    assert (child.lm_head.weight is child.model.embed_tokens.weight) == (family == "llama-tied")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        old, new = model.get_parameter(name).detach(), child.get_parameter(name).detach()
        assert new.shape == (300, SIZES["hidden_size"])
        assert float(new.std() / old.std()) == pytest.approx(1, abs=0.05)
        r = float(torch.corrcoef(torch.stack([new[:128].reshape(-1), old.reshape(-1)]))[0, 1])
        assert abs(r) < 0.1, f"{name}: the new rows correlate with the old (r = {r:.2f})"
    for (name, old), new in zip(model.model.layers.named_parameters(), child.model.layers.parameters(), strict=True):
        drift = float((new - old).detach().norm() / old.detach().norm())
        assert 0 < drift < 0.05, f"{name}: relative change {drift:.4f}"
    assert logits(child, torch.as_tensor(windows)).shape == (4, 16, 300)
    again, _ = T.replace_vocabulary(model, tokenizer, windows, seed=0, batch_size=2)
    assert all(torch.equal(a, b) for a, b in zip(child.parameters(), again.parameters(), strict=True))


def test_new_tokenizer_keeps_the_special_tokens_of_the_one_it_replaces():
    old = T.new_tokenizer([TEXT], vocab_size=280)
    new = T.new_tokenizer([TEXT.upper()], vocab_size=300, like=old)
    assert new.eos_token == old.eos_token and new.bos_token == old.bos_token
    assert new.convert_ids_to_tokens(new(TEXT.upper()[:20])["input_ids"]) != \
        old.convert_ids_to_tokens(old(TEXT.upper()[:20])["input_ids"])
    with pytest.raises(ForensicsError, match="256 bytes"):
        T.new_tokenizer([TEXT], vocab_size=200)


def test_noise_is_relative_to_each_tensors_std_and_seeded():
    model = decoder()
    scale = 0.05
    child, _ = T.add_noise(model, seed=4, scale=scale)
    z = []
    for (name, old), new in zip(model.named_parameters(), child.parameters(), strict=True):
        old, delta = old.detach(), (new - old).detach()
        if old.ndim == 2:
            assert float(delta.std() / old.std()) == pytest.approx(scale, rel=0.05), name
        z.append((delta / (scale * old.std())).reshape(-1))
    z = torch.cat(z)
    assert float(z.std()) == pytest.approx(1, abs=0.02) and abs(float(z.mean())) < 0.02
    again, _ = T.add_noise(model, seed=4, scale=scale)
    other, _ = T.add_noise(model, seed=5, scale=scale)
    for a, b, c in zip(child.parameters(), again.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("bits,granularity", [(8, "row"), (8, "block"), (4, "row"), (4, "block")])
def test_requantised_weights_lie_on_the_grid_within_half_a_step(bits, granularity):
    model = decoder()
    child, details = T.requantise(model, bits=bits, granularity=granularity, block_size=32)
    levels = 2 ** (bits - 1) - 1
    checked = 0
    for (name, old), new in zip(model.named_parameters(), child.parameters(), strict=True):
        if old.ndim != 2:
            assert torch.equal(old, new), f"{name}: norms stay float"
            continue
        width = old.shape[1] if granularity == "row" else 32
        o, n = old.detach().reshape(-1, width), new.detach().reshape(-1, width)
        step = o.abs().amax(1, keepdim=True) / levels
        assert ((n - o).abs() <= step / 2 + 1e-6).all(), name
        zero = step[:, 0] == 0  # e.g. the padding token's embedding
        assert (n[zero] == 0).all()
        q = n[~zero] / step[~zero]
        assert torch.allclose(q, q.round(), atol=1e-3), f"{name}: not integer multiples of the step"
        assert int(q.round().abs().max()) <= levels
        assert not torch.equal(old, new)
        checked += 1
    assert checked == details["matrices"] == 1 + 7 * SIZES["num_hidden_layers"]  # tied embedding counted once


def test_requantise_rejects_settings_it_cannot_honour():
    model = decoder()
    with pytest.raises(ForensicsError, match="bits"):
        T.requantise(model, bits=3)
    with pytest.raises(ForensicsError, match="multiple of the block size"):
        T.requantise(model, granularity="block", block_size=48)


def test_pruned_model_keeps_the_other_layers_exactly():
    model = decoder("llama-untied")
    child, details = T.prune_layers(model, drop=[2, 1])
    assert details["kept"] == [0, 3]
    assert child.config.num_hidden_layers == 2 and len(child.model.layers) == 2
    for new, old in ((0, 0), (1, 3)):
        a, b = layer(child, new).state_dict(), layer(model, old).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(child.get_parameter(name), model.get_parameter(name))
    assert logits(child, batch()).shape == (3, 16, SIZES["vocab_size"])
    assert model.config.num_hidden_layers == 4


@pytest.mark.parametrize("drop,problem", [([4], "no layer 4"), ([0, 1, 2, 3], "at most 3"), ([], "at least one")])
def test_prune_rejects_impossible_layer_sets(drop, problem):
    with pytest.raises(ForensicsError, match=problem):
        T.prune_layers(decoder(), drop=drop)


@pytest.mark.parametrize("arch,family", [("mixtral", "llama-tied"), ("mixtral", "llama-untied"),
                                         ("qwen2_moe", "llama-tied"), ("qwen2_moe", "qwen2-biased")])
def test_noiseless_upcycling_computes_the_dense_model(arch, family):
    model = decoder(family)
    child, _ = T.upcycle(model, seed=0, arch=arch, experts=4, top_k=2, noise=0.0)
    assert child.config.model_type == arch
    torch.testing.assert_close(logits(child, batch()), logits(model, batch()), atol=1e-4, rtol=0)


def test_upcycled_experts_are_the_dense_ffn_plus_noise_of_the_asked_level():
    model = decoder()
    noise = 0.05
    child, _ = T.upcycle(model, seed=0, experts=4, noise=noise, router_std=0.02)
    inter = SIZES["intermediate_size"]
    for i in range(SIZES["num_hidden_layers"]):
        dense, moe = layer(model, i).mlp, layer(child, i).mlp
        gate_up, down = moe.experts.gate_up_proj.detach(), moe.experts.down_proj.detach()
        assert gate_up.shape[0] == 4 and moe.gate.weight.shape == (4, SIZES["hidden_size"])
        assert float(moe.gate.weight.detach().std()) == pytest.approx(0.02, rel=0.15)
        for e in range(4):
            for got, want in ((gate_up[e, :inter], dense.gate_proj.weight), (gate_up[e, inter:], dense.up_proj.weight),
                              (down[e], dense.down_proj.weight)):
                rel = float((got - want.detach()).std() / want.detach().std())
                assert rel == pytest.approx(noise, rel=0.1)
        assert not torch.equal(gate_up[0], gate_up[1])
    assert torch.isfinite(logits(child, batch())).all()


def test_upcycling_rejects_what_the_target_cannot_hold():
    with pytest.raises(ForensicsError, match="qwen2_moe"):
        T.upcycle(decoder("qwen2-biased"), seed=0, arch="mixtral")
    with pytest.raises(ForensicsError, match="top_k"):
        T.upcycle(decoder(), seed=0, experts=2, top_k=3)


def test_continued_pretraining_learns_is_seeded_and_leaves_the_global_rng_alone():
    model = decoder()
    windows = np.tile(batch(2)[:2].numpy(), (4, 1))  # the same two sequences four times: loss must fall
    state = torch.random.get_rng_state()
    child, details = T.continue_pretraining(model, windows, seed=0, batch_size=2, lr=3e-3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert details["steps"] == 4 and details["losses"][-1] < details["losses"][0]
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), child.parameters(), strict=True))
    again, _ = T.continue_pretraining(model, windows, seed=0, batch_size=2, lr=3e-3)
    assert all(torch.equal(a, b) for a, b in zip(child.parameters(), again.parameters(), strict=True))
    assert not child.training


def test_training_rejects_tokens_outside_the_vocabulary():
    with pytest.raises(ForensicsError, match="vocabulary"):
        T.continue_pretraining(decoder(), np.full((2, 8), 500), seed=0)


def test_transforms_refuse_architectures_whose_symmetries_differ():
    gemma = transformers.AutoModelForCausalLM.from_config(transformers.GemmaConfig(**SIZES, head_dim=16))
    for fn in (T.permute_heads, T.permute_neurons, T.rescale_qk, T.rescale_vo, T.rescale_updown, T.rescale_norm,
               T.upcycle, T.rotate_residual, T.prune_width):
        with pytest.raises(ForensicsError, match="gemma"):
            fn(gemma, seed=0)
    with pytest.raises(ForensicsError, match="gemma"):
        T.prune_layers(gemma, drop=[0])


def test_requantise_composes_with_upcycling():
    moe, _ = T.upcycle(decoder(), seed=0)
    child, details = T.requantise(moe, bits=8, granularity="row")
    experts = layer(child, 0).mlp.experts.gate_up_proj.detach()
    step = experts.abs().amax(-1, keepdim=True) / 127
    assert torch.allclose(experts / step, (experts / step).round(), atol=1e-3)
    assert details["matrices"] == 1 + 7 * SIZES["num_hidden_layers"]  # q k v o, router, gate_up, down
