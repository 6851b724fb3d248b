"""Hostile inputs (issue #16): files crafted to make the tool read outside a model, hang, crash, compare a model with
itself, overwrite its evidence or pass off an unknown signer as verified. Each is refused with one message naming
the file, or reported as a verdict; nothing hangs and nothing is written."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import TensorProto, helper

from forensics.case import load_case
from forensics.errors import ForensicsError
from forensics.evidence.manifest import build_manifest
from forensics.fingerprint import fingerprint_model
from forensics.report.dossier import build_dossier
from forensics.report.signing import KEY_DIR_ENV, SigningConfig, load_signer
from forensics.report.verify import verify_dossier
from forensics.sources import Reads, open_model
from forensics.sources.vocabulary import vocabulary
from tests import tiny
from tests.test_bad_inputs import fails as refused
from tests.test_report import needs_poppler, synthetic_case

# A run that would hang on a FIFO is stopped here, so the test fails instead of hanging the suite.
HANG = 120


def cli(*args, env=None, timeout=HANG) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "forensics.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture()
def llama_dir(tmp_path):
    return tiny.save(tiny.build_model("llama"), tmp_path / "llama")


# --- (a) readers confine themselves, refuse non-regular files and shapes the config contradicts -------------------

@pytest.mark.parametrize("entry", ["../outside.safetensors", "../../../etc/passwd"])
def test_shard_index_entry_outside_the_model_is_refused(tmp_path, entry):
    model = tiny.save(tiny.build_model("llama"), tmp_path / "sharded", max_shard_size="20KB")
    index = model / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    victim = sorted(set(data["weight_map"].values()))[0]
    shutil.copy(model / victim, tmp_path / "outside.safetensors")  # a real shard, so that reading it would work
    data["weight_map"] = {name: entry if f == victim else f for name, f in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    msg = refused(model, str(index), repr(entry), "outside the model directory")
    assert "\n" not in msg  # one message


def test_symlinks_out_of_the_model_are_refused(llama_dir, tmp_path):
    weights = llama_dir / "model.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    weights.rename(outside)
    weights.symlink_to(outside)
    refused(llama_dir, "model.safetensors", "outside the model directory")

    outside.rename(weights)  # weights back in place; now the tokenizer file points out of the model
    (tmp_path / "secret.json").write_text('{"model": {"type": "BPE", "vocab": {"a": 0}}}')
    (llama_dir / "tokenizer.json").symlink_to(tmp_path / "secret.json")
    with pytest.raises(ForensicsError, match="tokenizer.json.*outside the model directory"):
        vocabulary(llama_dir)


def test_onnx_external_data_linked_out_of_the_model_is_refused(tmp_path):
    w = helper.make_tensor("encoder.layer.0.attention.self.query.weight", TensorProto.FLOAT, [4, 4],
                           np.arange(16, dtype=np.float32).tobytes(), raw=True)  # only raw data goes external
    graph = helper.make_graph([helper.make_node("MatMul", ["x", w.name], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = tmp_path / "onnx" / "model.onnx"
    model.parent.mkdir()
    onnx.save_model(helper.make_model(graph), model, save_as_external_data=True, location="w.data",
                    size_threshold=0)
    (model.parent / "w.data").rename(tmp_path / "w.data")
    (model.parent / "w.data").symlink_to(tmp_path / "w.data")
    with pytest.raises(ForensicsError) as e:
        open_model(model, Reads())
    assert "model.onnx" in str(e.value) and "'w.data'" in str(e.value) and "outside the model directory" in str(e.value)


@pytest.mark.parametrize("layout", ["directory", "gguf"])
def test_fifo_where_a_model_file_should_be_is_refused_at_once(tmp_path, layout):
    if layout == "directory":
        model = tmp_path / "m"
        model.mkdir()
        (model / "config.json").write_text(json.dumps(tiny.build_model("llama").config.to_dict()))
        os.mkfifo(model / "model.safetensors")
    else:
        model = tmp_path / "x.gguf"
        os.mkfifo(model)
    r = cli("fingerprint", model, "--device", "cpu")  # reading a FIFO would wait for a writer: until the timeout
    assert r.returncode == 2, r.stderr
    assert "not a regular file (a FIFO)" in r.stderr and ("model.safetensors" in r.stderr or "x.gguf" in r.stderr)
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("name,tensor,shape,expected", [
    ("model.layers.1.self_attn.k_proj.bias", torch.tensor(0.5), "()", "(16,)"),
    ("model.layers.2.mlp.up_proj.weight", torch.randn(60, 32), "(60, 32)", "(64, 32)"),
    ("model.layers.0.self_attn.q_proj.weight", torch.randn(32, 24), "(32, 24)", "(32, 32)"),
])
def test_tensor_shape_contradicting_the_config_is_refused(tmp_path, name, tensor, shape, expected):
    model = tiny.build_model("qwen2")  # q, k, v carry biases
    state = {**model.state_dict(), name: tensor}
    path = tiny.save_raw(state, model.config.to_dict(), tmp_path / "odd")
    refused(path, name, shape, expected)


def test_all_zero_attention_matrix_gives_a_value_and_no_numpy_warning(tmp_path):
    model = tiny.build_model("llama")
    state = {**model.state_dict(), "model.layers.1.self_attn.o_proj.weight": torch.zeros(32, 32)}
    path = tiny.save_raw(state, model.config.to_dict(), tmp_path / "zero")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning (0/0 in the spectrum) fails the test
        fp = fingerprint_model(path, device="cpu")
    ov = fp["signals"]["ov_spectrum"]["values"]
    assert ov[1] == 0.0 and all(0 < v <= 1 for v in ov[:1] + ov[2:])


# --- (b) verify: integrity and trust apart; malformed signatures are verdicts; inputs confined ------------------

@pytest.fixture(scope="module")
def dossier(tmp_path_factory) -> dict:
    """The synthetic case signed into a dossier whose inputs are recorded by absolute path, as a real case run
    records them, with a CJK party name (the fallback font) and one no font has (U+1F984)."""
    root = tmp_path_factory.mktemp("hostile-dossier")
    case = synthetic_case(root)
    case["case"]["parties"] = [{"role": "Claimant", "name": "华为技术有限公司"},
                               {"role": "Respondent", "name": "Unicorn Labs 🦄"}]
    inputs = [{"path": str(root / "evidence" / name), "model": name, "kind": "weights"}
              for name in case["fingerprints"]]
    manifest = build_manifest(case_id=case["manifest"]["case_id"], argv=["forensics", "case", "run"],
                              case_yaml_bytes=case["case_yaml"], case_yaml_path=root / "case.yaml",
                              results=case["results"], inputs=inputs, inputs_base=root)
    out = root / "out"
    out.mkdir()
    (out / "results.json").write_bytes(case["results"])
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        pdf = build_dossier(case["results"], manifest, case["case_yaml"], out, SigningConfig(key_dir=root / "keys"),
                            case=case["case"])
    signer = json.loads((out / "manifest.json").read_bytes())["signer"]["certificate_sha256"]
    return {"root": root, "pdf": pdf, "signer": signer, "stderr": stderr.getvalue()}


def test_valid_signature_by_an_unknown_key_is_not_verified(dossier):
    r = cli("verify", dossier["pdf"])
    out = json.loads(r.stdout)
    assert r.returncode == 3 and out["ok"] is False and out["integrity"] is True and out["trusted"] is False
    assert out["verdict"] == "integrity ok, signer not trusted" and "no --signer or --trust" in out["trust"]
    assert "signer not trusted" in r.stderr.lower()
    trusted = cli("verify", dossier["pdf"], "--signer", dossier["signer"])
    assert trusted.returncode == 0 and json.loads(trusted.stdout)["ok"] is True
    wrong = cli("verify", dossier["pdf"], "--signer", "ab" * 32)
    assert wrong.returncode == 1 and json.loads(wrong.stdout)["integrity"] is True
    assert "exit status" in cli("verify", "--help").stdout


def test_flipped_byte_inside_the_signatures_cms_is_a_verdict(dossier, tmp_path):
    data = dossier["pdf"].read_bytes()
    start = re.search(rb"/Contents\s*<", data).end()
    bad = tmp_path / "bad.pdf"
    # The start of the signer's certificate inside the CMS: flips here break its DER structure.
    for pos in range(start + 120, start + 160):
        damaged = bytearray(data)
        damaged[pos] = ord("0") if damaged[pos] != ord("0") else ord("f")
        bad.write_bytes(bytes(damaged))
        result = verify_dossier(bad, expected_signer=dossier["signer"])
        assert not result.ok and not result.integrity, pos
        json.dumps(result.to_dict())
    r = cli("verify", bad, "--signer", dossier["signer"])
    assert r.returncode == 1 and "Traceback" not in r.stderr and json.loads(r.stdout)["ok"] is False


def test_inputs_are_read_only_under_the_base_dir_and_only_once_integrity_holds(dossier, tmp_path, monkeypatch):
    root, pdf, signer = dossier["root"], dossier["pdf"], dossier["signer"]
    inside = verify_dossier(pdf, check_inputs=True, base_dir=root, expected_signer=signer)
    assert inside.ok and all(i["status"] == "ok" for i in inside.inputs)

    monkeypatch.chdir(tmp_path)  # the default base directory: nothing the manifest lists lies under it
    outside = verify_dossier(pdf, check_inputs=True, expected_signer=signer)
    assert not outside.ok and outside.integrity is False
    assert all(i["status"].startswith(f"outside the base directory {tmp_path.resolve()}") and "sha256" not in i
               for i in outside.inputs)
    detail = next(c.detail for c in outside.checks if c.name == "inputs")
    assert str(root / "evidence" / "base-7b" / "model.safetensors") in detail

    data = bytearray(pdf.read_bytes())
    data[len(data) // 2] ^= 0x01  # the signed bytes changed: the manifest can no longer say what to read
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(bytes(data))
    result = verify_dossier(broken, check_inputs=True, base_dir=root, expected_signer=signer)
    assert result.inputs is None and "not re-hashed" in next(c.detail for c in result.checks if c.name == "inputs")


# --- (c) case files ---------------------------------------------------------------------------------------------

def _case(tmp_path, text: str) -> Path:
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir(exist_ok=True)  # empty: a check that read them would fail differently
    path = tmp_path / "case.yaml"
    path.write_text(text)
    return path


BASE = """id: hostile
title: t
analyst: a
suspect: {name: s, path: a}
candidates:
  - {name: c, path: b}
