"""The activation-norm signal on tiny checkpoints written with the real libraries, against output_hidden_states."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch
import transformers
from onnx import TensorProto, helper
from safetensors.torch import load_file, save_file

from forensics.corpus import load_corpus
from forensics.errors import ForensicsError
from forensics.signals.activations import activation_signals
from tests import tiny
from tests.test_corpus import byte_bpe

RUN = dict(batch_size=2, seq_len=24, num_batches=3, device="cpu", show_progress=False)
# attribute of the base model holding its final norm, which output_hidden_states applies to the last entry
FINAL_NORM = {"llama": "norm", "gpt2": "ln_f", "bert": None}


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(show_progress=False)


@pytest.fixture(scope="module")
def tok(corpus):
    return byte_bpe(corpus.texts[:30])


def config(arch: str, vocab: int) -> transformers.PretrainedConfig:
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    if arch == "bert":
        return transformers.BertConfig(**{**tiny.ENCODER, "vocab_size": vocab, "max_position_embeddings": 32})
    return transformers.LlamaConfig(**{**tiny.SMALL, "vocab_size": vocab})


def write_model(arch: str, tokenizer, path):
    torch.manual_seed(0)
    auto = transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM
    model = auto.from_config(config(arch, len(tokenizer))).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory, corpus, tok):
    cache = {}

    def get(arch):
        if arch not in cache:
            # the encoder gets a tokenizer that puts a special token first, as BERT's puts [CLS]
            tokenizer = byte_bpe(corpus.texts[:30], bos=True) if arch == "bert" else tok
            cache[arch] = write_model(arch, tokenizer, tmp_path_factory.mktemp(arch))
        return cache[arch]
    return get


def direct(path, corpus, arch, batch_size, seq_len, num_batches, seed):
    """The oracle: norms of output_hidden_states in numpy float64, with the final norm taken out of the model."""
    root, kw = (path.parent, {"gguf_file": path.name}) if path.is_file() else (path, {})
    tokenizer = transformers.AutoTokenizer.from_pretrained(root, **kw)
    windows = corpus.sample_windows(tokenizer, num_windows=batch_size * num_batches, seq_len=seq_len, seed=seed,
                                    show_progress=False)
    model = transformers.AutoModel.from_pretrained(root, dtype=torch.float32, **kw).eval()
    if FINAL_NORM[arch]:
        setattr(model, FINAL_NORM[arch], torch.nn.Identity())
    norms = None
    with torch.no_grad():
        for batch in windows.batches(batch_size):
            hidden = model(torch.from_numpy(batch), output_hidden_states=True).hidden_states
            norms = norms or [[] for _ in hidden]
            for i, h in enumerate(hidden):
                norms[i].append(np.linalg.norm(h.numpy().astype(np.float64), axis=-1).ravel())
    flat = [np.concatenate(n) for n in norms]
    return windows, [float(np.mean(f)) for f in flat], [float(np.std(f)) for f in flat]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_per_layer_norms_equal_direct_computation_from_hidden_states(arch, saved, corpus):
    path = saved(arch)
    seq_len = 32 if arch == "bert" else RUN["seq_len"]
    signals = activation_signals(path, corpus, **{**RUN, "seq_len": seq_len, "seed": 5})
    windows, means, stds = direct(path, corpus, arch, RUN["batch_size"], seq_len, RUN["num_batches"], 5)
    mean, std = signals["act_norm"], signals["act_norm_std"]
    assert mean["kind"] == std["kind"] == "activation_norm" and "unavailable" not in mean
    assert len(mean["values"]) == len(std["values"]) == 3 + 1
    np.testing.assert_allclose(mean["values"], means, rtol=1e-9)
    np.testing.assert_allclose(std["values"], stds, rtol=1e-9)
    assert mean["windows"]["sha256"] == windows.sha256
    assert mean["windows"]["count"] == RUN["batch_size"] * RUN["num_batches"]
    assert mean["tokens"] == windows.count * seq_len
    assert mean["corpus"] == {"id": corpus.id, "sha256": corpus.sha256, "documents": len(corpus)}
    assert mean["dtype"] == "float32" and mean["device"] == "cpu"
    assert mean["settings"] == {"batch_size": 2, "seq_len": seq_len, "num_batches": 3, "seed": 5}
    json.dumps(signals, allow_nan=False)  # goes into the fingerprint JSON as it is


def test_last_value_is_the_residual_stream_before_the_final_norm(saved, corpus):
    path = saved("llama")
    signals = activation_signals(path, corpus, **{**RUN, "seed": 5})
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    windows = corpus.sample_windows(tokenizer, num_windows=6, seq_len=RUN["seq_len"], seed=5, show_progress=False)
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        normed = model(torch.from_numpy(windows.ids), output_hidden_states=True).hidden_states[-1]
    after_norm = float(np.linalg.norm(normed.numpy().astype(np.float64), axis=-1).mean())
    assert abs(signals["act_norm"]["values"][-1] - after_norm) > 1e-3 * after_norm


def test_encoder_sequence_cut_to_its_positions_and_recorded(saved, corpus):
    signals = activation_signals(saved("bert"), corpus, **{**RUN, "seq_len": 48})
    settings = signals["act_norm"]["settings"]
    assert settings["seq_len"] == 32 and settings["requested_seq_len"] == 48
    assert signals["act_norm"]["windows"]["seq_len"] == 32
    assert signals["act_norm"]["windows"]["prefix"] == [1]  # the <s> the tokenizer puts first, in every window


def test_same_seed_same_numbers_other_seed_other_windows(saved, corpus):
    path = saved("llama")
    a = activation_signals(path, corpus, **{**RUN, "seed": 11})
    b = activation_signals(path, corpus, **{**RUN, "seed": 11})
    c = activation_signals(path, corpus, **{**RUN, "seed": 12})
    assert a == b
    assert a["act_norm"]["windows"]["sha256"] != c["act_norm"]["windows"]["sha256"]
    assert a["act_norm"]["values"] != c["act_norm"]["values"]


def write_gguf_with_tokenizer(model_dir, path) -> None:
    """The checkpoint at `model_dir` as an F32 llama GGUF carrying its byte-level BPE tokenizer, as llama.cpp's
    converter writes them (Q and K rows permuted, tokens in the byte alphabet, merges as "a b")."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())

    def vocab(w) -> None:
        vocab = tokenizer["model"]["vocab"]
        tokens = sorted(vocab, key=vocab.get)
        special = {t["content"] for t in tokenizer["added_tokens"]}
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([3 if t in special else 1 for t in tokens])
        w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tokenizer["model"]["merges"]])
        w.add_eos_token_id(vocab["<|endoftext|>"])
        w.add_add_bos_token(False)

    tiny.write_llama_gguf(model, path, vocab=vocab)


