"""`forensics lab ...` end to end on tiny real checkpoints: files written, recipe.json, determinism, make-set."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from forensics.errors import ForensicsError
from forensics.lab import cli
from forensics.lab.io import LABEL
from forensics.lab.recipes import TRANSFORMS, effective_params
from tests import tiny
from tests.test_lab import SIZES, batch, decoder, logits

TEXT = ("the cat sat on the mat . the dog ate the bone . a bird sang in the tree and the cat watched it . "
        "rain fell on the town , and the river rose over the old stone bridge . ") * 4


def lab(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="forensics")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["lab", *map(str, argv)])
    return args.func(args)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny Llama with a word-level tokenizer trained on TEXT, saved the way transformers saves models."""
    path = tmp_path_factory.mktemp("lab") / "source"
    decoder("llama-tied").save_pretrained(path)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    assert tok.get_vocab_size() <= SIZES["vocab_size"]
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TEXT)
    return path


def test_child_is_a_loadable_checkpoint_with_the_source_tokenizer_and_a_recipe(source, tmp_path):
    out = tmp_path / "child"
    assert lab("permute-heads", "--source", source, "--out", out, "--seed", 5) == 0
    child = transformers.AutoModelForCausalLM.from_pretrained(out)
    original = transformers.AutoModelForCausalLM.from_pretrained(source)
    torch.testing.assert_close(logits(child, batch()), logits(original, batch()), atol=1e-4, rtol=0)
    assert not torch.equal(child.model.layers[0].self_attn.q_proj.weight,
                           original.model.layers[0].self_attn.q_proj.weight)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["label"] == LABEL
    assert recipe["steps"] == [{"transform": "permute-heads", "params": {}, "seed": 5, "details": {}}]
    assert recipe["source"]["path"] == str(source) and recipe["source"]["format"] == "hf"
    listed = {f["path"]: f for f in recipe["source"]["files"]}
    on_disk = {str(p.relative_to(source)): p for p in source.rglob("*") if p.is_file()}
    assert listed.keys() == on_disk.keys()
    for name, path in on_disk.items():
        assert listed[name]["sha256"] == sha256(path) and listed[name]["size"] == path.stat().st_size
    assert "config.json" in listed and "model.safetensors" in listed


@pytest.mark.parametrize("argv", [["noise", "--scale", "0.02"], ["upcycle", "--experts", "3"], ["rescale-norm"],
                                  ["requantise", "--bits", "8"], ["rotate-residual"],
                                  ["prune-width", "--ffn-keep", "0.5", "--rule", "random"]])
def test_same_arguments_give_byte_identical_files_and_another_seed_does_not(source, tmp_path, argv):
    lab(*argv, "--source", source, "--out", tmp_path / "a", *(["--seed", 1] if argv[0] != "requantise" else []))
    lab(*argv, "--source", source, "--out", tmp_path / "b", *(["--seed", 1] if argv[0] != "requantise" else []))
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert a.keys() == b.keys() and {"config.json", "model.safetensors", "recipe.json"} <= a.keys()
    assert a == b
    if argv[0] != "requantise":
        lab(*argv, "--source", source, "--out", tmp_path / "c", "--seed", 2)
        assert files(tmp_path / "c")["model.safetensors"] != a["model.safetensors"]


def test_train_on_a_text_file_records_the_corpus_and_tokens_and_repeats_byte_for_byte(source, corpus, tmp_path):
    out = tmp_path / "trained"
    for where in (out, tmp_path / "again"):
        lab("train", "--source", source, "--out", where, "--corpus", corpus, "--steps", 3, "--seq-len", 12,
            "--lr", 1e-3)
    assert files(out) == files(tmp_path / "again")
    (entry,) = json.loads((out / "recipe.json").read_text())["steps"]
    assert entry["params"] == {"corpus": str(corpus), "steps": 3, "batch_size": 2, "seq_len": 12, "lr": 1e-3,
                               "weight_decay": 0.01, "max_grad_norm": 1.0}
    details = entry["details"]
    assert details["corpus"]["sha256"] == sha256(corpus)
    assert details["windows"]["count"] == 6 and details["windows"]["seq_len"] == 12
    assert len(details["losses"]) == 3 and all(np.isfinite(details["losses"]))
    child = transformers.AutoModelForCausalLM.from_pretrained(out)
    original = transformers.AutoModelForCausalLM.from_pretrained(source)
    assert not torch.equal(child.model.embed_tokens.weight, original.model.embed_tokens.weight)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_noiseless_upcycled_checkpoint_reloads_as_moe_and_computes_the_source(source, tmp_path, arch):
    lab("upcycle", "--source", source, "--out", tmp_path / "moe", "--arch", arch, "--noise", 0)
    child = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    original = transformers.AutoModelForCausalLM.from_pretrained(source)
    assert child.config.model_type == arch and child.config.tie_word_embeddings
    torch.testing.assert_close(logits(child, batch()), logits(original, batch()), atol=1e-4, rtol=0)


