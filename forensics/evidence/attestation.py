"""The finding as an in-toto attestation (Statement v1 in a DSSE envelope), for tools that do not read PDFs.

The statement's subjects are every input file of the case (name and SHA-256, as in the manifest), so a release gate
can pair it with a model's own signature (OpenSSF model signing signs the same file digests). Its predicate holds
what was found: each candidate's verdict, the route that decided it, its p-values, the rule, the error rate, the
tool version and the digests of results.json and the manifest. The envelope is signed with the dossier's key over
DSSE's pre-authentication encoding (PAE); the signature's `keyid` is the SHA-256 of the signing certificate (DER),
the same value the manifest and the dossier's cover give.

Building and checking are pure functions of bytes: the signature itself is made and checked by the caller with the
signer's key (forensics/report/signing.py, forensics/report/verify.py).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping

from forensics.errors import ForensicsError
from forensics.evidence.hashing import sha256_bytes
from forensics.results import CaseResults

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "urn:llm-forensics:predicate:lineage:v1"
FILE_NAME = "attestation.dsse.json"


def statement(manifest: Mapping, results: bytes, manifest_bytes: bytes) -> dict:
    """The in-toto statement of a case: subjects from the manifest's inputs, predicate from the typed results."""
    typed = CaseResults.from_json(results)
    subjects = [{"name": r["path"], "digest": {"sha256": r["sha256"]}} for r in manifest.get("inputs", [])]
    verdicts = {}
    for name, c in typed.candidates.items():
        v = c.verdict
        verdicts[name] = {
            "verdict": v.verdict, "route": v.route, "pvalue": v.pvalue, "pvalue_adjusted": v.pvalue_adjusted,
            "error_rate": v.error_rate, "reasons": list(v.reasons),
            "measured_false_positive_rate": v.measured_false_positive_rate.model_dump(exclude_none=True)
            if v.measured_false_positive_rate else None,
            "routes": {n: {"role": r.role, "pvalue": r.pvalue} for n, r in v.routes.items()}}
    suspect = next(n for n, m in typed.models.items() if m.kind == "suspect")
    return {
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "tool": dict(manifest.get("tool", {})),
            "case_id": manifest.get("case_id"), "dossier_id": manifest.get("dossier_id"),
            "created_at": manifest.get("created_at"),
            "suspect": typed.models[suspect].path,
            "rule": typed.verdict_rule,
            "alpha": typed.settings.alpha,
            "multitest": typed.multitest.method,
            "verdicts": verdicts,
            "results": {"name": "results.json", "digest": {"sha256": sha256_bytes(results)}},
            "manifest": {"name": "manifest.json", "digest": {"sha256": sha256_bytes(manifest_bytes)}},
        },
    }


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what the signature covers."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def envelope(payload: bytes, keyid: str, signature: bytes) -> bytes:
    doc = {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode("ascii"),
           "signatures": [{"keyid": keyid, "sig": base64.b64encode(signature).decode("ascii")}]}
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def payload_bytes(stmt: Mapping) -> bytes:
    return json.dumps(stmt, sort_keys=True, separators=(",", ":")).encode()


def open_envelope(raw: bytes, where=None) -> tuple[bytes, list[tuple[str, bytes]], dict]:
    """(payload, [(keyid, signature)], statement) of a DSSE envelope; ForensicsError naming what is malformed."""
    try:
        doc = json.loads(raw)
        if doc["payloadType"] != PAYLOAD_TYPE:
            raise ValueError(f"payloadType {doc['payloadType']!r}, expected {PAYLOAD_TYPE!r}")
        payload = base64.b64decode(doc["payload"], validate=True)
        sigs = [(s["keyid"], base64.b64decode(s["sig"], validate=True)) for s in doc["signatures"]]
        stmt = json.loads(payload)
        if stmt.get("_type") != STATEMENT_TYPE or stmt.get("predicateType") != PREDICATE_TYPE:
            raise ValueError("not an llm-forensics in-toto statement")
    except (ValueError, KeyError, TypeError) as e:
        raise ForensicsError(where, f"not a valid DSSE attestation: {e}") from e
    return payload, sigs, stmt


def disagreements(stmt: Mapping, manifest: Mapping, results: bytes) -> list[str]:
    """How the statement differs from the manifest and results it claims to describe (empty when they agree)."""
    problems = []
    pred = stmt.get("predicate", {})
    got = pred.get("results", {}).get("digest", {}).get("sha256")
    if got != sha256_bytes(results):
        problems.append(f"results.json has SHA-256 {sha256_bytes(results)}, the attestation says {got}")
    subjects = {(s.get("name"), s.get("digest", {}).get("sha256")) for s in stmt.get("subject", [])}
    inputs = {(r.get("path"), r.get("sha256")) for r in manifest.get("inputs", [])}
    if subjects != inputs:
        problems.append(f"the attestation's subjects differ from the manifest's inputs in "
                        f"{len(subjects ^ inputs)} entr{'y' if len(subjects ^ inputs) == 1 else 'ies'}")
    if pred.get("dossier_id") != manifest.get("dossier_id"):
        problems.append(f"dossier id {pred.get('dossier_id')} differs from the manifest's {manifest.get('dossier_id')}")
    return problems
