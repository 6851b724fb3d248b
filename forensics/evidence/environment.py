"""What the analysis ran on, recorded in the manifest so a reviewer can rebuild the same environment."""

from __future__ import annotations

import importlib.metadata
import platform
import socket
import sys

# Distributions whose version can change a number in the dossier (parsing, statistics, rendering, signing).
KEY_PACKAGES = (
    "llm-forensics", "numpy", "scipy", "statsmodels", "torch", "safetensors", "gguf", "onnx", "transformers",
    "accelerate", "sentencepiece", "tokenizers", "datasets", "zstandard", "matplotlib", "reportlab", "pyhanko",
    "pyhanko-certvalidator", "cryptography", "pydantic", "pyyaml",
)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_info() -> dict:
    """torch's build and the accelerator it sees; torch is imported only when it is installed."""
    if _version("torch") is None:
        return {"installed": False}
    import torch

    info = {"installed": True, "version": torch.__version__, "cuda_build": torch.version.cuda,
            "cuda_available": bool(torch.cuda.is_available())}
    if info["cuda_available"]:
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def capture_environment(include_hostname: bool = False) -> dict:
    """JSON-ready description of interpreter, OS, torch/accelerator and key package versions.

    The hostname is left out by default: it identifies the analyst's machine, which a dossier handed to the other
    side need not reveal.
    """
    env = {
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "platform": {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
                     "platform": platform.platform()},
        "torch": _torch_info(),
        "packages": {name: _version(name) for name in KEY_PACKAGES},
    }
    if include_hostname:
        env["hostname"] = socket.gethostname()
    return env