"""


@pytest.mark.parametrize("extra,key,lines", [
    ("suspect: {name: s2, path: c}\n", "suspect", (4, 7)),
    ("statistics:\n  alpha: 0.01\n  seed: 3\n  alpha: 0.2\n", "alpha", (8, 10)),
])
def test_duplicate_key_is_refused_naming_both_lines(tmp_path, extra, key, lines):
    with pytest.raises(ForensicsError) as e:
        load_case(_case(tmp_path, BASE + extra))
    msg = str(e.value)
    assert "case.yaml" in msg and f"duplicate key {key!r}" in msg
    assert f"line {lines[1]}" in msg and f"line {lines[0]}" in msg


@pytest.mark.parametrize("extra,roles", [
    ("controls:\n  - {name: k, path: ./a/}\n", ("control 1 'k'", "suspect 's'")),
    ("  - {name: c2, path: ../DIR/b}\n", ("candidate 2 'c2'", "candidate 1 'c'")),  # the same folder, spelt apart
])
def test_model_listed_twice_is_refused_before_any_model_is_read(tmp_path, extra, roles):
    with pytest.raises(ForensicsError) as e:
        load_case(_case(tmp_path, BASE + extra.replace("DIR", tmp_path.name)))
    msg = str(e.value)
    assert "case.yaml" in msg and roles[0] in msg and roles[1] in msg and "same model" in msg


@pytest.mark.parametrize("section,field,value", [
    ("statistics", "permutations", 10 ** 9), ("statistics", "bootstrap", 10 ** 8),
    ("neurons", "permutations", 10 ** 7), ("neurons", "neurons", 10 ** 6), ("neurons", "dims", 10 ** 7),
    ("neurons", "tokens", 10 ** 9), ("activations", "batch_size", 10 ** 6), ("activations", "seq_len", 10 ** 8),
    ("activations", "num_batches", 10 ** 9),
])
def test_every_count_has_an_upper_bound(tmp_path, section, field, value):
    with pytest.raises(ForensicsError) as e:
        load_case(_case(tmp_path, BASE + yaml.safe_dump({section: {field: value}})))
    assert f"line 8: {section}.{field}: Input should be less than or equal to" in str(e.value)


# --- (d) outputs: never an input, one message for every write failure, nothing left behind ----------------------

@pytest.mark.parametrize("output", [".", "fp.json", "model.safetensors"])
def test_output_that_is_or_lies_inside_the_input_is_refused_before_reading(llama_dir, output):
    weights = llama_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a truncated model: reading it first would say so instead
    before = digest(llama_dir)
    target = llama_dir if output == "." else llama_dir / output
    r = cli("fingerprint", llama_dir, "-o", target, "--device", "cpu")
    assert r.returncode == 2 and str(target) in r.stderr and "truncated" not in r.stderr, r.stderr
    assert digest(llama_dir) == before and sorted(p.name for p in llama_dir.iterdir()) == sorted(before)


def _no_temp_left(folder: Path) -> bool:
    return not any(p.name.endswith(".tmp") for p in folder.rglob("*"))


def test_unwritable_output_is_one_message_exit_2_and_no_temp_file(llama_dir, tmp_path):
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-file").write_text("x")
    for target in (tmp_path / "a-dir", tmp_path / "a-file" / "fp.json"):
        r = cli("fingerprint", llama_dir, "-o", target, "--device", "cpu")
        assert r.returncode == 2 and f"{target}: cannot write" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert _no_temp_left(tmp_path)


def test_read_only_and_full_file_systems_give_one_message(llama_dir, tmp_path):
    full, ro = tmp_path / "full", tmp_path / "ro"
    full.mkdir()
    ro.mkdir()
    # Private mounts in a new mount namespace (root only): a full and a read-only tmpfs, invisible outside.
    script = (f"mount -t tmpfs -o size=64k tmpfs {full} && mount -t tmpfs -o ro,size=64k tmpfs {ro} || exit 99; "
              f"dd if=/dev/zero of={full}/filler bs=4k 2>/dev/null; "
              f"for out in {full}/fp.json {ro}/fp.json; do "
              f"{sys.executable} -m forensics.cli fingerprint {llama_dir} -o $out --device cpu; echo rc=$?; done; "
              f"ls -A {full} {ro}")
    if not shutil.which("unshare"):
        pytest.skip("unshare (util-linux) not installed")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=HANG)
    if r.returncode == 99 or "unshare failed" in r.stderr:
        pytest.skip(f"cannot mount a private tmpfs here: {r.stderr.strip()[:200]}")
    assert r.stdout.count("rc=2") == 2, r.stdout + r.stderr
    assert f"{full}/fp.json: cannot write: No space left on device" in r.stderr
    assert f"{ro}/fp.json: cannot write: {ro} is on a read-only file system" in r.stderr
    assert "Traceback" not in r.stderr and ".tmp" not in r.stdout and "fp.json" not in r.stdout


def test_key_directory_that_is_a_file_is_a_clear_error(tmp_path, monkeypatch):
    key_dir = tmp_path / "keys"
    key_dir.write_text("not a directory")
    monkeypatch.setenv(KEY_DIR_ENV, str(key_dir))
    with pytest.raises(ForensicsError, match="signing key directory is not a directory"):
        load_signer()


# --- (e) the dossier shows CJK names, and says which characters it cannot -----------------------------------------

@needs_poppler
def test_cjk_name_uses_the_embedded_fallback_font_and_an_unknown_glyph_is_named(dossier):
    if not Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc").is_file():
        pytest.skip("fonts-wqy-microhei not installed (.ci/run installs it)")
    fonts = subprocess.run(["pdffonts", str(dossier["pdf"])], capture_output=True, text=True, check=True).stdout
    row = next(line for line in fonts.splitlines() if "WenQuanYiMicroHei" in line)
    assert row.split()[-5:-3] == ["yes", "yes"]  # embedded, subset
    text = subprocess.run(["pdftotext", str(dossier["pdf"]), "-"], capture_output=True, text=True, check=True).stdout
    cover = text.split("\f")[0]
    assert "华为技术有限公司" in cover
    assert "U+1F984" in cover and "Characters not shown" in cover
    assert "U+1F984" in dossier["stderr"] and "warning" in dossier["stderr"] and "U+534E" not in dossier["stderr"]


def test_a_legacy_pytorch_file_is_read_and_a_legacy_pickle_still_refused(tmp_path):
    """torch.save's pre-1.6 format (no zip) is a legitimate checkpoint: read, not refused as if unsafe; weights_only
    still refuses code in it."""
    import torch

    from forensics.sources.hf import load_state_dict

    sd = {"model.layers.0.self_attn.q_proj.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    legacy = tmp_path / "pytorch_model.bin"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    assert not legacy.read_bytes().startswith(b"PK")
    loaded = load_state_dict(legacy)
    assert torch.equal(loaded["model.layers.0.self_attn.q_proj.weight"], sd["model.layers.0.self_attn.q_proj.weight"])
    hostile = tmp_path / "hostile.bin"
    torch.save({"w": torch.zeros(1), "x": Evil()}, hostile, _use_new_zipfile_serialization=False)
    with pytest.raises(ForensicsError, match="cannot read PyTorch checkpoint safely"):
        load_state_dict(hostile)


class Evil:
    """Pickles as a call: what weights_only must refuse."""

    def __reduce__(self):
        return (print, ("code ran",))
