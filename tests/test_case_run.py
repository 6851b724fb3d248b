"""A whole case on tiny real checkpoints: case file → fingerprints → activations → statistics → signed dossier."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
import yaml

from forensics.pipeline import run_case
from forensics.errors import ForensicsError
from forensics.report.verify import verify_dossier
from tests import tiny

LAYERS = 24  # real-model depth: the block-permutation null needs enough layers to reach small p


def family(path, tokenizer, seed: int, parent=None, noise: float = 0.0):
    """A tiny Llama whose matrices get a per-layer scale (trained models have a depth profile; a fresh init is
    flat). A child copies its parent's weights and adds `noise` times each tensor's std."""
    cfg = transformers.LlamaConfig(**{**tiny.SMALL, "num_hidden_layers": LAYERS, "vocab_size": len(tokenizer)})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if parent is not None:
            model.load_state_dict(parent.state_dict())
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * noise * p.std())
        else:
            for name, p in model.named_parameters():
                if ".layers." in name:
                    p.mul_(0.5 + torch.rand(1, generator=g))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def write_case(tmp_path, models, **overrides) -> object:
    case = {
        "id": "tiny-case", "title": "Tiny end-to-end case", "analyst": "Test Analyst", "organisation": "Test Lab",
        "parties": [{"role": "claimant", "name": "Parent Lab"}],
        "suspect": {"name": "child", "path": str(models / "child"), "claimed_origin": "independent"},
        "candidates": [{"name": "parent", "path": str(models / "parent")},
                       {"name": "stranger", "path": str(models / "unrelated0")}],
        "controls": [{"name": "control-1", "path": str(models / "unrelated1")},
                     {"name": "control-2", "path": str(models / "unrelated2")}],
        "activations": {"batch_size": 2, "seq_len": 24, "num_batches": 2, "device": "cpu"},
        "statistics": {"permutations": 999, "bootstrap": 200, "alpha": 0.05, "seed": 7, "panel": "none"},
    }
    case.update(overrides)
    path = tmp_path / "case.yaml"
    path.write_text(yaml.safe_dump(case, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def ran(tmp_path_factory, models):
    tmp = tmp_path_factory.mktemp("case")
    mp = pytest.MonkeyPatch()
    mp.setenv("FORENSICS_KEY_DIR", str(tmp / "keys"))
    out = run_case(write_case(tmp, models), out_root=tmp / "out", device="cpu", argv=["forensics", "case", "run"])
    yield tmp, out
    mp.undo()


def test_case_writes_signed_dossier_that_verifies(ran, models):
    tmp, out = ran
    assert sorted(p.name for p in out.iterdir()) == ["attestation.dsse.json", "dossier.pdf", "figures",
                                                     "fingerprints", "manifest.json", "results.json",
                                                     "signer-certificate.pem"]
    manifest = json.loads((out / "manifest.json").read_text())
    result = verify_dossier(out / "dossier.pdf", check_inputs=True, base_dir=models,
                            expected_signer=manifest["signer"]["certificate_sha256"])
    assert result.ok, result.to_dict()
    recorded = {r["path"] for r in manifest["inputs"]}
    assert any(p.endswith("child/model.safetensors") for p in recorded)
    assert any(p.endswith("parent/tokenizer.json") for p in recorded)
    if shutil.which("pdfsig"):
        sig = subprocess.run(["pdfsig", str(out / "dossier.pdf")], capture_output=True, text=True).stdout
        assert "Signature is Valid." in sig and "Total document signed" in sig
    if shutil.which("pdftotext"):
        text = subprocess.run(["pdftotext", str(out / "dossier.pdf"), "-"], capture_output=True, text=True).stdout
        headings = [line for line in text.splitlines() if line.strip().endswith(". Null distribution")]
        assert len(headings) == 1, headings  # each chapter once, its figure with it
        assert "of unrelated pairs, and the observed values" in text
        assert text.count("Decision rule, fixed before the analysis") == 1  # one rule, whichever route decided
        assert "Evidence that survives permutation and rescaling" in text and "parent: EVIDENCE OF DERIVATION" in text
    if shutil.which("pdftoppm"):
        subprocess.run(["pdftoppm", "-r", "20", "-png", str(out / "dossier.pdf"), str(tmp / "page")], check=True)
        assert len(list(tmp.glob("page-*.png"))) >= 5


def test_manifest_records_one_read_of_every_weight_file(ran):
    """The case read each file of each model front to back once (the neuron sketches came from the fingerprint
    passes), looked up little before it (headers, the token embedding) and nothing again."""
    _, out = ran
    weights = [r for r in json.loads((out / "manifest.json").read_text())["inputs"] if r["kind"] == "weights"]
    assert weights and all(r["bytes_read"]["pass"] == r["size"] and r["bytes_read"]["again"] == 0 for r in weights)
    size = sum(r["size"] for r in weights)
    looked_up = sum(r["bytes_read"]["look-up"] for r in weights)
    assert 0 < looked_up < 0.1 * size
    assert {r["model"] for r in weights if r["bytes_read"]["look-up"]} == {"child", "parent", "stranger"}
    # The activation pass (transformers' forward pass) reads every model's files again, unhashed.
    assert all(r["bytes_read"]["activations"] == r["size"] for r in weights)


def test_a_cached_rerun_reads_nothing_and_says_so(models, tmp_path, monkeypatch):
    monkeypatch.setenv("FORENSICS_KEY_DIR", str(tmp_path / "keys"))
    case = write_case(tmp_path, models, activations={"enabled": False},
                      statistics={"permutations": 99, "bootstrap": 100, "seed": 1, "panel": "none"})
    first = run_case(case, out_root=tmp_path / "out", device="cpu")
    shutil.rmtree(first)
    again = run_case(case, out_root=tmp_path / "out", device="cpu")
    weights = [r for r in json.loads((again / "manifest.json").read_text())["inputs"] if r["kind"] == "weights"]
    assert weights and all(r["bytes_read"] == {"pass": 0, "look-up": 0, "again": 0, "activations": 0}
                           for r in weights)


def test_results_json_is_what_the_typed_results_describe(ran):
    from forensics.results import CaseResults
    from forensics.stats.compare import to_json

    raw = (ran[1] / "results.json").read_bytes()
    assert to_json(CaseResults.from_json(raw).as_json()).encode() == raw


def test_results_tell_parent_from_stranger(ran):
    _, out = ran
    results = json.loads((out / "results.json").read_text())
    parent, stranger = results["candidates"]["parent"], results["candidates"]["stranger"]
    assert parent["signals"]["qkvo"]["statistic"] > 0.99
    assert parent["signals"]["qkvo"]["permutation"]["pvalue"] < 0.01
    assert stranger["signals"]["qkvo"]["statistic"] < parent["signals"]["qkvo"]["statistic"]
    assert parent["signals"]["act_norm"]["status"] == "compared"
    assert stranger["verdict"]["verdict"] != "DERIVED"
    # neuron matching (case defaults, T = 199): the noised child holds the parent's neurons, not the stranger's
    assert parent["neurons"]["conclusion"] == "EVIDENCE OF DERIVATION" and parent["neurons"]["pvalue"] == 1 / 200
    # an unrelated model has no near-exact map of the child's residual stream: the route does not apply to it
    assert stranger["neurons"]["conclusion"] == "UNAVAILABLE" and "no near-exact alignment" in stranger["neurons"]["reason"]
    assert not parent["tamper"]["raised"] and not stranger["tamper"]["raised"]


def test_same_inputs_give_byte_identical_results(ran, models, tmp_path, monkeypatch):
    _, out = ran
    monkeypatch.setenv("FORENSICS_KEY_DIR", str(tmp_path / "keys"))
    again = run_case(write_case(tmp_path, models), out_root=tmp_path / "fresh", device="cpu")
    assert (again / "results.json").read_bytes() == (out / "results.json").read_bytes()


def test_changed_input_is_named_by_verify(ran, models, tmp_path):
    tmp, out = ran
    copy = tmp_path / "models"
    shutil.copytree(models, copy)
    pdf = out / "dossier.pdf"
    manifest = json.loads((out / "manifest.json").read_text())
    victim = next(r["path"] for r in manifest["inputs"] if r["path"].endswith("child/config.json"))
    original = open(victim, "rb").read()
    try:
        with open(victim, "ab") as f:
            f.write(b" ")
        r = subprocess.run([sys.executable, "-m", "forensics.cli", "verify", str(pdf), "--inputs", "--base-dir",
                            str(models), "--signer", manifest["signer"]["certificate_sha256"]],
                           capture_output=True, text=True)
        assert r.returncode == 1
        assert victim in r.stdout
    finally:
        with open(victim, "wb") as f:
            f.write(original)
    shutil.rmtree(copy)


def test_flipped_byte_fails_verify(ran, tmp_path):
    _, out = ran
    data = bytearray((out / "dossier.pdf").read_bytes())
    data[len(data) // 3] ^= 0x01
    bad = tmp_path / "tampered.pdf"
    bad.write_bytes(bytes(data))
    r = subprocess.run([sys.executable, "-m", "forensics.cli", "verify", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0


@pytest.mark.parametrize("edit,field", [
    ({"suspect": None}, "suspect"),
    ({"signals": ["q", "warp_drive"]}, "warp_drive"),
    ({"statistics": {"alpha": "small"}}, "statistics.alpha"),
])
def test_bad_case_file_gives_clear_error_and_no_output(models, tmp_path, edit, field):
    case = write_case(tmp_path, models)
    data = yaml.safe_load(case.read_text())
    for k, v in edit.items():
        if v is None:
            data.pop(k)
        else:
            data[k] = v
    case.write_text(yaml.safe_dump(data, sort_keys=False))
    r = subprocess.run([sys.executable, "-m", "forensics.cli", "case", "run", str(case), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2
    assert field in r.stderr and "case.yaml" in r.stderr and "line" in r.stderr
    assert not (tmp_path / "out" / "tiny-case").exists()
    with pytest.raises(ForensicsError):
        run_case(case, out_root=tmp_path / "out2")
    assert not (tmp_path / "out2").exists() or not any((tmp_path / "out2").iterdir())
