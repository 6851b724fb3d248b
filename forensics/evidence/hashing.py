"""SHA-256 of files and byte strings, and the size/hash records the manifest and `forensics verify` compare."""

from __future__ import annotations

import hashlib
from pathlib import Path

from forensics.errors import ForensicsError

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError as e:
        raise ForensicsError(path, f"cannot read file to hash it: {e.strerror or e}") from e
    return h.hexdigest()


def file_record(path: str | Path, recorded_path: str | None = None) -> dict:
    """``{"path", "size", "sha256"}`` of one regular file; ``recorded_path`` is the name to write into the record."""
    p = Path(path)
    if not p.is_file():
        raise ForensicsError(p, "input file does not exist or is not a regular file")
    return {"path": recorded_path if recorded_path is not None else str(path),
            "size": p.stat().st_size, "sha256": sha256_file(p)}


def expand_input(path: str | Path) -> list[Path]:
    """A file is itself; a directory (a model checkout) is every regular file below it, in a fixed order."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        if not files:
            raise ForensicsError(p, "input directory contains no files")
        return files
    raise ForensicsError(p, "input does not exist")
