"""Checkpoint readers, one module per format, behind `open_model`."""

from __future__ import annotations

from pathlib import Path

from forensics.errors import ForensicsError
from forensics.sources.base import ModelInfo, Reads, Source, TensorRef
from forensics.sources.gguf import GGUFFile
from forensics.sources.hf import HFDirectory

# A single-file model's reader, by suffix. A directory is read as a Hugging Face model.
FILE_READERS: dict[str, type[Source]] = {".gguf": GGUFFile}


def open_model(path: str | Path, reads: Reads) -> Source:
    path = Path(path)
    if not path.exists():
        raise ForensicsError(path, "no such file or directory")
    if path.is_dir():
        return HFDirectory(path, reads)
    reader = FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise ForensicsError(path, f"unsupported model file type {path.suffix!r}; give a model directory or one of "
                                   f"{', '.join(sorted(FILE_READERS))}")
    return reader(path, reads)


__all__ = ["FILE_READERS", "ModelInfo", "Reads", "Source", "TensorRef", "open_model"]
