"""The activation signal on real published models (`make models` puts them under models/; `make test-slow`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from forensics.corpus import load_corpus
from forensics.signals.activations import activation_signals
from tests.test_activations import direct

MODELS = Path(__file__).resolve().parents[1] / "models"
SMOLLM2 = MODELS / "E-smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = MODELS / "A-minilm-l6"
MINILM_ONNX = MODELS / "B-minilm-int8" / "model.onnx"
RUN = dict(batch_size=2, seq_len=64, num_batches=2, seed=0, device="cpu", show_progress=False)

pytestmark = pytest.mark.slow


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: run `make models` first")
    return path


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(show_progress=False)


@pytest.mark.parametrize("path, arch, layers", [(SMOLLM2, "llama", 30), (MINILM, "bert", 6)],
                         ids=["smollm2-135m-gguf", "minilm-l6"])
def test_real_model_norms_equal_direct_computation(path, arch, layers, corpus):
    signals = activation_signals(need(path), corpus, **RUN)
    windows, means, stds = direct(path, corpus, arch, RUN["batch_size"], RUN["seq_len"], RUN["num_batches"],
                                  RUN["seed"])
    assert len(signals["act_norm"]["values"]) == layers + 1
    assert signals["act_norm"]["windows"]["sha256"] == windows.sha256
    np.testing.assert_allclose(signals["act_norm"]["values"], means, rtol=1e-9)
    np.testing.assert_allclose(signals["act_norm_std"]["values"], stds, rtol=1e-9)


def test_onnx_copy_is_reported_unavailable(corpus):
    signals = activation_signals(need(MINILM_ONNX), corpus, **RUN)
    assert signals["act_norm"]["values"] == [] and "ONNX" in signals["act_norm"]["unavailable"]
