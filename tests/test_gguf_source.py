"""GGUF copies of a tiny Llama, written with the gguf package's own writer and quantisers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from forensics.fingerprint import fingerprint_model
from forensics.sources.gguf import unpermute
from tests import tiny
from tests.tiny import llama_cpp_permute

def write_gguf(model, path, qtype: Q = Q.F32) -> None:
    tiny.write_llama_gguf(model, path, None if qtype == Q.F32 else qtype)


def llama(hidden=32, inter=64):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_f32_gguf_equals_safetensors_and_qk_permutation_is_undone(tmp_path):
    model = tiny.build_model("llama")
    st = tiny.save(model, tmp_path / "st")
    write_gguf(model, tmp_path / "m.gguf")
    a = fingerprint_model(st, device="cpu")["signals"]
    b = fingerprint_model(tmp_path / "m.gguf", device="cpu")["signals"]
    for signal in ("q", "k", "v", "o", "gate", "up", "down", "attn_norm", "mlp_norm"):
        assert b[signal]["values"] == pytest.approx(a[signal]["values"], rel=1e-12), signal


def test_unpermute_inverts_llama_cpp_and_std_ignores_row_order():
    w = np.random.default_rng(0).standard_normal((32, 16))
    permuted = llama_cpp_permute(w, 4)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(unpermute(permuted, 4), w)
    # Why the std curve does not depend on it: a row permutation keeps the multiset of elements.
    assert float(permuted.std()) == pytest.approx(float(w.std()), rel=1e-14)


# gguf-py cannot write K-quants (its quantiser stops at the legacy types); they are read in the slow tests on the
# real Gemma3 file, which is mostly Q4_K / Q6_K.
@pytest.mark.parametrize("qtype,tolerance", [(Q.Q8_0, 0.01), (Q.Q4_0, 0.06), (Q.Q4_1, 0.06), (Q.Q5_0, 0.03)])
def test_quantised_gguf_within_quantisation_error(tmp_path, qtype, tolerance):
    model = llama(hidden=256, inter=512)
    st = tiny.save(model, tmp_path / "st")
    write_gguf(model, tmp_path / "q.gguf", qtype)
    a = fingerprint_model(st, device="cpu")["signals"]
    b = fingerprint_model(tmp_path / "q.gguf", device="cpu")["signals"]
    for signal in ("q", "k", "v", "o", "gate", "up", "down"):
        assert b[signal]["values"] == pytest.approx(a[signal]["values"], rel=tolerance), signal
        assert b[signal]["values"] != a[signal]["values"]  # it really is a lossy copy


def test_truncated_gguf_is_refused_with_its_name(tmp_path):
    from forensics.errors import ForensicsError
    write_gguf(tiny.build_model("llama"), tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ForensicsError) as e:
        fingerprint_model(tmp_path / "cut.gguf", device="cpu")
    assert "cut.gguf" in str(e.value)


def test_the_plain_reader_parses_what_gguf_parses_and_is_put_back(tmp_path):
    """transformers loads GGUF files through `plain_reader` (a faster view of the same mapping, a faster conversion of
    its metadata, done once): every field and every tensor reads the same as with gguf's own reader, every metadata
    value converts to the same Python value, and what it replaced is restored afterwards, also on an error."""
    import gguf

    from forensics.sources.gguf import _PlainReader, plain_reader

    path = tmp_path / "m.gguf"
    tiny.write_llama_gguf(tiny.build_model("llama"), path, Q.Q8_0,
                          vocab=lambda w: w.add_token_list([f"t{i}" for i in range(256)]))
    ours, theirs = _PlainReader(path), gguf.GGUFReader(path)
    assert list(ours.fields) == list(theirs.fields)
    for name, field in theirs.fields.items():
        assert ours.fields[name].contents() == field.contents(), name
    assert [(t.name, t.tensor_type, t.data.tobytes()) for t in ours.tensors] == \
        [(t.name, t.tensor_type, t.data.tobytes()) for t in theirs.tensors]
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    original, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    original_load, original_parse = hf_gguf.load_gguf_checkpoint, hf_gguf._gguf_parse_value
    metadata = original_load(str(path), return_tensors=False)
    values = {name: [original_parse(f.parts[i], f.types) for i in f.data] for name, f in theirs.fields.items()}
    with pytest.raises(RuntimeError), plain_reader():
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3)
        first = gguf.GGUFReader(path)
        assert isinstance(first, _PlainReader) and gguf.GGUFReader(str(path)) is first  # parsed once
        parse = hf_gguf._gguf_parse_value
        assert parse is not original_parse
        ours = {name: [parse(f.parts[i], f.types) for i in f.data] for name, f in theirs.fields.items()}
        assert ours == values and all(type(a) is type(b) for name in values for a, b in zip(values[name], ours[name]))
        # the config's and the tokenizer's look-ups get equal metadata, each its own copy
        a, b = (hf_gguf.load_gguf_checkpoint(str(path), return_tensors=False) for _ in range(2))
        assert a == b == metadata and a is not b and a["tokenizer"]["tokens"] is not b["tokenizer"]["tokens"]
        raise RuntimeError
    assert gguf.GGUFReader is original and gguf.get_tensor_name_map is original_map
    assert hf_gguf.load_gguf_checkpoint is original_load and hf_gguf._gguf_parse_value is original_parse


def _random_blocks(qtype: Q, n: int, seed: int) -> np.ndarray:
    """`n` blocks of random bytes (every pattern is a valid block of these types) with finite float16 scales."""
    from gguf import GGML_QUANT_SIZES

    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    scales = {Q.Q8_0: [0], Q.Q5_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 1], Q.Q4_K: [0, 1]}.get(qtype, [104])  # Q6_K: d last
    for k in scales:
        blocks[:, 2 * k:2 * k + 2] = rng.normal(0, 0.01, (n, 1)).astype(np.float16).view(np.uint8)
    return blocks


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K])
def test_block_codes_give_ggufs_values_and_their_exact_moments(qtype):
    """Our Q8_0 / Q5_0 / Q4_0 / Q4_1 decoders equal gguf's to the bit; the moments from scales and codes (no float32
    copy) equal float64 moments of gguf's decoded values (Q4_1 and K-quants: of the exact values, which float32
    decoding rounds, within 1e-9 of the std on these random blocks); a block with a NaN or infinite scale is decoded instead and its NaN
    and Inf counted as the decoded tensor's are."""
    from gguf import quants

    from forensics.signals.weights import moments
    from forensics.sources.base import Blocks
    from forensics.sources.gguf import SCALED_CODES, _block_decoder, _code_sums

    blocks = _random_blocks(qtype, 40_000, seed=int(qtype))
    as_read = blocks.copy()
    reference = getattr(quants, qtype.name).dequantize_blocks(blocks)
    decoded = _block_decoder(qtype)(blocks)
    if qtype in SCALED_CODES or qtype == Q.Q4_1:
        assert np.array_equal(decoded.view(np.uint32), reference.view(np.uint32))
    # The bytes stay as read (the pass may still be hashing them), a chunk of one block too.
    for i in (0, 5):
        assert np.array_equal(_block_decoder(qtype)(blocks[i:i + 1]), reference[i:i + 1])
        _code_sums(qtype)(blocks[i:i + 1])
    assert np.array_equal(blocks, as_read)
    per_block = reference.shape[1]
    got = moments(Blocks((reference.size,), blocks, per_block, _code_sums(qtype), _block_decoder(qtype)))
    values = reference.astype(np.float64).reshape(-1)
    assert got.n == values.size and (got.nan, got.inf) == (0, 0)
    tolerance = 1e-12 if qtype in SCALED_CODES else 1e-9
    assert got.mean == pytest.approx(values.mean(), abs=tolerance * values.std())
    assert got.std == pytest.approx(values.std(), rel=tolerance)
    scale = {Q.Q6_K: 208}.get(qtype, 0)
    blocks[7, scale:scale + 2] = np.array([np.inf], np.float16).view(np.uint8)
    blocks[30_000, scale:scale + 2] = np.array([np.nan], np.float16).view(np.uint8)
    with np.errstate(invalid="ignore"):
        reference = getattr(quants, qtype.name).dequantize_blocks(blocks)
    got = moments(Blocks((reference.size,), blocks, per_block, _code_sums(qtype), _block_decoder(qtype)))
    plain = moments(reference)
    assert (got.nan, got.inf) == (plain.nan, plain.inf) and got.nan > 0 and got.inf > 0
    assert got.std == pytest.approx(plain.std, rel=tolerance)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0, Q.Q4_0, Q.Q4_1])
