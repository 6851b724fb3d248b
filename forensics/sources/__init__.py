"""Checkpoint readers, one module per format, behind `open_model`."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from forensics.errors import ForensicsError
from forensics.files import open_regular
from forensics.sources.base import ModelInfo, Reads, Source, TensorRef
from forensics.sources.hf import HFDirectory

# A single-file model's reader, by suffix, as "module:class" in this package: imported only for a file that needs it,
# because the gguf and onnx packages take about 50 ms each to import, a tenth of fingerprinting a small model.
# A directory is read as a Hugging Face model.
FILE_READERS: dict[str, str] = {".gguf": "gguf:GGUFFile", ".onnx": "onnx:ONNXFile"}
# Formats known by their first bytes whatever the file is called (E5S1 files end in .bin, like PyTorch's).
MAGIC_READERS: dict[bytes, str] = {b"E5S1": "e5s1:E5S1File"}


class NotRunnable(Exception):
    """transformers cannot run this model; the reason is recorded instead of activation values."""


def detect(path: str | Path) -> str:
    """The model's format, the one place it is decided: "hf" (a directory), or the reader module of a single
    file ("gguf", "onnx", "e5s1"), by its first bytes first and its suffix second."""
    path = Path(path)
    if not path.exists():
        raise ForensicsError(path, "no such file or directory")
    if path.is_dir():
        return "hf"
    reader = next((r for magic, r in MAGIC_READERS.items() if _head(path, len(magic)) == magic), None)
    reader = reader or FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise ForensicsError(path, f"unsupported model file type {path.suffix!r}; give a model directory or one of "
                                   f"{', '.join(sorted(FILE_READERS))}, or a file starting with "
                                   f"{', '.join(m.decode() for m in MAGIC_READERS)}")
    return reader.split(":")[0]


def open_model(path: str | Path, reads: Reads) -> Source:
    path = Path(path)
    fmt = detect(path)
    if fmt == "hf":
        return HFDirectory(path, reads)
    module, cls = next(r for r in (*MAGIC_READERS.values(), *FILE_READERS.values()) if r.startswith(f"{fmt}:")
                       ).split(":")
    return getattr(importlib.import_module(f"forensics.sources.{module}"), cls)(path, reads)


def transformers_location(path: str | Path) -> tuple[Path, dict]:
    """Where transformers finds the model: (directory, extra from_pretrained arguments), local files only and never
    the model's own code. Raises NotRunnable with the reason for a format transformers cannot run."""
    path = Path(path)
    fmt = detect(path)
    kw: dict = {"local_files_only": True, "trust_remote_code": False}
    if fmt == "gguf":
        return path.parent, {**kw, "gguf_file": path.name}
    if fmt == "onnx":
        raise NotRunnable("an ONNX graph: transformers cannot run it")
    if fmt != "hf":
        raise NotRunnable(f"transformers cannot run a {fmt} file")
    if not (path / "config.json").is_file():
        raise NotRunnable("no config.json: transformers needs the model's configuration to run it")
    return path, kw


def _head(path: Path, n: int) -> bytes:
    """The first bytes, only to choose a reader; the reader reads (and hashes) the whole file itself. A FIFO or a
    device is refused here, before any read could wait on it."""
    with open_regular(path) as f:
        try:
            return f.read(n)
        except OSError as e:
            raise ForensicsError(path, f"read failed: {e.strerror}") from e


__all__ = ["FILE_READERS", "MAGIC_READERS", "ModelInfo", "NotRunnable", "Reads", "Source", "TensorRef", "detect",
           "open_model", "transformers_location"]


class LayerTensors:
    """The tensors of one block of a safetensors checkpoint (single file or sharded), read one block at a time for
    the layer-streamed activation pass: `block(prefix)` returns {name below the prefix: tensor}. Each shard is opened
    only while its tensors are copied out: a mapping kept open would keep every page read resident in the process,
    the whole checkpoint by the last block."""

    def __init__(self, root: Path):
        from safetensors import SafetensorError, safe_open

        self.root = Path(root)
        index = self.root / "model.safetensors.index.json"
        try:
            if index.is_file():
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            elif (self.root / "model.safetensors").is_file():
                shards = ["model.safetensors"]
            else:
                raise NotRunnable("layer streaming reads safetensors checkpoints; this one has none")
            self._where: dict[str, str] = {}
            for shard in shards:
                with safe_open(str(self.root / shard), framework="pt") as f:
                    self._where.update({name: shard for name in f.keys()})
        except (OSError, ValueError, KeyError, SafetensorError) as e:
            raise NotRunnable(f"the checkpoint's safetensors cannot be opened for layer streaming: {e}") from e

    def names(self) -> list[str]:
        return sorted(self._where)

    def block(self, prefix: str, dtype=None) -> dict:
        """The block's tensors, as `dtype` when given (converted one at a time, so at most one is held twice)."""
        from safetensors import safe_open

        wanted: dict[str, list[str]] = {}
        for name, shard in self._where.items():
            if name.startswith(prefix):
                wanted.setdefault(shard, []).append(name)
        out = {}
        for shard, names in sorted(wanted.items()):
            with safe_open(str(self.root / shard), framework="pt") as f:
                for name in names:
                    t = f.get_tensor(name)
                    out[name[len(prefix):]] = t.to(dtype, copy=True) if dtype is not None else t.clone()
        return out
