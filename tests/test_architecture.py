"""The package's shape (docs/architecture.md): stages in one order, imports only pointing down it, the statistics
pure and the report free of statistics and model reading. Read from the source with `ast`, so a new module is
checked the day it is added."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "forensics"

# The stages, top of the page first: a module may import its own stage and the ones above it, never one below.
STAGES = (
    ("base", ("forensics", "forensics.errors", "forensics.settings", "forensics.results", "forensics.progress",
              "forensics.files", "forensics.seeds", "forensics.schemas")),
    ("sources", ("forensics.sources", "forensics.corpus", "forensics.reference")),
    ("roles", ("forensics.roles",)),
    ("signals", ("forensics.signals", "forensics.fingerprint")),
    ("stats", ("forensics.stats",)),
    ("evidence", ("forensics.evidence",)),
    ("report", ("forensics.report",)),
    ("pipeline", ("forensics.pipeline", "forensics.case")),
    ("tools", ("forensics.lab", "forensics.cli", "forensics.models", "forensics.corpus.build_corpus")),
)
# Calls and attributes that touch files or the console; the statistics use none of them.
FILE_CALLS = {"open", "print", "input"}
FILE_ATTRIBUTES = {"read_text", "read_bytes", "write_text", "write_bytes", "mkdir", "unlink", "iterdir", "glob",
                   "rglob", "touch", "load", "dump", "save", "savez", "fromfile", "tofile", "memmap"}
FILE_MODULES = ("os", "io", "sys", "pathlib", "shutil", "tempfile", "mmap", "rich", "forensics.progress")


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = ast.parse(path.read_text(), filename=str(path))
    return out


def stage_of(module: str) -> int:
    """The stage of the longest matching prefix (forensics.corpus.build_corpus is a tool, forensics.corpus a
    source)."""
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(STAGES):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if rank is None:
        raise AssertionError(f"{module} belongs to no stage: add it to STAGES and docs/architecture.md")
    return rank


def imports(tree: ast.Module) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if node.module == "forensics"]
    return found


MODULES = modules()


def test_every_module_has_a_stage():
    for name in MODULES:
        stage_of(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_the_stage_order(name):
    here = stage_of(name)
    upward = [f"line {line}: {target} ({STAGES[stage_of(target)][0]})" for line, target in imports(MODULES[name])
              if target.startswith("forensics") and target in MODULES and stage_of(target) > here]
    assert not upward, f"{name} ({STAGES[here][0]}) imports a later stage: {upward}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("forensics.stats")))
def test_statistics_open_no_file_and_print_nothing(name):
    tree = MODULES[name]
    bad = [f"line {line}: imports {target}" for line, target in imports(tree)
           if any(target == m or target.startswith(m + ".") for m in FILE_MODULES + ("forensics.sources",))]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in FILE_CALLS:
                bad.append(f"line {node.lineno}: calls {f.id}()")
            if isinstance(f, ast.Attribute) and f.attr in FILE_ATTRIBUTES:
                bad.append(f"line {node.lineno}: calls .{f.attr}()")
    assert not bad, f"{name} must be a pure function of its arguments: {bad}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith(("forensics.stats", "forensics.report"))))
def test_statistics_and_report_read_no_model(name):
    readers = ("forensics.sources", "forensics.fingerprint", "forensics.pipeline", "safetensors", "gguf", "onnx",
               "torch", "transformers")
    if name.startswith("forensics.report"):
        readers += ("forensics.signals", "forensics.stats")
    reads = [f"line {line}: {target}" for line, target in imports(MODULES[name]) if target.startswith(readers)]
    assert not reads, f"{name} reads models or computes statistics: {reads}"


def test_the_check_sees_a_violation():
    """The checks above on a module written to break them."""
    tree = ast.parse("import pathlib\nfrom forensics.sources import open_model\n"
                     "def f(p):\n    print(p)\n    return open(p).read()\n")
    assert ("forensics.sources" in [t for _, t in imports(tree)] and
            stage_of("forensics.sources") < stage_of("forensics.stats") < stage_of("forensics.pipeline"))
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert calls & FILE_CALLS == {"open", "print"}