def test_rotated_and_width_pruned_checkpoints_reload_with_their_new_configs(source, tmp_path):
    original = transformers.AutoModelForCausalLM.from_pretrained(source)
    lab("rotate-residual", "--source", source, "--out", tmp_path / "rotated")
    rotated = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "rotated")
    assert not rotated.config.tie_word_embeddings and rotated.lm_head.weight is not rotated.model.embed_tokens.weight
    torch.testing.assert_close(logits(rotated, batch()), logits(original, batch()), atol=1e-4, rtol=0)
    lab("prune-width", "--source", source, "--out", tmp_path / "narrow", "--hidden-keep", 0.5, "--ffn-keep", 0.25,
        "--heads-keep", 0.5)
    narrow = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "narrow")
    assert (narrow.config.hidden_size, narrow.config.intermediate_size, narrow.config.num_attention_heads,
            narrow.config.num_key_value_heads, narrow.config.head_dim) == (32, 32, 2, 1, 16)
    assert torch.isfinite(logits(narrow, batch())).all()
    (entry,) = json.loads((tmp_path / "narrow" / "recipe.json").read_text())["steps"]
    assert entry["params"] == {"hidden_keep": 0.5, "ffn_keep": 0.25, "heads_keep": 0.5, "rule": "norm"}
    kept = entry["details"]["kept_hidden"]
    assert torch.equal(narrow.model.embed_tokens.weight, original.model.embed_tokens.weight[:, kept])
    assert len(entry["details"]["kept_ffn"]) == len(entry["details"]["kept_kv_heads"]) == SIZES["num_hidden_layers"]


def test_vocab_replaced_child_has_its_own_tokenizer_fresh_embeddings_and_near_source_layers(source, corpus, tmp_path):
    argv = ["--source", source, "--corpus", corpus, "--vocab-size", 300, "--steps", 2, "--seq-len", 16]
    lab("replace-vocabulary", *argv, "--out", tmp_path / "child")
    lab("replace-vocabulary", *argv, "--out", tmp_path / "again")
    out = tmp_path / "child"
    assert files(out) == files(tmp_path / "again")
    assert (out / "tokenizer.json").read_bytes() != (source / "tokenizer.json").read_bytes()
    new, old = transformers.AutoTokenizer.from_pretrained(out), transformers.AutoTokenizer.from_pretrained(source)
    child = transformers.AutoModelForCausalLM.from_pretrained(out)
    original = transformers.AutoModelForCausalLM.from_pretrained(source)
    assert len(new) == child.config.vocab_size == 300
    for role in ("bos", "eos", "pad", "unk"):  # the same special tokens, by spelling and role, at their new ids
        assert getattr(new, f"{role}_token") == getattr(old, f"{role}_token")
    config = child.config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (new.bos_token_id, new.eos_token_id,
                                                                               new.pad_token_id)
    text = "the river rose over the old stone bridge"
    assert new(text).input_ids != old(text).input_ids
    (entry,) = json.loads((out / "recipe.json").read_text())["steps"]
    assert entry["params"] == {"vocab_size": 300, "corpus": str(corpus), "steps": 2, "batch_size": 2, "seq_len": 16,
                               "lr": 1e-4, "weight_decay": 0.01, "max_grad_norm": 1.0}
    shared = sorted(new.get_vocab().keys() & old.get_vocab().keys())
    assert entry["details"]["tokenizer"]["shared_spellings"] == len(shared) and "cat" in shared
    assert entry["details"]["tokenizer"]["size"] == entry["details"]["vocab_size"] == 300
    # tokens spelled alike in both vocabularies have unrelated embeddings
    a = child.model.embed_tokens.weight[new.convert_tokens_to_ids(shared)].detach()
    b = original.model.embed_tokens.weight[old.convert_tokens_to_ids(shared)].detach()
    assert abs(float(torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1])) < 0.2
    for (name, p), q in zip(original.model.layers.named_parameters(), child.model.layers.parameters(), strict=True):
        assert float((q - p).detach().norm() / p.detach().norm()) < 0.05, name
    assert torch.isfinite(logits(child, torch.as_tensor([new(text).input_ids]))).all()


