"""`forensics verify`: is this dossier the file that was signed, by the key its manifest records, and (optionally)
are the input files it describes still the same bytes?"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from asn1crypto import x509 as asn1_x509
from cryptography import x509
from pyhanko.keys import load_certs_from_pemder
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.validation import SignatureCoverageLevel, validate_pdf_signature
from pyhanko_certvalidator import ValidationContext

from forensics.errors import ForensicsError
from forensics.evidence.hashing import sha256_bytes, sha256_file
from forensics.report.signing import SIGNATURE_FIELD, is_self_signed

MANIFEST = "manifest.json"
CASE_YAML = "case.yaml"
RESULTS = "results.json"
SIGNER_CERT = "signer-certificate.pem"


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
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "checks": [vars(c) for c in self.checks],
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
    """Check a signed dossier; ``result.ok`` only when every check holds.

    Valid means: exactly one signature, cryptographically intact, covering the entire file, made with the certificate
    the embedded manifest records, and the embedded case file and results matching the manifest's hashes. Whether
    the certificate is trusted is reported in ``result.trust``; it is a check only when ``trust_roots`` are given.
    ``expected_signer`` is the signing certificate's SHA-256 as the analyst gave it out of band: the manifest's own
    record cannot tell a forgery re-signed with another key, this can. ``check_inputs`` re-hashes every input file
    in the manifest, relative paths under ``base_dir`` (default: the directory recorded in the manifest).
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
    fields = [s.field_name for s in sigs]
    if not result.add("one_signature", fields == [SIGNATURE_FIELD],
                      f"one signature, in field {SIGNATURE_FIELD}" if fields == [SIGNATURE_FIELD] else
                      f"signature field(s) found: {fields or 'none'}; expected exactly one, {SIGNATURE_FIELD}"):
        return result
    sig = sigs[0]
    cert = sig.signer_cert
    cert_sha = cert.sha256.hex()
    try:
        # Trusting the signer's own certificate separates "is the signature intact" from "whom do we trust".
        with _quiet_pyhanko():
            status = validate_pdf_signature(sig, ValidationContext(trust_roots=[cert], allow_fetching=False))
    except Exception as e:  # noqa: BLE001 -- a damaged signature can fail anywhere inside the CMS parser
        result.add("signature_intact", False, f"signature could not be validated: {e}")
        return result
    result.signature = {
        "field": sig.field_name, "signer": cert.subject.human_friendly, "certificate_sha256": cert_sha,
        "signing_time": status.signer_reported_dt.isoformat() if status.signer_reported_dt else None,
        "intact": status.intact, "valid": status.valid, "coverage": status.coverage.name,
        "digest_algorithm": status.md_algorithm}
    result.add("signature_intact", status.intact and status.valid,
               "the signed bytes are unchanged and the signature matches them" if status.intact and status.valid
               else "the document was changed after signing, or the signature is damaged")
    result.add("covers_entire_file", status.coverage == SignatureCoverageLevel.ENTIRE_FILE,
               f"signature coverage: {status.coverage.name}")
    if expected_signer is not None:
        want = expected_signer.strip().lower().replace(":", "")
        result.add("signer_is_expected", cert_sha == want,
                   f"signing certificate SHA-256 {cert_sha}" + ("" if cert_sha == want else f", expected {want}"))
    self_signed = is_self_signed(x509.load_der_x509_certificate(cert.dump()))
    if trust_roots:
        with _quiet_pyhanko():
            trusted = validate_pdf_signature(
                sig, ValidationContext(trust_roots=_load_certs(trust_roots), allow_fetching=False)).trusted
        result.trust = "chains to a given trust root" if trusted else "does not chain to any given trust root"
        result.add("trusted", trusted, result.trust)
    else:
        result.trust = ("self-signed: not issued by a certification authority; compare the certificate SHA-256 "
                        "with the one the analyst gave you" if self_signed else
                        "not checked against a trust root (pass trust roots to check)")

    files = _embedded_files(reader)
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
        want = (manifest.get(section) or {}).get("sha256")
        got = sha256_bytes(files[name])
        result.add(f"{name}_hash", got == want, f"SHA-256 {got}" + ("" if got == want else f", manifest says {want}"))
    if check_inputs:
        base = Path(base_dir) if base_dir is not None else Path(manifest.get("inputs_base") or ".")
        result.inputs = [_check_input(rec, base) for rec in manifest.get("inputs", [])]
        bad = [f"{r['path']}: {r['status']}" for r in result.inputs if r["status"] != "ok"]
        result.add("inputs", not bad, "; ".join(bad) if bad else f"{len(result.inputs)} input file(s) unchanged")
    return result


def _check_input(rec: dict, base: Path) -> dict:
    path = base / rec["path"]
    out = {"path": rec["path"], "resolved": str(path), "expected_sha256": rec.get("sha256"),
           "expected_size": rec.get("size")}
    if not path.is_file():
        return {**out, "status": "missing"}
    out["size"] = path.stat().st_size
    if out["size"] != rec.get("size"):
        return {**out, "status": f"size changed ({rec.get('size')} -> {out['size']} bytes)"}
    out["sha256"] = sha256_file(path)
    return {**out, "status": "ok" if out["sha256"] == rec.get("sha256") else "hash mismatch"}
