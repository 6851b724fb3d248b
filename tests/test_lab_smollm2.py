"""The lab's symmetries on the real SmolLM2-135M GGUF (`make models`; `make test-slow`): GQA with 3 groups of 3, RoPE
in transformers' layout after the loader undoes llama.cpp's Q/K permutation, and tied embeddings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from forensics.lab import transforms as T
from forensics.lab.io import load_source

SMOLLM2 = Path(__file__).resolve().parents[1] / "models" / "E-smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source():
    if not SMOLLM2.exists():
        pytest.skip(f"{SMOLLM2} is absent: run `make models` first")
    return load_source(SMOLLM2)


@pytest.fixture(scope="module")
def reference(source):
    ids = source.tokenizer(["The capital of France is Paris, and the capital of Italy is",
                            "def fibonacci(n):\n    return n if n < 2 else"], return_tensors="pt",
                           padding=True).input_ids
    with torch.no_grad():
        return ids, source.model(input_ids=ids).logits


@pytest.mark.parametrize("make", [
    lambda m: T.permute_heads(m, seed=0), lambda m: T.permute_neurons(m, seed=0),
    lambda m: T.rescale_qk(m, seed=0, granularity="pair"), lambda m: T.rescale_vo(m, seed=0),
    lambda m: T.rescale_updown(m, seed=0), lambda m: T.rescale_norm(m, seed=0),
    lambda m: T.upcycle(m, seed=0, noise=0.0), lambda m: T.rotate_residual(m, seed=0),
], ids=["permute-heads", "permute-neurons", "rescale-qk-pair", "rescale-vo", "rescale-updown", "rescale-norm",
        "upcycle-noiseless", "rotate-residual"])
def test_output_preserving_transforms_keep_smollm2s_logits(source, reference, make):
    ids, want = reference
    child, _ = make(source.model)
    with torch.no_grad():
        got = child(input_ids=ids).logits
    # float32 rounding of ~1e-7 per weight, through 30 layers, on logits of magnitude ~20
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    assert got.argmax(-1).equal(want.argmax(-1))
