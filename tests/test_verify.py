"""`verify_dossier` against a real signed dossier, and against the ways a hostile party could alter one."""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import pytest
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.validation import validate_pdf_signature
from pyhanko_certvalidator import ValidationContext
from reportlab.pdfgen import canvas

from forensics.errors import ForensicsError
from forensics.evidence.hashing import sha256_bytes
from forensics.evidence.manifest import canonical_json_bytes
from forensics.report.signing import LOCAL_CERT_NAME, Attachment, SigningConfig, load_signer, sign_pdf
from forensics.report.verify import verify_dossier
from tests.test_report import build_synthetic, needs_poppler


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """The synthetic case as a signed dossier (see tests/test_report.py)."""
    return build_synthetic(tmp_path_factory.mktemp("case"))


def _pdfsig(path) -> str:
    return subprocess.run(["pdfsig", str(path)], capture_output=True, text=True).stdout


def _failed(result) -> set[str]:
    return {c.name for c in result.checks if not c.ok}


def _copy(built, tmp_path, name="dossier.pdf"):
    dst = tmp_path / name
    shutil.copyfile(built["pdf"], dst)
    return dst


def _signer(built) -> str:
    """The signing certificate's SHA-256, as the analyst would hand it over out of band."""
    return json.loads((built["out"] / "manifest.json").read_bytes())["signer"]["certificate_sha256"]


def test_intact_dossier_verifies_with_inputs(built):
    result = verify_dossier(built["pdf"], check_inputs=True, base_dir=built["root"], expected_signer=_signer(built))
    assert result.ok and result.exit_status == 0, result.to_dict()
    assert {c.name for c in result.checks} == {"one_signature", "signature_intact", "covers_entire_file",
                                               "signer_is_expected", "attachments", "signer_matches_manifest",
                                               "case.yaml_hash", "results.json_hash", "attestation_signature",
                                               "attestation_agrees", "inputs"}
    out = result.to_dict()
    json.dumps(out)
    assert out["signature"]["coverage"] == "ENTIRE_FILE"
    assert out["verdict"] == "verified: integrity ok, signer trusted" and out["integrity"] and out["trusted"]
    assert out["trust"] == "the signing certificate is the one given with --signer"
    assert out["dossier_id"] == json.loads((built["out"] / "manifest.json").read_bytes())["dossier_id"]
    assert all(i["status"] == "ok" for i in out["inputs"]) and len(out["inputs"]) == 10


