"""Reading a lab source (HF directory or GGUF file) and writing a lab child with its recipe.json.

A child is an ordinary Hugging Face checkpoint directory (config.json, model.safetensors, generation_config.json, the
tokenizer) plus recipe.json, which names the source by path and SHA-256, lists the transforms with their parameters
and seeds, and carries the label "made by the llm-forensics lab" so nobody mistakes it for a model found in the wild.
Everything written is a function of (source bytes, transforms, parameters, seeds, library versions): no timestamps,
no machine paths other than the source path as given, so the same recipe gives byte-identical files.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import forensics.settings  # noqa: F401,I001  (first: the offline switches, before transformers is imported)

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

from forensics import __version__  # noqa: E402
from forensics.errors import ForensicsError  # noqa: E402
from forensics.evidence.atomic import staged_directory  # noqa: E402
from forensics.evidence.hashing import expand_input, file_record  # noqa: E402
from forensics.sources import NotRunnable, transformers_location  # noqa: E402
from forensics.sources.gguf import plain_reader  # noqa: E402

LABEL = "made by the llm-forensics lab"
SCHEMA = "llm-forensics.lab-recipe/1"
RECIPE = "recipe.json"
# Copied byte for byte from a source directory; whatever of these it has.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")


@dataclass
class Source:
    path: Path
    format: str  # "gguf" or "hf"
    model: nn.Module
    tokenizer: object | None  # a transformers tokenizer, or None when the source has none
    files: list[dict]  # {"path", "size", "sha256"} of every file the source consists of
    recipe: dict | None  # the source's own recipe.json when it is itself a lab child

    def describe(self) -> dict:
        return {"path": str(self.path), "format": self.format, "files": self.files, "recipe": self.recipe}


def load_source(path: str | Path) -> Source:
    """Hash and load a model directory (config.json + weights) or a .gguf file, as float32, from local files only.

    A GGUF file is dequantised by transformers, which also undoes llama.cpp's Q/K row permutation.
    """
    path = Path(path)
    try:
        where, kwargs = transformers_location(path)
    except NotRunnable as e:
        raise ForensicsError(path, f"a lab source is a model directory (config.json + weights) or a .gguf file: "
                                   f"{e}") from e
    fmt = "gguf" if "gguf_file" in kwargs else "hf"
    files = [file_record(f, str(f.relative_to(path))) for f in expand_input(path)] if fmt == "hf" else \
        [file_record(path, path.name)]
    with plain_reader():  # one parse of a GGUF file for the model and the tokenizer
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs)
        except Exception as e:  # transformers, safetensors and gguf each raise their own types for an unreadable model
            raise ForensicsError(path, f"transformers cannot load it as a causal language model: "
                                       f"{type(e).__name__}: {e}") from e
        # Dequantised weights are plain float32 now; keeping the GGUF quantisation note would make the child's
        # config.json ask transformers to read it as GGUF again.
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
            model.hf_quantizer = None
        model.name_or_path = str(path)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(where, **kwargs)
        except (OSError, ValueError, KeyError, TypeError):
            tokenizer = None  # only continued pre-training needs one, and it says so
    recipe = None
    if fmt == "hf" and (path / RECIPE).is_file():
        try:
            recipe = json.loads((path / RECIPE).read_text())
        except ValueError as e:
            raise ForensicsError(path / RECIPE, f"not valid JSON: {e}") from e
    return Source(path, fmt, model.eval(), tokenizer, files, recipe)


def step(transform: str, params: dict, seed: int | None, details: dict | None = None) -> dict:
    """One entry of a recipe's `steps`."""
    return {"transform": transform, "params": params, "seed": seed, "details": details or {}}


def recipe(source: Source, steps: list[dict]) -> dict:
    return {
        "schema": SCHEMA,
        "label": LABEL,
        "tool": {"name": "llm-forensics", "version": __version__},
        "libraries": {"torch": torch.__version__, "transformers": transformers.__version__},
        "source": source.describe(),
        "steps": steps,
    }


def save_child(model: nn.Module, out: str | Path, source: Source, steps: list[dict], *, tokenizer=None,
               force: bool = False) -> Path:
    """Write `model` as a checkpoint directory at `out`, with recipe.json and its tokenizer: `tokenizer` when the
    child has its own (a new vocabulary), else the source's.

    The directory is assembled under a temporary name beside `out` and renamed into place, so `out` is either
    absent, the old child, or the complete new one.
    """
    out = Path(out)
    if out.exists() and not force:
        raise ForensicsError(out, "already exists; pass --force to replace it")
    if out.exists() and not (out / RECIPE).is_file():
        raise ForensicsError(out, "exists and is not a lab child (no recipe.json); refusing to replace it")
    with staged_directory(out) as tmp:
        # The source's path is already in recipe.json; config.json should not depend on where the source lay.
        model.config.name_or_path = ""
        model.save_pretrained(tmp)
        if tokenizer is None:
            _write_tokenizer(source, tmp)
        else:
            tokenizer.save_pretrained(tmp)
        text = json.dumps(recipe(source, steps), indent=1, sort_keys=True) + "\n"
        (tmp / RECIPE).write_text(text)
    return out


def _write_tokenizer(source: Source, dest: Path) -> None:
    if source.format == "hf":
        for name in TOKENIZER_FILES:
            if (source.path / name).is_file():
                shutil.copyfile(source.path / name, dest / name)
    elif source.tokenizer is not None:  # a GGUF file carries its tokenizer inside; write it out in HF form
        source.tokenizer.save_pretrained(dest)


def read_recipe(path: str | Path) -> dict | None:
    """A child's recipe.json, or None when there is none or it is unreadable (then the child is remade)."""
    try:
        return json.loads((Path(path) / RECIPE).read_text())
    except (OSError, ValueError):
        return None
