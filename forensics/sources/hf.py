"""A Hugging Face style model directory: config.json plus safetensors (single or sharded) or PyTorch .bin weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from forensics.errors import ForensicsError
from forensics.files import open_regular
from forensics.sources import safetensors as st
from forensics.sources.base import ModelInfo, Reads, Source, TensorRef

WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".h5", ".msgpack", ".ckpt"}
# Side files (tokenizer, configs) are hashed as evidence; nothing this large is a side file.
MAX_SIDE_FILE = 256 << 20


def model_info(config: dict, fmt: str, path: Path) -> ModelInfo:
    """Dimensions the role table needs, from config.json at `path` (multimodal configs keep them under
    text_config)."""
    text = config.get("text_config") or config
    if not isinstance(text, dict):
        raise ForensicsError(path, "text_config is not a JSON object")

    def pick(*keys):
        for k in keys:
            v = text.get(k)
            if v is not None:
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    raise ForensicsError(path, f"{k} is {v!r}, not a positive whole number")
                return v
        return None

    return ModelInfo(
        architecture=str(text.get("model_type") or config.get("model_type") or ""),
        format=fmt,
        num_layers=pick("num_hidden_layers", "n_layer", "num_layers"),
        hidden_size=pick("hidden_size", "n_embd", "d_model"),
        num_heads=pick("num_attention_heads", "n_head"),
        num_kv_heads=pick("num_key_value_heads"),
        head_dim=pick("head_dim"),
        intermediate_size=pick("intermediate_size", "n_inner"),
        config=config,
    )


class HFDirectory(Source):
    def __init__(self, path: Path, reads: Reads):
        super().__init__(path, reads)
        cfg_path = path / "config.json"
        if not cfg_path.exists():  # a config.json that is a FIFO or a link outside is refused on opening
            raise ForensicsError(path, "not a model directory: no config.json (give a directory with config.json "
                                       "and weights, or a single .gguf / .onnx file)")
        raw = bytes(reads.open(cfg_path).read_all())
        try:
            self.config = json.loads(raw)
        except ValueError as e:
            raise ForensicsError(cfg_path, f"not valid JSON: {e}") from e
        if not isinstance(self.config, dict):
            raise ForensicsError(cfg_path, "not a JSON object")
        self.weight_files, self.shard_names, self.format = self._weights()
        self._info = model_info(self.config, self.format, cfg_path)
        self._headers: dict[Path, tuple[int, dict]] = {}
        self._state_dicts: dict[Path, dict] = {}

    def _weights(self) -> tuple[list[Path], dict[Path, set[str]] | None, str]:
        p = self.path
        for index_name, fmt in (("model.safetensors.index.json", "safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch")):
            index = p / index_name
            if index.exists():
                by_file = st.shards(index, bytes(self.reads.open(index).read_all()), self.root)
                files = sorted(p / f for f in by_file)
                return files, {p / f: set(n) for f, n in by_file.items()}, fmt
        for pattern, fmt in (("*.safetensors", "safetensors"), ("*.bin", "pytorch"), ("*.pt", "pytorch"),
                             ("*.pth", "pytorch")):
            files = sorted(p.glob(pattern))
            if files:
                if len(files) > 1:
                    raise ForensicsError(p, f"several {pattern} files and no shard index: "
                                            f"{', '.join(f.name for f in files)}")
                return files, None, fmt
        raise ForensicsError(p, "no weights found (*.safetensors, *.bin, *.pt with config.json)")

    def info(self) -> ModelInfo:
        return self._info

    def planned_files(self) -> list[Path]:
        # Whatever exists and is not a directory is evidence and gets opened, so that a FIFO, a device or a link
        # pointing outside the model is refused by name rather than silently left out.
        side = [f for f in sorted(self.path.iterdir())
                if f.exists() and not f.is_dir() and f.suffix not in WEIGHT_SUFFIXES and not f.name.startswith(".")
                and not (f.is_file() and f.stat().st_size > MAX_SIDE_FILE)]
        return side + self.weight_files

    def names(self) -> list[str]:
        if self.format == "safetensors":
            out = []
            for f in self.weight_files:
                header = self._header(f)[1]
                want = self.shard_names.get(f) if self.shard_names else None
                if want is not None and not want <= set(header):
                    missing = sorted(want - set(header))
                    raise ForensicsError(f, f"shard lacks {len(missing)} tensor(s) its index lists, e.g. {missing[0]}")
                out.extend(n for n in header if want is None or n in want)
            return out
        return [t.name for t in self.tensors()]

    def _header(self, f: Path) -> tuple[int, dict]:
        if f not in self._headers:
            self._headers[f] = st.read_header(self.reads.open(f))
        return self._headers[f]

    def tensors(self) -> Iterator[TensorRef]:
        for f in self.weight_files:
            if self.format == "safetensors":
                start, header = self._header(f)
                want = self.shard_names.get(f) if self.shard_names else None
                yield from st.tensors(self.reads.open(f), start, header, want)
            else:
                if f not in self._state_dicts:
                    # Opened (confined, regular-file check) before torch reads it by its resolved name.
                    self._state_dicts[f] = load_state_dict(self.reads.open(f).real)
                state = self._state_dicts[f]
                for name, t in sorted(state.items(), key=lambda kv: kv[1].untyped_storage().data_ptr()):
                    yield TensorRef(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), lambda t=t: _numpy(t), f)


def _numpy(t) -> np.ndarray:
    """A tensor of a PyTorch checkpoint as the array every loader returns (torch is loaded by then)."""
    import torch

    if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
        t = t.float()  # bfloat16 and fp8, which numpy lacks, widen to float32 exactly
    return np.ascontiguousarray(t.numpy())


def load_state_dict(path: Path) -> dict:
    """PyTorch checkpoints through torch's safe loader: zip archives memory-mapped, the legacy (pre-1.6, non-zip)
    format read whole, since torch can map only the former.

    weights_only=True refuses pickled code in either format. torch reads the file itself, so its bytes are hashed by
    a separate sequential read (the one format here not read in a single pass; prefer safetensors evidence where it
    exists). torch is imported here only: no other format needs it.
    """
    import torch

    with open_regular(path) as f:
        zipped = f.read(4) == b"PK\x03\x04"
    try:
        obj = torch.load(path, map_location="cpu", mmap=zipped, weights_only=True)
    except Exception as e:  # torch raises many types for a bad archive; all mean the same to the analyst
        raise ForensicsError(path, f"cannot read PyTorch checkpoint safely: {type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:300]}") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ForensicsError(path, "PyTorch checkpoint is not a state dict of tensors")
    return obj
