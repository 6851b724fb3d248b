"""A model's token strings, in a spelling that different tokenizer families share.

Neuron matching aligns two residual streams through the embedding rows of the tokens both vocabularies hold, so it
needs each vocabulary as text. Tokenizers spell the same text differently: GPT-2 style byte-level BPE writes a leading
space as "Ġ" (through its byte-to-unicode table), SentencePiece as "▁", WordPiece marks the *continuation* of a word
with "##" instead. `vocabulary` undoes each spelling, so "Ġthe", "▁the" and WordPiece's "the" all read " the".

These are small side files (or a file's header) read directly: their SHA-256 is already in the fingerprint, and
nothing here feeds a statistic other than the choice of which embedding rows to compare.
"""

from __future__ import annotations

import json
import os
import struct
from functools import lru_cache
from pathlib import Path

from forensics.errors import ForensicsError
from forensics.files import model_root, open_regular


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes stand for themselves, the rest are shifted past 255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, shift = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shift)] = b
            shift += 1
    return chars


def canonical(token: str, spelling: str) -> str | None:
    """The text a token stands for; None for tokens with no text of their own (byte fallbacks, undecodable bytes)."""
    if spelling == "byte_level":
        table = byte_level_alphabet()
        try:
            return bytes(table[c] for c in token).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            return None
    if spelling == "sentencepiece":
        if token.startswith("<0x") and token.endswith(">"):
            return None
        return token.replace("▁", " ")
    if spelling == "wordpiece":
        if token.startswith("##"):
            return token[2:]
        if token.startswith("[") and token.endswith("]"):
            return token
        return " " + token
    return token


def spellings(vocab: list[str], spelling: str) -> dict[str, int]:
    """Text -> id for every text the vocabulary spells exactly one way (no empty text, no text twice)."""
    seen: dict[str, int] = {}
    twice = set()
    for i, tok in enumerate(vocab):
        text = canonical(tok, spelling)
        if text is None or text == "":
            continue
        if text in seen:
            twice.add(text)
        seen[text] = i
    return {t: i for t, i in seen.items() if t not in twice}


def shared_tokens(a: list[str] | None, b: list[str] | None, spelling_a: str, spelling_b: str) -> list[tuple[int, int]]:
    """(id in a, id in b) for every text both vocabularies spell exactly one way, sorted by the text."""
    if not a or not b:
        return []
    ia, ib = spellings(a, spelling_a), spellings(b, spelling_b)
    return [(ia[t], ib[t]) for t in sorted(ia.keys() & ib.keys())]


def vocabulary(path: Path) -> tuple[list[str] | None, str]:
    """(token strings by id, spelling) of the model at `path`; (None, "") when the model ships no vocabulary."""
    from forensics.sources import detect

    path = Path(path)
    fmt = detect(path)
    if fmt == "hf":
        root = model_root(path)
        if (path / "tokenizer.json").exists():
            return _tokenizer_json(path / "tokenizer.json", root)
        if (path / "vocab.txt").exists():
            return _text(path / "vocab.txt", root).splitlines(), "wordpiece"
        return None, ""
    return {"gguf": _gguf, "e5s1": _e5s1}.get(fmt, lambda _: (None, ""))(path)


def _text(path: Path, root: Path) -> str:
    """A side file of the model directory as text, through the same checks as every file a reader opens."""
    with open_regular(path, root) as f:
        raw = f.readall()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ForensicsError(path, f"not UTF-8 text: {e}") from e


def _tokenizer_json(path: Path, root: Path) -> tuple[list[str], str]:
    try:
        tok = json.loads(_text(path, root))
        model = tok["model"]
        vocab = model["vocab"]
    except (ValueError, KeyError, TypeError) as e:
        raise ForensicsError(path, f"not a readable tokenizer.json: {e}") from e
    if isinstance(vocab, dict):
        tokens = [""] * (max(vocab.values(), default=-1) + 1)
        for text, i in vocab.items():
            tokens[i] = text
    else:  # Unigram: [[piece, score], ...]
        tokens = [entry[0] for entry in vocab]
    for added in tok.get("added_tokens") or []:
        i = added.get("id")
        if isinstance(i, int) and 0 <= i < len(tokens):
            tokens[i] = added.get("content", tokens[i])
    if model.get("type") == "WordPiece":
        return tokens, "wordpiece"
    described = json.dumps([tok.get("pre_tokenizer"), tok.get("decoder")])
    if "ByteLevel" in described:
        return tokens, "byte_level"
    return tokens, "sentencepiece"


def _gguf(path: Path) -> tuple[list[str] | None, str]:
    from forensics.sources.gguf import read_header

    meta, _ = read_header(path, keep=frozenset({"tokenizer.ggml.tokens"}))
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        return None, ""
    # llama.cpp writes WordPiece vocabularies with SentencePiece's "▁" for word starts, and GPT-2's as they are.
    return tokens, "byte_level" if meta.get("tokenizer.ggml.model") == "gpt2" else "sentencepiece"


def _e5s1(path: Path) -> tuple[list[str], str]:
    """The tokenizer block after E5S1's fixed header (layout in forensics/sources/e5s1.py)."""
    from forensics.sources.e5s1 import HEADER, TOKENIZER

    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            f.seek(HEADER.size)
            pieces, *_, blob = TOKENIZER.unpack(f.read(TOKENIZER.size))
            if not 0 <= pieces <= size or blob > size:
                raise ForensicsError(path, f"corrupt E5S1 tokenizer block: {pieces} pieces in {blob} bytes, "
                                           f"in a file of {size}")
            offsets = struct.unpack(f"<{pieces + 1}I", f.read((pieces + 1) * 4))
            f.seek(pieces * 4, 1)  # scores
            data = f.read(blob)
        except struct.error as e:  # a count that does not fit the file
            raise ForensicsError(path, f"corrupt or truncated E5S1 tokenizer block: {e}") from e
    if len(data) != blob or offsets[-1] > blob:
        raise ForensicsError(path, "corrupt or truncated E5S1 tokenizer block")
    return [data[offsets[i]:offsets[i + 1]].decode("utf-8", errors="replace") for i in range(pieces)], "sentencepiece"
