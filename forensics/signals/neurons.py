"""FFN neurons of one model, read layer by layer into small sketches that another model's neurons can be matched to.

Zhu, Ahmed, Kuditipudi and Liang ("Independence Tests for Language Models", ICML 2025) test lineage by matching
neurons: a derived model keeps its parent's neurons (possibly permuted, possibly rescaled), an independently
initialised one has none in common. Two models only compare neuron by neuron in one residual basis, so first the two
residual streams are aligned (forensics/stats/residual.py), from the embedding rows of the tokens both vocabularies
spell the same way (`read_embedding_rows`) or from per-coordinate profiles of the attention weights (`read_profile`).

A neuron is described by its gate row, its up row and its down column: three vectors in the residual basis. A sketch
keeps, per FFN unit (a dense FFN, an expert, a shared expert), every neuron projected on `k` directions of the
residual stream (the suspect's: a seeded sample of its coordinates; the candidate's: those coordinates through the
alignment, a signed selection or, after a rotation, dense directions): that is all the matching needs, and it keeps
a 7B model's sketch near 1/30 of its size, so two models are never held whole. Before matching, each part of each neuron is made invariant to what an evader can do
without changing the model's outputs:

* the input norm's gain is folded into the gate and up columns (a gain moved into the projections changes nothing);
* each row is scaled to unit length (up ·c with down /c per neuron, or any such per-neuron rescaling, changes nothing);
* the mean neuron of the unit is subtracted and the rows scaled to unit length again, so directions every neuron
  shares (large residual dimensions) do not pass for a match.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from forensics import roles
from forensics.errors import ForensicsError
from forensics.sources import ModelInfo, Reads, open_model

# role -> (unit kind, part)
FFN_ROLES = {r.value: (r.unit, r.part) for r in roles.Role if r.unit}
PARTS = ("gate", "up", "down")
GAIN_ROLES = {"attn_norm", "mlp_norm"}
# Role-table targets worth decoding: the FFN roles, the gains, and the fused tensors that split into them.
NEEDED = set(FFN_ROLES) | GAIN_ROLES | {"split_gate_up_rows"} | set(roles.STACKED)


@dataclass(frozen=True, order=True)
class UnitKey:
    layer: int
    kind: str  # dense | expert | shared
    expert: int = -1

    def label(self) -> str:
        return {"dense": f"layer {self.layer}", "shared": f"layer {self.layer} shared expert"}.get(
            self.kind, f"layer {self.layer} expert {self.expert}")

    def as_dict(self) -> dict:
        return {"layer": self.layer, "kind": self.kind, "expert": None if self.expert < 0 else self.expert}


@dataclass
class Sketch:
    """Per unit and part: (neurons, len(dims)) rows, invariant-normalised (see the module's docstring)."""

    path: Path
    architecture: str
    hidden_size: int
    units: dict[UnitKey, dict[str, np.ndarray]] = field(default_factory=dict)
    readers: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # (role, layer) -> (rows, k), if asked
    files: list[dict] = field(default_factory=list)  # every file of the model read in full: path, size, SHA-256

    def parts(self) -> set[str]:
        """Parts every unit has (BERT-style FFNs have no gate)."""
        found = [set(p) for p in self.units.values()]
        return set.intersection(*found) if found else set()

    def columns(self, keep: np.ndarray) -> Sketch:
        """The sketch on a subset of its directions, made invariant again on them (rows to unit length, the mean
        neuron removed, unit length again: `_invariant`), readers cut alike."""
        units = {u: {w: _invariant(a[:, keep], None) for w, a in parts.items()} for u, parts in self.units.items()}
        return Sketch(self.path, self.architecture, self.hidden_size, units,
                      {k: a[:, keep] for k, a in self.readers.items()}, self.files)


@dataclass(frozen=True)
class Layout:
    """What reading a model's neurons needs to know of it besides its tensors: hidden size, role-table key, and how
    its norms apply their gains."""

    path: Path
    info: ModelInfo

    @property
    def d(self) -> int:
        return self.info.hidden_size

    @property
    def key(self) -> str:
        return roles.architecture_key(self.info.table or self.info.architecture)

    @property
    def post_norm(self) -> bool:
        return self.key in roles.POST_NORM

    def gain(self, w: np.ndarray) -> np.ndarray:
        w = w.astype(np.float64)
        plus_one = self.info.table != "gguf" and self.info.architecture in roles.NORM_PLUS_ONE
        return w + 1.0 if plus_one else w


class _Model:
    """One model's source and role table, for one pass over its tensors in file order (`random`: a look-up that
    reads only the tensors asked for and hashes nothing)."""

    def __init__(self, path: Path, random: bool = False):
        self.path = Path(path)
        self.reads = Reads(random=random)
        self.source = open_model(self.path, self.reads)
        self.info = self.source.info()
        self.table, self.matches = roles.resolve(self.path, self.info, self.source.names())
        self.layout = Layout(self.path, self.info)
        self.embedding = re.compile(roles.EMBEDDINGS.get(self.layout.key, roles.DECODER_EMBEDDING))
        if not self.info.hidden_size:
            raise ForensicsError(self.path, "hidden size unknown (no hidden_size in the config or metadata)")

    def collect(self, collectors: list) -> None:
        """Every tensor some collector wants, split into its parts, handed to each that wants it."""
        for ref in self.source.tensors():
            match = self.matches.get(ref.name)
            if match is None or not any(c.wants(match.target) for c in collectors):
                continue
            for part in self.table.parts(ref.name, match, ref.load(), self.info):
                for c in collectors:
                    if c.wants(match.target):
                        c.add(part)
            part = None

    def close(self) -> None:
        self.reads.close()


def hidden_size(path: Path) -> int:
    """The model's residual width, from its header alone."""
    reads = Reads(random=True)
    try:
        return open_model(Path(path), reads).info().hidden_size or 0
    finally:
        reads.close()


def read_embedding_rows(path: Path, ids: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """Rows `ids` of the model's token embedding (float32: the alignment needs correlations, not exact sums), read
    as a look-up before the model's one pass, and the bytes that read per file."""
    m = _Model(path, random=True)
    try:
        for ref in m.source.tensors():
            if m.embedding.fullmatch(ref.name):
                shape = ref.shape
                if len(shape) != 2 or shape[1] != m.info.hidden_size or (len(ids) and ids.max() >= shape[0]):
                    raise ForensicsError(ref.file or path, f"token embedding {ref.name} has shape {shape}, "
                                                           f"not (vocabulary, {m.info.hidden_size})")
                return ref.rows(ids).astype(np.float32), m.reads.bytes_read(m.path)
    finally:
        m.close()
    raise ForensicsError(path, "no token embedding found (looked for a tensor named like "
                               f"{m.embedding.pattern!r}); neuron matching needs it to align the residual streams")


@dataclass
class Profile:
    """Per residual coordinate, what the layers that read and write it say about it (forensics/stats/residual.py)."""

    features: dict[tuple[str, int], np.ndarray]  # (role, layer) -> (hidden,) log norm of the coordinate's column/row
    gains: dict[tuple[str, int], np.ndarray]  # (norm role, layer) -> (hidden,) gain as the model applies it
    num_layers: int

    def matrix(self, keys: list[tuple[str, int]]) -> np.ndarray:
        return np.stack([self.features[k] for k in keys], axis=1)


PROFILE_READERS = {"q", "k", "v"}  # read the attention norm's output: their columns carry its gain
PROFILE_ROLES = PROFILE_READERS | {"o"} | GAIN_ROLES
FUSED_QKV = {"split_qkv_rows", "split_c_attn", "split_neox_qkv"}  # role-table targets that split into q, k, v


class ProfileCollector:
    """`read_profile`'s statistics, from the parts of a pass as it meets them (`gains_only`: the norms' gains)."""

    def __init__(self, layout: Layout, gains_only: bool = False):
        self.layout = layout
        self.targets = GAIN_ROLES if gains_only else PROFILE_ROLES | FUSED_QKV
        self.norms: dict[tuple[str, int], np.ndarray] = {}
        self.gains: dict[tuple[str, int], np.ndarray] = {}
        self.layers: set[int] = set()

    def wants(self, target: str) -> bool:
        return target in self.targets

    def add(self, part, decode=None) -> None:
        if part.layer is None or part.role not in PROFILE_ROLES:
            return
        w = np.asarray(part.tensor if decode is None else decode(part.tensor), dtype=np.float64)
        d = self.layout.d
        self.layers.add(part.layer)
        if part.role in GAIN_ROLES:
            if w.reshape(-1).shape[0] == d:
                self.gains[(part.role, part.layer)] = self.layout.gain(w.reshape(-1))
            return
        if w.ndim != 2:
            return
        if self.layout.key in roles.IN_OUT_LAYOUT:
            w = w.T
        residual_axis = 1 if part.role in PROFILE_READERS else 0  # torch layout (out, in)
        if w.shape[residual_axis] == d:
            self.norms[(part.role, part.layer)] = np.linalg.norm(w, axis=1 - residual_axis)

    def profile(self) -> Profile:
        fold = not self.layout.post_norm  # post-norm layers read the previous layer's output norm, not attn_norm
        features = {}
        for (role, layer), n in self.norms.items():
            gain = self.gains.get(("attn_norm", layer)) if fold and role in PROFILE_READERS else None
            value = n * np.abs(gain) if gain is not None else n
            features[(role, layer)] = np.log(np.maximum(value, 1e-30))
        return Profile(features, self.gains, len(self.layers))


def read_profile(path: Path) -> Profile:
    """Log column norms of q, k, v (gain folded in) and log row norms of o, per coordinate and layer, and the gains.

    Reordering heads or neurons, rescaling q·c with k/c per head or folding a gain into the readers leaves the
    products of a coordinate's gain and column norms where they were (up to the per-head factor, common to all
    coordinates). A look-up of the attention and norm tensors; a case takes the profile from the fingerprint pass.
    """
    m = _Model(path, random=True)
    try:
        collector = ProfileCollector(m.layout)
        m.collect([collector])
    finally:
        m.close()
    return collector.profile()


def read_gains(path: Path) -> tuple[dict[tuple[str, int], np.ndarray], dict[str, int]]:
    """The norms' gains alone (a look-up of a few small tensors), for a dense projection read in the one pass, and
    the bytes that read per file."""
    m = _Model(path, random=True)
    try:
        collector = ProfileCollector(m.layout, gains_only=True)
        m.collect([collector])
        return collector.gains, m.reads.bytes_read(m.path)
    finally:
        m.close()


class SketchCollector:
    """Every FFN neuron projected on the columns of `projection` (hidden, k), from the parts of a pass.

    A signed selection (one ±1 per column) is read by indexing (a tensor stored in a format decoded element by
    element, bf16, is decoded at the selected coordinates alone); any other projection needs the input norms' gains
    (`gains`) before it, since a gain must be folded into the full rows it scales. With `readers`, the q, k, v
    matrices' columns on the same directions are kept too (the weights alignment's signs need them).
    """

    def __init__(self, layout: Layout, projection: np.ndarray, gains: dict | None = None, readers: bool = False):
        d = layout.d
        if projection.shape[0] != d:
            raise ForensicsError(layout.path, f"a projection of {projection.shape[0]} coordinates for a hidden size "
                                              f"of {d}")
        self.layout, self.projection, self.gains = layout, projection, gains
        self.chosen = selection(projection)
        if self.chosen is None and gains is None:
            raise ValueError("a dense projection needs the model's gains")
        self.readers = readers
        self.targets = NEEDED | (PROFILE_READERS | FUSED_QKV if readers else set())
        self.raw: dict[UnitKey, dict[str, np.ndarray]] = {}
        self.seen: dict[tuple[str, int], np.ndarray] = {}
        self.kept: dict[tuple[str, int], np.ndarray] = {}

    def wants(self, target: str) -> bool:
        return target in self.targets

    def _project(self, rows: np.ndarray, gain: np.ndarray | None, decode) -> np.ndarray:
        """(n, hidden) -> (n, k); gain, when given, scales the coordinates first."""
        if self.chosen is not None:
            idx, signs = self.chosen
            picked = rows[:, idx]
            if decode is not None:
                picked = decode(np.ascontiguousarray(picked))
            return picked * signs  # the gain, at the selected coordinates, is folded in with the sketch
        if decode is not None:
            rows = decode(np.ascontiguousarray(rows))
        rows = rows.astype(np.float64)
        return (rows * gain if gain is not None else rows) @ self.projection

    def add(self, part, decode=None) -> None:
        layout = self.layout
        if part.role in GAIN_ROLES:
            g = np.asarray(part.tensor if decode is None else decode(part.tensor)).reshape(-1)
            if g.shape[0] == layout.d:
                self.seen[(part.role, part.layer)] = layout.gain(g)
        elif part.role in FFN_ROLES:
            kind, which = FFN_ROLES[part.role]
            unit = UnitKey(part.layer, kind, -1 if part.expert is None else part.expert)
            gain = None
            if self.chosen is None and which != "down":
                gain = self.gains.get(("attn_norm" if layout.post_norm else "mlp_norm", part.layer))
            self.raw.setdefault(unit, {})[which] = np.ascontiguousarray(
                self._project(_rows(np.asarray(part.tensor), which, layout, part.role), gain, decode),
                dtype=np.float32)
        elif self.readers and part.role in PROFILE_READERS:
            self.kept[(part.role, part.layer)] = self._project(
                _rows(np.asarray(part.tensor), part.role, layout, part.role), None, decode)

    def sketch(self, files: list[dict]) -> Sketch:
        """The sketch of what the pass read; `files` are the pass's file records (path, size, SHA-256)."""
        if not self.raw:
            raise ForensicsError(self.layout.path, "no FFN matrices found for neuron matching")
        layout, chosen = self.layout, self.chosen
        norm = "attn_norm" if layout.post_norm else "mlp_norm"
        sketch = Sketch(layout.path, layout.info.architecture, layout.d, files=files)
        for unit in sorted(self.raw):
            # A selection read the rows unscaled: its gain (at the selected coordinates) is folded in here.
            gain = self.seen.get((norm, unit.layer)) if chosen is not None else None
            sketch.units[unit] = {which: _invariant(rows, gain[chosen[0]] if gain is not None else None)
                                  if which != "down" else _invariant(rows, None)
                                  for which, rows in self.raw[unit].items()}
        for (role, layer), cols in self.kept.items():
            gain = self.seen.get(("attn_norm", layer)) if not layout.post_norm and chosen is not None else None
            sketch.readers[(role, layer)] = (cols * gain[chosen[0]] if gain is not None else cols).astype(np.float32)
        return sketch


def read_sketch(path: Path, projection: np.ndarray, gains: dict | None = None, readers: bool = False) -> Sketch:
    """`SketchCollector`'s sketch in a pass of its own (see `read_sketches`)."""
    return read_sketches(path, [(projection, gains, readers)])[0]


def read_sketches(path: Path, specs: list[tuple[np.ndarray, dict | None, bool]]) -> list[Sketch]:
    """One sketch per (projection, gains, readers) of `specs`, all from one pass, which reads every file to the end
    and hashes it (so the bytes matched can be checked against the fingerprinted evidence)."""
    m = _Model(path)
    try:
        collectors = [SketchCollector(m.layout, *spec) for spec in specs]
        m.collect(collectors)
        files = m.reads.finish(m.path)
    except BaseException:
        m.close()
        raise
    return [c.sketch(files) for c in collectors]


def selection(m: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(index, sign) per column when M is a signed selection (one ±1 per column, nothing else), else None."""
    nonzero = m != 0
    if not (nonzero.sum(axis=0) == 1).all() or not np.all(np.abs(m[nonzero]) == 1.0):
        return None
    idx = np.argmax(nonzero, axis=0)
    return idx, m[idx, np.arange(m.shape[1])]


def _rows(w: np.ndarray, which: str, layout: Layout, name: str) -> np.ndarray:
    """(n, hidden) rows in the residual basis: gate/up/q/k/v rows as stored, down columns transposed."""
    if w.ndim != 2:
        raise ForensicsError(layout.path, f"{name}: matrix of shape {w.shape}")
    if layout.key in roles.IN_OUT_LAYOUT:
        w = w.T
    rows = w.T if which == "down" else w  # torch layout: readers (n, d), down (d, n)
    if rows.shape[1] != layout.d:
        raise ForensicsError(layout.path, f"{name}: matrix of shape {w.shape} does not have the hidden size "
                                          f"{layout.d} where a {which} projection should")
    return rows


def _unit_rows(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def _invariant(rows: np.ndarray, gain: np.ndarray | None) -> np.ndarray:
    if gain is not None:
        rows = rows * gain
    rows = _unit_rows(rows)
    return _unit_rows(rows - rows.mean(axis=0)).astype(np.float32)


RECORD_SCHEMA = "llm-forensics.neuron-record/1"


@dataclass
class Record:
    """What a registry keeps of a reference for neuron matching, so that a scan never reads its weights again: the
    embedding rows of a seeded sample of its tokens (with their texts), its coordinate profile, and its sketch on a
    seeded sample of its own residual coordinates (`dims`), q/k/v readers kept. A scan then maps the suspect onto
    those coordinates through the alignment, the reverse of a case (which samples the suspect's coordinates)."""

    texts: list[str]  # canonical token texts (sources.vocabulary), one per row of `rows`
    rows: np.ndarray  # (tokens, hidden) embedding rows
    profile: Profile
    dims: np.ndarray  # the reference's coordinates the sketch keeps, sorted
    sketch: Sketch
    settings: dict  # dims, tokens, seed: what the sample was drawn with

    def to_bytes(self) -> bytes:
        """safetensors bytes (float16 arrays; sorted, so the same record always gives the same bytes)."""
        from safetensors.numpy import save

        half = np.float16
        tensors = {"rows": self.rows.astype(half), "dims": self.dims.astype(np.int64)}
        for unit, parts in self.sketch.units.items():
            for which, a in parts.items():
                tensors[f"unit.{unit.layer}.{unit.kind}.{unit.expert}.{which}"] = a.astype(half)
        for (role, layer), a in self.sketch.readers.items():
            tensors[f"reader.{role}.{layer}"] = a.astype(half)
        for (role, layer), a in self.profile.features.items():
            tensors[f"feature.{role}.{layer}"] = a.astype(np.float64)
        for (role, layer), a in self.profile.gains.items():
            tensors[f"gain.{role}.{layer}"] = a.astype(np.float64)
        meta = {"schema": RECORD_SCHEMA, "texts": json.dumps(self.texts), "settings": json.dumps(self.settings),
                "architecture": self.sketch.architecture, "hidden_size": str(self.sketch.hidden_size),
                "num_layers": str(self.profile.num_layers), "files": json.dumps(self.sketch.files)}
        # One metadata entry: safetensors writes several in a per-process hash order, which would change the bytes.
        return save(tensors, metadata={"record": json.dumps(meta, sort_keys=True)})

    @classmethod
    def from_bytes(cls, blob: bytes, path: Path) -> Record:
        """The record `to_bytes` wrote; `path` (where the reference was) names it in messages."""
        from safetensors.numpy import load

        try:
            size = int.from_bytes(blob[:8], "little")
            meta = json.loads(json.loads(blob[8:8 + size])["__metadata__"]["record"])
            if meta.get("schema") != RECORD_SCHEMA:
                raise ValueError(f"schema {meta.get('schema')!r}, not {RECORD_SCHEMA!r}")
            return cls._parse(load(blob), meta, path)
        except Exception as e:  # noqa: BLE001 - whatever the bytes hold, one message naming the reference
            raise ForensicsError(path, f"its neuron record in the registry cannot be read: "
                                       f"{type(e).__name__}: {e}") from None

    @classmethod
    def _parse(cls, arrays: dict, meta: dict, path: Path) -> Record:
        units: dict[UnitKey, dict[str, np.ndarray]] = {}
        readers, features, gains = {}, {}, {}
        for name, a in arrays.items():
            kind, *rest = name.split(".")
            if kind == "unit":
                layer, unit_kind, expert, which = rest
                units.setdefault(UnitKey(int(layer), unit_kind, int(expert)), {})[which] = a.astype(np.float32)
            elif kind in ("reader", "feature", "gain"):
                key = (rest[0], int(rest[1]))
                {"reader": readers, "feature": features, "gain": gains}[kind][key] = (
                    a.astype(np.float32) if kind == "reader" else a)
        sketch = Sketch(Path(path), meta["architecture"], int(meta["hidden_size"]), dict(sorted(units.items())),
                        readers, json.loads(meta["files"]))
        record = cls(json.loads(meta["texts"]), arrays["rows"].astype(np.float32),
                     Profile(features, gains, int(meta["num_layers"])), arrays["dims"], sketch,
                     json.loads(meta["settings"]))
        if not units or record.rows.shape != (len(record.texts), sketch.hidden_size) or \
                any(a.shape[1] != len(record.dims) for parts in units.values() for a in parts.values()):
            raise ValueError("its arrays do not have the shapes its metadata gives")
        return record


def record_lookups(path: Path, dims: int, tokens: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """What a record takes from look-ups before the model's one pass: the texts of a seeded sample of its tokens,
    their embedding rows, and the seeded sample of its residual coordinates its sketch keeps."""
    from forensics.sources.vocabulary import spellings, vocabulary
    from forensics.seeds import rng_for

    vocab, spelling = vocabulary(path)
    texts: list[str] = []
    ids = np.zeros(0, dtype=np.int64)
    if vocab:
        index = spellings(vocab, spelling)
        texts = sorted(index)
        if len(texts) > tokens:
            keep = np.sort(rng_for(seed, "record tokens").choice(len(texts), tokens, replace=False))
            texts = [texts[i] for i in keep]
        ids = np.array([index[t] for t in texts], dtype=np.int64)
    d = hidden_size(path)
    if not d:
        raise ForensicsError(path, "hidden size unknown (no hidden_size in the config or metadata)")
    chosen = np.sort(rng_for(seed, "dims").choice(d, min(dims, d), replace=False))
    rows = read_embedding_rows(path, ids)[0] if len(ids) else np.zeros((0, d), np.float32)
    return texts, rows, chosen


def read_record(path: Path, dims: int, tokens: int, seed: int) -> Record:
    """The neuron record of the model at `path` (see `Record`), in a pass of its own, which reads every file to the
    end and hashes it (a registry takes it from the reference's fingerprint pass instead)."""
    texts, rows, chosen = record_lookups(path, dims, tokens, seed)
    sketch = read_sketch(path, np.eye(rows.shape[1])[:, chosen], readers=True)  # rows: (tokens, hidden)
    return Record(texts, rows, read_profile(path), chosen, sketch, {"dims": dims, "tokens": tokens, "seed": seed})


SCREEN_BYTES = 8 << 20  # one block of the screen's products: 8 MiB ran 10-25 % faster than 32 (the demo pair)
# Emulated (float32) products, a block per core: 1 MiB counted in bfloat16 (2 MiB of float32 products) ran twice as
# fast as torch's 8 MiB blocks on a 2-core AMD EPYC without bfloat16 instructions (a 7B pair: 0.66 s a draw, not 1.48).
EMULATED_BYTES = 1 << 20


def _pieces(widths: list[int], rows: int, block_bytes: int) -> list[tuple[int, int]]:
    """Each candidate unit's width, a unit whose product with `rows` suspect neurons alone exceeds `block_bytes` in
    bfloat16 cut into near-equal pieces that fit (a 7B FFN's 18,944 neurons against 448 rows: 17 MB of products, at
    half the speed of 8 MiB blocks): [(unit, width)] in row order."""
    if min(widths, default=1) < 1:
        raise ValueError("a candidate unit without neurons")
    cols = max(1, block_bytes // (2 * rows))
    out = []
    for unit, width in enumerate(widths):
        n = -(-width // cols)
        out += [(unit, width // n + (k < width % n)) for k in range(n)]
    return out


def _runs(pieces: list[int], rows: int, block_bytes: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Blocks of consecutive pieces of candidate units (their widths, `_pieces`), (first row, end row, [(pieces,
    width)] runs of one width), whose products with `rows` suspect neurons fit `block_bytes` in bfloat16."""
    blocks, start, k = [], 0, 0
    while k < len(pieces):
        end, runs = start, []
        while k < len(pieces) and (end == start or rows * (end + pieces[k] - start) * 2 <= block_bytes):
            if runs and runs[-1][1] == pieces[k]:
                runs[-1] = (runs[-1][0] + 1, pieces[k])
            else:
                runs.append((1, pieces[k]))
            end += pieces[k]
            k += 1
        blocks.append((start, end, runs))
        start = end
    return blocks


class Screen:
    """Each suspect unit's mean row maximum (and minimum) against every candidate unit, from bfloat16 products in
    float32 accumulation: the order in which neuron matching (stats/neurons.py) visits candidate units, and where it
    stops. torch's, since numpy has no bfloat16 product; where the CPU has no bfloat16 instructions, numpy's float32
    products of the rounded inputs instead (torch's emulation of bfloat16 is slower than float32)."""

    def __init__(self, cand: np.ndarray, widths: list[int], rows: int, native: bool | None = None,
                 block_bytes: int | None = None):
        """`native`: the CPU's bfloat16 products (None: where it has the instructions) or the emulated ones."""
        self.native = native if native is not None else _bf16_instructions() and _mkldnn_bf16()
        if self.native:
            import torch

            self.cand = torch.from_numpy(cand).to(torch.bfloat16)
        else:
            # Held transposed, so that a block of candidate neurons is a slice of columns of one product; rounded
            # and transposed a slice at a time (a whole transposed copy is several times slower).
            self.cand = np.empty(cand.shape[::-1], np.float32)
            for a in range(0, len(cand), 8192):
                self.cand[:, a:a + 8192] = _bfloat16(cand[a:a + 8192]).T
        block = block_bytes or (SCREEN_BYTES if self.native else EMULATED_BYTES)
        pieces = _pieces(widths, rows, block)
        self.blocks = _runs([width for _, width in pieces], rows, block)
        # Where a unit was cut, its pieces' extremes are combined: the first piece of each unit.
        of_piece = np.array([unit for unit, _ in pieces])
        self.firsts = np.flatnonzero(np.r_[True, of_piece[1:] != of_piece[:-1]])

    def __call__(self, sus: np.ndarray, offsets: np.ndarray, flips: tuple[bool, ...],
                 pool: ThreadPoolExecutor | None = None) -> dict[bool, np.ndarray]:
        """`pool`: where the emulated products run, a block each on one BLAS thread (the native ones run on torch's
        threads)."""
        low_too = True in flips
        if self.native:
            import torch

            s = torch.from_numpy(np.ascontiguousarray(sus)).to(torch.bfloat16)
            high, low = [], []
            for start, end, runs in self.blocks:
                product, at = s @ self.cand[start:end].T, 0
                for pieces, width in runs:
                    view = product[:, at:at + pieces * width].unflatten(1, (pieces, width))
                    high.append(_row_max(torch, view))
                    if low_too:
                        low.append(_row_min(torch, view))
                    at += pieces * width
            high = torch.cat(high, 1).float().numpy()
            low = torch.cat(low, 1).float().numpy() if low_too else None
        else:
            s = _bfloat16(sus)

            def extremes(block: tuple) -> list[tuple[np.ndarray, np.ndarray | None]]:
                start, end, runs = block
                product, at, out = s @ self.cand[:, start:end], 0, []
                for pieces, width in runs:
                    view = product[:, at:at + pieces * width].reshape(len(s), pieces, width)
                    out.append((view.max(axis=2), view.min(axis=2) if low_too else None))
                    at += pieces * width
                return out

            found = [e for block in (pool.map(extremes, self.blocks) if pool else map(extremes, self.blocks))
                     for e in block]
            # Rounding to bfloat16 keeps order, so the rounded extreme is the extreme of the rounded products (as
            # the native path rounds them).
            high = _bfloat16(np.concatenate([h for h, _ in found], axis=1))
            low = _bfloat16(np.concatenate([m for _, m in found], axis=1)) if low_too else None
        counts = np.diff(offsets)[:, None]

        def mean(extremes: np.ndarray, extreme) -> np.ndarray:
            per_unit = extreme.reduceat(extremes, self.firsts, axis=1)
            return np.add.reduceat(per_unit, offsets[:-1], axis=0) / counts

        return {flip: -mean(low, np.minimum) if flip else mean(high, np.maximum) for flip in flips}


def _bfloat16(x: np.ndarray) -> np.ndarray:
    """Finite numbers rounded to bfloat16 (to nearest, ties to even, as torch rounds them), as float32: the low 16
    bits of the float32 rounded away (a carry into the exponent is the rounding up it should be)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + (0x7FFF + ((u >> 16) & 1))) & 0xFFFF0000).view(np.float32)


def _row_max(torch, view):
    """The maximum over the last axis of a bfloat16 tensor, from its bits read as int16 (several times quicker than
    torch's bfloat16 reduction). bfloat16's bits are a sign and a magnitude, so as integers the non-negative numbers
    keep their order and lie above every negative one: where no row's maximum is negative, the integer maximum is
    torch's (a maximum of zero may come out as +0 where torch gives -0: the same number); otherwise torch's bfloat16
    maximum is taken."""
    high = view.view(torch.int16).amax(dim=-1)
    return view.amax(dim=-1) if bool((high < 0).any()) else high.view(torch.bfloat16)


def _row_min(torch, view):
    """The minimum over the last axis, likewise: with the magnitude bits flipped (x ^ 0x7FFF), the numbers with the
    sign bit set (-0 among them) keep their order as integers and lie below every other; where some row has none,
    torch's bfloat16 minimum is taken."""
    low = (view.view(torch.int16) ^ 0x7FFF).amin(dim=-1) ^ 0x7FFF
    return view.amin(dim=-1) if bool((low >= 0).any()) else low.view(torch.bfloat16)


def _mkldnn_bf16() -> bool:
    import torch

    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _bf16_instructions() -> bool:
    """Whether the CPU multiplies bfloat16 itself (AVX512-BF16 or AMX): oneDNN's own check also says yes on AVX-512
    CPUs without them, where it emulates bfloat16 at less than float32's speed."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags
