"""bench/device_check.py on the CPU with tiny settings: the script the GPU machine runs, end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers

from forensics.corpus import load_corpus
from tests.test_activations import config, write_gguf_with_tokenizer
from tests.test_corpus import byte_bpe

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "device_check.py"
TINY = ["--device", "cpu", "--batches", "2", "--batch-size", "2", "--seq-len", "16", "--ref-batches", "1"]


@pytest.fixture(scope="module")
def device_check():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = byte_bpe(load_corpus(show_progress=False).texts[:30])
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config("llama", len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run(device_check, argv, out):
    assert device_check.main([*argv, *TINY, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_speed_and_agreement_of_a_stored_model(device_check, model_dir, tmp_path, capsys):
    result = run(device_check, [str(model_dir)], tmp_path / "r.json")
    speed, agreement = result["speed"], result["agreement"]
    params = sum(p.numel() for p in transformers.AutoModel.from_pretrained(model_dir).parameters())
    assert speed["parameters"] == params and speed["tokens"] == 2 * 2 * 16
    assert speed["tokens_per_s"] > 0
    assert speed["achieved_tflops"] == pytest.approx(2 * params * speed["tokens_per_s"] / 1e12, rel=1e-2, abs=1e-3)
    # the CPU against itself, same weights and windows: the curves must agree exactly
    for name in ("act_norm", "act_norm_std"):
        assert agreement[name]["pearson_r"] == pytest.approx(1.0, abs=1e-12)
        assert agreement[name]["max_abs_dz"] == 0.0
    assert "tokens/s" in capsys.readouterr().out


def test_skeleton_of_a_gguf_and_random_weights(device_check, model_dir, tmp_path):
    write_gguf_with_tokenizer(model_dir, tmp_path / "m.gguf")
    skeleton = tmp_path / "skeleton"
    assert device_check.main([str(tmp_path / "m.gguf"), "--save-skeleton", str(skeleton)]) == 0
    assert (skeleton / "config.json").is_file() and not list(skeleton.glob("*.safetensors"))
    result = run(device_check, [str(skeleton), "--random-weights"], tmp_path / "r.json")
    assert result["speed"]["weights"] == "random (seeded)"
    assert result["agreement"]["act_norm"]["max_abs_dz"] == 0.0
