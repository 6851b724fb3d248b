"""The registry: reference models' fingerprints, their files' SHA-256 and what the analyst declares about them, in one
SQLite file (no server) that cases and scans read as their null and their candidates.

* Schema: `PRAGMA user_version` = SCHEMA_VERSION and `meta.schema` = SCHEMA; a file with another version, or no
  registry at all, is refused with one message naming it.
* Entries are byte-stable: the fingerprint is stored as canonical JSON (sorted keys, the run's timings left out),
  so the same model gives the same entry whichever machine or process fingerprinted it.
* Writes are transactions: an add, a remove or an import commits whole or not at all (SQLite's journal rolls an
  interrupted writer back on the next open, which is then made with write access). Readers otherwise open the file
  read-only; SQLite's locking lets any number of them read at once, and a writer waits for them only while it
  commits.
* Export is one JSON document (entries sorted by name) carrying the SHA-256 of its body; import checks that hash
  and every entry's fingerprint hash before it writes anything.
* Lineage: each entry may be declared a `base`, `derived_from` some entries, `unrelated_to` others. Two entries are
  unrelated when declared so, or when their roots (followed through `derived_from`) are different declared bases.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from forensics.errors import ForensicsError
from forensics.schemas import FINGERPRINT_SCHEMA

SCHEMA = "llm-forensics.registry/2"
SCHEMA_VERSION = 2  # 2: neuron records
EXPORT_SCHEMA = "llm-forensics.registry-export/2"

_TABLES = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE reference (
    name TEXT PRIMARY KEY, architecture TEXT, hidden_size INTEGER, num_layers INTEGER,
    fingerprint BLOB NOT NULL, fingerprint_sha256 TEXT NOT NULL, declared TEXT NOT NULL);
CREATE TABLE file (
    reference TEXT NOT NULL REFERENCES reference(name) ON DELETE CASCADE, path TEXT NOT NULL,
    size INTEGER NOT NULL, sha256 TEXT NOT NULL, PRIMARY KEY (reference, path));
CREATE TABLE neurons (
    reference TEXT PRIMARY KEY REFERENCES reference(name) ON DELETE CASCADE, record BLOB NOT NULL,
    sha256 TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Declared:
    """What the analyst says about a reference; none of it is checked against the weights."""

    source: str = ""
    licence: str = ""
    base: bool = False
    derived_from: tuple[str, ...] = ()
    unrelated_to: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {"source": self.source, "licence": self.licence, "base": self.base,
                "derived_from": sorted(self.derived_from), "unrelated_to": sorted(self.unrelated_to)}

    @classmethod
    def from_dict(cls, d: dict) -> Declared:
        return cls(d.get("source", ""), d.get("licence", ""), bool(d.get("base", False)),
                   tuple(d.get("derived_from", ())), tuple(d.get("unrelated_to", ())))


@dataclass(frozen=True)
class Entry:
    """One reference: its fingerprint, what is declared about it, and its neuron record (signals.neurons.Record,
    as bytes; read from the registry only when asked for, by `Registry.neuron_record`)."""

    name: str
    fingerprint: bytes  # canonical JSON
    declared: Declared = field(default_factory=Declared)
    neurons: bytes | None = None
    neurons_sha256: str | None = None  # when `neurons` was not read

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.fingerprint).hexdigest()

    @property
    def record_sha256(self) -> str | None:
        return hashlib.sha256(self.neurons).hexdigest() if self.neurons is not None else self.neurons_sha256

    def fp(self) -> dict:
        return json.loads(self.fingerprint)

    def files(self) -> list[dict]:
        return self.fp()["model"]["files"]

    def summary(self) -> dict:
        model = self.fp()["model"]
        return {"name": self.name, "architecture": model.get("architecture"), "hidden_size": model.get("hidden_size"),
                "num_layers": model.get("num_layers"), "fingerprint_sha256": self.sha256,
                "files": len(model["files"]), "bytes": sum(f["size"] for f in model["files"]),
                "neuron_record_sha256": self.record_sha256, **self.declared.as_dict()}


def canonical(fp: dict) -> bytes:
    """A fingerprint as the registry stores it: sorted keys, compact, without the run's timings (they differ from
    one run to the next)."""
    if not isinstance(fp, dict) or fp.get("schema") != FINGERPRINT_SCHEMA:
        raise ValueError(f"not a fingerprint (schema must be {FINGERPRINT_SCHEMA!r})")
    return json.dumps({k: v for k, v in fp.items() if k != "run"}, sort_keys=True, separators=(",", ":")).encode()


class Registry:
    """One registry file. `Registry.create` makes a new one; opening checks that it is one, of this schema."""

    def __init__(self, path: str | Path, writable: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise ForensicsError(self.path, "registry not found (make one with `forensics registry add`)")
        # A journal left by an interrupted writer is rolled back on the first open, which must be able to write it:
        # that restores the last committed state and changes nothing that was committed.
        journal = self.path.with_name(self.path.name + "-journal")
        hot = journal.is_file() and journal.stat().st_size > 0
        uri = f"file:{self.path.resolve()}?mode={'rw' if writable or hot else 'ro'}"
        try:
            self.db = sqlite3.connect(uri, uri=True, isolation_level=None)  # transactions are explicit
        except sqlite3.DatabaseError as e:
            raise ForensicsError(self.path, f"cannot open the registry (SQLite says: {e})") from None
        try:
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            schema = self.db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if schema is None or schema[0] != SCHEMA or version != SCHEMA_VERSION:
                found = schema[0] if schema else "none"
                raise ForensicsError(self.path, f"registry of schema {found!r} version {version}; this tool reads "
                                                f"{SCHEMA!r} version {SCHEMA_VERSION} (build it again from the "
                                                f"models with `forensics registry add` or `make registry`)")
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise ForensicsError(self.path, f"not a registry (SQLite says: {e})") from None
        except ForensicsError:
            self.db.close()
            raise
        self.db.execute("PRAGMA foreign_keys = ON")

    @classmethod
    def create(cls, path: str | Path) -> Registry:
        path = Path(path)
        if path.exists():
            return cls(path, writable=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Made aside and renamed into place: an interrupted create leaves no file that is half a registry.
        staging = path.with_name(f".{path.name}.{os.getpid()}.new")
        db = sqlite3.connect(staging)
        try:
            db.executescript(_TABLES)
            db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA,))
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.commit()
        finally:
            db.close()
        os.replace(staging, path)
        return cls(path, writable=True)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading --

    def names(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM reference ORDER BY name")]

    def entries(self) -> list[Entry]:
        rows = self.db.execute("SELECT name, fingerprint, fingerprint_sha256, declared, neurons.sha256 FROM reference "
                               "LEFT JOIN neurons ON neurons.reference = name ORDER BY name")
        out = []
        for name, blob, sha, declared, record_sha in rows:
            entry = Entry(name, bytes(blob), Declared.from_dict(json.loads(declared)), neurons_sha256=record_sha)
            if entry.sha256 != sha:
                raise ForensicsError(self.path, f"entry {name!r}: its fingerprint does not hash to the SHA-256 "
                                                f"stored with it (the file was altered)")
            out.append(entry)
        return out

    def neuron_record(self, name: str) -> bytes | None:
        """The reference's neuron record, checked against the SHA-256 stored with it; None if it has none."""
        row = self.db.execute("SELECT record, sha256 FROM neurons WHERE reference = ?", (name,)).fetchone()
        if row is None:
            return None
        blob = bytes(row[0])
        if hashlib.sha256(blob).hexdigest() != row[1]:
            raise ForensicsError(self.path, f"entry {name!r}: its neuron record does not hash to the SHA-256 stored "
                                            f"with it (the file was altered)")
        return blob

    def get(self, name: str) -> Entry:
        for entry in self.entries():
            if entry.name == name:
                return entry
        raise ForensicsError(self.path, f"no reference named {name!r}")

    def _lineage(self) -> tuple[dict[str, Declared], dict[str, frozenset[str]]]:
        """Every entry's declarations and roots (followed through `derived_from`), without reading fingerprints."""
        entries = {name: Declared.from_dict(json.loads(d))
                   for name, d in self.db.execute("SELECT name, declared FROM reference ORDER BY name")}

        def roots(name: str, seen: frozenset = frozenset()) -> frozenset[str]:
            parents = [p for p in entries.get(name, Declared()).derived_from if p not in seen]
            if not parents:
                return frozenset((name,))
            return frozenset().union(*(roots(p, seen | {name}) for p in parents))

        return entries, {n: roots(n) for n in entries}

    @staticmethod
    def _unrelated(a: str, b: str, entries: dict[str, Declared], root: dict[str, frozenset[str]]) -> bool:
        if b in entries[a].unrelated_to or a in entries[b].unrelated_to:
            return True
        bases = all(entries.get(r, Declared()).base for r in root[a] | root[b])
        return bases and not root[a] & root[b]

    def unrelated_pairs(self) -> set[frozenset[str]]:
        """Pairs of entries the declarations make unrelated (the module's docstring says how)."""
        entries, root = self._lineage()
        names = sorted(entries)
        return {frozenset((a, b)) for i, a in enumerate(names) for b in names[i + 1:]
                if self._unrelated(a, b, entries, root)}

    def unrelated_sample(self, limit: int, seed: int = 0) -> list[tuple[str, str]]:
        """At most `limit` unrelated pairs, sorted: all of them in a small registry, else a seeded sample drawn
        without enumerating the N(N-1)/2 pairs of a large one."""
        entries, root = self._lineage()
        names = sorted(entries)
        n = len(names)
        rng = np.random.default_rng(seed)
        if n * (n - 1) // 2 <= 4 * limit:
            pairs = sorted((a, b) for a, b in map(sorted, self.unrelated_pairs()))
            if len(pairs) > limit:
                pairs = [pairs[i] for i in np.sort(rng.choice(len(pairs), limit, replace=False))]
            return pairs
        found: set[tuple[str, str]] = set()
        for _ in range(50 * limit):
            i, j = sorted(rng.choice(n, 2, replace=False))
            if self._unrelated(names[i], names[j], entries, root):
                found.add((names[i], names[j]))
                if len(found) == limit:
                    break
        return sorted(found)

    def null_members(self) -> list[Entry]:
        """A set of entries every two of which are unrelated, chosen greedily in name order (not necessarily the
        largest): the empirical null's members (a case's panel) when the registry is named as one."""
        pairs = self.unrelated_pairs()
        chosen: list[Entry] = []
        for entry in self.entries():
            if all(frozenset((entry.name, c.name)) in pairs for c in chosen):
                chosen.append(entry)
        return chosen

    def digest(self) -> str:
        """SHA-256 of the export body: what the registry holds, independent of SQLite's page layout."""
        return hashlib.sha256(_body(self.entries())).hexdigest()

    # -- writing (each one transaction) --

    def add(self, entries: list[Entry], replace: bool = False) -> None:
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise ForensicsError(self.path, f"two references would have the same name: {sorted(names)}")
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            for entry in entries:
                exists = self.db.execute("SELECT 1 FROM reference WHERE name = ?", (entry.name,)).fetchone()
                if exists and not replace:
                    raise ForensicsError(self.path, f"a reference named {entry.name!r} is already in the registry "
                                                    f"(remove it first, or add with --replace)")
                fp = entry.fp()
                model = fp["model"]
                self.db.execute("DELETE FROM reference WHERE name = ?", (entry.name,))
                self.db.execute("INSERT INTO reference VALUES (?, ?, ?, ?, ?, ?, ?)",
                                (entry.name, model.get("architecture"), model.get("hidden_size"),
                                 model.get("num_layers"), entry.fingerprint, entry.sha256,
                                 json.dumps(entry.declared.as_dict(), sort_keys=True)))
                self.db.executemany("INSERT INTO file VALUES (?, ?, ?, ?)",
                                    [(entry.name, f["path"], f["size"], f["sha256"]) for f in model["files"]])
                if entry.neurons is not None:
                    self.db.execute("INSERT INTO neurons VALUES (?, ?, ?)",
                                    (entry.name, entry.neurons, entry.record_sha256))

    def remove(self, names: list[str]) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            for name in names:
                if self.db.execute("DELETE FROM reference WHERE name = ?", (name,)).rowcount == 0:
                    raise ForensicsError(self.path, f"no reference named {name!r}")

    def export(self) -> bytes:
        entries = self.entries()
        body = _body(entries)
        records = {e.name: base64.b64encode(r).decode() for e in entries if (r := self.neuron_record(e.name))}
        return json.dumps({"schema": EXPORT_SCHEMA, "registry_schema": SCHEMA,
                           "sha256": hashlib.sha256(body).hexdigest(), "entries": json.loads(body),
                           "neuron_records": records}, sort_keys=True, indent=1).encode() + b"\n"


