"""Reference data shipped with the tool: the panel of unrelated real models and the calibration table.

Both are JSON files read here and handed to the statistics as plain values (the statistics never open a file).
The panel (panel/*.json, one fingerprint each) is the empirical null's source; a user extends it with a directory
of fingerprints of their own. The calibration table (calibration_table.json, written by `make calibrate`) gives the
error rates a verdict quotes.
"""

from __future__ import annotations

import json
from pathlib import Path

from forensics.errors import ForensicsError
from forensics.schemas import FINGERPRINT_SCHEMA

HERE = Path(__file__).resolve().parent
PANEL_DIR = HERE / "panel"
CALIBRATION_TABLE = HERE / "calibration_table.json"


def load_panel(directory: str | Path | None = None) -> list[dict]:
    """Every `*.json` fingerprint in `directory` (default: the shipped panel), in file-name order.

    A missing default directory is an empty panel; a missing directory the user named is an error.
    """
    folder = Path(directory) if directory is not None else PANEL_DIR
    if not folder.is_dir():
        if directory is None:
            return []
        raise ForensicsError(folder, "panel directory not found")
    panel = []
    for path in sorted(folder.glob("*.json")):
        fp = _read_json(path, "panel fingerprint")
        if not isinstance(fp, dict) or fp.get("schema") != FINGERPRINT_SCHEMA:
            raise ForensicsError(path, f"not a fingerprint (schema must be {FINGERPRINT_SCHEMA!r})")
        panel.append(fp)
    return panel


def load_calibration_table(path: str | Path | None = None) -> dict | None:
    """The calibration table to quote in verdicts: `path`, else the shipped one; None if none was shipped."""
    target = Path(path) if path is not None else CALIBRATION_TABLE
    if not target.is_file():
        if path is None:
            return None
        raise ForensicsError(target, "calibration table not found")
    return _read_json(target, "calibration table")


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ForensicsError(path, f"cannot read {what}: {e}") from None
