"""`forensics` command line. Every command has --help; machine-readable output is JSON."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from forensics import __version__
from forensics.errors import ForensicsError
from forensics.progress import byte_progress, err


def cmd_fingerprint(args: argparse.Namespace) -> int:
    from forensics.evidence.atomic import check_output, write_output
    from forensics.fingerprint import fingerprint_model

    model = Path(args.path)
    if args.output:
        check_output(args.output, [model])  # before the model is read: a bad -o costs nothing
    with byte_progress() as bar:
        task = bar.add_task(f"{model.name}", total=None)
        fp = fingerprint_model(model, device=args.device, allow_nonfinite=args.allow_nonfinite,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
    text = json.dumps(fp, indent=1, sort_keys=True) + "\n"
    if args.output:
        # Every file the fingerprint read is an input now known (an ONNX model's external data beside it).
        folder = model if model.is_dir() else model.parent
        write_output(args.output, text.encode(), [model, *(folder / f["path"] for f in fp["model"]["files"])])
        err.print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_case_run(args: argparse.Namespace) -> int:
    from forensics.pipeline import run_case

    from forensics.results import CaseResults

    out = run_case(args.case, out_root=args.out, device=args.device)
    manifest = json.loads((out / "manifest.json").read_text())
    results = CaseResults.from_json((out / "results.json").read_bytes())
    summary = {"dossier": str(out / "dossier.pdf"), "manifest": str(out / "manifest.json"),
               "results": str(out / "results.json"), "dossier_id": manifest.get("dossier_id"),
               "signer_certificate_sha256": (manifest.get("signer") or {}).get("certificate_sha256"),
               "verdicts": {name: c.verdict.verdict for name, c in results.candidates.items()},
               "decided_by": {name: c.verdict.route for name, c in results.candidates.items()}}
    json.dump(summary, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


def cmd_case_check(args: argparse.Namespace) -> int:
    from forensics.case import load_case

    case, raw = load_case(args.case)
    missing = [str(m.path) for m in case.models() if not m.path.exists()]
    json.dump({"case": case.id, "valid": not missing, "models": {m.name: str(m.path) for m in case.models()},
               "missing": missing}, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0 if not missing else 1


def cmd_verify(args: argparse.Namespace) -> int:
    from forensics.report.verify import EXIT_UNTRUSTED, verify_attestation, verify_dossier

    if args.dossier.endswith(".json"):
        if args.trust:
            raise ForensicsError(args.dossier, "--trust validates a PDF signature's chain; an attestation is checked "
                                               "against --cert, and trusted with --signer")
        if not args.cert:
            raise ForensicsError(args.dossier, "an attestation is checked against its signer's certificate: give "
                                               "--cert (signer-certificate.pem beside it, or from the dossier)")
        result = verify_attestation(args.dossier, args.cert, check_inputs=args.inputs, base_dir=args.base_dir,
                                    expected_signer=args.signer)
    else:
        result = verify_dossier(args.dossier, check_inputs=args.inputs, base_dir=args.base_dir,
                                trust_roots=args.trust or (), expected_signer=args.signer)
    json.dump(result.to_dict(), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    if result.exit_status == EXIT_UNTRUSTED:
        err.print(f"[bold yellow]INTEGRITY OK, SIGNER NOT TRUSTED[/]: {result.trust}", highlight=False)
    elif not result.ok:
        err.print(f"[bold red]NOT VERIFIED[/]: {result.verdict}", highlight=False)
    return result.exit_status


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forensics", description="Evidence on whether one language model was derived "
                                                              "from another, from weights and activations.")
    p.add_argument("--version", action="version", version=f"llm-forensics {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    fp = sub.add_parser("fingerprint", help="per-layer weight statistics and SHA-256 of every file of one model",
                        description="Read a checkpoint once (safetensors, sharded or not; PyTorch .bin; GGUF; ONNX) "
                                    "and write its fingerprint JSON: per-layer std of every weight role and the "
                                    "SHA-256 of every file read.")
    fp.add_argument("path", help="model directory (config.json + weights) or a single .gguf / .onnx file")
    fp.add_argument("-o", "--output", help="write the fingerprint JSON here (default: standard output)")
    fp.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="where to compute the statistics (default: cuda when torch sees one)")
    fp.add_argument("--allow-nonfinite", action="store_true",
                    help="record NaN/Inf weights in the fingerprint instead of refusing the model")
    fp.set_defaults(func=cmd_fingerprint)

    case = sub.add_parser("case", help="run a case file end to end into a signed dossier",
                          description="Cases are YAML files (see cases/demo.yaml and docs/case-format.md).")
    case_sub = case.add_subparsers(dest="case_command", required=True)
    run = case_sub.add_parser("run", help="fingerprints, activations, statistics and the signed dossier",
                              description="Run every step of a case and write OUT/CASE_ID/: dossier.pdf (signed), "
                                          "manifest.json, results.json, figures/, fingerprints/. Prints a JSON summary.")
    run.add_argument("case", help="the case file, e.g. cases/demo.yaml")
    run.add_argument("--out", default="out", help="output root (default: out)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                     help="where to compute (default: cuda when torch sees one)")
    run.set_defaults(func=cmd_case_run)
    check = case_sub.add_parser("check", help="validate a case file and check its models exist",
                                description="Validate a case file (schema, signals, paths) without running it.")
    check.add_argument("case")
    check.set_defaults(func=cmd_case_check)

    ver = sub.add_parser("verify", help="check a dossier's signature, and optionally its inputs",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description=textwrap.fill(
                             "Check the dossier's integrity (its PAdES signature is intact, covers the whole file "
                             "and was made with the key its manifest records; the attached case file, results and "
                             "in-toto attestation match their hashes and each other) and, apart from that, whether "
                             "the signer is trusted (--signer, --trust); with --inputs, re-hash the input files it "
                             "lists. Given an attestation.dsse.json instead of a PDF, check its DSSE signature "
                             "against --cert. Prints the checks as JSON, the signature's RFC 3161 timestamp "
                             "among them.",
                             88),
                         epilog="exit status:\n"
                                "  0  verified: integrity ok and the signer trusted (--signer or --trust)\n"
                                "  1  failed: a check failed (integrity, --inputs, or the given --signer/--trust)\n"
                                "  2  the dossier or a --trust file cannot be read\n"
                                "  3  integrity ok, signer not trusted: neither --signer nor --trust was given")
    ver.add_argument("dossier", help="the dossier PDF, or an attestation.dsse.json")
    ver.add_argument("--cert", help="for an attestation: the signer's certificate (PEM)")
    ver.add_argument("--inputs", action="store_true",
                     help="re-hash the input files the manifest lists, once its integrity holds; only files under "
                          "--base-dir are read")
    ver.add_argument("--base-dir", help="the directory input paths are taken relative to, and the only one read: a "
                                        "path that resolves outside it fails the check (default: the current "
                                        "directory)")
    ver.add_argument("--signer", help="the signing certificate's SHA-256 that must have signed it")
    ver.add_argument("--trust", action="append", help="a trusted root certificate (PEM), repeatable")
    ver.set_defaults(func=cmd_verify)

    from forensics.lab.cli import add_parser as add_lab
    add_lab(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ForensicsError, RuntimeError) as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
