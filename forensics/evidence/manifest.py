"""The manifest: what went into a dossier (inputs with hashes, case file, command, environment) and a digest of what
came out, written as canonical JSON so the same content always gives the same bytes and the same SHA-256."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import forensics
from forensics.errors import ForensicsError
from forensics.evidence.atomic import atomic_write_bytes
from forensics.evidence.environment import capture_environment
from forensics.evidence.hashing import expand_input, file_record, sha256_bytes

SCHEMA = "llm-forensics.manifest/1"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _plain(obj: Any, where: str) -> Any:
    """Plain JSON types only; numpy scalars/arrays become Python numbers/lists, non-finite floats are refused."""
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ForensicsError(None, f"{where}: key {k!r} is not a string; JSON keys must be strings")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (str, bool)) or obj is None:
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ForensicsError(None, f"{where} is {obj}; undefined values must be written as null")
        return obj
    if hasattr(obj, "tolist"):  # numpy scalar or array, without importing numpy here
        return _plain(obj.tolist(), where)
    raise ForensicsError(None, f"{where}: {type(obj).__name__} is not a JSON value")


def canonical_json_bytes(obj: Any, where: str = "$") -> bytes:
    """UTF-8 JSON with sorted keys and no insignificant whitespace: equal content, equal bytes."""
    return json.dumps(_plain(obj, where), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def write_canonical_json(obj: Any, path: str | Path) -> Path:
    """Atomically write ``canonical_json_bytes(obj)``; the file's SHA-256 is then the digest of ``obj``."""
    return atomic_write_bytes(path, canonical_json_bytes(obj))


def results_bytes(results: Mapping | bytes) -> bytes:
    """The bytes of results.json: given as written (e.g. ``forensics.stats.compare.to_json``), or the canonical JSON
    of a dict. Either way the dossier attaches, and the manifest hashes, exactly these bytes."""
    if isinstance(results, (bytes, bytearray)):
        try:
            json.loads(results)
        except ValueError as e:
            raise ForensicsError(None, f"results are not valid JSON: {e}") from e
        return bytes(results)
    return canonical_json_bytes(results, "results")


def results_digest(results: Mapping | bytes) -> str:
    """SHA-256 of the results.json bytes (see ``results_bytes``)."""
    return sha256_bytes(results_bytes(results))


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_dossier_id(case_id: str, created_at: str, digest: str) -> str:
    """``LF-YYYYMMDD-xxxxxxxxxx``: the date for humans, a hash of case, time and results to tell runs apart."""
    day = re.sub(r"\D", "", created_at)[:8]
    return f"LF-{day}-{sha256_bytes(f'{case_id}|{created_at}|{digest}'.encode())[:10].upper()}"


def input_records(inputs: Iterable[str | Path | Mapping], base: str | Path = ".") -> list[dict]:
    """One record per input file: ``{"path", "size", "sha256", ...labels}``; relative paths are read under ``base``
    and recorded as given.

    A path is hashed now (a directory stands for every file below it). A mapping with ``path`` may carry labels
    (``model``, ``kind``) and may carry ``size`` and ``sha256`` already computed when the file was read for analysis
    (the fingerprint's file list): those are the bytes that were analysed, so they are recorded as given.
    """
    records: list[dict] = []
    for item in inputs:
        if isinstance(item, Mapping):
            if "path" not in item:
                raise ForensicsError(None, f"input record {dict(item)!r} has no 'path'")
            labels = {k: v for k, v in item.items() if k not in ("path", "size", "sha256")}
            if "sha256" in item or "size" in item:
                sha, size = str(item.get("sha256", "")).lower(), item.get("size")
                if not _HEX64.match(sha) or not isinstance(size, int) or size < 0:
                    raise ForensicsError(item["path"], "input record needs both 'size' (bytes) and a hex 'sha256'")
                records.append({**labels, "path": str(item["path"]), "size": size, "sha256": sha})
                continue
            given = Path(item["path"])
        else:
            given, labels = Path(item), {}
        actual = Path(base) / given
        for f in expand_input(actual):
            recorded = given / f.relative_to(actual) if f != actual else given
            records.append({**labels, **file_record(f, str(recorded))})
    seen: set[str] = set()
    for r in records:
        if r["path"] in seen:
            raise ForensicsError(r["path"], "input listed twice")
        seen.add(r["path"])
    return records


# What a case records it read of each weight file (`bytes_read`): the one pass (front to back, hashed); look-ups
# before it (headers' tensors, embedding rows, norm gains: only those bytes); a pass over it again (a weights-aligned
# pair's candidate sketch, a registry comparison's suspect sketch); the activation pass's forward pass.
READ_KINDS = ("pass", "look-up", "again", "activations")


def fingerprint_inputs(models: Mapping[str, Mapping], reads: Mapping[str, Mapping] | None = None) -> list[dict]:
    """Input records for the weight files each fingerprint read (``model.files``, relative to ``model.path``).
    ``reads`` (model -> file -> kind of read -> bytes, pipeline.Evidence.reads) adds what this run read of each file
    as ``bytes_read``: zero of every kind where a cache answered."""
    records = []
    for name, fp in models.items():
        model = fp.get("model", {})
        root = Path(str(model.get("path", "")))
        folder = root.parent if root.is_file() else root  # a single-file model (GGUF) lists its own name
        for f in model.get("files", []):
            path = folder / f["path"]
            record = {"path": str(path), "size": f["size"], "sha256": f["sha256"], "model": name, "kind": "weights"}
            if reads is not None:
                record["bytes_read"] = {**dict.fromkeys(READ_KINDS, 0), **(reads.get(name, {}).get(f["path"]) or {})}
            records.append(record)
    return records


def build_manifest(
    *,
    case_id: str,
    argv: Sequence[str],
    case_yaml_bytes: bytes,
    case_yaml_path: str | Path,
    results: Mapping | bytes,
    inputs: Iterable[str | Path | Mapping],
    corpus: Mapping | None = None,
    token_windows: Mapping | None = None,
    environment: Mapping | None = None,
    dossier_id: str | None = None,
    created_at: str | None = None,
    inputs_base: str | Path | None = None,
    registries: list | None = None,
) -> dict:
    """The manifest dict. ``inputs_base`` is the directory relative input paths are relative to (default: the
    current directory), recorded so `forensics verify --inputs` can find the files again. ``registries``: the registries
    read (each one's path, size, SHA-256 of its contents, references), whose files are also among the inputs."""
    created_at = created_at or utc_now()
    digest = results_digest(results)
    base = Path(inputs_base) if inputs_base is not None else Path.cwd()
    records = input_records(inputs, base)
    return {
        "schema": SCHEMA,
        "case_id": case_id,
        "dossier_id": dossier_id or new_dossier_id(case_id, created_at, digest),
        "created_at": created_at,
        "tool": {"name": "llm-forensics", "version": forensics.__version__},
        "command": {"argv": [str(a) for a in argv], "cwd": str(Path.cwd())},
        "case_yaml": {"path": str(case_yaml_path), "size": len(case_yaml_bytes),
                      "sha256": sha256_bytes(case_yaml_bytes)},
        "inputs_base": str(base.resolve()),
        "inputs": records,
        "corpus": _plain(corpus, "corpus") if corpus is not None else None,
        "token_windows": _plain(token_windows, "token_windows") if token_windows is not None else None,
        "environment": _plain(environment, "environment") if environment is not None else capture_environment(),
        "results_digest": {"algorithm": "sha256", "of": "results.json", "sha256": digest},
        **({"registries": _plain(registries, "registries")} if registries is not None else {}),
    }
