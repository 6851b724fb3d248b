"""Signing the dossier: key loading (PKCS#12, PEM/DER key + certificate, or a key in a PKCS#11 token or HSM), the local
self-signed analyst key, a PAdES signature over the whole PDF with the evidence files attached inside the signed
revision, an RFC 3161 timestamp on it when a timestamp authority is configured, and raw signatures for the DSSE
attestation made with the same key."""

from __future__ import annotations

import datetime as dt
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from pyhanko.pdf_utils import embed, generic
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.sign import fields, signers
from pyhanko.sign.general import SigningError
from pyhanko.sign.timestamps import HTTPTimeStamper, TimestampRequestError
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko_certvalidator import ValidationContext
from pyhanko_certvalidator.errors import PathBuildingError, PathValidationError
from pyhanko_certvalidator.registry import SimpleCertificateStore

import asyncio

from forensics import settings
from forensics.errors import ForensicsError
from forensics.evidence.atomic import atomic_write_bytes, exclusive_write_bytes
from forensics.evidence.hashing import sha256_bytes

KEY_DIR_ENV = settings.KEY_DIR_ENV
LOCAL_KEY_NAME = "analyst.p12"
LOCAL_CERT_NAME = "analyst-cert.pem"
LOCAL_CN = "llm-forensics local analyst key"
SIGNATURE_FIELD = "DossierSignature"
# poppler (pdfsig, most PDF viewers on Linux) verifies RSA and NIST-curve ECDSA, not Ed25519/Ed448.
EC_CURVES = {"secp256r1": "ECDSA P-256", "secp384r1": "ECDSA P-384"}
MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class SigningConfig:
    """Where the signing key is: a PKCS#12 archive, or a PEM/DER key with its certificate (the field names of the
    case file's ``signing:`` section). With neither, the local self-signed analyst key under ``key_dir`` is used and
    made on first use. A passphrase is never part of the config: only the name of an environment variable, or the
    path of a file, that holds it."""

    pkcs12: Path | None = None
    key: Path | None = None
    certificate: Path | None = None
    chain: tuple[Path, ...] = ()  # intermediate certificates to embed, if the key's issuer is not a root
    passphrase_env: str | None = None  # also the PIN of a PKCS#11 token
    passphrase_file: Path | None = None
    key_dir: Path | None = None  # default: $FORENSICS_KEY_DIR, else ~/.config/llm-forensics
    pkcs11_module: Path | None = None  # a PKCS#11 library (an HSM's, a smart card's, SoftHSM2's)
    pkcs11_token: str | None = None  # the token's label
    pkcs11_key: str | None = None  # the label of the key and of its certificate on the token
    tsa_url: str | None = None  # an RFC 3161 timestamp authority; default $FORENSICS_TSA_URL, else none (offline)


@dataclass(frozen=True)
class SignerIdentity:
    """What the dossier states about its signer (cover, manifest) and `forensics verify` checks against."""

    subject: str
    certificate_sha256: str  # SHA-256 of the DER certificate
    key_algorithm: str
    self_signed: bool
    generated_locally: bool  # the local analyst key made by llm-forensics, not one the analyst supplied
    not_after: str
    certificate_pem: str = field(repr=False)
    chain: tuple[str, ...] = ()  # subjects of the embedded issuing certificates, nearest first

    def to_manifest(self) -> dict:
        return {"subject": self.subject, "certificate_sha256": self.certificate_sha256,
                "key_algorithm": self.key_algorithm, "self_signed": self.self_signed,
                "generated_locally": self.generated_locally, "not_after": self.not_after,
                "chain": list(self.chain)}


@dataclass(frozen=True)
class LoadedSigner:
    identity: SignerIdentity
    signer: signers.Signer = field(repr=False)
    tsa_url: str | None = None

    def sign_raw(self, data: bytes) -> bytes:
        """A signature over ``data`` (SHA-256; DER ECDSA or PKCS#1 v1.5 RSA) with the dossier's key: the DSSE
        envelope's signature. The key never leaves its token when it lives in one."""
        return asyncio.run(self.signer.async_sign_raw(data, "sha256"))


