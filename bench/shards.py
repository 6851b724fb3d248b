"""Writing the benches' large random checkpoints: one safetensors shard per block, made and written in turn."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def write_shards(folder: Path, shards: list[tuple[str, Callable[[], dict]]], save: Callable) -> None:
    """Each (name, make) writes make()'s tensors to model-NAME.safetensors with `save` (safetensors' numpy or torch
    save_file), so only one shard is in memory at a time; then the index of them all."""
    weight_map = {}
    for name, make in shards:
        tensors = make()
        file = f"model-{name}.safetensors"
        save(tensors, str(folder / file))
        weight_map.update({k: file for k in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
