"""Evidence a third party can check: the in-toto attestation beside and inside the dossier, RFC 3161 timestamps from a
local TSA, and dossiers signed with the analyst's own key (a PKCS#12 file issued by a CA; a key in a SoftHSM2 token)."""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import json
import os
import shutil
import subprocess
import threading

import pytest
from asn1crypto import keys as asn1_keys
from asn1crypto import tsp
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pyhanko.pdf_utils.reader import PdfFileReader

from forensics.evidence import attestation
from forensics.report.dossier import build_dossier
from forensics.report.signing import Attachment, SigningConfig, load_signer, sign_pdf
from forensics.report.verify import EXIT_UNTRUSTED, verify_attestation, verify_dossier
from tests.test_report import _pdftotext, build_synthetic, needs_poppler, synthetic_case
from tests.test_signing import _pdf

NOW = dt.datetime.now(dt.timezone.utc)


def _cert(key, subject: str, issuer_key=None, issuer: str | None = None, ca=False, tsa=False):
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer or subject)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=not ca, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                                            crl_sign=ca, encipher_only=False, decipher_only=False), critical=True))
    if tsa:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    return build_synthetic(tmp_path_factory.mktemp("attested"))


# --- the attestation ---------------------------------------------------------------------------------------------

def test_dossier_carries_an_attestation_that_verifies(built):
    out = built["out"]
    raw = (out / attestation.FILE_NAME).read_bytes()
    payload, sigs, stmt = attestation.open_envelope(raw)
    manifest = json.loads((out / "manifest.json").read_bytes())
    assert sigs[0][0] == manifest["signer"]["certificate_sha256"]
    assert stmt["_type"] == "https://in-toto.io/Statement/v1"
    assert {s["name"] for s in stmt["subject"]} == {r["path"] for r in manifest["inputs"]}
    assert stmt["predicate"]["verdicts"]["base-7b"]["verdict"] == "DERIVED"
    assert stmt["predicate"]["verdicts"]["base-7b"]["route"] == "std_curves"
    assert stmt["predicate"]["results"]["digest"]["sha256"] == manifest["results_digest"]["sha256"]
    cert = manifest["signer"]["certificate_sha256"]
    dossier = verify_dossier(out / "dossier.pdf", expected_signer=cert)
    assert dossier.ok and {"attestation_signature", "attestation_agrees"} <= {c.name for c in dossier.checks}
    alone = verify_attestation(out / attestation.FILE_NAME, out / "signer-certificate.pem", check_inputs=True,
                               base_dir=built["root"], expected_signer=cert)
    assert alone.ok, alone.to_dict()
    assert len(alone.inputs) == len(manifest["inputs"]) and all(r["status"] == "ok" for r in alone.inputs)
    assert verify_attestation(out / attestation.FILE_NAME, out / "signer-certificate.pem").exit_status == \
        EXIT_UNTRUSTED


def _tampered(raw: bytes, edit) -> bytes:
    doc = json.loads(raw)
    doc["payload"] = base64.b64encode(edit(base64.b64decode(doc["payload"]))).decode()
    return json.dumps(doc).encode()


def test_flipped_payload_byte_and_changed_subject_digest_fail(built, tmp_path):
    out = built["out"]
    raw = (out / attestation.FILE_NAME).read_bytes()
    cert = out / "signer-certificate.pem"

    def flip(p: bytes) -> bytes:
        i = p.index(b"DERIVED")
        return p[:i] + b"X" + p[i + 1:]

    def subject(p: bytes) -> bytes:
        stmt = json.loads(p)
        stmt["subject"][0]["digest"]["sha256"] = "0" * 64
        return attestation.payload_bytes(stmt)

    for name, edit in (("flipped", flip), ("subject", subject)):
        bad = tmp_path / f"{name}.dsse.json"
        bad.write_bytes(_tampered(raw, edit))
        result = verify_attestation(bad, cert)
        assert not result.integrity and "attestation_signature" in {c.name for c in result.checks if not c.ok}


