"""`forensics verify`: is this dossier the file that was signed, by the key its manifest records, and (optionally)
are the input files it describes still the same bytes?"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from asn1crypto import x509 as asn1_x509
from cryptography import x509
from pyhanko.keys import load_certs_from_pemder
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.diff_analysis import ModificationLevel
from pyhanko.sign.validation import SignatureCoverageLevel, validate_pdf_signature, validate_pdf_timestamp
from cryptography.hazmat.primitives import serialization
from pyhanko_certvalidator import ValidationContext

from forensics.errors import ForensicsError
from forensics.evidence import attestation
from forensics.evidence.hashing import sha256_bytes
from forensics.files import open_regular
from forensics.report.signing import SIGNATURE_FIELD, is_self_signed, verify_raw

MANIFEST = "manifest.json"
CASE_YAML = "case.yaml"
RESULTS = "results.json"
SIGNER_CERT = "signer-certificate.pem"


# The checks that say whom the signature is from; every other check is about integrity.
TRUST_CHECKS = frozenset({"signer_is_expected", "trusted"})
# Exit statuses of `forensics verify` (2 is every command's status for an input it cannot use).
EXIT_VERIFIED, EXIT_FAILED, EXIT_UNTRUSTED = 0, 1, 3


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class VerifyResult:
    path: str
    checks: list[Check] = field(default_factory=list)
    signature: dict = field(default_factory=dict)
    trust: str = "not checked"
    manifest: dict | None = None
    inputs: list[dict] | None = None

    @property
    def integrity(self) -> bool:
        """The file is the one signed, by the key its manifest names, with the evidence it describes."""
        checks = [c for c in self.checks if c.name not in TRUST_CHECKS]
        return bool(checks) and all(c.ok for c in checks)

    @property
    def trusted(self) -> bool:
        """The signer is one the user vouched for (--signer, --trust); never true when neither was given."""
        checks = [c for c in self.checks if c.name in TRUST_CHECKS]
        return bool(checks) and all(c.ok for c in checks)

    @property
    def ok(self) -> bool:
        return self.integrity and self.trusted

    @property
    def exit_status(self) -> int:
        if self.ok:
            return EXIT_VERIFIED
        untrusted = self.integrity and not any(c.name in TRUST_CHECKS for c in self.checks)
        return EXIT_UNTRUSTED if untrusted else EXIT_FAILED

    @property
    def verdict(self) -> str:
        status = self.exit_status
        if status == EXIT_VERIFIED:
            return "verified: integrity ok, signer trusted"
        if status == EXIT_UNTRUSTED:
            return "integrity ok, signer not trusted"
        failed = ", ".join(c.name for c in self.checks if not c.ok)
        return f"failed: {'integrity ok, but ' if self.integrity else ''}{failed}"

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "verdict": self.verdict, "exit_status": self.exit_status,
                "integrity": self.integrity, "trusted": self.trusted, "checks": [vars(c) for c in self.checks],
                "signature": self.signature, "trust": self.trust,
                "dossier_id": (self.manifest or {}).get("dossier_id"),
                "case_id": (self.manifest or {}).get("case_id"), "inputs": self.inputs}


@contextmanager
def _quiet_pyhanko() -> Iterator[None]:
    """pyHanko logs a traceback for every untrusted certificate; the result object already says so."""
    log = logging.getLogger("pyhanko")
    old = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(old)


def _embedded_files(reader: PdfFileReader) -> dict[str, bytes]:
    out: dict[str, bytes] = {}

    def walk(node):
        node = node.get_object()
        names = node.get("/Names", generic.ArrayObject()).get_object()
        for i in range(0, len(names) - 1, 2):
            spec = names[i + 1].get_object()
            ef = spec.get("/EF")
            if ef is not None and "/F" in ef:
                out[str(names[i])] = ef["/F"].get_object().data
        for kid in node.get("/Kids", generic.ArrayObject()).get_object():
            walk(kid)

    try:
        tree = reader.root["/Names"]["/EmbeddedFiles"]
    except KeyError:
        return out
    walk(tree)
    return out


def _load_certs(paths: Sequence[str | Path]) -> list[asn1_x509.Certificate]:
    try:
        return list(load_certs_from_pemder([str(p) for p in paths]))
    except (OSError, ValueError) as e:
        raise ForensicsError(paths[0] if len(paths) == 1 else None, f"cannot read trust root certificate: {e}") from e


def verify_dossier(pdf_path: str | Path, check_inputs: bool = False, base_dir: str | Path | None = None,
                   trust_roots: Sequence[str | Path] = (), expected_signer: str | None = None) -> VerifyResult:
    """Check a signed dossier; integrity and trust are reported apart, and ``result.ok`` needs both.

    Integrity: exactly one signature, cryptographically intact, covering the entire file, made with the certificate
    the embedded manifest records, and the embedded case file and results matching the manifest's hashes. Trust: the
    signing certificate is ``expected_signer`` (its SHA-256 as the analyst gave it out of band: the manifest's own
    record cannot tell a forgery re-signed with another key, this can) or chains to one of ``trust_roots``. With
    neither, a dossier of intact integrity is "integrity ok, signer not trusted" (``exit_status`` 3).

    ``check_inputs`` re-hashes the input files the manifest lists, once integrity holds (a manifest that does not
    check out must not choose which files are read), and only those under ``base_dir`` (default: the current
    directory): a path that resolves outside it is reported, not read. A damaged or malformed signature is a failed
    check, never an exception; only an unreadable dossier file raises ForensicsError.
    """
    pdf_path = Path(pdf_path)
    try:
        data = pdf_path.read_bytes()
    except OSError as e:
        raise ForensicsError(pdf_path, f"cannot read dossier: {e.strerror or e}") from e
    result = VerifyResult(path=str(pdf_path))
    try:
        reader = PdfFileReader(io.BytesIO(data))
        sigs = reader.embedded_signatures
    except Exception as e:  # noqa: BLE001 -- any parse failure of a damaged file is a verification failure
        result.add("pdf_readable", False, f"the file cannot be parsed as PDF: {e}")
        return result
    try:
        # Document timestamps (PAdES B-LTA) may follow the dossier's signature; nothing else may.
        stamps = [s for s in sigs if s.sig_object_type == "/DocTimeStamp"]
        fields = [s.field_name for s in sigs if s not in stamps]
    except Exception as e:  # noqa: BLE001 -- a crafted signature dictionary can break the parse anywhere
        result.add("one_signature", False, f"the signature dictionaries cannot be read: {type(e).__name__}: {e}")
        return result
    if not result.add("one_signature", fields == [SIGNATURE_FIELD],
                      f"one signature, in field {SIGNATURE_FIELD}" if fields == [SIGNATURE_FIELD] else
                      f"signature field(s) found: {fields or 'none'}; expected exactly one, {SIGNATURE_FIELD}"):
        return result
    sig = next(s for s in sigs if s not in stamps)
    try:
        # The CMS structure is parsed lazily, by these: a damaged one can fail anywhere inside asn1crypto or pyHanko.
        cert = sig.signer_cert
        cert_sha = cert.sha256.hex()
        self_signed = is_self_signed(x509.load_der_x509_certificate(cert.dump()))
        # Trusting the signer's own certificate separates "is the signature intact" from "whom do we trust".
        with _quiet_pyhanko():
            status = validate_pdf_signature(sig, ValidationContext(trust_roots=[cert], allow_fetching=False))
        result.signature = {
            "field": sig.field_name, "signer": cert.subject.human_friendly, "certificate_sha256": cert_sha,
            "signing_time": status.signer_reported_dt.isoformat() if status.signer_reported_dt else None,
            "intact": status.intact, "valid": status.valid, "coverage": status.coverage.name,
            "digest_algorithm": status.md_algorithm, "timestamp": _timestamp(status)}
    except Exception as e:  # noqa: BLE001 -- see above
        result.add("signature_intact", False, f"the signature is malformed and could not be validated: "
                                              f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        return result
    result.add("signature_intact", status.intact and status.valid,
               "the signed bytes are unchanged and the signature matches them" if status.intact and status.valid
               else "the document was changed after signing, or the signature is damaged")
    archived = _document_timestamp(result, stamps, status)
    result.add("covers_entire_file", status.coverage == SignatureCoverageLevel.ENTIRE_FILE or archived,
               f"signature coverage: {status.coverage.name}" + (
                   ", then only a document timestamp covering the entire file (PAdES B-LTA)" if archived else ""))
    _check_trust(result, sig, cert_sha, self_signed, trust_roots, expected_signer)

    try:
        files = _embedded_files(reader)
    except Exception as e:  # noqa: BLE001 -- a crafted name tree can break the walk anywhere
        result.add("attachments", False, f"the attachments cannot be read: {type(e).__name__}: {e}")
        return result
    missing = [n for n in (MANIFEST, CASE_YAML, RESULTS) if n not in files]
    if not result.add("attachments", not missing, f"missing attachment(s): {', '.join(missing)}" if missing
                      else f"attached: {', '.join(sorted(files))}"):
        return result
    try:
        manifest = json.loads(files[MANIFEST])
        recorded = manifest["signer"]["certificate_sha256"]
    except (ValueError, KeyError, TypeError) as e:
        result.add("manifest", False, f"attached manifest.json is not a valid manifest: {e!r}")
        return result
    result.manifest = manifest
    result.add("signer_matches_manifest", recorded == cert_sha,
               f"signing certificate SHA-256 {cert_sha}" + ("" if recorded == cert_sha else
                                                            f" differs from the manifest's {recorded}"))
    for name, section in ((CASE_YAML, "case_yaml"), (RESULTS, "results_digest")):
        section = manifest.get(section)
        want = section.get("sha256") if isinstance(section, dict) else None
        got = sha256_bytes(files[name])
        result.add(f"{name}_hash", got == want, f"SHA-256 {got}" + ("" if got == want else f", manifest says {want}"))
    if attestation.FILE_NAME in files:
        _check_attestation(result, files[attestation.FILE_NAME], cert.dump(), cert_sha, manifest, files[RESULTS],
                           where="the attached attestation")
    else:
        result.add("attestation", False, f"no {attestation.FILE_NAME} attached: every dossier carries one")
    if check_inputs:
        _check_inputs(result, manifest, Path(base_dir) if base_dir is not None else Path.cwd())
    return result


def _document_timestamp(result: VerifyResult, stamps: list, status) -> bool:
    """Whether everything after the signed revision is one intact document timestamp with only long-term-archival
    data (DSS) beside it; the timestamp is recorded either way."""
    if not stamps:
        return False
    try:
        stamp = stamps[-1]
        with _quiet_pyhanko():
            ts = validate_pdf_timestamp(stamp, ValidationContext(trust_roots=[stamp.signer_cert],
                                                                 allow_fetching=False))
        result.signature["document_timestamp"] = {
            "time": ts.timestamp.isoformat(), "authority": stamp.signer_cert.subject.human_friendly,
            "intact": ts.intact, "valid": ts.valid, "coverage": ts.coverage.name}
    except Exception as e:  # noqa: BLE001 -- a damaged token is a failed check, not a traceback
        result.signature["document_timestamp"] = {"error": f"{type(e).__name__}: {e}"}
        return False
    # pyHanko writes the timestamp's own validation data in a DSS revision after it: also an archival update.
    covered = ts.coverage == SignatureCoverageLevel.ENTIRE_FILE or (
        ts.coverage == SignatureCoverageLevel.ENTIRE_REVISION
        and getattr(ts, "modification_level", None) == ModificationLevel.LTA_UPDATES)
    return (len(stamps) == 1 and ts.intact and ts.valid and covered
            and status.modification_level == ModificationLevel.LTA_UPDATES)


def _timestamp(status) -> dict | None:
    """The signature's RFC 3161 timestamp as pyHanko validated it (time, authority, whether its token is intact)."""
    ts = getattr(status, "timestamp_validity", None)
    if ts is None:
        return None
    return {"time": ts.timestamp.isoformat(), "authority": ts.signing_cert.subject.human_friendly,
            "intact": ts.intact, "valid": ts.valid}


