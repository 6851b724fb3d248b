"""The package as a user installs it: a wheel built from this tree, installed into a fresh virtual environment
outside the repository, runs a tiny case to a signed dossier. This is what catches data files (dossier wording,
embedded corpus, reference panel, calibration table) left out of the package, or read from the source tree."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import yaml

from forensics.corpus import load_corpus
from tests.test_case_run import family
from tests.test_corpus import byte_bpe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel; its dependencies come from this interpreter's site-packages through a
    .pth path entry, which adds the directory but runs none of its .pth files (so not the editable install)."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(ROOT)], check=True, cwd=tmp, capture_output=True)
    wheel = next((tmp / "dist").glob("llm_forensics-*.whl"))
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    deps = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (purelib / "deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(purelib), str(wheel)],
                   check=True, capture_output=True)
    return py


def test_installed_wheel_runs_a_case_to_a_signed_dossier(installed, tmp_path):
    where = subprocess.run([str(installed), "-c", "import forensics; print(forensics.__file__)"], check=True,
                           capture_output=True, text=True, cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(installed.parents[1]), where  # the wheel's copy, not the source tree
    tok = byte_bpe(load_corpus(show_progress=False).texts[:30])
    parent = family(tmp_path / "parent", tok, seed=1)
    family(tmp_path / "child", tok, seed=2, parent=parent, noise=0.02)
    family(tmp_path / "other", tok, seed=11)
    case = {"id": "wheel-case", "title": "Installed wheel", "analyst": "Test Analyst",
            "suspect": {"name": "child", "path": "child"},
            "candidates": [{"name": "parent", "path": "parent"}, {"name": "other", "path": "other"}],
            "activations": {"batch_size": 2, "seq_len": 16, "num_batches": 1, "device": "cpu"},
            "statistics": {"permutations": 99, "bootstrap": 100, "alpha": 0.05, "seed": 1},
            "neurons": {"enabled": False}}
    (tmp_path / "case.yaml").write_text(yaml.safe_dump(case))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FORENSICS_TEMPLATES_DIR")}
    env["FORENSICS_KEY_DIR"] = str(tmp_path / "keys")
    run = subprocess.run([str(installed), "-m", "forensics.cli", "case", "run", "case.yaml", "--out", "out",
                          "--device", "cpu"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    assert set(summary["verdicts"]) == {"parent", "other"}
    out = tmp_path / "out" / "wheel-case"
    assert (out / "dossier.pdf").read_bytes().startswith(b"%PDF-")
    results = json.loads((out / "results.json").read_text())
    assert results["candidates"]["parent"]["signals"]["act_norm"]["status"] == "compared"  # the embedded corpus
    assert results["null"]["n_pairs"] > 0  # the shipped panel
    assert results["measured_false_positive_rate"] is not None  # the shipped calibration table
    verify = subprocess.run([str(installed), "-m", "forensics.cli", "verify", "out/wheel-case/dossier.pdf",
                             "--signer", summary["signer_certificate_sha256"]],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout
