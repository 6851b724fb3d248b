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
    from forensics.pipeline import missing_models

    case, raw = load_case(args.case)
    missing = [f"{m.name}: {problem}" for m, problem in missing_models(case)]
    where = {m.name: str(m.path) if m.path is not None else f"{m.registry} (reference {m.reference!r})"
             for m in case.models()}
    json.dump({"case": case.id, "valid": not missing, "models": where, "missing": missing}, sys.stdout, indent=1,
              sort_keys=True)
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


def _declared(args: argparse.Namespace):
    from forensics.evidence.registry import Declared

    return Declared(source=args.source or "", licence=args.licence or "", base=args.base,
                    derived_from=tuple(args.derived_from or ()), unrelated_to=tuple(args.unrelated_to or ()))


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


def cmd_registry_add(args: argparse.Namespace) -> int:
    from forensics.pipeline import Reference

    if args.name and len(args.models) > 1:
        raise ForensicsError(None, "--name names one model; give one model per `registry add` to name each")
    refs = [Reference(Path(m), args.name or Path(m).name, _declared(args)) for m in args.models]
    entries = _add_references(args, refs)
    _print_json({"registry": args.registry, "added": [e.summary() for e in entries]})
    return 0


def _add_references(args: argparse.Namespace, refs, memory_gb: float = 4.0) -> list:
    """Check the target, fingerprint `refs` (the --engine's way) and add them in one transaction."""
    from forensics.evidence.registry import Registry
    from forensics.pipeline import build_entries

    _check_registry_target(args.registry, refs)
    entries = build_entries(refs, engine=args.engine, address=args.address, workers=args.workers,
                            memory_gb=memory_gb)
    with Registry.create(args.registry) as reg:
        reg.add(entries, replace=args.replace)
    return entries


def _check_registry_target(registry: str, refs) -> None:
    """Before anything is read: the registry is not one of the inputs, and an existing one opens."""
    from forensics.evidence.registry import Registry

    target = Path(registry).resolve()
    for ref in refs:
        root = ref.path.resolve()
        if target == root or root in target.parents:
            raise ForensicsError(registry, f"the registry would be written inside the model {ref.path}; inputs "
                                           f"are read-only")
    if Path(registry).exists():
        Registry(registry, writable=True).close()


def cmd_registry_build(args: argparse.Namespace) -> int:
    from forensics.evidence.registry import Declared
    from forensics.pipeline import Reference

    refs = []
    try:
        lines = Path(args.from_list).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ForensicsError(args.from_list, f"cannot read the list of models: {e}") from None
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        path, _, name = line.partition(" ")
        if not Path(path).exists():
            raise ForensicsError(args.from_list, f"line {n}: no model at {path}")
        refs.append(Reference(Path(path), name.strip() or Path(path).name, Declared(base=args.base)))
    if not refs:
        raise ForensicsError(args.from_list, "lists no model (one path per line, optionally followed by a name)")
    entries = _add_references(args, refs, args.memory_gb)
    _print_json({"registry": args.registry, "engine": args.engine, "added": [e.name for e in entries]})
    return 0


def cmd_registry_list(args: argparse.Namespace) -> int:
    from forensics.evidence.registry import Registry

    with Registry(args.registry) as reg:
        _print_json({"registry": args.registry, "sha256_of_contents": reg.digest(),
                     "references": [e.summary() for e in reg.entries()],
                     "unrelated_pairs": sorted(sorted(p) for p in reg.unrelated_pairs())})
    return 0


def cmd_registry_remove(args: argparse.Namespace) -> int:
    from forensics.evidence.registry import Registry

    with Registry(args.registry, writable=True) as reg:
        reg.remove(args.names)
    _print_json({"registry": args.registry, "removed": args.names})
    return 0


def cmd_registry_export(args: argparse.Namespace) -> int:
    from forensics.evidence.atomic import check_output, write_output
    from forensics.evidence.registry import Registry

    check_output(args.output, [Path(args.registry)])
    with Registry(args.registry) as reg:
        write_output(args.output, reg.export(), [Path(args.registry)])
    err.print(f"wrote {args.output}")
    return 0


