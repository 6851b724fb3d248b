"""Signing keys and the PAdES signature, checked with real keys, real PDFs, pyHanko and poppler's pdfsig."""

from __future__ import annotations

import datetime as dt
import io
import os
import stat
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.validation import SignatureCoverageLevel, validate_pdf_signature
from pyhanko_certvalidator import ValidationContext
from reportlab.pdfgen import canvas

from forensics.errors import ForensicsError
from forensics.report.signing import (KEY_DIR_ENV, LOCAL_CERT_NAME, LOCAL_KEY_NAME, Attachment, SigningConfig,
                                      ensure_local_key, load_signer, sign_pdf)
from forensics.report.verify import verify_dossier
from tests.test_report import build_synthetic, needs_poppler

NOW = dt.datetime.now(dt.timezone.utc)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """The synthetic case as a signed dossier (see tests/test_report.py)."""
    return build_synthetic(tmp_path_factory.mktemp("case"))


def _pdf() -> bytes:
    buf = io.BytesIO()
    c = canvas.Canvas(buf)
    c.drawString(72, 720, "signing test")
    c.save()
    return buf.getvalue()


def _cert(key, subject="Test Analyst", issuer_key=None, issuer="Test Analyst", start=-1, days=365, ca=False,
          non_repudiation=True):
    """A certificate for ``key``, self-signed unless ``issuer_key`` is given."""
    issuer_key = issuer_key or key
    usage = dict(digital_signature=True, content_commitment=non_repudiation, key_encipherment=False,
                 data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False,
                 decipher_only=False)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW + dt.timedelta(days=start)).not_valid_after(NOW + dt.timedelta(days=start + days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(**usage), critical=True)
            .sign(issuer_key, None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()))


def _pem(obj, password: bytes | None = None) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def _pdfsig(path) -> str:
    return subprocess.run(["pdfsig", str(path)], capture_output=True, text=True).stdout


def _sign(tmp_path, config: SigningConfig):
    signer = load_signer(config)
    out = tmp_path / "signed.pdf"
    out.write_bytes(sign_pdf(_pdf(), signer, [Attachment("note.txt", b"hello", "text/plain", "a note")], "test"))
    return signer, out


def test_local_key_is_made_once_private_and_outside_the_repo(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_DIR_ENV, str(tmp_path / "keys"))
    first = load_signer()
    key = tmp_path / "keys" / LOCAL_KEY_NAME
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (tmp_path / "keys" / LOCAL_CERT_NAME).read_text().startswith("-----BEGIN CERTIFICATE-----")
    again = load_signer()
    assert again.identity.certificate_sha256 == first.identity.certificate_sha256
    assert first.identity.self_signed and first.identity.generated_locally
    assert first.identity.key_algorithm == "ECDSA P-256"
    assert ensure_local_key() == key


def test_local_key_readable_by_others_is_refused(tmp_path):
    key = ensure_local_key(tmp_path)
    os.chmod(key, 0o644)
    with pytest.raises(ForensicsError, match="chmod 600"):
        load_signer(SigningConfig(key_dir=tmp_path))


@needs_poppler
def test_rsa_pkcs12_with_passphrase_from_environment(tmp_path, monkeypatch):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    p12 = tmp_path / "analyst.p12"
    p12.write_bytes(pkcs12.serialize_key_and_certificates(b"a", key, _cert(key), None,
                                                          serialization.BestAvailableEncryption(b"s3cret")))
    monkeypatch.setenv("DOSSIER_PASS", "s3cret")
    signer, pdf = _sign(tmp_path, SigningConfig(pkcs12=p12, passphrase_env="DOSSIER_PASS"))
    assert signer.identity.key_algorithm == "RSA 2048" and not signer.identity.generated_locally
    out = _pdfsig(pdf)
    assert "Signature is Valid." in out and "Total document signed" in out

    monkeypatch.setenv("DOSSIER_PASS", "wrong")
    with pytest.raises(ForensicsError, match="wrong passphrase"):
        load_signer(SigningConfig(pkcs12=p12, passphrase_env="DOSSIER_PASS"))
    monkeypatch.delenv("DOSSIER_PASS")
    with pytest.raises(ForensicsError, match="DOSSIER_PASS .* is not set"):
        load_signer(SigningConfig(pkcs12=p12, passphrase_env="DOSSIER_PASS"))
    with pytest.raises(ForensicsError, match="no passphrase was given"):
        load_signer(SigningConfig(pkcs12=p12))