def _flip_middle_byte(built, tmp_path):
    pdf = _copy(built, tmp_path)
    data = bytearray(pdf.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the first signed byte range (the signature sits near the end)
    pdf.write_bytes(bytes(data))
    return pdf


def test_flipped_byte_fails_pyhanko_and_verify(built, tmp_path):
    pdf = _flip_middle_byte(built, tmp_path)
    result = verify_dossier(pdf)
    assert not result.ok and "signature_intact" in _failed(result)
    (sig,) = PdfFileReader(io.BytesIO(pdf.read_bytes())).embedded_signatures
    status = validate_pdf_signature(sig, ValidationContext(trust_roots=[sig.signer_cert], allow_fetching=False))
    assert not status.intact


@needs_poppler
def test_flipped_byte_fails_pdfsig(built, tmp_path):
    assert "Signature is Valid." in _pdfsig(built["pdf"])
    out = _pdfsig(_flip_middle_byte(built, tmp_path))
    assert "Signature is Valid." not in out  # pdfsig exits 0 on a digest mismatch: its words are the verdict


def test_changed_and_missing_inputs_are_named(built, tmp_path):
    root = tmp_path / "inputs"
    shutil.copytree(built["root"] / "evidence", root / "evidence")
    changed = root / "evidence/base-7b/model.safetensors"
    data = bytearray(changed.read_bytes())
    data[100] ^= 0xFF  # same size, different bytes: only the hash can tell
    changed.write_bytes(bytes(data))
    (root / "evidence/other-lab/config.json").unlink()

    # without --inputs, the files are not read
    assert verify_dossier(built["pdf"], base_dir=root, expected_signer=_signer(built)).ok
    result = verify_dossier(built["pdf"], check_inputs=True, base_dir=root, expected_signer=_signer(built))
    assert not result.ok and _failed(result) == {"inputs"}
    status = {i["path"]: i["status"] for i in result.inputs}
    assert status["evidence/base-7b/model.safetensors"] == "hash mismatch"
    assert status["evidence/other-lab/config.json"] == "missing"
    detail = next(c.detail for c in result.checks if c.name == "inputs")
    assert "evidence/base-7b/model.safetensors: hash mismatch" in detail
    assert "evidence/other-lab/config.json: missing" in detail


def _append_revision(built, tmp_path):
    """An edit appended as a new revision: the old signature stays intact but no longer covers the file."""
    pdf = _copy(built, tmp_path)
    writer = IncrementalPdfFileWriter(io.BytesIO(pdf.read_bytes()))
    writer.document_meta.title = "Doctored"
    writer.root["/Doctored"] = generic.BooleanObject(True)
    writer.update_root()
    out = io.BytesIO()
    writer.write(out)
    pdf.write_bytes(out.getvalue())
    return pdf


def test_incremental_update_after_signing_is_caught(built, tmp_path):
    result = verify_dossier(_append_revision(built, tmp_path))
    assert not result.ok and _failed(result) == {"covers_entire_file"}


@needs_poppler
def test_incremental_update_after_signing_fails_pdfsig_coverage(built, tmp_path):
    assert "Total document signed" in _pdfsig(built["pdf"])
    assert "Total document signed" not in _pdfsig(_append_revision(built, tmp_path))


def test_manifest_naming_another_signer_is_caught(built, tmp_path):
    """Re-signing with another key, keeping the original manifest, breaks the recorded-signer check."""
    manifest = (built["out"] / "manifest.json").read_bytes()
    results = built["results"]
    buf = io.BytesIO()
    c = canvas.Canvas(buf)
    c.drawString(72, 720, "forged dossier")
    c.save()
    other = load_signer(SigningConfig(key_dir=tmp_path / "other-keys"))
    signed = sign_pdf(buf.getvalue(), other, [
        Attachment("manifest.json", manifest, "application/json", ""),
        Attachment("case.yaml", built["case_yaml"], "application/yaml", ""),
        Attachment("results.json", results, "application/json", "")], "forged")
    pdf = tmp_path / "forged.pdf"
    pdf.write_bytes(signed)
    result = verify_dossier(pdf)
    assert _failed(result) == {"signer_matches_manifest", "attestation"}  # the forger made no attestation either


def test_swapped_results_attachment_is_caught(built, tmp_path):
    manifest = (built["out"] / "manifest.json").read_bytes()
    signer = load_signer(SigningConfig(key_dir=built["root"] / "keys"))  # even the analyst's own key
    buf = io.BytesIO()
    c = canvas.Canvas(buf)
    c.drawString(72, 720, "dossier with other results")
    c.save()
    results = json.loads(built["results"])
    results["candidates"]["other-lab"]["verdict"]["verdict"] = "DERIVED"
    pdf = tmp_path / "swapped.pdf"
    pdf.write_bytes(sign_pdf(buf.getvalue(), signer, [
        Attachment("manifest.json", manifest, "application/json", ""),
        Attachment("case.yaml", built["case_yaml"], "application/yaml", ""),
        Attachment("results.json", canonical_json_bytes(results), "application/json", "")], "swapped"))
    result = verify_dossier(pdf)
    assert _failed(result) == {"results.json_hash", "attestation"}
    assert sha256_bytes(canonical_json_bytes(results)) in next(c.detail for c in result.checks
                                                              if c.name == "results.json_hash")


def test_trust_roots_are_checked_when_given(built, tmp_path):
    own = built["root"] / "keys" / LOCAL_CERT_NAME
    result = verify_dossier(built["pdf"], trust_roots=[own])
    assert result.ok and result.trust == "chains to a given trust root"
    load_signer(SigningConfig(key_dir=tmp_path))
    result = verify_dossier(built["pdf"], trust_roots=[tmp_path / LOCAL_CERT_NAME])
    assert not result.ok and _failed(result) == {"trusted"}


def test_expected_signer_from_out_of_band(built):
    cert = _signer(built)
    colon_form = ":".join(cert[i:i + 2] for i in range(0, 64, 2)).upper()  # as openssl -fingerprint prints it
    assert verify_dossier(built["pdf"], expected_signer=colon_form).ok
    result = verify_dossier(built["pdf"], expected_signer="ab" * 32)
    assert _failed(result) == {"signer_is_expected"}


def test_unreadable_and_non_pdf_files(tmp_path):
    with pytest.raises(ForensicsError, match="cannot read dossier"):
        verify_dossier(tmp_path / "absent.pdf")
    junk = tmp_path / "junk.pdf"
    junk.write_bytes(b"%PDF-1.7\nthis is not a PDF body\n")
    result = verify_dossier(junk)
    assert not result.ok and _failed(result) <= {"pdf_readable", "one_signature"}


@needs_poppler
def test_attachments_extract_with_pdfdetach_and_match_the_manifest(built, tmp_path):
    """The by-hand route of "How to verify": pdfdetach gives the files whose hashes the dossier prints."""
    subprocess.run(["pdfdetach", "-saveall", "-o", str(tmp_path), str(built["pdf"])], check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attestation.dsse.json", "case.yaml", "manifest.json",
                                                          "results.json", "signer-certificate.pem"]
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = x509.load_pem_x509_certificate((tmp_path / "signer-certificate.pem").read_bytes())
    manifest = json.loads((tmp_path / "manifest.json").read_bytes())
    assert sha256_bytes(cert.public_bytes(Encoding.DER)) == manifest["signer"]["certificate_sha256"]
    assert sha256_bytes((tmp_path / "case.yaml").read_bytes()) == manifest["case_yaml"]["sha256"]
    assert sha256_bytes((tmp_path / "results.json").read_bytes()) == manifest["results_digest"]["sha256"]
