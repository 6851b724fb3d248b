"""Rebuild the embedded corpus from its three Debian packages (provenance record; not used at run time).

    python forensics/corpus/build_corpus.py OUT_DIR r-cran-janeaustenr_1.0.0-1_all.deb \
        jargon-text_4.4.7-4.1_all.deb libpython3.11-stdlib_3.11.2-6+deb12u9_amd64.deb

Needs `dpkg-deb`, `zstandard` and, for the R data of janeaustenr only, `rdata` (pip install rdata==1.1.0 in a
throw-away environment: the project itself does not depend on it). The output is byte-for-byte reproducible:
documents are written in a fixed order with sorted keys and compressed single-threaded at zstd level 19.
SOURCES.md says what each step does and why.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import runpy
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import zstandard

BOX = re.compile(r"[│─┼├┤┌┐└┘┬┴═]")
BOOKS = [("sensesensibility", "Sense and Sensibility"), ("prideprejudice", "Pride and Prejudice"),
         ("mansfieldpark", "Mansfield Park"), ("emma", "Emma"), ("northangerabbey", "Northanger Abbey"),
         ("persuasion", "Persuasion")]


def paragraphs(lines):
    block = []
    for line in lines + [""]:
        if line.strip():
            block.append(line)
        elif block:
            yield block
            block = []


def reflow(block, indent=0):
    """Join a hard-wrapped prose paragraph into one line; keep tables and indented verbatim text as they are."""
    body = [line[indent:] if line[:indent].strip() == "" else line for line in block]
    if any(BOX.search(line) for line in body) or any(line.startswith(" ") for line in body):
        return "\n".join(line.rstrip() for line in body)
    return " ".join(line.strip() for line in body)


def austen_lines(rdata_dir: Path) -> dict[str, list[str]]:
    """The six novels, one line of text per element, out of R's lazy-load database (Rdata.rdx/.rdb)."""
    import rdata

    def parse(raw: bytes):
        return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress((rdata_dir / "Rdata.rdx").read_bytes()))
    rdb = (rdata_dir / "Rdata.rdb").read_bytes()
    books = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[int(offset):int(offset) + int(length)]
        raw = zlib.decompress(blob[4:])  # 4-byte big-endian length, then a zlib stream
        assert len(raw) == struct.unpack(">I", blob[:4])[0]
        books[str(name)] = [str(x) for x in parse(raw)]
    return books


def austen(lines: list[str], title: str) -> list[dict]:
    """One document per chapter, paragraphs reflowed."""
    heads = [i for i, line in enumerate(lines) if re.fullmatch(r"(CHAPTER|Chapter) [IVXLC\d]+\.?", line.strip())]
    volume_of, volume = {}, None
    for i, line in enumerate(lines):
        if re.fullmatch(r"VOLUME [IVX]+", line.strip()):
            volume = line.strip().title()
        volume_of[i] = volume
    docs = []
    for k, start in enumerate(heads):
        end = heads[k + 1] if k + 1 < len(heads) else len(lines)
        paras = [reflow(b) for b in paragraphs(lines[start + 1:end])
                 if not re.fullmatch(r"VOLUME [IVX]+|THE END|FINIS", " ".join(b).strip())]
        chapter = "Chapter " + lines[start].strip().rstrip(".").split()[1]
        label = ", ".join(x for x in (title, volume_of[start], chapter) if x)
        docs.append({"text": "\n\n".join(paras), "meta": {"source": "janeaustenr", "title": label}})
    return docs


def jargon(text: str) -> list[dict]:
    """Chapters and appendix sections one document each; lexicon entries grouped into documents of about 8 kB."""
    # The DocBook rendering puts no-break spaces in headings ('Chapter\u00a01.'); plain spaces read the same.
    lines = text.replace("\u00a0", " ").split("\n")
    top = [i for i, line in enumerate(lines) if line and not line.startswith(" ") and not BOX.search(line)]
    docs = []
    for k, start in enumerate(top):
        end = top[k + 1] if k + 1 < len(top) else len(lines)
        head = lines[start].strip()
        if head in ("The Jargon File", "Glossary") or head.startswith("(version"):
            continue
        paras = [reflow(b, 3) for b in paragraphs(lines[start + 1:end])]
        # a table of contents is a run of short title lines; keep prose only
        paras = [p for p in paras if len(p) > 80 or p.endswith((".", ":", "?", "!"))]
        if paras:
            docs.append({"text": "\n\n".join(paras), "meta": {"source": "jargon-text", "title": head}})
    glossary = lines.index("Glossary")
    appendix_a = next(i for i, line in enumerate(lines) if line.startswith("Appendix A."))
    lexicon = lines[glossary:appendix_a]
    first = next(i for i, line in enumerate(lexicon) if line.startswith("   :"))
    entries, current = [], []
    for b in paragraphs(lexicon[first:]):
        if b[0].startswith("   :") and current:
            entries.append(current)
            current = []
        # letter headings ('A', 'B', ...) and the table-of-contents lines before Appendix A are not entries
        if len(b) == 1 and not b[0].startswith("   :") and not b[0].rstrip().endswith((".", ":", "?", "!")):
            continue
        current.append(reflow(b, 3))
    entries.append(current)
    group, size = [], 0
    for entry in entries:
        group.append("\n\n".join(entry))
        size += len(group[-1])
        if size >= 8000:
            docs.append({"text": "\n\n".join(group), "meta": {"source": "jargon-text", "title": "The Jargon Lexicon"}})
            group, size = [], 0
    if group:
        docs.append({"text": "\n\n".join(group), "meta": {"source": "jargon-text", "title": "The Jargon Lexicon"}})
    return docs


def pydoc_topics(topics_py: Path) -> list[dict]:
    topics = runpy.run_path(str(topics_py))["topics"]
    return [{"text": topics[k].strip(), "meta": {"source": "pydoc_data", "title": k}} for k in sorted(topics)]


def write(docs: list[dict], out: Path) -> dict:
    raw = "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs).encode()
    data = zstandard.ZstdCompressor(level=19, threads=0).compress(raw)
    out.write_bytes(data)
    return {"path": out.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "documents": len(docs),
            "text_bytes": len(raw)}


def main(out: Path, austen_deb: Path, jargon_deb: Path, python_deb: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for deb in (austen_deb, jargon_deb, python_deb):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        books = austen_lines(root / "usr/lib/R/site-library/janeaustenr/data")
        novels = [d for name, title in BOOKS for d in austen(books[name], title)]
        lexicon = jargon(gzip.decompress((root / "usr/share/doc/jargon-text/jargon.txt.gz").read_bytes()).decode())
        stdlib = next((root / "usr/lib").glob("python3.*"))
        files = [write(novels, out / "austen.jsonl.zst"), write(lexicon, out / "jargon.jsonl.zst"),
                 write(pydoc_topics(stdlib / "pydoc_data/topics.py"), out / "pydoc-topics.jsonl.zst")]
        (out / "LICENSE-python.txt").write_bytes((stdlib / "LICENSE.txt").read_bytes())
    debs = {"austen.jsonl.zst": austen_deb, "jargon.jsonl.zst": jargon_deb, "pydoc-topics.jsonl.zst": python_deb}
    for f in files:
        deb = debs[f["path"]]
        f["debian_package"] = deb.name
        f["debian_package_sha256"] = hashlib.sha256(deb.read_bytes()).hexdigest()
    manifest = {"id": "llm-forensics-prose/1", "text_field": "text", "files": files}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), *(Path(a) for a in sys.argv[2:5]))