def _check_attestation(result: VerifyResult, raw: bytes, cert_der: bytes, cert_sha: str, manifest: dict | None,
                       results: bytes | None, where: str) -> dict | None:
    """The DSSE envelope: well formed, signed by the certificate's key, and (when given) in agreement with the
    manifest and results it describes. Returns the statement."""
    try:
        payload, sigs, stmt = attestation.open_envelope(raw, where)
    except ForensicsError as e:
        result.add("attestation", False, str(e))
        return None
    cert = x509.load_der_x509_certificate(cert_der)
    signed = [s for keyid, s in sigs if keyid == cert_sha]
    good = bool(signed) and any(verify_raw(cert, attestation.pae(attestation.PAYLOAD_TYPE, payload), s)
                                for s in signed)
    result.add("attestation_signature", good,
               f"DSSE envelope signed by certificate {cert_sha}" if good else
               f"no valid DSSE signature by certificate {cert_sha} (key ids: {', '.join(k for k, _ in sigs) or 'none'})")
    if manifest is not None and results is not None:
        problems = attestation.disagreements(stmt, manifest, results)
        result.add("attestation_agrees", not problems,
                   "statement, manifest and results.json agree" if not problems else "; ".join(problems))
    return stmt


def verify_attestation(path: str | Path, certificate: str | Path, check_inputs: bool = False,
                       base_dir: str | Path | None = None, expected_signer: str | None = None) -> VerifyResult:
    """Check a standalone `attestation.dsse.json` against the signer's certificate (PEM), without the PDF: its DSSE
    signature, and with ``check_inputs`` every subject re-hashed under ``base_dir``. Trust, as for a dossier, is
    ``expected_signer`` (the certificate's SHA-256 given out of band)."""
    path, certificate = Path(path), Path(certificate)
    try:
        raw, pem = path.read_bytes(), certificate.read_bytes()
    except OSError as e:
        raise ForensicsError(e.filename, f"cannot read: {e.strerror or e}") from e
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise ForensicsError(certificate, f"not a PEM certificate: {e}") from e
    cert_der = cert.public_bytes(serialization.Encoding.DER)
    cert_sha = sha256_bytes(cert_der)
    result = VerifyResult(path=str(path))
    stmt = _check_attestation(result, raw, cert_der, cert_sha, None, None, where=path)
    _check_trust(result, None, cert_sha, is_self_signed(cert), (), expected_signer)
    if stmt is not None:
        result.manifest = {"dossier_id": stmt["predicate"].get("dossier_id"), "case_id": stmt["predicate"].get(
            "case_id"), "inputs": [{"path": s["name"], "sha256": s["digest"]["sha256"]} for s in stmt["subject"]]}
        result.signature = {"verdicts": {c: v["verdict"] for c, v in stmt["predicate"].get("verdicts", {}).items()}}
        if check_inputs:
            _check_inputs(result, result.manifest, Path(base_dir) if base_dir is not None else Path.cwd())
    return result