@needs_poppler
def test_encrypted_pem_key_with_ca_issued_certificate_and_passphrase_file(tmp_path):
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(ca_key, subject="Test CA", issuer="Test CA", days=3650, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "key.pem").write_bytes(_pem(key, b"pem pass"))
    (tmp_path / "cert.pem").write_bytes(_pem(_cert(key, issuer_key=ca_key, issuer="Test CA")))
    (tmp_path / "chain.pem").write_bytes(_pem(ca))
    (tmp_path / "pass.txt").write_text("pem pass\n")  # the editor's final newline is not part of it
    signer, pdf = _sign(tmp_path, SigningConfig(key=tmp_path / "key.pem", certificate=tmp_path / "cert.pem",
                                                chain=(tmp_path / "chain.pem",),
                                                passphrase_file=tmp_path / "pass.txt"))
    assert not signer.identity.self_signed and signer.identity.subject == "Test Analyst"
    out = _pdfsig(pdf)
    assert "Signature is Valid." in out and "Total document signed" in out
    status = validate_pdf_signature(PdfFileReader(io.BytesIO(pdf.read_bytes())).embedded_signatures[0],
                                    ValidationContext(trust_roots=[_asn1(ca)], allow_fetching=False))
    assert status.trusted and status.intact and status.coverage == SignatureCoverageLevel.ENTIRE_FILE


def _asn1(cert):
    from asn1crypto import x509 as asn1_x509

    return asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))


def test_unusable_keys_are_refused_with_the_reason(tmp_path):
    ec_key = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP256R1())
    ed = ed25519.Ed25519PrivateKey.generate()
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    files = {"ec.pem": _pem(ec_key), "ec-cert.pem": _pem(_cert(ec_key)), "other-cert.pem": _pem(_cert(other)),
             "expired-cert.pem": _pem(_cert(ec_key, start=-400, days=30)), "ed.pem": _pem(ed),
             "ed-cert.pem": _pem(_cert(ed)), "weak.pem": _pem(weak), "weak-cert.pem": _pem(_cert(weak)),
             "no-nr-cert.pem": _pem(_cert(ec_key, non_repudiation=False))}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    cases = [(SigningConfig(key=tmp_path / "ec.pem"), "needs its certificate"),
             (SigningConfig(key=tmp_path / "ec.pem", certificate=tmp_path / "other-cert.pem"), "does not belong"),
             (SigningConfig(key=tmp_path / "ec.pem", certificate=tmp_path / "expired-cert.pem"), "valid only from"),
             (SigningConfig(key=tmp_path / "ed.pem", certificate=tmp_path / "ed-cert.pem"), "poppler"),
             (SigningConfig(key=tmp_path / "weak.pem", certificate=tmp_path / "weak-cert.pem"), "too weak"),
             (SigningConfig(key=tmp_path / "ec.pem", certificate=tmp_path / "no-nr-cert.pem"), "nonRepudiation"),
             (SigningConfig(key=tmp_path / "ec.pem", certificate=tmp_path / "missing.pem"), "cannot read certificate"),
             (SigningConfig(key=tmp_path / "ec.pem", certificate=tmp_path / "ec.pem"), "not a PEM or DER X.509")]
    for config, problem in cases:
        with pytest.raises(ForensicsError, match=problem):
            load_signer(config)


def test_conflicting_key_settings_are_refused(tmp_path):
    with pytest.raises(ForensicsError, match="not both"):
        load_signer(SigningConfig(pkcs12=tmp_path / "a.p12", key=tmp_path / "k.pem", certificate=tmp_path / "c.pem"))
    with pytest.raises(ForensicsError, match="either passphrase_env or passphrase_file"):
        load_signer(SigningConfig(pkcs12=tmp_path / "a.p12", passphrase_env="P", passphrase_file=tmp_path / "p"))


@needs_poppler
def test_dossier_signature_is_pades_certifying_and_covers_the_whole_file(built):
    out = _pdfsig(built["pdf"])
    assert "Signature is Valid." in out and "Total document signed" in out
    assert "ETSI.CAdES.detached" in out  # PAdES
    reader = PdfFileReader(io.BytesIO(built["pdf"].read_bytes()))
    (sig,) = reader.embedded_signatures
    status = validate_pdf_signature(sig, ValidationContext(trust_roots=[sig.signer_cert], allow_fetching=False))
    assert status.intact and status.valid and status.coverage == SignatureCoverageLevel.ENTIRE_FILE
    assert status.docmdp_ok and sig.docmdp_level.name == "NO_CHANGES"
    # The attachments are in the last (= signed) revision, not added after the signature.
    names = reader.root["/Names"]["/EmbeddedFiles"]["/Names"]
    assert [str(names[i]) for i in range(0, len(names), 2)] == [  # sorted, as PDF requires
        "attestation.dsse.json", "case.yaml", "manifest.json", "results.json", "signer-certificate.pem"]
    assert sig.signed_revision == reader.xrefs.total_revisions - 1
    assert verify_dossier(built["pdf"], trust_roots=[built["root"] / "keys" / LOCAL_CERT_NAME]).ok