def _body(entries: list[Entry]) -> bytes:
    """What the registry's digest and an export's hash cover: every entry, its neuron record by SHA-256."""
    return json.dumps([{"name": e.name, "declared": e.declared.as_dict(), "fingerprint_sha256": e.sha256,
                        "neuron_record_sha256": e.record_sha256, "fingerprint": e.fp()}
                       for e in sorted(entries, key=lambda e: e.name)], sort_keys=True, separators=(",", ":")).encode()


def read_export(path: Path) -> list[Entry]:
    """The entries of an exported registry, after checking the document's hash and every entry's."""
    try:
        doc = json.loads(Path(path).read_bytes())
        if doc.get("schema") != EXPORT_SCHEMA:
            raise ForensicsError(path, f"not a registry export (schema must be {EXPORT_SCHEMA!r})")
        body = json.dumps(doc["entries"], sort_keys=True, separators=(",", ":")).encode()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ForensicsError(path, f"cannot read the registry export: {e}") from None
    if hashlib.sha256(body).hexdigest() != doc.get("sha256"):
        raise ForensicsError(path, "the export's entries do not hash to the SHA-256 it carries (altered or cut)")
    entries = []
    for item in doc["entries"]:
        try:
            record = doc.get("neuron_records", {}).get(item["name"])
            record = base64.b64decode(record, validate=True) if record is not None else None
        except (ValueError, TypeError, AttributeError) as e:
            raise ForensicsError(path, f"entry {item['name']!r}: its neuron record cannot be decoded: {e}") from None
        entry = Entry(item["name"], canonical(item["fingerprint"]), Declared.from_dict(item["declared"]), record)
        if entry.sha256 != item["fingerprint_sha256"]:
            raise ForensicsError(path, f"entry {item['name']!r}: fingerprint does not match its SHA-256")
        if entry.record_sha256 != item.get("neuron_record_sha256"):
            raise ForensicsError(path, f"entry {item['name']!r}: neuron record does not match its SHA-256")
        if record is not None:
            from forensics.signals.neurons import Record

            Record.from_bytes(record, path)  # readable, before anything is written
        entries.append(entry)
    return entries