def _check_trust(result: VerifyResult, sig, cert_sha: str, self_signed: bool, trust_roots: Sequence[str | Path],
                 expected_signer: str | None) -> None:
    texts = []
    if expected_signer is not None:
        want = expected_signer.strip().lower().replace(":", "")
        result.add("signer_is_expected", cert_sha == want,
                   f"signing certificate SHA-256 {cert_sha}" + ("" if cert_sha == want else f", expected {want}"))
        texts.append("the signing certificate is the one given with --signer" if cert_sha == want else
                     "the signing certificate is not the one given with --signer")
    if trust_roots:
        roots = _load_certs(trust_roots)  # an unreadable root is the user's error (exit 2), not a verdict
        try:
            with _quiet_pyhanko():
                trusted = validate_pdf_signature(sig, ValidationContext(trust_roots=roots,
                                                                        allow_fetching=False)).trusted
            why = "chains to a given trust root" if trusted else "does not chain to any given trust root"
        except Exception as e:  # noqa: BLE001 -- the CMS parsed once already; whatever fails now is a verdict
            trusted, why = False, f"could not be checked against the trust roots: {type(e).__name__}: {e}"
        result.add("trusted", trusted, why)
        texts.append(why)
    if not texts:
        texts.append("not trusted: no --signer or --trust was given. " + (
            "The certificate is self-signed, not issued by a certification authority: compare its SHA-256 with the "
            "one the analyst gave you, and pass it as --signer" if self_signed else
            "Pass the analyst's certificate SHA-256 as --signer, or trust roots as --trust"))
    result.trust = "; ".join(texts)


