"""`forensics` command line. Every command has --help; machine-readable output is JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from forensics import __version__
from forensics.errors import ForensicsError
from forensics.progress import byte_progress, err


def cmd_fingerprint(args: argparse.Namespace) -> int:
    from forensics.fingerprint import fingerprint_model, write_json

    with byte_progress() as bar:
        task = bar.add_task(f"{Path(args.path).name}", total=None)
        fp = fingerprint_model(args.path, device=args.device, allow_nonfinite=args.allow_nonfinite,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
    if args.output:
        write_json(fp, Path(args.output))
        err.print(f"wrote {args.output}")
    else:
        json.dump(fp, sys.stdout, indent=1, sort_keys=True)
        sys.stdout.write("\n")
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