def test_a_child_of_a_child_carries_its_parents_recipe(source, tmp_path):
    lab("noise", "--source", source, "--out", tmp_path / "first")
    lab("prune", "--source", tmp_path / "first", "--out", tmp_path / "second", "--drop", "1-2")
    first = json.loads((tmp_path / "first" / "recipe.json").read_text())
    second = json.loads((tmp_path / "second" / "recipe.json").read_text())
    assert second["source"]["recipe"] == first
    assert second["steps"][0]["params"] == {"drop": [1, 2]}
    assert transformers.AutoConfig.from_pretrained(tmp_path / "second").num_hidden_layers == 2


def test_existing_output_needs_force_and_force_replaces_only_lab_children(source, tmp_path):
    out = tmp_path / "child"
    lab("noise", "--source", source, "--out", out, "--seed", 1)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ForensicsError, match="--force"):
        lab("noise", "--source", source, "--out", out, "--seed", 2)
    assert (out / "model.safetensors").read_bytes() == before
    lab("noise", "--source", source, "--out", out, "--seed", 2, "--force")
    assert (out / "model.safetensors").read_bytes() != before
    with pytest.raises(ForensicsError, match="not a lab child"):
        lab("noise", "--source", source, "--out", source, "--force")
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob(".*.partial-*")), \
        "a failed write left its temporary directory behind"


def test_bad_sources_name_the_path_and_the_problem(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "llama"}')
    decoder().save_pretrained(tmp_path / "corrupt")
    weights = tmp_path / "corrupt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for path, problem in ((tmp_path / "missing", "no such file"), (tmp_path / "notes.txt", ".gguf"),
                          (tmp_path / "empty", "no config.json"), (tmp_path / "broken", "cannot load"),
                          (tmp_path / "corrupt", "cannot load")):
        with pytest.raises(ForensicsError, match=problem) as e:
            lab("noise", "--source", path, "--out", tmp_path / "out")
        assert e.value.path == str(path)
    assert not (tmp_path / "out").exists()


def test_training_a_source_without_tokenizer_says_so(tmp_path, corpus):
    decoder().save_pretrained(tmp_path / "bare")
    with pytest.raises(ForensicsError, match="no tokenizer"):
        lab("train", "--source", tmp_path / "bare", "--out", tmp_path / "out", "--corpus", corpus)


def write_gguf(model, path: Path) -> None:
    """A float32 GGUF as convert_hf_to_gguf.py writes one (Q/K rows permuted), with a small GPT-2-style vocab."""

    def vocab(w) -> None:
        tokens = ["<unk>", "<s>", "</s>", *"abcdefghijklmnopqrstuvwxyz",
                  *("\u0120" + c for c in "abcdefghijklmnopqrstuvwxyz"), "\u0120", ".", ","]
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
        w.add_token_scores([0.0] * len(tokens))
        w.add_token_merges(["\u0120 t"])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)

    tiny.write_llama_gguf(model, path, vocab=vocab)