def _check_inputs(result: VerifyResult, manifest: dict, base: Path) -> None:
    if not result.integrity:
        result.add("inputs", False, "not re-hashed: the dossier's integrity does not hold, so its manifest cannot "
                                    "say which files to read")
        return
    records = manifest.get("inputs", [])
    if not isinstance(records, list):
        result.add("inputs", False, "the manifest's inputs are not a list")
        return
    base = base.resolve()
    result.inputs = [_check_input(rec, base, manifest.get("inputs_base")) for rec in records]
    bad = [f"{r['path']}: {r['status']}" for r in result.inputs if r["status"] != "ok"]
    result.add("inputs", not bad, "; ".join(bad) if bad else f"{len(result.inputs)} input file(s) unchanged")


def _check_input(rec, base: Path, recorded_base) -> dict:
    if not isinstance(rec, dict) or not isinstance(rec.get("path"), str):
        return {"path": repr(rec)[:200], "status": "malformed input record"}
    path = base / rec["path"]
    real = path.resolve()
    out = {"path": rec["path"], "resolved": str(real), "expected_sha256": rec.get("sha256"),
           "expected_size": rec.get("size")}
    if not real.is_relative_to(base):
        hint = f"; the dossier was made in {recorded_base}" if recorded_base else ""
        return {**out, "status": f"outside the base directory {base}: not read (name the directory with "
                                 f"--base-dir{hint})"}
    if not real.exists():
        return {**out, "status": "missing"}
    try:
        with open_regular(real) as f:
            out["size"] = os.fstat(f.fileno()).st_size
            if rec.get("size") is not None and out["size"] != rec["size"]:
                return {**out, "status": f"size changed ({rec.get('size')} -> {out['size']} bytes)"}
            out["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
    except ForensicsError as e:
        return {**out, "status": e.problem}
    except OSError as e:
        return {**out, "status": f"read failed: {e.strerror or e}"}
    return {**out, "status": "ok" if out["sha256"] == rec.get("sha256") else "hash mismatch"}