def cmd_registry_import(args: argparse.Namespace) -> int:
    from forensics.evidence.registry import Registry, read_export

    entries = read_export(Path(args.export))
    with Registry.create(args.registry) as reg:
        reg.add(entries, replace=args.replace)
        digest = reg.digest()
    _print_json({"registry": args.registry, "imported": [e.name for e in entries], "sha256_of_contents": digest})
    return 0


def cmd_registry_verify(args: argparse.Namespace) -> int:
    """Re-hash every reference's files where its fingerprint found them."""
    from forensics.evidence.hashing import sha256_file
    from forensics.evidence.registry import Registry

    report, bad = [], 0
    with Registry(args.registry) as reg:
        for entry in reg.entries():
            model = entry.fp()["model"]
            root = Path(model["path"])
            folder = root if root.is_dir() else root.parent
            for f in model["files"]:
                where = folder / f["path"]
                found = sha256_file(where) if where.is_file() else None
                ok = found == f["sha256"]
                bad += not ok
                report.append({"reference": entry.name, "file": str(where), "ok": ok,
                               "problem": None if ok else ("missing" if found is None else "SHA-256 differs")})
    _print_json({"registry": args.registry, "ok": not bad, "files": report})
    if bad:
        err.print(f"[bold red]{bad} file(s) no longer match the registry[/]", highlight=False)
    return 1 if bad else 0