def verify_raw(certificate: x509.Certificate, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` over ``data`` was made with the key of the certificate (as `LoadedSigner.sign_raw`)."""
    key = certificate.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class Attachment:
    name: str
    data: bytes
    mime_type: str
    description: str


def default_key_dir() -> Path:
    return settings.key_dir()


def _new_local_key() -> bytes:
    """A fresh ECDSA P-256 key with a 10-year self-signed certificate, as a PKCS#12 archive without passphrase
    (it lives in a 0600 file in a 0700 directory, like an SSH key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOCAL_CN),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "self-signed, not issued by a certification "
                                                                     "authority")])
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock differences of a verifier
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return pkcs12.serialize_key_and_certificates(b"llm-forensics analyst", key, cert, None,
                                                 serialization.NoEncryption())


def ensure_local_key(key_dir: str | Path | None = None) -> Path:
    """Path of the local analyst key, generated on first use; also leaves its certificate as PEM beside it, for
    handing to whoever must check the signature."""
    key_dir = Path(key_dir) if key_dir is not None else default_key_dir()
    key_path = key_dir / LOCAL_KEY_NAME
    if key_dir.exists() and not key_dir.is_dir():
        raise ForensicsError(key_dir, f"the signing key directory is not a directory; point {KEY_DIR_ENV} at a "
                                      f"directory (it is made if missing)")
    if not key_path.exists():
        try:
            key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise ForensicsError(key_dir, f"cannot make the signing key directory: {e.strerror or e}") from e
        exclusive_write_bytes(key_path, _new_local_key(), mode=0o600)  # a concurrent run's key wins; both use it
    mode = key_path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ForensicsError(key_path, f"the unencrypted analyst key is accessible to other users (mode "
                                       f"{mode:04o}); run: chmod 600 {key_path}")
    _, cert, _ = _read_pkcs12(key_path, None)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path = key_dir / LOCAL_CERT_NAME
    if not cert_path.exists() or cert_path.read_bytes() != cert_pem:
        atomic_write_bytes(cert_path, cert_pem, mode=0o644)
    return key_path


def _passphrase(config: SigningConfig) -> bytes | None:
    if config.passphrase_env and config.passphrase_file:
        raise ForensicsError(config.passphrase_file, "give either passphrase_env or passphrase_file, not both")
    if config.passphrase_env:
        value = os.environ.get(config.passphrase_env)
        if value is None:
            raise ForensicsError(None, f"environment variable {config.passphrase_env} (signing.passphrase_env) "
                                       "is not set")
        return value.encode("utf-8")
    if config.passphrase_file:
        try:
            text = config.passphrase_file.read_text("utf-8")
        except OSError as e:
            raise ForensicsError(config.passphrase_file, f"cannot read passphrase file: {e.strerror or e}") from e
        return text.rstrip("\r\n").encode("utf-8")  # editors add a final newline that is not part of it
    return None


def _read_pkcs12(path: Path, passphrase: bytes | None):
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(path.read_bytes(), passphrase)
    except OSError as e:
        raise ForensicsError(path, f"cannot read key file: {e.strerror or e}") from e
    except (ValueError, TypeError) as e:
        hint = "" if passphrase else " (no passphrase was given: set signing.passphrase_env or passphrase_file)"
        raise ForensicsError(path, f"cannot open PKCS#12 archive: wrong passphrase or damaged file{hint}") from e
    if key is None or cert is None:
        raise ForensicsError(path, "PKCS#12 archive must hold both a private key and its certificate")
    return key, cert, list(extra)


def _read_certs(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ForensicsError(path, f"cannot read certificate: {e.strerror or e}") from e
    try:
        return x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data else [x509.load_der_x509_certificate(
            data)]
    except ValueError as e:
        raise ForensicsError(path, "not a PEM or DER X.509 certificate") from e


def _read_key(path: Path, passphrase: bytes | None):
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ForensicsError(path, f"cannot read key file: {e.strerror or e}") from e
    load = serialization.load_pem_private_key if b"-----BEGIN" in data else serialization.load_der_private_key
    try:
        return load(data, password=passphrase)
    except TypeError as e:  # cryptography: encrypted key without password, or password for a plain key
        raise ForensicsError(path, f"private key passphrase problem: {e}") from e
    except ValueError as e:
        raise ForensicsError(path, "cannot load private key: wrong passphrase or not a PEM/DER key") from e


def _key_algorithm(key, path: Path) -> str:
    """The signing key's algorithm, read off its public key (a token's key is known only by its certificate)."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ForensicsError(path, f"RSA key of {key.key_size} bits is too weak; use at least {MIN_RSA_BITS}")
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in EC_CURVES:
        return EC_CURVES[key.curve.name]
    kind = type(key).__name__.lstrip("_").removesuffix("PublicKey")
    raise ForensicsError(path, f"unsupported key type {kind}: poppler and most PDF readers verify only RSA and ECDSA "
                               "P-256/P-384 signatures")


def is_self_signed(cert: x509.Certificate) -> bool:
    """Issuer equals subject and the certificate's signature verifies with its own key."""
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _allows_document_signing(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value.content_commitment
    except x509.ExtensionNotFound:
        return False


def _subject(cert: x509.Certificate) -> str:
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cn[0].value) if cn else cert.subject.rfc4514_string()


def load_signer(config: SigningConfig | None = None) -> LoadedSigner:
    """The signer named by ``config``, or the local analyst key (created if missing) when no key is configured."""
    config = config or SigningConfig()
    tsa = config.tsa_url or os.environ.get(settings.TSA_URL_ENV) or None
    if config.pkcs11_module:
        return _pkcs11_signer(config, tsa)
    if config.pkcs12 and (config.key or config.certificate):
        raise ForensicsError(config.pkcs12, "give either a PKCS#12 archive, or a key and its certificate, not both")
    generated = config.pkcs12 is None and config.key is None
    if generated:
        key_path = ensure_local_key(config.key_dir)
        key, cert, extra = _read_pkcs12(key_path, None)
    elif config.pkcs12:
        key_path = config.pkcs12
        key, cert, extra = _read_pkcs12(key_path, _passphrase(config))
    else:
        key_path = config.key
        if config.certificate is None:
            raise ForensicsError(key_path, "a PEM/DER private key needs its certificate: set signing.certificate")
        key = _read_key(key_path, _passphrase(config))
        cert, *extra = _read_certs(config.certificate)
    for c in config.chain:
        extra += _read_certs(c)
    algorithm = _key_algorithm(key.public_key(), key_path)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, pub) != cert.public_key().public_bytes(
            serialization.Encoding.DER, pub):
        raise ForensicsError(config.certificate or key_path, "the certificate does not belong to the private key")
    if not _allows_document_signing(cert):
        raise ForensicsError(config.certificate or key_path,
                             "the certificate's key usage lacks nonRepudiation (contentCommitment), which PDF "
                             "validators such as pyHanko require of a document signature")
    now = dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ForensicsError(config.certificate or key_path,
                             f"the certificate is valid only from {cert.not_valid_before_utc:%Y-%m-%d} to "
                             f"{cert.not_valid_after_utc:%Y-%m-%d}; a signature made now would not validate")
    cert_der = cert.public_bytes(serialization.Encoding.DER)
    identity = _identity(cert, algorithm, generated, extra)
    registry = SimpleCertificateStore()
    registry.register_multiple(asn1_x509.Certificate.load(c.public_bytes(serialization.Encoding.DER)) for c in extra)
    key_info = asn1_keys.PrivateKeyInfo.load(key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    signer = signers.SimpleSigner(signing_cert=asn1_x509.Certificate.load(cert_der), signing_key=key_info,
                                  cert_registry=registry)
    return LoadedSigner(identity=identity, signer=signer, tsa_url=tsa)


def _identity(cert: x509.Certificate, algorithm: str, generated: bool, chain: list[x509.Certificate]) -> SignerIdentity:
    return SignerIdentity(
        subject=_subject(cert), certificate_sha256=sha256_bytes(cert.public_bytes(serialization.Encoding.DER)),
        key_algorithm=algorithm, self_signed=is_self_signed(cert), generated_locally=generated,
        not_after=cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        chain=tuple(_subject(c) for c in chain))


def _pkcs11_signer(config: SigningConfig, tsa: str | None) -> LoadedSigner:
    """The key and certificate labelled ``pkcs11_key`` on the token ``pkcs11_token``; the PIN comes from
    passphrase_env or passphrase_file, like a passphrase."""
    from pkcs11 import PKCS11Error
    from pyhanko.sign import pkcs11 as p11

    where = config.pkcs11_module
    if not (config.pkcs11_token and config.pkcs11_key):
        raise ForensicsError(where, "a PKCS#11 key needs signing.pkcs11_token and signing.pkcs11_key (labels)")
    pin = _passphrase(config)
    try:
        session = p11.open_pkcs11_session(str(where), token_criteria=p11.TokenCriteria(label=config.pkcs11_token),
                                          user_pin=pin.decode("utf-8") if pin is not None else None)
        # Raw mechanisms (CKM_ECDSA, CKM_RSA_PKCS over a digest pyHanko computes) are the ones every token has;
        # SoftHSM2, for one, lacks CKM_ECDSA_SHA256.
        signer = p11.PKCS11Signer(session, key_label=config.pkcs11_key, cert_label=config.pkcs11_key,
                                  use_raw_mechanism=True)
        cert_der = signer.signing_cert.dump()
        chain_der = [c.dump() for c in signer.cert_registry if c.dump() != cert_der]
    except (PKCS11Error, OSError, RuntimeError, SigningError) as e:
        raise ForensicsError(where, f"cannot use the PKCS#11 key {config.pkcs11_key!r} on token "
                                    f"{config.pkcs11_token!r}: {type(e).__name__}: {e}") from e
    cert = x509.load_der_x509_certificate(cert_der)
    if not _allows_document_signing(cert):
        raise ForensicsError(where, "the token's certificate lacks nonRepudiation (contentCommitment), which PDF "
                                    "validators such as pyHanko require of a document signature")
    algorithm = _key_algorithm(cert.public_key(), where)
    chain = [x509.load_der_x509_certificate(c) for c in chain_der]
    return LoadedSigner(identity=_identity(cert, algorithm, False, chain), signer=signer, tsa_url=tsa)


def sign_pdf(pdf_bytes: bytes, signer: LoadedSigner, attachments: Sequence[Attachment], reason: str) -> bytes:
    """Attach ``attachments`` and sign, both in one incremental update, so the signature covers the attachments and
    the whole file. The signature certifies the document with "no changes permitted", so viewers flag any later
    edit."""
    writer = IncrementalPdfFileWriter(io.BytesIO(pdf_bytes))
    # A name tree must be sorted by name (PDF 32000 7.9.6); embed_file appends, so add them in that order.
    for a in sorted(attachments, key=lambda a: a.name):
        data = embed.EmbeddedFileObject.from_file_data(writer, a.data, mime_type=a.mime_type,
                                                       params=embed.EmbeddedFileParams())
        embed.embed_file(writer, embed.FileSpec(file_spec_string=a.name, file_name=a.name, embedded_data=data,
                                                description=a.description,
                                                af_relationship=generic.pdf_name("/Supplement")))
    meta = signers.PdfSignatureMetadata(
        field_name=SIGNATURE_FIELD, subfilter=fields.SigSeedSubFilter.PADES, md_algorithm="sha256",
        reason=reason, name=signer.identity.subject, certify=True,
        docmdp_permissions=fields.MDPPerm.NO_CHANGES)
    timestamper = HTTPTimeStamper(signer.tsa_url, timeout=30) if signer.tsa_url else None
    try:
        signed = signers.PdfSigner(meta, signer.signer, timestamper=timestamper).sign_pdf(writer).getvalue()
        return _archive(signed, timestamper) if timestamper else signed
    except (SigningError, TimestampRequestError) as e:
        raise ForensicsError(signer.tsa_url, f"cannot sign the dossier: {type(e).__name__}: {e}") from e


def _archive(signed: bytes, timestamper: HTTPTimeStamper) -> bytes:
    """PAdES B-LTA: a document timestamp over the signed file, with the certificates that validate the signature and
    its timestamp in the DSS when the embedded chains end in a root (a chain that does not gets the timestamp
    without them). pyHanko classes both as long-term-archival updates, which the certification allows."""
    sig = PdfFileReader(io.BytesIO(signed)).embedded_signatures[0]
    certs = [sig.signer_cert, *sig.other_embedded_certs]
    for attr in sig.signer_info["unsigned_attrs"] or ():
        if attr["type"].native == "signature_time_stamp_token":
            certs += [c.chosen for token in attr["values"] for c in token["content"]["certificates"]]
    roots = [c for c in certs if c.self_signed in ("yes", "maybe")]
    stamper = signers.PdfTimeStamper(timestamper)
    try:
        context = ValidationContext(trust_roots=roots, allow_fetching=False) if roots else None
        out = stamper.timestamp_pdf(IncrementalPdfFileWriter(io.BytesIO(signed)), "sha256",
                                    validation_context=context)
    except (PathBuildingError, PathValidationError):
        out = stamper.timestamp_pdf(IncrementalPdfFileWriter(io.BytesIO(signed)), "sha256")
    return out.getvalue()