def test_pdf_whose_attestation_disagrees_with_its_results_fails(built, tmp_path):
    """Validly signed, with the dossier's own key, but describing other results: verify names the disagreement."""
    out = built["out"]
    signer = load_signer(SigningConfig(key_dir=built["root"] / "keys"))
    manifest_bytes = (out / "manifest.json").read_bytes()
    _, _, stmt = attestation.open_envelope((out / attestation.FILE_NAME).read_bytes())
    stmt["predicate"]["results"]["digest"]["sha256"] = "ab" * 32
    payload = attestation.payload_bytes(stmt)
    dsse = attestation.envelope(payload, signer.identity.certificate_sha256,
                                signer.sign_raw(attestation.pae(attestation.PAYLOAD_TYPE, payload)))
    pdf = tmp_path / "other.pdf"
    pdf.write_bytes(sign_pdf(_pdf(), signer, [
        Attachment("manifest.json", manifest_bytes, "application/json", ""),
        Attachment("case.yaml", built["case_yaml"], "application/yaml", ""),
        Attachment("results.json", built["results"], "application/json", ""),
        Attachment(attestation.FILE_NAME, dsse, "application/json", "")], "other"))
    result = verify_dossier(pdf, expected_signer=signer.identity.certificate_sha256)
    failed = {c.name: c.detail for c in result.checks if not c.ok}
    assert set(failed) == {"attestation_agrees"} and "results.json has SHA-256" in failed["attestation_agrees"]


