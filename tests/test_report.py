"""Dossier building on a synthetic but well-formed case: figures, layout, manifest, and the rendered pages."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from forensics.errors import ForensicsError
from forensics.evidence.manifest import build_manifest, canonical_json_bytes, results_digest, write_canonical_json
from forensics.report import figures
from forensics.report.dossier import build_dossier, f_p
from forensics.report.signing import SigningConfig
from forensics.report.view import DossierView

ROLES = ("q", "k", "v", "o", "gate", "up", "down", "attn_norm")
POPPLER = shutil.which("pdftoppm") and shutil.which("pdfsig")
needs_poppler = pytest.mark.skipif(not POPPLER, reason="poppler-utils (pdftoppm, pdfsig) not installed; "
                                                       "apt-get install -y poppler-utils")


def _fingerprint(path: str, layers: int, curves: dict[str, np.ndarray], files: list[dict]) -> dict:
    signals = {name: {"kind": "weight_std", "role": name, "values": [round(float(x), 6) for x in vals]}
               for name, vals in curves.items()}
    return {"schema": "llm-forensics.fingerprint/1", "tool": {"name": "llm-forensics", "version": "0.1.0"},
            "model": {"path": path, "format": "safetensors", "architecture": "llama", "num_layers": layers,
                      "hidden_size": 576, "files": files},
            "signals": signals, "nonfinite": [], "run": {"device": "cpu", "elapsed_s": 1.0}}


def _base_curves(rng: np.random.Generator, layers: int) -> dict[str, np.ndarray]:
    depth = np.linspace(0, 1, layers)
    out = {}
    for i, role in enumerate(ROLES):
        shape = 0.05 + 0.02 * np.sin(2 * np.pi * depth * (1 + i % 3) + rng.uniform(0, 6)) + 0.01 * depth
        out[role] = shape + rng.normal(0, 0.002, layers)
    out["attn_norm"] = np.full(layers, 1.0)  # a flat curve, as RMSNorm weights at init give
    return out


# A calibration table as forensics.lab.calibrate writes it: 1 false positive in 90 unrelated pairs at alpha 0.05.
CALIBRATION = {"rule": {"0.05": {"rate": 1 / 90, "n": 90, "hits": 1, "ci95": [0.0003, 0.06]}},
               "design": {"summary": "90 unrelated pairs (test table)"}}


def synthetic_case(root: Path, calibration: dict | None = CALIBRATION) -> dict:
    """A suspect fine-tuned from 'base-7b' (same curves plus noise), an unrelated model of other depth, two named
    controls and eight more unrelated fingerprints, run through the real statistics stage (compare_case, few
    resamples for speed); input files with real bytes so hashes can be checked. ``results`` are the exact bytes of
    results.json as the statistics stage writes them. Returns everything build_dossier needs."""
    from forensics.stats.compare import Settings, compare_case, to_json

    rng = np.random.default_rng(20240611)
    evidence = root / "evidence"
    models = {"suspect-chat": ("suspect", 30), "base-7b": ("candidate", 30), "other-lab": ("candidate", 24),
              "control-a": ("control", 28), "control-b": ("control", 32)}
    base = _base_curves(rng, 30)
    fps, inputs = {}, []
    for name, (role, layers) in models.items():
        d = evidence / name
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(rng.bytes(4096 + layers))
        (d / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
        if name == "base-7b":
            curves = base
        elif name == "suspect-chat":
            curves = {k: v + rng.normal(0, 0.0015, 30) if k != "attn_norm" else v for k, v in base.items()}
        else:
            curves = _base_curves(rng, layers)
        files = [{"path": f, "size": (d / f).stat().st_size,
                  "sha256": hashlib.sha256((d / f).read_bytes()).hexdigest()}
                 for f in ("config.json", "model.safetensors")]
        fps[name] = _fingerprint(f"evidence/{name}", layers, curves, files)
        inputs.append({"path": f"evidence/{name}", "model": name, "kind": "weights"})
    more = {f"ctl-{i}": _fingerprint(f"evidence/ctl-{i}", 26 + i, _base_curves(rng, 26 + i),
                                     [{"path": "model.safetensors", "size": 1, "sha256": f"{i:064x}"}])
            for i in range(8)}
    controls = {"control-a": fps["control-a"], "control-b": fps["control-b"], **more}
    results = compare_case(fps["suspect-chat"], {"base-7b": fps["base-7b"], "other-lab": fps["other-lab"]},
                           controls, None, Settings(n_permutations=199, n_bootstrap=199, calibration=calibration))
    raw = to_json(results).encode()
    case = {"id": "CASE-2025-017", "title": "Provenance of suspect-chat", "analyst": "A. Analyst",
            "organisation": "Forensic Lab", "date": "2025-06-11",
            "parties": [{"role": "Claimant", "name": "Base Lab GmbH & Co. KG"},
                        {"role": "Respondent", "name": "Ünïcode Ltd <R&D>"}],
            "suspect": {"name": "suspect-chat", "path": "evidence/suspect-chat",
                        "claimed_origin": "trained from scratch"},
            "candidates": [{"name": "base-7b", "path": "evidence/base-7b"},
                           {"name": "other-lab", "path": "evidence/other-lab"}],
            "controls": [{"name": n, "path": f"evidence/{n}"} for n in controls]}
    case_yaml = yaml.safe_dump({"id": "CASE-2025-017", "suspect": "evidence/suspect-chat",
                                "candidates": ["evidence/base-7b", "evidence/other-lab"]}).encode()
    (root / "case.yaml").write_bytes(case_yaml)
    manifest = build_manifest(
        case_id="CASE-2025-017", argv=["forensics", "case", "run", str(root / "case.yaml")],
        case_yaml_bytes=case_yaml, case_yaml_path=root / "case.yaml", results=raw, inputs=inputs,
        corpus={"name": "forensics-en-1", "sha256": "ab" * 32}, token_windows={"sha256": "cd" * 32, "count": 64,
                                                                              "length": 512},
        environment={"python": {"version": "3.11.7"}, "torch": {"installed": False}}, inputs_base=root)
    return {"results": raw, "fingerprints": fps, "manifest": manifest, "case_yaml": case_yaml, "root": root,
            "case": case}


def build_synthetic(root: Path) -> dict:
    """The synthetic case, built into a signed dossier under ``root/out`` with a local key under ``root/keys``."""
    case = synthetic_case(root)
    out = root / "out"
    out.mkdir()
    (out / "results.json").write_bytes(case["results"])
    pdf = build_dossier(case["results"], case["manifest"], case["case_yaml"], out,
                        SigningConfig(key_dir=root / "keys"), case=case["case"])
    return {**case, "pdf": pdf, "out": out}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    return build_synthetic(tmp_path_factory.mktemp("case"))


def _pdftotext(pdf: Path) -> str:
    return subprocess.run(["pdftotext", "-layout", str(pdf), "-"], check=True, capture_output=True,
                          text=True).stdout


def test_build_writes_dossier_manifest_and_figures_and_no_temp_files(built):
    out = built["out"]
    assert built["pdf"] == out / "dossier.pdf"
    assert built["pdf"].read_bytes().startswith(b"%PDF-")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["attestation.dsse.json", "dossier.pdf", "figures", "manifest.json", "results.json",
                     "signer-certificate.pem"]
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["curves_weight_std_1.png", "heatmap.png",
                                                                  "null_qkvo.png"]
    manifest = json.loads((out / "manifest.json").read_bytes())
    assert manifest["results_digest"]["sha256"] == results_digest(built["results"])
    assert manifest["signer"]["self_signed"] and manifest["signer"]["generated_locally"]
    assert len(manifest["tool"]["templates_sha256"]) == 64
    # manifest.json on disk is canonical: rewriting it gives the same bytes
    assert canonical_json_bytes(manifest) == (out / "manifest.json").read_bytes()


@needs_poppler
def test_dossier_text_cover_summary_custody_and_footer(built):
    text = _pdftotext(built["pdf"])
    manifest = json.loads((built["out"] / "manifest.json").read_bytes())
    pages = text.split("\f")[:-1]
    cover = pages[0]
    assert "CASE-2025-017" in cover and manifest["dossier_id"] in cover
    cert = manifest["signer"]["certificate_sha256"]
    assert cert[:32] in cover and cert[32:] in cover  # printed as two 32-digit lines
    assert "generated locally" in cover
    assert "Base Lab GmbH & Co. KG" in cover and "Ünïcode Ltd <R&D>" in cover  # escaped, not eaten as markup
    assert "A. Analyst, Forensic Lab" in cover
    for n, page in enumerate(pages, start=1):
        assert f"Dossier {manifest['dossier_id']}" in page and f"Page {n} of {len(pages)}" in page
    assert "base-7b: DERIVED." in text and "other-lab: NO EVIDENCE." in text
    assert "1.1% (1 of 90 unrelated pairs; 95%" in text and "CI 0.03%–6%)" in text
    assert "Deciding test: std curves" in text and "neuron matching: not applicable" in text
    headings = ["1. Summary", "2. Models examined", "3. Method", "4. Results per signal", "5. Similarity of the suspect",
                "6. Null distribution", "7. Limitations", "8. Chain of custody", "9. How to verify this dossier"]
    assert [text.index(h) for h in headings] == sorted(text.index(h) for h in headings)
    for phrase in ("Distillation.", "Retraining at scale.", "Rescaling attacks.", "Flat curves.",
                   "trained from scratch", "pdfsig dossier.pdf", "pyhanko sign validate"):
        assert phrase in text
    for rec in manifest["inputs"]:
        assert rec["sha256"][:32] in text and rec["sha256"][32:] in text
    assert manifest["case_yaml"]["sha256"][:32] in text


@needs_poppler
def test_every_page_renders(built, tmp_path):
    info = subprocess.run(["pdfinfo", str(built["pdf"])], check=True, capture_output=True, text=True).stdout
    n_pages = int(next(line.split()[-1] for line in info.splitlines() if line.startswith("Pages:")))
    assert n_pages >= 8
    subprocess.run(["pdftoppm", "-r", "30", "-png", str(built["pdf"]), str(tmp_path / "p")], check=True,
                   capture_output=True)
    pngs = sorted(tmp_path.glob("p-*.png"))
    assert len(pngs) == n_pages
    assert all(p.stat().st_size > 1000 for p in pngs)


def test_figures_are_byte_reproducible(built, tmp_path):
    view = DossierView.from_results(built["results"], case=built["case"])
    again = figures.render_all(view, tmp_path)
    for paths in again.values():
        for p in paths:
            original = built["out"] / "figures" / p.name
            assert p.read_bytes() == original.read_bytes(), p.name
            assert b"matplotlib" not in p.read_bytes()  # no Software chunk naming the version


def test_curves_use_relative_depth_only_when_depths_differ(built):
    mixed = figures.curves_figure(DossierView.from_results(built["results"], case=built["case"]), ["q", "attn_norm"])
    assert mixed.axes[0].get_xlabel() == "relative depth"  # other-lab has 24 layers, the suspect 30
    results = json.loads(built["results"])
    for key in ("candidates", "models", "curves"):
        del results[key]["other-lab"]
    same = figures.curves_figure(DossierView.from_results(results, case=built["case"]), ["q", "attn_norm"])
    assert same.axes[0].get_xlabel() == "layer"
    assert [len(line.get_xdata()) for line in same.axes[0].lines] == [30, 30]
    assert same.axes[1].get_title() == "attn_norm (flat)" and not same.axes[1].lines


def test_view_refuses_results_that_drift_from_the_schema(built):
    results = json.loads(built["results"])
    results["candidates"]["base-7b"]["signals"]["q"]["pearson"] = 0.9  # a synonym the schema does not know
    del results["candidates"]["other-lab"]["verdict"]["rule"]
    with pytest.raises(ForensicsError, match=r"candidates\.base-7b\.signals\.q\.pearson: Extra inputs.*"
                                             r"candidates\.other-lab\.verdict\.rule: Field required"):
        DossierView.from_results(results, case={"id": "X"})
    view = DossierView.from_results(built["results"], case={"id": "X"})
    assert list(view.models)[:3] == ["suspect", "base-7b", "other-lab"]
    assert view.heatmap.candidates == ["base-7b", "other-lab"] and "qkvo" in view.heatmap.signals


@pytest.mark.parametrize("change, problem", [
    (lambda r: r["models"]["base-7b"].update(kind="suspect"), "exactly one model of kind 'suspect'"),
    (lambda r: r["models"]["base-7b"].update(kind="parent"), "'suspect', 'candidate', 'control' or 'panel'"),
    (lambda r: r["candidates"].update(nobody=r["candidates"]["base-7b"]), "'nobody', which is not among the models"),
])
def test_view_rejects_inconsistent_results(built, change, problem):
    results = json.loads(built["results"])
    change(results)
    with pytest.raises(ForensicsError, match=problem):
        DossierView.from_results(results, case={"id": "X"})


def test_results_off_the_schema_write_nothing(built, tmp_path):
    """A results file the schema does not describe (here: verdicts only, no curves, no tests) is refused with the
    fields it lacks, before any figure or PDF is written."""
    results = {"schema": "llm-forensics.stats/2", "candidates": {"c": {"verdict": {"verdict": "INCONCLUSIVE"}}}}
    case_yaml = b"id: SPARSE\n"
    manifest = build_manifest(case_id="SPARSE", argv=["forensics"], case_yaml_bytes=case_yaml,
                              case_yaml_path="case.yaml", results=results, inputs=[], environment={})
    with pytest.raises(ForensicsError, match="results do not match the results schema.*settings: Field required"):
        build_dossier(results, manifest, case_yaml, tmp_path / "out", SigningConfig(key_dir=built["root"] / "keys"))
    assert not (tmp_path / "out").exists()


def test_pvalue_formatting_states_the_floor_as_a_bound():
    assert f_p(1 / 1001, 1 / 1001) == "≤ 0.001"
    assert f_p(1 / 10001, 1 / 10001) == "≤ 0.0001"
    assert f_p(0.0412, 1 / 1001) == "0.041"
    assert f_p(3.2e-5) == "3.2e-05"
    assert f_p(None) == "n/a"


def test_build_refuses_manifest_of_other_results_and_writes_nothing(built, tmp_path):
    results = json.loads(built["results"])
    results["candidates"]["base-7b"]["verdict"]["verdict"] = "INCONCLUSIVE"
    with pytest.raises(ForensicsError, match="different results"):
        build_dossier(results, built["manifest"], built["case_yaml"], tmp_path / "out",
                      SigningConfig(key_dir=built["root"] / "keys"))
    with pytest.raises(ForensicsError, match="case file changed"):
        build_dossier(built["results"], built["manifest"], built["case_yaml"] + b"#", tmp_path / "out",
                      SigningConfig(key_dir=built["root"] / "keys"))
    assert not (tmp_path / "out" / "dossier.pdf").exists()


def test_signing_failure_leaves_previous_dossier_untouched(built, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "dossier.pdf").write_bytes(b"previous dossier")
    bad_key = tmp_path / "analyst.p12"
    bad_key.write_bytes(b"not a pkcs12 archive")
    with pytest.raises(ForensicsError, match="cannot open PKCS#12"):
        build_dossier(built["results"], built["manifest"], built["case_yaml"], out, SigningConfig(pkcs12=bad_key))
    assert (out / "dossier.pdf").read_bytes() == b"previous dossier"
    assert [p.name for p in out.iterdir()] == ["dossier.pdf"]


def test_manifest_records_inputs_and_is_deterministic(built, tmp_path):
    root = built["root"]
    kwargs = dict(case_id="C", argv=["forensics", "case", "run", "c.yaml"], case_yaml_bytes=b"id: C\n",
                  case_yaml_path="c.yaml", results={"x": [1, 2.5]}, inputs=["evidence/base-7b"],
                  environment={"python": {"version": "3"}}, created_at="2025-01-02T03:04:05Z", inputs_base=root)
    a, b = build_manifest(**kwargs), build_manifest(**kwargs)
    assert canonical_json_bytes(a) == canonical_json_bytes(b)
    assert a["dossier_id"].startswith("LF-20250102-")
    assert [r["path"] for r in a["inputs"]] == ["evidence/base-7b/config.json", "evidence/base-7b/model.safetensors"]
    want = hashlib.sha256((root / "evidence/base-7b/model.safetensors").read_bytes()).hexdigest()
    assert a["inputs"][1]["sha256"] == want
    path = write_canonical_json({"x": [1, 2.5]}, tmp_path / "results.json")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == a["results_digest"]["sha256"]
    with pytest.raises(ForensicsError, match="listed twice"):
        build_manifest(**{**kwargs, "inputs": ["evidence/base-7b", "evidence/base-7b/config.json",
                                               "evidence/base-7b/config.json"]})
    with pytest.raises(ForensicsError, match="does not exist"):
        build_manifest(**{**kwargs, "inputs": ["evidence/nothing-here"]})
    with pytest.raises(ForensicsError, match=r"results\.x\[0\] is nan"):
        build_manifest(**{**kwargs, "results": {"x": [float("nan")]}})


def test_fingerprint_file_lists_become_input_records(built, monkeypatch):
    from forensics.evidence.manifest import fingerprint_inputs

    monkeypatch.chdir(built["root"])  # the fingerprints record model paths relative to the case directory
    records = fingerprint_inputs(built["fingerprints"])
    assert len(records) == 10 and {r["model"] for r in records} == set(built["fingerprints"])
    for r in records:
        assert hashlib.sha256(Path(r["path"]).read_bytes()).hexdigest() == r["sha256"]
    kept = build_manifest(case_id="C", argv=[], case_yaml_bytes=b"", case_yaml_path="c.yaml", results={},
                          inputs=records, environment={})["inputs"]
    assert kept == records  # hashed when the weights were read; not hashed again
    with pytest.raises(ForensicsError, match="needs both 'size'"):
        build_manifest(case_id="C", argv=[], case_yaml_bytes=b"", case_yaml_path="c.yaml", results={},
                       inputs=[{"path": "x", "sha256": "00"}], environment={})


def test_environment_is_json_ready_and_hostname_optional():
    from forensics.evidence.environment import capture_environment

    env = capture_environment()
    json.dumps(env)
    assert env["python"]["version"].count(".") == 2
    assert env["packages"]["reportlab"] and env["packages"]["pyhanko"]
    assert "hostname" not in env and "hostname" in capture_environment(include_hostname=True)
    if env["torch"]["installed"]:
        assert env["torch"]["version"] and isinstance(env["torch"]["cuda_available"], bool)


@pytest.fixture(scope="module")
def built_stats(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stats")
    case = synthetic_case(root, calibration=None)
    pdf = build_dossier(case["results"], case["manifest"], case["case_yaml"], root / "out",
                        SigningConfig(key_dir=root / "keys"), case=case["case"])
    return {**case, "pdf": pdf, "out": root / "out"}


@needs_poppler
def test_dossier_from_the_statistics_stage(built_stats):
    text = _pdftotext(built_stats["pdf"])
    results = json.loads(built_stats["results"])
    verdicts = {name: c["verdict"]["verdict"] for name, c in results["candidates"].items()}
    for name, verdict in verdicts.items():
        assert f"{name}: {verdict}." in text
    assert "suspect-chat" in text  # the case's name for the model compare_case calls "suspect"
    assert "has not been measured" in text  # no calibration table: said so, not left blank
    # the statistics stage records the null's values, so the dossier draws their histogram
    assert "of unrelated pairs, and the observed values" in text
    assert "did not record the individual values" not in text
    assert "ctl-7" in text and "4.2 Aggregates" in text
    assert results["candidates"]["base-7b"]["verdict"]["reasons"][0] in " ".join(text.split())
    # results.json is attached exactly as the statistics stage wrote it
    attached = subprocess.run(["pdfdetach", "-savefile", "results.json", "-o", "/dev/stdout", str(built_stats["pdf"])],
                              capture_output=True, check=True).stdout
    assert attached == built_stats["results"]


def test_statistics_null_values_give_a_histogram(built_stats, tmp_path):
    results = json.loads(built_stats["results"])
    for c in results["candidates"].values():
        c["signals"]["qkvo"]["empirical_null"]["values"] = [0.1 * i for i in range(-3, 8)]
    view = DossierView.from_results(results, case=built_stats["case"])
    assert [(n.label, len(n.values)) for n in view.nulls] == [("qkvo", 11)]
    assert set(view.nulls[0].observed) == {"base-7b", "other-lab"}
    assert (tmp_path / "null_qkvo.png") in figures.render_all(view, tmp_path)["null:qkvo"]


def test_the_dossier_says_how_many_neurons_each_layer_drew():
    """Per layer from the units' own counts (a wide MoE layer draws more than the setting), per unit where a layer
    has several; results from before units recorded their share fall back on the setting."""
    from forensics.report.dossier import _drawn
    from forensics.results import NeuronLayer

    def layer(i: int, counts: list[int | None]) -> NeuronLayer:
        unit = {"layer": i, "kind": "dense" if len(counts) == 1 else "expert"}
        return NeuronLayer.model_validate({"layer": i, "statistic": 0.5, "pvalue": 0.5, "units": [
            {"unit": unit, "label": "u", "statistic": 0.5, "pvalue": 0.5, "matches": unit,
             "same_index_fraction": 0.0, **({} if n is None else {"neurons": n})} for n in counts]})

    assert _drawn(16, [layer(0, [16]), layer(1, [16])]) == "16 neurons drawn per layer"
    assert _drawn(16, [layer(0, [4] * 4)]) == "16 neurons drawn per layer (4 from each of its FFN units)"
    assert _drawn(16, [layer(0, [4] * 64), layer(1, [16])]) == \
        "16 or 256 neurons drawn per layer (4 from each of its FFN units)"
    assert _drawn(16, [layer(0, [None, None])]) == "16 neurons per unit"
