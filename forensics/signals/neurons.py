"""FFN neurons of one model, read layer by layer into small sketches that another model's neurons can be matched to.

Zhu, Ahmed, Kuditipudi and Liang ("Independence Tests for Language Models", ICML 2025) test lineage by matching
neurons: a derived model keeps its parent's neurons (possibly permuted, possibly rescaled), an independently
initialised one has none in common. Two models only compare neuron by neuron in one residual basis, so first the two
residual streams are aligned through the embedding rows of the tokens both vocabularies spell the same way
(`align_residual`: a signed permutation of the residual dimensions, found with linear_sum_assignment).

A neuron is described by its gate row, its up row and its down column: three vectors in the residual basis. A sketch
keeps, per FFN unit (a dense FFN, an expert, a shared expert), every neuron restricted to `dims`, a seeded sample of
the residual dimensions: that is all the matching needs, and it keeps a 7B model's sketch near 1/30 of its size, so
two models are never held whole. Before matching, each part of each neuron is made invariant to what an evader can do
without changing the model's outputs:

* the input norm's gain is folded into the gate and up columns (a gain moved into the projections changes nothing);
* each row is scaled to unit length (up ·c with down /c per neuron, or any such per-neuron rescaling, changes nothing);
* the mean neuron of the unit is subtracted and the rows scaled to unit length again, so directions every neuron
  shares (large residual dimensions) do not pass for a match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from forensics import roles
from forensics.errors import ForensicsError
from forensics.sources import Reads, open_model

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
    files: list[dict] = field(default_factory=list)  # every file of the model read in full: path, size, SHA-256

    def parts(self) -> set[str]:
        """Parts every unit has (BERT-style FFNs have no gate)."""
        found = [set(p) for p in self.units.values()]
        return set.intersection(*found) if found else set()


class _Model:
    """One model's source and role table, for one pass over its tensors in file order."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.reads = Reads()
        self.source = open_model(self.path, self.reads)
        self.info = self.source.info()
        self.table, self.matches = roles.resolve(self.path, self.info, self.source.names())
        self.key = roles.architecture_key(self.info.table or self.info.architecture)
        self.embedding = re.compile(roles.EMBEDDINGS.get(self.key, roles.DECODER_EMBEDDING))
        if not self.info.hidden_size:
            raise ForensicsError(self.path, "hidden size unknown (no hidden_size in the config or metadata)")

    def gain(self, w: np.ndarray) -> np.ndarray:
        w = w.astype(np.float64)
        plus_one = self.info.table != "gguf" and self.info.architecture in roles.NORM_PLUS_ONE
        return w + 1.0 if plus_one else w

    def close(self) -> None:
        self.reads.close()