# --- timestamps from a local TSA ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tsa():
    """An RFC 3161 timestamp authority on 127.0.0.1: pyHanko's DummyTimeStamper behind http.server."""
    from pyhanko.sign.timestamps.dummy_client import DummyTimeStamper

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # pyHanko's test TSA signs with RSA only
    cert = _cert(key, "Test TSA", tsa=True)
    stamper = DummyTimeStamper(
        tsa_cert=asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER)),
        tsa_key=asn1_keys.PrivateKeyInfo.load(key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 -- http.server's name
            request = tsp.TimeStampReq.load(self.rfile.read(int(self.headers["Content-Length"])))
            body = stamper.request_tsa_response(request).dump()
            self.send_response(200)
            self.send_header("Content-Type", "application/timestamp-reply")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/tsa"
    server.shutdown()


def _dossier(tmp_path, config: SigningConfig):
    case = synthetic_case(tmp_path)
    out = tmp_path / "out"
    pdf = build_dossier(case["results"], case["manifest"], case["case_yaml"], out, config, case=case["case"])
    return pdf, json.loads((out / "manifest.json").read_bytes())


@needs_poppler
def test_timestamp_from_a_local_tsa(tsa, tmp_path):
    pdf, manifest = _dossier(tmp_path, SigningConfig(key_dir=tmp_path / "keys", tsa_url=tsa))
    result = verify_dossier(pdf, expected_signer=manifest["signer"]["certificate_sha256"])
    assert result.ok, result.verdict
    assert result.signature["timestamp"]["intact"] and result.signature["timestamp"]["valid"]
    assert "Test TSA" in result.signature["timestamp"]["authority"]
    # PAdES B-LTA: a document timestamp over the signed file, and the DSS with what validates both
    doc = result.signature["document_timestamp"]
    assert doc["intact"] and doc["valid"] and "Test TSA" in doc["authority"]
    assert "/DSS" in PdfFileReader(open(pdf, "rb")).root
    sig = subprocess.run(["pdfsig", str(pdf)], capture_output=True, text=True).stdout
    assert "Signature is Valid." in sig
    assert sig.count("Signature #") == 2 and "Signer Certificate Common Name: Test TSA" in sig  # the document timestamp
    # Poppler 22's pdfsig does not print the signature's own timestamp token; it dumps the CMS, in which OpenSSL
    # shows the RFC 3161 token as an unsigned attribute, with the TSA's certificate.
    subprocess.run(["pdfsig", "-dump", str(pdf)], cwd=tmp_path, check=True, capture_output=True)
    cms = subprocess.run(["openssl", "cms", "-cmsout", "-print", "-inform", "DER", "-in",
                          str(next(tmp_path.glob("*.sig0")))], capture_output=True, text=True, check=True).stdout
    assert "id-smime-aa-timeStampToken" in cms and "Test TSA" in cms
    assert f"RFC 3161 timestamp from {tsa}" in " ".join(_pdftotext(pdf).split())


@needs_poppler
def test_without_a_tsa_the_case_runs_offline_and_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv("FORENSICS_TSA_URL", raising=False)
    pdf, manifest = _dossier(tmp_path, SigningConfig(key_dir=tmp_path / "keys"))
    assert manifest["signer"]["timestamp_authority"] is None
    assert verify_dossier(pdf, expected_signer=manifest["signer"]["certificate_sha256"]).signature["timestamp"] is None
    assert "no trusted timestamp" in _pdftotext(pdf)


def test_an_unreachable_tsa_is_one_clear_error(tmp_path):
    from forensics.errors import ForensicsError

    with pytest.raises(ForensicsError, match="cannot sign the dossier"):
        _dossier(tmp_path, SigningConfig(key_dir=tmp_path / "keys", tsa_url="http://127.0.0.1:9/tsa"))
    assert not (tmp_path / "out" / "dossier.pdf").exists()


# --- the analyst's own key -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    """A CA, an analyst certificate it issued, the PKCS#12 file (chain inside) and another CA."""
    root = tmp_path_factory.mktemp("ca")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _cert(ca_key, "Test Forensics CA", ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert(key, "A. Analyst", issuer_key=ca_key, issuer="Test Forensics CA")
    p12 = root / "analyst.p12"
    p12.write_bytes(pkcs12.serialize_key_and_certificates(
        b"analyst", key, cert, [ca_cert], serialization.BestAvailableEncryption(b"s3cret")))
    (root / "pass.txt").write_text("s3cret\n")
    (root / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    other_key = ec.generate_private_key(ec.SECP256R1())
    (root / "other-ca.pem").write_bytes(_cert(other_key, "Other CA", ca=True).public_bytes(serialization.Encoding.PEM))
    return {"root": root, "p12": p12, "key": key, "cert": cert}


@needs_poppler
def test_pkcs12_with_its_chain_and_trust(ca, tmp_path):
    pdf, manifest = _dossier(tmp_path, SigningConfig(pkcs12=ca["p12"], passphrase_file=ca["root"] / "pass.txt"))
    assert manifest["signer"]["chain"] == ["Test Forensics CA"] and not manifest["signer"]["self_signed"]
    assert verify_dossier(pdf, trust_roots=[ca["root"] / "ca.pem"]).ok
    refused = verify_dossier(pdf, trust_roots=[ca["root"] / "other-ca.pem"])
    assert refused.integrity and not refused.ok and refused.exit_status == 1
    cover = _pdftotext(pdf).split("\f")[0]
    assert "A. Analyst" in cover and "Test Forensics CA" in cover


SOFTHSM = shutil.which("softhsm2-util")
MODULES = [p for p in ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                       "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so") if os.path.exists(p)]


@pytest.mark.skipif(not (SOFTHSM and MODULES), reason="SoftHSM2 not installed (apt-get install softhsm2)")
def test_key_in_a_softhsm2_token(ca, tmp_path, monkeypatch):
    """The analyst's key imported into a token, its certificate written beside it; the key never leaves the token:
    the PDF and the attestation are signed inside it."""
    import pkcs11
    from pkcs11 import Attribute, CertificateType, ObjectClass

    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    run = {"check": True, "capture_output": True, "env": {**os.environ, "SOFTHSM2_CONF": str(conf)}}
    subprocess.run([SOFTHSM, "--init-token", "--free", "--label", "analyst", "--pin", "1234", "--so-pin", "5678"],
                   **run)
    key_pem = tmp_path / "key.pem"
    key_pem.write_bytes(ca["key"].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    subprocess.run([SOFTHSM, "--import", str(key_pem), "--token", "analyst", "--label", "signing", "--id", "01",
                    "--pin", "1234"], **run)
    key_pem.unlink()
    lib = pkcs11.lib(MODULES[0])
    with lib.get_token(token_label="analyst").open(user_pin="1234", rw=True) as session:
        session.create_object({Attribute.CLASS: ObjectClass.CERTIFICATE,
                               Attribute.CERTIFICATE_TYPE: CertificateType.X_509, Attribute.TOKEN: True,
                               Attribute.LABEL: "signing", Attribute.ID: b"\x01",
                               Attribute.SUBJECT: ca["cert"].subject.public_bytes(),
                               Attribute.VALUE: ca["cert"].public_bytes(serialization.Encoding.DER)})
    monkeypatch.setenv("ANALYST_PIN", "1234")
    config = SigningConfig(pkcs11_module=MODULES[0], pkcs11_token="analyst", pkcs11_key="signing",
                           passphrase_env="ANALYST_PIN")
    pdf, manifest = _dossier(tmp_path, config)
    assert manifest["signer"]["subject"].startswith("A. Analyst")
    result = verify_dossier(pdf, trust_roots=[ca["root"] / "ca.pem"])
    assert result.ok, result.to_dict()
    assert verify_attestation(tmp_path / "out" / attestation.FILE_NAME, tmp_path / "out" / "signer-certificate.pem",
                              expected_signer=manifest["signer"]["certificate_sha256"]).ok