def test_gguf_source_is_dequantised_unpermuted_and_its_tokenizer_written_out(tmp_path, capfd):
    model = decoder("llama-tied")
    write_gguf(model, tmp_path / "tiny.gguf")
    out = tmp_path / "child"
    lab("rescale-qk", "--source", tmp_path / "tiny.gguf", "--out", out, "--granularity", "pair")
    assert "de-quantizing" not in capfd.readouterr().err  # transformers' GGUF loader's own bar stays quiet
    child = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    torch.testing.assert_close(logits(child, batch()), logits(model, batch()), atol=1e-4, rtol=0)
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["source"]["format"] == "gguf"
    assert recipe["source"]["files"] == [{"path": "tiny.gguf", "size": (tmp_path / "tiny.gguf").stat().st_size,
                                          "sha256": sha256(tmp_path / "tiny.gguf")}]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)  # the GGUF's vocabulary and its one merge, Ġ + t
    ids = tokenizer("a tact", add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["a", "Ġt", "a", "c", "t"]


def test_make_set_writes_every_child_and_keeps_those_up_to_date(source, corpus, tmp_path):
    out = tmp_path / "set"
    lab("make-set", "--source", source, "--out", out, "--train-steps", 2, "--corpus", corpus)
    names = {"trained", "upcycled", "pruned", "int4", "noised", "head-permuted", "neuron-permuted", "qk-rescaled",
             "vo-rescaled", "updown-rescaled", "norm-rescaled", "rotated", "width-pruned", "vocab-replaced"}
    assert {p.name for p in out.iterdir()} == names
    ids = batch()
    original = transformers.AutoModelForCausalLM.from_pretrained(source)
    for name in names:
        recipe = json.loads((out / name / "recipe.json").read_text())
        assert recipe["label"] == LABEL and recipe["source"]["path"] == str(source)
        child = transformers.AutoModelForCausalLM.from_pretrained(out / name)
        assert torch.isfinite(logits(child, ids)).all()
        if name.endswith(("permuted", "rescaled")) or name == "rotated":
            torch.testing.assert_close(logits(child, ids), logits(original, ids), atol=1e-4, rtol=0)
    assert transformers.AutoConfig.from_pretrained(out / "upcycled").model_type == "mixtral"
    assert transformers.AutoConfig.from_pretrained(out / "pruned").num_hidden_layers == 3
    narrow = transformers.AutoConfig.from_pretrained(out / "width-pruned")
    assert (narrow.hidden_size, narrow.intermediate_size) == (48, 96)
    vocab = json.loads((out / "vocab-replaced" / "recipe.json").read_text())["steps"][0]["details"]["vocab_size"]
    assert len(transformers.AutoTokenizer.from_pretrained(out / "vocab-replaced")) == vocab
    stamps = {name: (out / name / "model.safetensors").stat().st_mtime_ns for name in names}
    lab("make-set", "--source", source, "--out", out, "--train-steps", 2, "--corpus", corpus, "--only", "noised",
        "trained", "vocab-replaced")
    assert {name: (out / name / "model.safetensors").stat().st_mtime_ns for name in names} == stamps
    lab("make-set", "--source", source, "--out", out, "--only", "noised", "--seed", 3)
    assert (out / "noised" / "model.safetensors").stat().st_mtime_ns != stamps["noised"]
    with pytest.raises(ForensicsError, match="no lab child named nothing"):
        lab("make-set", "--source", source, "--out", out, "--only", "nothing")


def test_cli_defaults_are_the_transforms_own():
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    for name, (_, _, seeded) in cli.SUBCOMMANDS.items():
        assert seeded == TRANSFORMS[name][1], name
        extra = ["--drop", "1"] if name == "prune" else []
        args = parser.parse_args(["lab", name, "--source", "s", "--out", "o", *extra])
        given = {p: getattr(args, p) for p in args.lab_params}
        defaults = effective_params(name, {"drop": [1]} if name == "prune" else {})
        assert {k: defaults[k] for k in given} == given, name
    args = parser.parse_args(["lab", "make-set", "--source", "s", "--out", "o"])
    assert args.train_steps == effective_params("train", {})["steps"]


def test_layer_lists_parse_ranges_and_reject_nonsense():
    assert cli._layer_list("3,5,7-9") == [3, 5, 7, 8, 9]
    assert cli._layer_list(" 4 - 4 ") == [4]
    for bad in ("", "a", "3-", "3,,4", "9-7", "-2"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli._layer_list(bad)