def test_gguf_runs_through_transformers_and_matches_its_safetensors_source(saved, corpus, tmp_path):
    path = saved("llama")
    write_gguf_with_tokenizer(path, tmp_path / "m.gguf")
    from_gguf = activation_signals(tmp_path / "m.gguf", corpus, **RUN)
    from_st = activation_signals(path, corpus, **RUN)
    assert "unavailable" not in from_gguf["act_norm"]
    assert from_gguf["act_norm"]["windows"]["sha256"] == from_st["act_norm"]["windows"]["sha256"]
    for name in ("act_norm", "act_norm_std"):
        np.testing.assert_allclose(from_gguf[name]["values"], from_st[name]["values"], rtol=1e-5)


def onnx_file(path):
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), path)
    return path


def without_tokenizer(tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config("llama", 64))
    return tiny.save(model, tmp_path / "no-tokenizer")


def missing_weight(tmp_path, saved):
    out = tmp_path / "missing-weight"
    out.mkdir()
    for f in saved("llama").iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    tensors = load_file(out / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def encoder_decoder(tmp_path, tok):
    torch.manual_seed(0)
    model = transformers.T5Model(transformers.T5Config(vocab_size=len(tok), d_model=32, d_ff=64, num_layers=2,
                                                       num_heads=4, d_kv=8))
    model.save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    return tmp_path / "t5"


@pytest.mark.parametrize("case, reason", [
    ("onnx", "an ONNX graph: transformers cannot run it"),
    ("pangu", "transformers cannot build this architecture: .*PanguProMoE"),
    ("no config", "no config.json"),
    ("no tokenizer", "no usable tokenizer"),
    ("missing weight", "1 weight\\(s\\) missing from the checkpoint \\(first layers.1.mlp.up_proj.weight\\)"),
    ("encoder-decoder", "an encoder-decoder model \\(t5\\)"),
])
def test_a_model_that_cannot_run_is_reported_unavailable_with_its_reason(case, reason, tmp_path, saved, tok, corpus):
    path = {
        "onnx": lambda: onnx_file(tmp_path / "model.onnx"),
        "pangu": lambda: tiny.pangu_pro_moe(tmp_path / "pangu"),
        "no config": lambda: tmp_path,
        "no tokenizer": lambda: without_tokenizer(tmp_path),
        "missing weight": lambda: missing_weight(tmp_path, saved),
        "encoder-decoder": lambda: encoder_decoder(tmp_path, tok),
    }[case]()
    signals = activation_signals(path, corpus, **RUN)
    for name, statistic in (("act_norm", "mean"), ("act_norm_std", "std")):
        entry = signals[name]
        assert entry["kind"] == "activation_norm" and entry["statistic"] == statistic
        assert entry["values"] == []
        assert re.search(reason, entry["unavailable"]), entry["unavailable"]


def test_user_errors_name_the_file(tmp_path, tok, corpus):
    with pytest.raises(ForensicsError, match="no such file or directory"):
        activation_signals(tmp_path / "absent", corpus, **RUN)
    small = tiny.save(tiny.build_model("llama"), tmp_path / "vocab64")
    tok.save_pretrained(small)  # 300-token tokenizer, 64-row embedding
    with pytest.raises(ForensicsError, match=f"^{small}: the tokenizer gives token id \\d+ but the model's "
                                             f"embedding has 64 rows"):
        activation_signals(small, corpus, **RUN)


def write_sharded_qwen2(path, tokenizer):
    torch.manual_seed(3)
    cfg = transformers.Qwen2Config(**{**tiny.SMALL, "vocab_size": len(tokenizer)})
    transformers.AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(path, max_shard_size="100KB")
    tokenizer.save_pretrained(path)
    assert (path / "model.safetensors.index.json").is_file()
    return path


def write_bf16_llama(path, tokenizer):
    torch.manual_seed(4)
    cfg = transformers.LlamaConfig(**{**tiny.SMALL, "vocab_size": len(tokenizer)})
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("arch", ["llama", "llama-bf16", "qwen2-sharded", "bert"])
def test_layer_streamed_pass_gives_the_full_pass_curves(arch, saved, corpus, tok, tmp_path):
    """Each block read from the checkpoint when the pass reaches it: the same curves as the whole model loaded, to
    float32 rounding (the windows go through in one batch instead of several). A 16-bit checkpoint keeps its
    embedding as stored, its rows widened as looked up: exact, so the curves agree as closely."""
    path = {"qwen2-sharded": lambda: write_sharded_qwen2(tmp_path / "q", tok),
            "llama-bf16": lambda: write_bf16_llama(tmp_path / "b", tok)}.get(arch, lambda: saved(arch))()
    seq_len = 32 if arch == "bert" else RUN["seq_len"]
    run = {**RUN, "seq_len": seq_len, "seed": 2}
    full = activation_signals(path, corpus, **run, stream="never")
    streamed = activation_signals(path, corpus, **run, stream="always")
    assert streamed["act_norm"]["streamed"] and not full["act_norm"]["streamed"]
    for signal in ("act_norm", "act_norm_std"):
        np.testing.assert_allclose(streamed[signal]["values"], full[signal]["values"], rtol=1e-4)
    assert streamed["act_norm"]["windows"] == full["act_norm"]["windows"]


def test_layer_streaming_refuses_what_it_cannot_read(saved, corpus, tmp_path):
    gguf = tmp_path / "m.gguf"
    write_gguf_with_tokenizer(saved("llama"), gguf)
    signals = activation_signals(gguf, corpus, **RUN, stream="always")
    assert signals["act_norm"]["values"] == [] and "not GGUF" in signals["act_norm"]["unavailable"]
