"""The embedded corpus, analysts' corpus files in every supported format, and seeded token windows."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers
import zstandard
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from forensics import corpus as corpus_module
from forensics.corpus import load_corpus
from forensics.errors import ForensicsError

DOCS = [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(20 + 13 * i)) for i in range(12)]


def byte_bpe(texts, vocab_size: int = 300, bos: bool = False) -> transformers.PreTrainedTokenizerFast:
    """A real byte-level BPE (GPT-2 style) trained on `texts`; with `bos`, it puts <s> before every text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                bos_token="<s>" if bos else None)


@pytest.fixture(scope="module")
def embedded():
    return load_corpus(show_progress=False)


@pytest.fixture(scope="module")
def tokenizer(embedded):
    return byte_bpe(embedded.texts[:40])


def write_jsonl(path, records, compress=False):
    raw = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(raw) if compress else raw)
    return path


def test_embedded_corpus_matches_its_manifest_and_sources(embedded):
    manifest = json.loads(corpus_module.MANIFEST.read_text())
    assert embedded.id == f"embedded:{manifest['id']}"
    assert len(embedded) == sum(f["documents"] for f in manifest["files"])
    for entry in manifest["files"]:
        data = (corpus_module.EMBEDDED_DIR / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["size"] < 5 << 20  # git-tracked files stay under 5 MB each
    listing = "".join(f"{f['sha256']}  {f['path']}\n" for f in manifest["files"])
    assert embedded.sha256 == hashlib.sha256(listing.encode()).hexdigest()
    sources = (corpus_module.EMBEDDED_DIR / "SOURCES.md").read_text()
    for entry in manifest["files"]:
        assert entry["sha256"] in sources and entry["debian_package"] in sources
    texts = embedded.texts
    assert all(isinstance(t, str) and t.strip() for t in texts)
    assert any("Elizabeth" in t for t in texts) and any(":hacker:" in t for t in texts)


def test_altered_embedded_corpus_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "corpus"
    shutil.copytree(corpus_module.EMBEDDED_DIR, copy)
    victim = copy / "jargon.jsonl.zst"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    monkeypatch.setattr(corpus_module, "EMBEDDED_DIR", copy)
    monkeypatch.setattr(corpus_module, "MANIFEST", copy / "manifest.json")
    with pytest.raises(ForensicsError, match="jargon.jsonl.zst: SHA-256 is [0-9a-f]{64} but the manifest records"):
        load_corpus(cache_dir=tmp_path / "cache", show_progress=False)


def test_every_format_gives_the_same_documents_and_hashes_the_file(tmp_path):
    records = [{"text": t, "meta": {"n": i}} for i, t in enumerate(DOCS)]
    files = {
        "c.jsonl": write_jsonl(tmp_path / "c.jsonl", records),
        "c.jsonl.zst": write_jsonl(tmp_path / "c.jsonl.zst", records, compress=True),
    }
    pq.write_table(pa.table({"text": DOCS, "n": list(range(len(DOCS)))}), tmp_path / "c.parquet")
    files["c.parquet"] = tmp_path / "c.parquet"
    for name, path in files.items():
        c = load_corpus(path, cache_dir=tmp_path / "cache", show_progress=False)
        assert list(c.texts) == DOCS, name
        assert c.id == f"file:{name}"
        assert c.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert c.describe()["files"] == [{"path": name, "size": path.stat().st_size, "sha256": c.sha256}]


def test_txt_is_one_document_and_another_field_can_be_named(tmp_path):
    txt = tmp_path / "book.txt"
    txt.write_text("\n\n".join(DOCS) + "\n")
    assert list(load_corpus(txt, cache_dir=tmp_path / "cache", show_progress=False).texts) == [txt.read_text()]
    body = write_jsonl(tmp_path / "body.jsonl", [{"body": t} for t in DOCS])
    c = load_corpus(body, text_field="body", cache_dir=tmp_path / "cache", show_progress=False)
    assert list(c.texts) == DOCS and c.text_field == "body"


def bad_files(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": t} for t in DOCS]).read_bytes()
    squeezed = zstandard.ZstdCompressor().compress(good)
    cases = {
        "empty.jsonl": (b"", "empty file"),
        "blank.jsonl": (b"\n\n  \n", "empty: no documents"),
        "empty.txt": (b"", "empty file"),
        "binary.jsonl": (bytes(range(256)) * 8, "binary data"),
        "latin1.txt": ("caf\u00e9 cr\u00e8me".encode("latin-1"), "not UTF-8"),
        "binary.jsonl.zst": (zstandard.ZstdCompressor().compress(bytes(range(256)) * 8), "binary data"),
        "fieldless.jsonl": (b'{"body": "a"}\n{"body": "b"}\n', "no 'text' field in record 1 \\(fields: body\\)"),
        "numbers.jsonl": (b'{"text": 1}\n{"text": 2}\n', "field 'text' holds int64, not text"),
        "prose.jsonl": (b"just some prose\n", "not JSON Lines"),
        "broken.jsonl": (b'{"text": "a"\n', "record 1 is not valid JSON"),
        "plain.jsonl.zst": (good, "not zstd-compressed"),
        "truncated.jsonl.zst": (squeezed[: len(squeezed) // 2], "truncated"),
        "fake.parquet": (good, "not a Parquet file"),
        "corpus.csv": (b"text\nhello\n", "unsupported corpus file type"),
    }
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "fieldless.parquet")
    cases["fieldless.parquet"] = (None, "no 'text' field \\(fields: body\\)")
    return cases


def test_bad_corpus_files_give_one_clear_error_naming_the_file(tmp_path):
    for name, (_, problem) in bad_files(tmp_path).items():
        with pytest.raises(ForensicsError, match=f"^{tmp_path / name}: .*{problem}") as e:
            load_corpus(tmp_path / name, cache_dir=tmp_path / "cache", show_progress=False)
        assert e.value.path == str(tmp_path / name)
    with pytest.raises(ForensicsError, match="no such file"):
        load_corpus(tmp_path / "absent.jsonl", show_progress=False)
    with pytest.raises(ForensicsError, match="not a file"):
        load_corpus(tmp_path, show_progress=False)


def body_stream(windows, n_prefix):
    return np.concatenate([w[n_prefix:] for w in windows.ids])


def test_windows_are_seeded_deterministic_and_hashed(embedded, tokenizer):
    a = embedded.sample_windows(tokenizer, num_windows=6, seq_len=40, seed=3, show_progress=False)
    b = embedded.sample_windows(tokenizer, num_windows=6, seq_len=40, seed=3, show_progress=False)
    c = embedded.sample_windows(tokenizer, num_windows=6, seq_len=40, seed=4, show_progress=False)
    assert a.ids.shape == (6, 40) and a.ids.dtype == np.int64
    assert np.array_equal(a.ids, b.ids) and a.sha256 == b.sha256
    assert not np.array_equal(a.ids, c.ids) and a.sha256 != c.sha256
    assert a.sha256 == hashlib.sha256(a.ids.astype("<i8").tobytes()).hexdigest()
    assert not a.overlapping and a.separator == tokenizer.eos_token_id and a.prefix == ()
    head, tail = a.split(2)
    assert np.array_equal(np.concatenate([head.ids, tail.ids]), a.ids) and head.count == 2 and tail.count == 4
    assert head.sha256 == hashlib.sha256(a.ids[:2].astype("<i8").tobytes()).hexdigest()


def test_windows_cut_whole_documents_in_order_joined_by_eos(tmp_path):
    tok = byte_bpe(DOCS, bos=True)
    c = load_corpus(write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in DOCS]), cache_dir=tmp_path / "cache",
                    show_progress=False)
    whole = {tuple(tok(t, add_special_tokens=False)["input_ids"]) for t in DOCS}
    w = c.sample_windows(tok, num_windows=70, seq_len=30, seed=1, show_progress=False)
    assert not w.overlapping
    bos = tok.convert_tokens_to_ids("<s>")
    assert w.prefix == (bos,) and all(row[0] == bos for row in w.ids)
    pieces = body_stream(w, 1).tolist()
    docs = []
    for t in pieces:
        if t == tok.eos_token_id:
            docs.append([])
        elif docs:
            docs[-1].append(t)
    # every document between two separators is a whole document of the corpus, each at most once
    full = [tuple(d) for d in docs[:-1]]
    assert len(full) >= 2 and set(full) <= whole and len(set(full)) == len(full)


def test_a_corpus_shorter_than_asked_gives_overlapping_windows_from_its_stream(tmp_path):
    tok = byte_bpe(DOCS)
    c = load_corpus(write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in DOCS[:3]]), cache_dir=tmp_path / "cache",
                    show_progress=False)
    w = c.sample_windows(tok, num_windows=50, seq_len=24, seed=0, show_progress=False)
    assert w.overlapping and w.documents == 3 and w.ids.shape == (50, 24)
    stream_docs = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in DOCS[:3]]
    assert w.stream_tokens == sum(map(len, stream_docs))
    streams = {tuple(sum((stream_docs[i] for i in order), [])) for order in
               [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]}
    for row in w.ids.tolist():
        assert any(_contains(s, row) for s in streams)
    with pytest.raises(ForensicsError, match="too small"):
        c.sample_windows(tok, num_windows=1, seq_len=w.stream_tokens + 1, seed=0, show_progress=False)


def _contains(seq: tuple, sub: list) -> bool:
    n = len(sub)
    return any(list(seq[i:i + n]) == sub for i in range(len(seq) - n + 1))
