"""Settings read once, in one place: where keys and caches live, and the offline switches of the Hugging Face
libraries.

Evidence sites have no network and the tool never fetches a model: transformers, datasets and huggingface_hub read
HF_HUB_OFFLINE / HF_DATASETS_OFFLINE when they are first imported, so every module that imports one of them imports
this module first (`forensics.settings.offline()`), and the switch is set here and nowhere else.
"""

from __future__ import annotations

import os
from pathlib import Path

KEY_DIR_ENV = "FORENSICS_KEY_DIR"
TSA_URL_ENV = "FORENSICS_TSA_URL"  # an RFC 3161 timestamp authority for every dossier (a case's signing.tsa_url wins)
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def offline() -> None:
    """Make the Hugging Face libraries local-only (an analyst's own setting, if any, wins)."""
    for name, value in OFFLINE.items():
        os.environ.setdefault(name, value)


def cores() -> int:
    """The CPUs this process may run on (its affinity where the system has one, else the machine's count)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def key_dir() -> Path:
    """The analyst's key directory: $FORENSICS_KEY_DIR, else $XDG_CONFIG_HOME/llm-forensics (~/.config by
    default). It also holds the key that authenticates cache entries."""
    if os.environ.get(KEY_DIR_ENV):
        return Path(os.environ[KEY_DIR_ENV]).expanduser()
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "llm-forensics"


offline()