def test_a_gguf_fingerprint_from_codes_equals_one_from_decoded_tensors(tmp_path, qtype):
    """The pass takes the moments of tensors that only moments need from their codes: the same std, to 1e-13, as
    the float64 moments of every tensor decoded whole."""
    from forensics.signals.weights import moments
    from forensics.sources import Reads, open_model

    path = tmp_path / "q.gguf"
    write_gguf(llama(hidden=256, inter=512), path, qtype)
    fp = fingerprint_model(path, device="cpu")["signals"]
    source = open_model(path, Reads(None))
    stds = {t.name: moments(t.load()).std for t in source.tensors() if t.load_blocks is not None}
    for signal, suffix in (("gate", "ffn_gate.weight"), ("up", "ffn_up.weight"), ("down", "ffn_down.weight")):
        assert fp[signal]["values"] == pytest.approx([stds[f"blk.{i}.{suffix}"] for i in range(3)], rel=1e-13)


@pytest.mark.parametrize("fmt", ["q5_0.gguf", "f32.gguf", "bf16-safetensors"])
def test_a_tensor_read_now_and_decoded_on_another_thread_equals_its_load(tmp_path, fmt):
    """The pass reads each tensor on its own thread and decodes it on the moments' one (`TensorRef.fetch`): every
    tensor decoded later, elsewhere and after the next ones were read, is bit for bit what `load()` gives, q and k
    of the GGUF back in Hugging Face's row order."""
    from concurrent.futures import ThreadPoolExecutor

    from forensics.sources import Reads, open_model

    model = llama(hidden=64, inter=128)
    if fmt.endswith("safetensors"):
        path = tiny.save(model.to(torch.bfloat16), tmp_path / "st")
    else:
        path = tmp_path / fmt
        write_gguf(model, path, Q.Q5_0 if fmt.startswith("q5_0") else Q.F32)
    loaded = {t.name: t.load() for t in open_model(path, Reads(None)).tensors()}
    fetched = [(t.name, t.fetch()) for t in open_model(path, Reads(None)).tensors()]
    with ThreadPoolExecutor(1) as pool:
        decoded = dict(zip([name for name, _ in fetched], pool.map(lambda item: item[1](), fetched)))
    assert decoded.keys() == loaded.keys()
    for name, tensor in loaded.items():
        assert decoded[name].dtype == tensor.dtype and np.array_equal(decoded[name], tensor, equal_nan=True), name