def read_embedding_rows(path: Path, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of the model's token embedding (float32: the alignment needs correlations, not exact sums)."""
    m = _Model(path)
    try:
        for ref in m.source.tensors():
            if m.embedding.fullmatch(ref.name):
                w = ref.load()
                if w.ndim != 2 or w.shape[1] != m.info.hidden_size or (len(ids) and ids.max() >= w.shape[0]):
                    raise ForensicsError(ref.file or path, f"token embedding {ref.name} has shape {w.shape}, "
                                                           f"not (vocabulary, {m.info.hidden_size})")
                return w[ids].astype(np.float32)
    finally:
        m.close()
    raise ForensicsError(path, "no token embedding found (looked for a tensor named like "
                               f"{m.embedding.pattern!r}); neuron matching needs it to align the residual streams")


def read_sketch(path: Path, dims: np.ndarray, signs: np.ndarray | None = None) -> Sketch:
    """Every FFN neuron restricted to residual dimensions `dims` (times `signs`), in one pass over the model."""
    m = _Model(path)
    d = m.info.hidden_size
    signs = np.ones(len(dims)) if signs is None else signs
    raw: dict[UnitKey, dict[str, np.ndarray]] = {}
    gains: dict[tuple[str, int], np.ndarray] = {}
    try:
        for ref in m.source.tensors():
            match = m.matches.get(ref.name)
            if match is None or match.target not in NEEDED:
                continue
            for part in m.table.parts(ref.name, match, ref.load(), m.info):
                if part.role in GAIN_ROLES:
                    g = np.asarray(part.tensor).reshape(-1)
                    if g.shape[0] == d:
                        gains[(part.role, part.layer)] = m.gain(g)[dims]
                elif part.role in FFN_ROLES:
                    kind, which = FFN_ROLES[part.role]
                    unit = UnitKey(part.layer, kind, -1 if part.expert is None else part.expert)
                    raw.setdefault(unit, {})[which] = _restrict(np.asarray(part.tensor), which, dims, d, m,
                                                                ref.name) * signs
        # Read to the end and hashed, so the bytes matched can be checked against the fingerprinted evidence.
        files = m.reads.finish(m.path)
    except BaseException:
        m.close()
        raise
    if not raw:
        raise ForensicsError(path, "no FFN matrices found for neuron matching")
    sketch = Sketch(m.path, m.info.architecture, d, files=files)
    post_norm = m.key in roles.POST_NORM
    for unit in sorted(raw):
        gain = gains.get(("attn_norm" if post_norm else "mlp_norm", unit.layer))
        sketch.units[unit] = {which: _invariant(rows, gain if which != "down" else None)
                              for which, rows in raw[unit].items()}
    return sketch


def _restrict(w: np.ndarray, which: str, dims: np.ndarray, d: int, m: _Model, name: str) -> np.ndarray:
    """(neurons, len(dims)) float32 (cosines need no more): gate/up rows or down columns at the chosen dimensions."""
    if w.ndim != 2:
        raise ForensicsError(m.path, f"{name}: FFN matrix of shape {w.shape}")
    if m.key in roles.IN_OUT_LAYOUT:
        w = w.T
    # torch layout: gate/up (neurons, d), down (d, neurons)
    rows = w[:, dims] if which != "down" else w[dims, :].T
    if (w.shape[1] if which != "down" else w.shape[0]) != d:
        raise ForensicsError(m.path, f"{name}: FFN matrix of shape {w.shape} does not have the hidden size {d} "
                                     f"where a {which} projection should")
    return np.ascontiguousarray(rows, dtype=np.float32)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def _invariant(rows: np.ndarray, gain: np.ndarray | None) -> np.ndarray:
    if gain is not None:
        rows = rows * gain
    rows = _unit_rows(rows)
    return _unit_rows(rows - rows.mean(axis=0)).astype(np.float32)


@dataclass(frozen=True)
class Alignment:
    """Suspect residual dimension i corresponds to candidate dimension perm[i], with sign signs[i]."""

    perm: np.ndarray
    signs: np.ndarray
    correlation: np.ndarray  # |corr| of each matched pair of dimensions over the shared tokens

    def as_dict(self) -> dict:
        c = self.correlation
        return {"matched_abs_correlation_mean": float(c.mean()), "matched_abs_correlation_median": float(np.median(c)),
                "dims_above_0.5": int((c > 0.5).sum()), "dims": int(len(c))}


def align_residual(es: np.ndarray, ec: np.ndarray) -> Alignment:
    """Signed permutation of the residual dimensions that best matches the two embeddings' columns.

    Columns are compared by Pearson correlation over the shared tokens (centred, so a dimension's offset or scale,
    which norms and rescalings change freely, plays no part); the matching maximises the summed |correlation|.
    """
    if es.shape != ec.shape:
        raise ValueError(f"embedding rows of different shapes {es.shape} and {ec.shape}")

    def standard(x):
        x = x - x.mean(axis=0)
        n = np.linalg.norm(x, axis=0)
        x /= np.where(n > 0, n, 1.0)
        return x

    corr = standard(es).T @ standard(ec)
    rows, cols = linear_sum_assignment(np.abs(corr), maximize=True)
    perm = cols[np.argsort(rows)]
    matched = corr[np.arange(len(perm)), perm]
    return Alignment(perm, np.where(matched < 0, -1.0, 1.0), np.abs(matched))
