"""Text corpora for the activation signal: the embedded default, or an analyst's own file (e.g. the Pile test set).

Every corpus is read through `datasets` from local files named explicitly (never a hub name), after a pass of our own
that hashes the file and checks it is what it claims to be, so a bad file fails with one clear message instead of a
pyarrow traceback. Token windows are cut with each model's own tokenizer from a seeded order of the documents, and
their SHA-256 goes into the fingerprint so a dossier can cite exactly which tokens the model saw.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import forensics.settings  # noqa: F401,I001  (first: the offline switches, before datasets is imported)

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import zstandard  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn  # noqa: E402

from forensics.errors import ForensicsError  # noqa: E402

EMBEDDED_DIR = Path(__file__).with_name("corpus")
MANIFEST = EMBEDDED_DIR / "manifest.json"
# suffix -> datasets builder; the Pile's test set is a .jsonl.zst
FORMATS = {".jsonl.zst": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
HEAD_BYTES = 1 << 16
READ_CHUNK = 8 << 20
# Documents tokenised per call: doubling from a few, so a small request stops soon after its windows are full and a
# large one gets the fast tokenizer's batching.
FIRST_CHUNK, MAX_CHUNK = 8, 512

err = Console(stderr=True)


@dataclass(frozen=True)
class Windows:
    """`count` token windows of `seq_len` ids each, in the order they are fed to the model."""

    ids: np.ndarray  # int64, shape (count, seq_len)
    sha256: str  # of `ids` as little-endian int64, row-major
    seed: int
    prefix: tuple[int, ...]  # special tokens the tokenizer puts before text (BOS, [CLS]), repeated in every window
    separator: int | None  # put between documents in the token stream (EOS, else [SEP])
    overlapping: bool  # the corpus held fewer tokens than asked for, so windows start at random offsets
    documents: int  # documents tokenised
    stream_tokens: int  # tokens those documents gave, separators included

    @property
    def count(self) -> int:
        return int(self.ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[1])

    def split(self, count: int) -> tuple[Windows, Windows]:
        """The first `count` windows and the rest, each hashed anew."""
        head, tail = self.ids[:count], self.ids[count:]
        return replace(self, ids=head, sha256=_digest(head)), replace(self, ids=tail, sha256=_digest(tail))

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, self.count, batch_size):
            yield self.ids[start:start + batch_size]

    def describe(self) -> dict:
        return {"sha256": self.sha256, "count": self.count, "seq_len": self.seq_len, "seed": self.seed,
                "prefix": list(self.prefix), "separator": self.separator, "overlapping": self.overlapping,
                "documents": self.documents, "stream_tokens": self.stream_tokens}


@dataclass(frozen=True)
class Corpus:
    id: str
    sha256: str  # of the file; for several files, of their `sha256sum`-style listing (see docs/activations.md)
    files: tuple[dict, ...]  # {"path", "size", "sha256"} per file
    text_field: str
    dataset: datasets.Dataset

    @property
    def texts(self) -> Sequence[str]:
        return self.dataset[self.text_field]

    def __len__(self) -> int:
        return self.dataset.num_rows

    def describe(self) -> dict:
        return {"id": self.id, "sha256": self.sha256, "files": list(self.files), "documents": len(self),
                "text_field": self.text_field}

    def sample_windows(self, tokenizer, *, num_windows: int, seq_len: int, seed: int = 0,
                       show_progress: bool = True) -> Windows:
        """`num_windows` windows of `seq_len` tokens, a pure function of (corpus, tokenizer, sizes, seed).

        Documents are taken in a seeded random order, tokenised without special tokens and joined with the
        tokenizer's EOS (else SEP) into one stream, which is cut into consecutive windows; each window starts with
        the special tokens the tokenizer itself puts before a text (BOS, [CLS]). When the whole corpus is too short
        for that, windows start at seeded random offsets instead and overlap (recorded as `overlapping`).
        """
        if num_windows < 1 or seq_len < 1:
            raise ValueError(f"num_windows and seq_len must be positive, got {num_windows} and {seq_len}")
        prefix = _prefix(tokenizer)
        body = seq_len - len(prefix)
        if body < 1:
            raise ValueError(f"seq_len {seq_len} leaves no room after the tokenizer's prefix {prefix}")
        separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        need = num_windows * body
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self))
        pieces: list[np.ndarray] = []
        total = documents = 0
        with progress_bar(show_progress) as bar:
            task = bar.add_task("tokenising corpus", total=need)
            start, chunk = 0, FIRST_CHUNK
            while start < len(order):
                rows = order[start:start + chunk].tolist()
                start, chunk = start + chunk, min(2 * chunk, MAX_CHUNK)
                texts = self.dataset[rows][self.text_field]
                encoded = tokenizer([t or "" for t in texts], add_special_tokens=False, verbose=False)["input_ids"]
                for ids in encoded:
                    if not ids:
                        continue
                    documents += 1
                    pieces.append(np.asarray(ids if separator is None else [*ids, separator], dtype=np.int64))
                    total += len(pieces[-1])
                bar.update(task, completed=min(total, need))
                if total >= need:
                    break
        stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        if stream.size >= need:
            bodies, overlapping = stream[:need].reshape(num_windows, body), False
        elif stream.size >= body:
            starts = rng.integers(0, stream.size - body + 1, size=num_windows)
            bodies, overlapping = stream[starts[:, None] + np.arange(body)], True
        else:
            raise ForensicsError(self.id, f"too small: the whole corpus gives {stream.size} tokens with this "
                                          f"tokenizer, and one window needs {body}")
        ids = np.concatenate([np.broadcast_to(np.asarray(prefix, dtype=np.int64), (num_windows, len(prefix))),
                              bodies], axis=1)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        return Windows(ids, _digest(ids), seed, tuple(prefix), separator, overlapping, documents, int(stream.size))


def load_corpus(path: str | Path | None = None, *, text_field: str = "text", cache_dir: str | Path | None = None,
                show_progress: bool = True) -> Corpus:
    """The embedded corpus (`path` None) or a local .jsonl, .jsonl.zst, .parquet or .txt file.

    A .txt file is one document; the other formats hold one document per record, its text under `text_field`.
    `cache_dir` is where `datasets` keeps its Arrow copy (default: its own cache, so a large file converts once).
    """
    if path is None:
        return _embedded(cache_dir, show_progress)
    path = Path(path)
    if not path.is_file():
        raise ForensicsError(path, "no such file" if not path.exists() else "not a file")
    fmt = _format(path)
    record = _check_file(path, fmt, text_field, show_progress)
    dataset = _load(path, [path], fmt, text_field, cache_dir)
    return Corpus(f"file:{path.name}", record["sha256"], (record,), "text" if fmt == ".txt" else text_field, dataset)


def _embedded(cache_dir: str | Path | None, show_progress: bool) -> Corpus:
    try:
        manifest = json.loads(MANIFEST.read_text())
    except (OSError, ValueError) as e:
        raise ForensicsError(MANIFEST, f"embedded corpus manifest unreadable ({e}); reinstall llm-forensics") from e
    files, records = [], []
    for entry in manifest["files"]:
        path = EMBEDDED_DIR / entry["path"]
        if not path.is_file():
            raise ForensicsError(path, "embedded corpus file missing; reinstall llm-forensics")
        # compared before any other check, so an altered file is reported as altered, whatever it now holds
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != entry["sha256"]:
            raise ForensicsError(path, f"SHA-256 is {digest} but the manifest records {entry['sha256']}: "
                                       f"the embedded corpus was altered; reinstall llm-forensics")
        record = _check_file(path, _format(path), manifest["text_field"], show_progress)
        files.append(path)
        records.append(record)
    listing = "".join(f"{r['sha256']}  {r['path']}\n" for r in records)
    dataset = _load(EMBEDDED_DIR, files, ".jsonl.zst", manifest["text_field"], cache_dir)
    return Corpus(f"embedded:{manifest['id']}", hashlib.sha256(listing.encode()).hexdigest(), tuple(records),
                  manifest["text_field"], dataset)


def _format(path: Path) -> str:
    name = path.name.lower()
    for suffix in FORMATS:
        if name.endswith(suffix):
            return suffix
    raise ForensicsError(path, f"unsupported corpus file type; give one of {', '.join(FORMATS)}")


def _check_file(path: Path, fmt: str, text_field: str, show_progress: bool) -> dict:
    """Hash the file and check it holds what its name says, reading it once (decompressing a .zst as it goes)."""
    size = path.stat().st_size
    if size == 0:
        raise ForensicsError(path, "empty file: no documents")
    sha = hashlib.sha256()
    head = bytearray()
    decompressor = zstandard.ZstdDecompressor() if fmt == ".jsonl.zst" else None
    frame = decompressor.decompressobj() if decompressor else None
    mid_frame = False  # input fed to `frame` that has not completed it yet
    with open(path, "rb") as f, progress_bar(show_progress and size > READ_CHUNK) as bar:
        task = bar.add_task(f"hashing {path.name}", total=size)
        first = True
        while chunk := f.read(READ_CHUNK):
            sha.update(chunk)
            if first and frame is not None and not chunk.startswith(ZSTD_MAGIC):
                raise ForensicsError(path, "not zstd-compressed (no zstd magic number at the start)")
            if first and fmt == ".parquet" and not chunk.startswith(b"PAR1"):
                raise ForensicsError(path, "not a Parquet file (no PAR1 magic number at the start)")
            first = False
            if frame is None:
                if len(head) < HEAD_BYTES:
                    head += chunk[:HEAD_BYTES - len(head)]
            else:
                # Every frame is decompressed to its end: a truncated .zst would otherwise read as a shorter corpus.
                data = chunk
                while data:
                    try:
                        out = frame.decompress(data)
                    except zstandard.ZstdError as e:
                        raise ForensicsError(path, f"corrupt zstd data: {e}") from e
                    if len(head) < HEAD_BYTES:
                        head += out[:HEAD_BYTES - len(head)]
                    mid_frame = not frame.eof
                    data = b""
                    if frame.eof:
                        data = frame.unused_data
                        frame = decompressor.decompressobj()
            bar.update(task, advance=len(chunk))
    if mid_frame:
        raise ForensicsError(path, "truncated: the zstd stream ends in the middle of a frame")
    if fmt != ".parquet":
        _check_text(path, bytes(head), fmt, text_field)
    return {"path": path.name, "size": size, "sha256": sha.hexdigest()}


def _check_text(path: Path, head: bytes, fmt: str, text_field: str) -> None:
    if not head.strip():
        raise ForensicsError(path, "empty: no documents")
    nul = head.find(b"\x00")
    if nul >= 0:
        raise ForensicsError(path, f"binary data, not text (NUL byte at offset {nul})")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as e:
        raise ForensicsError(path, f"binary data, not UTF-8 text (invalid byte at offset {e.start})") from e
    if fmt == ".txt":
        return
    line = head.lstrip().split(b"\n", 1)[0]
    if not line.startswith(b"{"):
        raise ForensicsError(path, f"not JSON Lines: the first record does not start with '{{' "
                                   f"({line[:40].decode('utf-8', 'replace')!r})")
    if len(line) < len(head.lstrip()) or head.endswith(b"\n"):
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ForensicsError(path, f"not JSON Lines: record 1 is not valid JSON ({e})") from e
        if text_field not in record:
            raise ForensicsError(path, f"no {text_field!r} field in record 1 (fields: {', '.join(record) or 'none'})")


def _load(where: Path, files: list[Path], fmt: str, text_field: str, cache_dir: str | Path | None) -> datasets.Dataset:
    options = {"sample_by": "document"} if fmt == ".txt" else {}
    try:
        with _quiet_datasets():
            dataset = datasets.load_dataset(FORMATS[fmt], data_files={"train": [str(f) for f in files]}, split="train",
                                            cache_dir=None if cache_dir is None else str(cache_dir), **options)
    except Exception as e:  # datasets wraps pyarrow's errors in its own; show the innermost, with the file
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise ForensicsError(where, f"cannot be read as {FORMATS[fmt]}: {type(cause).__name__}: {cause}") from e
    field = "text" if fmt == ".txt" else text_field
    if dataset.num_rows == 0:
        raise ForensicsError(where, "empty: no documents")
    if field not in dataset.column_names:
        raise ForensicsError(where, f"no {field!r} field (fields: {', '.join(dataset.column_names)})")
    dtype = dataset.features[field]
    if getattr(dtype, "dtype", None) not in ("string", "large_string"):
        raise ForensicsError(where, f"field {field!r} holds {getattr(dtype, 'dtype', type(dtype).__name__)}, not text")
    return dataset


@contextmanager
def _quiet_datasets():
    """datasets' own tqdm bars would interleave with ours; restore whatever the caller had."""
    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.utils.enable_progress_bars()


def _digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


def _prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer itself puts before a text (BOS, [CLS]); none after it (EOS, [SEP])."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return list(full[:k])
    return []


def progress_bar(enabled: bool) -> Progress:
    """The bar every long step of the activation signal shows (on stderr, gone when done)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=err, transient=True, disable=not enabled)
