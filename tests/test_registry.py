"""The registry on tiny real checkpoints: add, list, remove, export and import through the command line; its
declarations as a null; a scan; bad registry files; an interrupted writer; and the Ray build with a killed worker."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import threading
import time

import psutil
import pytest

from forensics.cli import main
from forensics.errors import ForensicsError
from forensics.evidence.registry import SCHEMA, Declared, Registry
from forensics.pipeline import Reference, build_entries


def cli(capsys, *argv) -> tuple[int, dict | None, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else None, captured.err


@pytest.fixture(scope="module")
def registry(models, tmp_path_factory):
    path = tmp_path_factory.mktemp("registry") / "r.sqlite"
    assert main(["registry", "add", str(models / "parent"), "--name", "parent", "--base", "--registry",
                 str(path), "--source", "tests", "--licence", "Apache-2.0"]) == 0
    assert main(["registry", "add", str(models / "child"), "--name", "child", "--derived-from", "parent",
                 "--registry", str(path)]) == 0
    for i in range(3):
        assert main(["registry", "add", str(models / f"unrelated{i}"), "--name", f"unrelated{i}", "--base",
                     "--registry", str(path)]) == 0
    return path


def test_declarations_make_the_null(registry, capsys):
    code, listing, _ = cli(capsys, "registry", "list", "--registry", str(registry))
    assert code == 0
    assert [r["name"] for r in listing["references"]] == ["child", "parent", "unrelated0", "unrelated1", "unrelated2"]
    parent = next(r for r in listing["references"] if r["name"] == "parent")
    assert parent["base"] and parent["licence"] == "Apache-2.0" and parent["files"] >= 2
    pairs = {tuple(p) for p in listing["unrelated_pairs"]}
    # the child shares the parent's root: every other pair of the five is unrelated
    assert ("child", "parent") not in pairs and len(pairs) == 10 - 1
    with Registry(registry) as reg:
        assert [e.name for e in reg.null_members()] == ["child", "unrelated0", "unrelated1", "unrelated2"]


def test_scan_ranks_the_parent_first_and_calls_no_stranger_derived(registry, models, capsys):
    code, doc, _ = cli(capsys, "scan", str(models / "child"), "--registry", str(registry), "--alpha", "0.05",
                       "--permutations", "999", "--bootstrap", "100")
    assert code == 0
    ranking = doc["ranking"]
    # The child itself is in the registry: it and its parent come first, DERIVED by neuron matching on the stored
    # records, at a T the scan chose so that its floor survives Holm over the five references.
    assert {r["reference"] for r in ranking[:2]} == {"child", "parent"}
    assert [(r["verdict"], r["decided_by"]) for r in ranking[:2]] == [("DERIVED", "neurons")] * 2
    assert all(r["verdict"] != "DERIVED" for r in ranking if r["reference"].startswith("unrelated"))
    assert doc["registry"]["neuron_permutations"] == 199  # 5 / 200 < 0.05 <= 5 / 100
    assert doc["null_pairs"] == 9 and doc["registry"]["references"] == 5


def test_scan_never_reads_a_references_weights(registry, models, tmp_path, capsys):
    """The references' files are gone: the scan still matches neurons, from the registry's records alone."""
    kept = tmp_path / "child"
    shutil.copytree(models / "child", kept)
    with Registry(registry) as reg:
        paths = [reg.get(n).fp()["model"]["path"] for n in ("parent", "unrelated0")]
    assert all(p.startswith(str(models)) for p in paths)
    hidden = tmp_path / "hidden"
    shutil.move(str(models), str(hidden))
    try:
        code, doc, _ = cli(capsys, "scan", str(kept), "--registry", str(registry), "--alpha", "0.05",
                           "--permutations", "999", "--bootstrap", "100")
    finally:
        shutil.move(str(hidden), str(models))
    assert code == 0
    assert next(r for r in doc["ranking"] if r["reference"] == "parent")["verdict"] == "DERIVED"


def test_scan_writes_a_signed_dossier_that_records_the_registry(registry, models, tmp_path, capsys, monkeypatch):
    from forensics.report.verify import verify_dossier

    monkeypatch.setenv("FORENSICS_KEY_DIR", str(tmp_path / "keys"))
    out = tmp_path / "scan"
    code, doc, _ = cli(capsys, "scan", str(models / "unrelated0"), "--registry", str(registry), "--alpha", "0.05",
                       "--permutations", "999", "--bootstrap", "100", "--out", str(out), "--analyst", "A. Tester")
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["attestation.dsse.json", "dossier.pdf", "figures",
                                                     "fingerprints", "manifest.json", "results.json", "scan.json",
                                                     "scan.yaml", "signer-certificate.pem"]
    assert json.loads((out / "scan.json").read_text()) == doc
    manifest = json.loads((out / "manifest.json").read_text())
    with Registry(registry) as reg:
        assert manifest["registries"] == [{"path": str(registry), "sha256_of_contents": reg.digest(),
                                           "bytes": registry.stat().st_size, "references": 5}]
    assert [r["kind"] for r in manifest["inputs"] if r["path"] == str(registry)] == ["registry"]
    result = verify_dossier(out / "dossier.pdf", check_inputs=True, base_dir=models.parent,
                            expected_signer=manifest["signer"]["certificate_sha256"])
    assert result.ok, result.to_dict()
    # The model scanned is itself a reference (unrelated0): that one is found; no other reference is DERIVED.
    assert [r["reference"] for r in doc["ranking"] if r["verdict"] == "DERIVED"] == ["unrelated0"]


def test_export_import_round_trip_keeps_every_byte(registry, tmp_path, capsys):
    export = tmp_path / "r.json"
    assert main(["registry", "export", "--registry", str(registry), "-o", str(export)]) == 0
    copy = tmp_path / "copy.sqlite"
    code, doc, _ = cli(capsys, "registry", "import", str(export), "--registry", str(copy))
    with Registry(registry) as a, Registry(copy) as b:
        assert code == 0 and doc["sha256_of_contents"] == a.digest() == b.digest()
        assert a.export() == b.export()
    body = json.loads(export.read_text())
    body["entries"][0]["declared"]["base"] = not body["entries"][0]["declared"]["base"]
    export.write_text(json.dumps(body))
    code, _, message = cli(capsys, "registry", "import", str(export), "--registry", str(tmp_path / "x.sqlite"))
    assert code == 2 and "do not hash" in message and not (tmp_path / "x.sqlite").exists()


def test_an_export_whose_neuron_record_is_not_one_is_refused(registry, tmp_path, capsys):
    """Hashes that agree do not make a record readable: a crafted export (every hash recomputed over bytes that are
    no record) is refused by name before anything is written."""
    import base64
    import hashlib

    export = tmp_path / "r.json"
    assert main(["registry", "export", "--registry", str(registry), "-o", str(export)]) == 0
    doc = json.loads(export.read_text())
    bogus = b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"not a safetensors header"
    doc["neuron_records"]["parent"] = base64.b64encode(bogus).decode()
    next(e for e in doc["entries"] if e["name"] == "parent")["neuron_record_sha256"] = hashlib.sha256(bogus).hexdigest()
    doc["sha256"] = hashlib.sha256(json.dumps(doc["entries"], sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    export.write_text(json.dumps(doc))
    target = tmp_path / "x.sqlite"
    code, _, message = cli(capsys, "registry", "import", str(export), "--registry", str(target))
    assert code == 2 and "neuron record" in message and "cannot be read" in message and not target.exists()


def test_bad_scan_settings_and_missing_references_stop_before_reading(registry, models, tmp_path, capsys):
    out = tmp_path / "scan"
    code, doc, message = cli(capsys, "scan", str(models / "child"), "--registry", str(registry), "--permutations",
                             "50", "--out", str(out))
    assert code == 2 and doc is None and "statistics.permutations" in message and not out.exists()
    from tests.test_case_run import write_case

    path = write_case(tmp_path, models, candidates=[{"name": "p", "registry": str(registry), "reference": "nobody"}])
    code, doc, _ = cli(capsys, "case", "check", str(path))
    assert code == 1 and doc["missing"] == [f"p: the registry {registry} holds no reference named 'nobody'"]
    code, _, message = cli(capsys, "case", "run", str(path), "--out", str(tmp_path / "out"))
    assert code == 2 and "holds no reference named 'nobody'" in message and not (tmp_path / "out").exists()


def test_screened_out_candidates_are_adjusted_by_holm_only():
    from forensics.stats.compare import Settings

    with pytest.raises(ForensicsError, match="Holm only"):
        Settings(untested=3, multitest="bh")


def test_remove_and_duplicate_names(registry, tmp_path, capsys):
    copy = tmp_path / "r.sqlite"
    shutil.copy(registry, copy)
    assert main(["registry", "remove", "unrelated2", "--registry", str(copy)]) == 0
    with Registry(copy) as reg:
        assert "unrelated2" not in reg.names()
    code, _, message = cli(capsys, "registry", "remove", "nobody", "--registry", str(copy))
    assert code == 2 and "nobody" in message
    code, _, message = cli(capsys, "registry", "add", str(copy.parent), "--name", "parent", "--registry", str(copy))
    assert code == 2


def test_bad_registry_files_are_named_and_refused(registry, tmp_path, capsys):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    other = tmp_path / "other.sqlite"
    shutil.copy(registry, other)
    db = sqlite3.connect(other)
    db.execute("PRAGMA user_version = 7")
    db.commit()
    db.close()
    for path, problem in ((junk, "not a registry"), (other, "version 7"), (tmp_path / "none.sqlite", "not found")):
        code, out, message = cli(capsys, "registry", "list", "--registry", str(path))
        assert code == 2 and out is None and problem in message and str(path.name) in message
        code, out, message = cli(capsys, "scan", str(tmp_path), "--registry", str(path))
        assert code == 2 and out is None


def test_a_changed_reference_file_is_found_by_verify(models, tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(models / "unrelated0", model)
    reg = tmp_path / "r.sqlite"
    assert main(["registry", "add", str(model), "--registry", str(reg)]) == 0
    capsys.readouterr()
    code, report, _ = cli(capsys, "registry", "verify", "--registry", str(reg))
    assert code == 0 and report["ok"]
    (model / "config.json").write_text((model / "config.json").read_text() + " ")
    code, report, message = cli(capsys, "registry", "verify", "--registry", str(reg))
    assert code == 1 and not report["ok"] and "no longer match" in message
    assert [f["problem"] for f in report["files"] if not f["ok"]] == ["SHA-256 differs"]


def test_an_interrupted_writer_leaves_no_half_entry(registry, tmp_path):
    copy = tmp_path / "r.sqlite"
    shutil.copy(registry, copy)
    with Registry(copy) as reg:
        before = reg.export()
    # A writer killed between its inserts and its commit (SIGKILL: no cleanup runs).
    # 2,000 rows of 8 kB: more than SQLite's page cache holds, so the write has reached the file itself.
    code = ("import os, signal, sqlite3, sys; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "db.execute('BEGIN IMMEDIATE'); "
            "[db.execute('INSERT INTO reference VALUES (?, ?, 1, 1, ?, ?, ?)', (f'half{i}', 'llama', os.urandom(8192), "
            "'x', '{}')) for i in range(2000)]; "
            "db.execute(\"INSERT INTO file VALUES ('half0', 'a', 1, 'b')\"); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code, str(copy)])
    assert proc.returncode == -9
    assert copy.with_name(copy.name + "-journal").stat().st_size > 0  # the killed writer's journal is still there
    with Registry(copy) as reg:  # a reader: the journal is rolled back first
        assert reg.export() == before and not any(n.startswith("half") for n in reg.names())


def test_readers_share_the_file(registry):
    with Registry(registry) as a, Registry(registry) as b:
        assert a.digest() == b.digest()
        with pytest.raises(sqlite3.OperationalError):
            a.db.execute("DELETE FROM reference")  # a reader's connection is read-only


def test_registry_as_a_case_panel(registry, models):
    from forensics.case import load_case
    from forensics.pipeline import case_panel
    from tests.test_case_run import write_case

    path = write_case(registry.parent, models, statistics={"permutations": 999, "bootstrap": 100, "alpha": 0.05,
                                                           "seed": 1, "panel": str(registry)})
    case, _ = load_case(path)
    assert [fp["model"]["path"] for fp in case_panel(case)] == [
        str(models / n) for n in ("child", "unrelated0", "unrelated1", "unrelated2")]


def test_a_case_takes_candidates_from_a_registry(registry, models, tmp_path, monkeypatch):
    """The parent comes from the registry (its files moved away): the case still finds it, by neuron matching on its
    record, and the manifest lists the registry as an input with its contents hash."""
    from forensics.pipeline import run_case
    from tests.test_case_run import write_case

    monkeypatch.setenv("FORENSICS_KEY_DIR", str(tmp_path / "keys"))
    path = write_case(tmp_path, models, candidates=[
        {"name": "parent", "registry": str(registry), "reference": "parent"},
        {"name": "stranger", "path": str(models / "unrelated0")}], activations={"enabled": False},
        statistics={"permutations": 999, "bootstrap": 100, "alpha": 0.05, "seed": 1, "panel": str(registry)},
        neurons={"permutations": 99})
    hidden = tmp_path / "parent-away"
    shutil.move(str(models / "parent"), str(hidden))
    try:
        out = run_case(path, out_root=tmp_path / "out", device="cpu", argv=["forensics", "case", "run"])
    finally:
        shutil.move(str(hidden), str(models / "parent"))
    results = json.loads((out / "results.json").read_text())
    verdict = results["candidates"]["parent"]["verdict"]
    assert (verdict["verdict"], verdict["route"]) == ("DERIVED", "neurons")
    assert results["candidates"]["stranger"]["verdict"]["verdict"] != "DERIVED"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["path"] for r in manifest["registries"]] == [str(registry)]
    assert [r["kind"] for r in manifest["inputs"] if r["path"] == str(registry)] == ["registry"]
    assert not any("parent" in r["path"] for r in manifest["inputs"] if r.get("kind") == "weights")


def test_a_registry_candidate_needs_both_fields(registry, models, tmp_path, capsys):
    from tests.test_case_run import write_case

    path = write_case(tmp_path, models, candidates=[{"name": "parent", "registry": str(registry)}])
    code, out, message = cli(capsys, "case", "run", str(path), "--out", str(tmp_path / "out"))
    assert code == 2 and out is None and "registry and reference go together" in message
    assert not (tmp_path / "out").exists()


def _ray_workers() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any("_ray_entry" in part for part in (p.info["cmdline"] or [])):
            found.append(p)
    return found


def test_ray_build_survives_a_killed_worker_and_matches_a_local_build(models):
    refs = [Reference(models / n, n, Declared(base=True)) for n in ("parent", "unrelated0", "unrelated1",
                                                                   "unrelated2", "child")]
    killed = []

    def kill_first_worker():
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            for proc in _ray_workers():
                proc.kill()
                killed.append(proc.pid)
                break
            time.sleep(0.02)

    killer = threading.Thread(target=kill_first_worker)
    killer.start()
    remote = build_entries(refs, engine="ray", workers=2, memory_gb=0.5)
    killer.join()
    assert killed, "no Ray worker was seen running a task"
    local = build_entries(refs)
    assert [e.fingerprint for e in remote] == [e.fingerprint for e in local]
    assert [e.neurons for e in remote] == [e.neurons for e in local] and all(e.neurons for e in local)
    assert [e.name for e in remote] == [r.name for r in refs]


def test_ray_build_reports_a_bad_model_by_name(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{")
    with pytest.raises(ForensicsError) as caught:
        build_entries([Reference(bad, "bad", Declared())], engine="ray", workers=1, memory_gb=0.5)
    assert caught.value.path and caught.value.path.startswith(str(bad)) and "Ray" not in caught.value.problem


def test_schema_is_recorded(registry):
    db = sqlite3.connect(f"file:{registry}?mode=ro", uri=True)
    assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0] == SCHEMA
