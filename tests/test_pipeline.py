"""The orchestration (forensics/pipeline.py): the authenticated cache, the byte checks between passes, and a case's
outputs staged, checked and swapped into place."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from forensics import pipeline
from forensics.corpus import load_corpus
from forensics.errors import ForensicsError
from tests.test_case_run import write_case


def test_store_round_trips_and_refuses_an_edited_entry(tmp_path, capsys):
    store = pipeline.Store(tmp_path / "cache", key_dir=tmp_path / "keys")
    store.put("fingerprints", "k", {"signals": {"q": [1.0, 2.0]}})
    assert store.get("fingerprints", "k") == {"signals": {"q": [1.0, 2.0]}}
    assert (tmp_path / "keys" / pipeline.STORE_KEY_NAME).stat().st_mode & 0o777 == 0o600
    entry = tmp_path / "cache" / "fingerprints" / "k.json"
    entry.write_bytes(entry.read_bytes().replace(b"2.0", b"2.5"))  # a hand-edited value, MAC line kept
    assert store.get("fingerprints", "k") is None
    assert "failed its authentication check" in capsys.readouterr().err
    assert not entry.exists()
    # An entry written under another installation's key is refused the same way.
    store.put("fingerprints", "k", {"x": 1})
    other = pipeline.Store(tmp_path / "cache", key_dir=tmp_path / "other-keys")
    assert other.get("fingerprints", "k") is None


def test_a_poisoned_cache_entry_is_recomputed_and_said_so(models, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FORENSICS_KEY_DIR", str(tmp_path / "keys"))
    store = pipeline.Store(tmp_path / "cache")
    fp = pipeline.fingerprint(models / "parent", "cpu", "parent", store)
    entry = next((tmp_path / "cache" / "fingerprints").glob("*.json"))
    mac, _, body = entry.read_bytes().partition(b"\n")
    poisoned = json.loads(body)
    poisoned["signals"]["q"]["values"][0] *= 2
    entry.write_bytes(mac + b"\n" + json.dumps(poisoned, sort_keys=True).encode())
    capsys.readouterr()
    again = pipeline.fingerprint(models / "parent", "cpu", "parent", store)
    assert "failed its authentication check" in capsys.readouterr().err
    assert again["signals"] == fp["signals"]


def test_activation_pass_refuses_files_written_after_the_fingerprint_pass(models, tmp_path):
    """The forward pass reads through transformers, not hashed again: a write since the fingerprint pass (the same
    bytes written back still change its status-change time) stops it."""
    child = tmp_path / "child"
    shutil.copytree(models / "child", child)
    fp = pipeline.fingerprint(child, "cpu", "child", show_progress=False)
    plan = {"batch_size": 1, "seq_len": 16, "num_batches": 1, "seed": 0}
    corpus = load_corpus(show_progress=False)
    assert pipeline.activations(child, fp, corpus, plan, "cpu", show_progress=False)["act_norm"]["values"]
    config = child / "config.json"
    config.write_bytes(config.read_bytes())
    with pytest.raises(ForensicsError, match="changed during the analysis.*activation pass") as e:
        pipeline.activations(child, fp, corpus, plan, "cpu", show_progress=False)
    assert Path(e.value.path) == config


def test_case_refuses_an_output_inside_the_evidence_before_reading(models, tmp_path, monkeypatch):
    monkeypatch.setenv("FORENSICS_KEY_DIR", str(tmp_path / "keys"))
    case = write_case(tmp_path, models)
    with pytest.raises(ForensicsError, match="inside the input model directory"):
        pipeline.run_case(case, out_root=models / "parent", device="cpu")
    assert not (models / "parent" / "tiny-case").exists() and not (models / "parent" / ".cache").exists()


def test_stale_staging_of_a_dead_run_is_removed(models, tmp_path, monkeypatch):
    monkeypatch.setenv("FORENSICS_KEY_DIR", str(tmp_path / "keys"))
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = out / f".tiny-case.partial-{dead}"
    (stale / "fingerprints").mkdir(parents=True)
    (stale / "results.json").write_text("{}")  # unsigned leftovers of a run killed mid-write
    alive = out / f".tiny-case.partial-{os.getppid()}"
    alive.mkdir()
    case = write_case(tmp_path, models, activations={"enabled": False}, neurons={"enabled": False},
                      statistics={"permutations": 99, "bootstrap": 100, "seed": 1, "panel": "none"})
    final = pipeline.run_case(case, out_root=out, device="cpu")
    assert not stale.exists() and alive.exists()  # a running process's staging is left alone
    assert (final / "dossier.pdf").is_file()
