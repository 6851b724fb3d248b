"""The reference panel: fingerprints of real models known to be unrelated to each other, one JSON file each.

The project ships its panel in forensics/panel/; a user extends it with a directory of their own fingerprints.
"""

from __future__ import annotations

import json
from pathlib import Path

from forensics.errors import ForensicsError

SCHEMA = "llm-forensics.fingerprint/1"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "panel"


def load_panel(directory: str | Path | None = None) -> list[dict]:
    """Every `*.json` fingerprint in `directory` (default: the shipped panel), in file-name order.

    A missing default directory is an empty panel; a missing directory the user named is an error.
    """
    folder = Path(directory) if directory is not None else DEFAULT_DIR
    if not folder.is_dir():
        if directory is None:
            return []
        raise ForensicsError(folder, "panel directory not found")
    panel = []
    for path in sorted(folder.glob("*.json")):
        try:
            fp = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ForensicsError(path, f"cannot read panel fingerprint: {e}") from None
        if not isinstance(fp, dict) or fp.get("schema") != SCHEMA:
            raise ForensicsError(path, f"not a fingerprint (schema must be {SCHEMA!r})")
        panel.append(fp)
    return panel