def cmd_scan(args: argparse.Namespace) -> int:
    from forensics.case import Signing
    from forensics.pipeline import Store, run_scan
    from forensics.reference import load_calibration_table
    from forensics.stats.compare import Settings

    signing = {}
    if args.signing:
        import yaml
        from pydantic import ValidationError

        try:
            data = yaml.safe_load(Path(args.signing).read_text())
            signing = Signing.model_validate(data or {}).model_dump(exclude_none=True)
        except (OSError, yaml.YAMLError) as e:
            raise ForensicsError(args.signing, f"cannot read the signing settings: {e}") from None
        except ValidationError as e:
            raise ForensicsError(args.signing, f"invalid signing settings: {e}") from None
        base = Path(args.signing).resolve().parent
        signing = {k: str(base / v) if k in ("pkcs12", "key", "certificate", "passphrase_file", "pkcs11_module")
                   else v for k, v in signing.items()}
    settings = Settings(alpha=args.alpha, n_permutations=args.permutations, n_bootstrap=args.bootstrap, seed=args.seed,
                        calibration=load_calibration_table())
    doc = run_scan(Path(args.suspect), Path(args.registry), Path(args.out) if args.out else None, settings,
                   args.analyst, signing, args.device, Store(Path(args.cache)) if args.cache else None,
                   args.neuron_permutations, args.top, args.full)
    if args.out:
        err.print(f"wrote {args.out}: scan.json, results.json, scan.yaml, manifest.json and the signed dossier.pdf")
    sys.stdout.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return 0


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

    reg = sub.add_parser("registry", help="a registry of reference models (SQLite): add, build, list, remove, "
                                          "export, import, verify",
                         description="Reference models' fingerprints, files' SHA-256 and declared lineage in one "
                                     "SQLite file, the null and the candidates of scans and cases.")
    reg_sub = reg.add_subparsers(dest="registry_command", required=True)

    def registry_arg(p, *, writes: bool = False):
        p.add_argument("--registry", required=True, help="the registry file (.sqlite)" +
                       ("; made if absent" if writes else ""))

    def engine_args(p):
        p.add_argument("--engine", choices=["local", "ray"], default="local",
                       help="fingerprint in this process, or as Ray tasks (one per model)")
        p.add_argument("--address", help="with --engine ray: join this Ray cluster (default: start a local one)")
        p.add_argument("--workers", type=int, help="with a local Ray cluster: its CPUs (default: all cores)")

    add = reg_sub.add_parser("add", help="fingerprint models and add them",
                             description="Fingerprint each MODEL (every file read and hashed) and add it, with what "
                                         "you declare about it, in one transaction.")
    add.add_argument("models", nargs="+", metavar="MODEL")
    registry_arg(add, writes=True)
    add.add_argument("--name", help="the reference's name (one model only; default: the file or directory name)")
    add.add_argument("--source", help="where it came from (a URL, a package)")
    add.add_argument("--licence")
    add.add_argument("--base", action="store_true", help="declare it a base model (trained from scratch)")
    add.add_argument("--derived-from", action="append", metavar="NAME", help="declare it derived from NAME")
    add.add_argument("--unrelated-to", action="append", metavar="NAME", help="declare it unrelated to NAME")
    add.add_argument("--replace", action="store_true", help="replace references of the same name")
    engine_args(add)
    add.set_defaults(func=cmd_registry_add)

    build = reg_sub.add_parser("build", help="fingerprint a list of checkpoints into a registry, locally or on Ray",
                               description="Each line of LIST: a model path, optionally a space and a name. Models "
                                           "are fingerprinted as tasks (one per model, memory reserved per task, "
                                           "retried if a worker dies); the driver alone writes the registry.")
    build.add_argument("--from", dest="from_list", required=True, metavar="LIST")
    registry_arg(build, writes=True)
    build.add_argument("--base", action="store_true", help="declare every listed model a base model")
    build.add_argument("--memory-gb", type=float, default=4.0, help="memory reserved per task (default: 4)")
    build.add_argument("--replace", action="store_true")
    engine_args(build)
    build.set_defaults(func=cmd_registry_build)

    ls = reg_sub.add_parser("list", help="the references, their declarations and unrelated pairs (JSON)")
    registry_arg(ls)
    ls.set_defaults(func=cmd_registry_list)
    rm = reg_sub.add_parser("remove", help="remove references by name")
    rm.add_argument("names", nargs="+", metavar="NAME")
    registry_arg(rm)
    rm.set_defaults(func=cmd_registry_remove)
    ex = reg_sub.add_parser("export", help="write a portable JSON file another analyst can import and verify")
    registry_arg(ex)
    ex.add_argument("-o", "--output", required=True)
    ex.set_defaults(func=cmd_registry_export)
    im = reg_sub.add_parser("import", help="add the entries of an exported registry, after checking its hashes")
    im.add_argument("export")
    registry_arg(im, writes=True)
    im.add_argument("--replace", action="store_true")
    im.set_defaults(func=cmd_registry_import)
    vf = reg_sub.add_parser("verify", help="re-hash every reference's files; exit 1 if one changed or is missing")
    registry_arg(vf)
    vf.set_defaults(func=cmd_registry_verify)

    sc = sub.add_parser("scan", help="screen a suspect against every reference of a registry",
                        description="Screen the suspect against every reference of the registry at once, then "
                                    "run the verdict rule (neuron matching on the stored records included) on the "
                                    "best --full of them, adjusted over all references (the others at p = 1); the "
                                    "null: a sample of the pairs the registry declares unrelated. No reference's "
                                    "weights are read. Ranks the references and prints JSON (docs/registry.md).")
    sc.add_argument("suspect", help="the suspect model (directory or file)")
    registry_arg(sc)
    sc.add_argument("--top", type=int, help="print the K best-ranked references only")
    sc.add_argument("--full", type=int, default=20,
                    help="references the full verdict rule (and neuron matching) runs on, the best-screened first; "
                         "the others count at p = 1 in its adjustment (default: 20)")
    sc.add_argument("--out", help="also write the signed dossier into DIR (scan.json, results.json, scan.yaml, "
                                  "manifest.json, dossier.pdf)")
    sc.add_argument("--analyst", default="unnamed analyst", help="the analyst the dossier names")
    sc.add_argument("--signing", help="a YAML file with the fields of a case's `signing:` section (default: the "
                                      "local analyst key)")
    sc.add_argument("--neuron-permutations", type=int,
                    help="T of every neuron test (default: the least whose floor survives the adjustment over the "
                         "registry's references)")
    sc.add_argument("--alpha", type=float, default=0.01, help="significance level of the verdicts (default: 0.01)")
    sc.add_argument("--permutations", type=int, default=9999,
                    help="block permutations of each std-curve and spectrum test (default: 9999)")
    sc.add_argument("--bootstrap", type=int, default=999, help="bootstrap draws of each interval (default: 999)")
    sc.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: 0)")
    sc.add_argument("--cache", help="cache directory for the suspect's fingerprint and neuron tests (e.g. out/.cache)")
    sc.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    sc.set_defaults(func=cmd_scan)

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
