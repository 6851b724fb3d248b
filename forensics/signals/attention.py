"""Attention evidence that output-preserving rescalings cannot redraw: spectra of the per-head QK and OV products.

The std curves of q, k, v and o move at an evader's will without changing a single output (forensics/lab/transforms.py):
q rows ·c with k rows /c, v rows ·c with o columns /c, a norm gain ·c with the next projections' input columns /c,
heads permuted. What attention computes from the normalised residual x̂ does not move, so neither do, per query head
h reading kv head j = h // (heads / kv heads), with G = diag(gain of the norm that feeds attention):

* the bilinear form behind its scores, B_h = G W_q^hᵀ W_k^j G (d × d);
* its value-to-output map, W_o^h W_v^j G (d × d).

Their singular values are therefore invariant to all of these, and to any permutation of the residual basis. Each
head's spectrum is divided by its sum (which also drops a global scale, such as a softmax temperature folded into
W_q), and a layer is summarised symmetrically over its heads, so permuting heads changes nothing either.

Per layer the summary is the mean over heads of the effective-rank fraction exp(H(p)) / r, where p is the normalised
spectrum, H its Shannon entropy and r the number of singular values (the head dimension): 1 for a head that uses every
direction equally, 1/r for a rank-one head. On the published models it varies across layers by a CV of 0.8 % (MiniLM's
OV) to 38 % (Gemma3-270M's QK), above the 0.1 % flat-curve threshold of forensics/stats/normalise.py everywhere
(docs/fingerprint-format.md has the table and the other summaries tried).

The singular values come from d_head × d_head problems. A head block X (d_head × d) factors as Xᵀ = P R with P's
columns orthonormal and RᵀR = X Xᵀ, so B_h = P_Q R_Q R_Kᵀ P_Kᵀ has the singular values of R_Q R_Kᵀ, and W_o^h W_v^j G
those of R_O R_Vᵀ. R is the thin QR's R factor; it is taken here from the Cholesky factor of the Gram matrix X Xᵀ
(R = Lᵀ), because LAPACK's QR of these tall, skinny blocks ran far slower than a Gram product (a matrix multiply) and
a Cholesky factorisation: 12 s against 0.3 s for SmolLM2-135M's 30 layers on 2 cores. A rank-deficient head (no
Cholesky factor) takes the Gram matrix's symmetric square root instead, which serves as R just as well.

`LayerCollector` gathers one layer's q, k, v, o and norm gain from a fingerprint pass that reads tensors in file
order, reduces the layer to its two values once its pieces are in, and drops them. The reduction runs on a worker
thread (LAPACK and BLAS release the GIL) while the pass reads, hashes and takes the moments of the next tensors; one
layer is reduced at a time, so at most two layers' attention weights are held.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from forensics import roles
from forensics.sources.base import ModelInfo

SIGNALS = ("qk_spectrum", "ov_spectrum")
PIECES = ("q", "k", "v", "o")
# Multi-head latent attention has no plain per-head q and k (they pass through low-rank factors); not covered.
MLA_ROLES = {"q_a", "q_b", "kv_a", "kv_b"}


class NonFinite(ValueError):
    """A head block holds NaN or Inf (weights fingerprinted with --allow-nonfinite): the layer gets no value."""


def _r_factors(w: np.ndarray, n: int, gain: np.ndarray | None = None, columns: bool = False) -> np.ndarray:
    """R with RᵀR = X Xᵀ for each of the n head blocks X of a (out, in) projection: its row blocks, or with `columns`
    its column blocks (transposed), each column of X scaled by `gain`: (n, r, r).

    One head at a time through a float64 buffer of one block: a float64 copy of the whole matrix (100 MB for a 7B
    model's q) was fresh memory every layer, and its page faults cost more than the products."""
    w = np.asarray(w)
    rows = w.shape[1] if columns else w.shape[0]
    r, d = rows // n, w.shape[0] if columns else w.shape[1]
    g = None if gain is None else np.asarray(gain, dtype=np.float64)
    block = np.empty((r, d))
    gram = np.empty((n, r, r))
    for h in range(n):
        np.copyto(block, w[:, h * r:(h + 1) * r].T if columns else w[h * r:(h + 1) * r])
        if not np.isfinite(block).all():
            raise NonFinite
        if g is not None:
            block *= g
        np.matmul(block, block.T, out=gram[h])
    try:
        return np.swapaxes(np.linalg.cholesky(gram), 1, 2)
    except np.linalg.LinAlgError:
        lam, u = np.linalg.eigh(gram)
        # Rounding can leave a zero eigenvalue slightly negative.
        return (u * np.sqrt(np.clip(lam, 0.0, None))[:, None, :]) @ np.swapaxes(u, 1, 2)


def _singular_values(m: np.ndarray) -> np.ndarray:
    """Singular values of each (r, r) matrix, largest first, as the square roots of M Mᵀ's eigenvalues.

    A symmetric eigensolver is 4-5x faster than an SVD here (Gemma3-270M's 256-wide heads: 0.15 s against 0.68 s);
    it loses relative accuracy only on singular values below ~1e-7 of the largest. Eigenvalues within the solver's
    rounding of zero (rank-deficient heads) are set to zero, as an SVD would report them.
    """
    lam = np.linalg.eigvalsh(m @ np.swapaxes(m, 1, 2))
    noise = 10 * m.shape[-1] * np.finfo(np.float64).eps * lam.max(axis=-1, keepdims=True)
    return np.sqrt(np.where(lam > noise, lam, 0.0))[..., ::-1]


def _kv_index(n_heads: int, n_kv: int) -> np.ndarray:
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads do not split into {n_kv} kv groups")
    return np.arange(n_heads) // (n_heads // n_kv)


def qk_singular_values(q: np.ndarray, k: np.ndarray, n_heads: int, n_kv: int,
                       gain: np.ndarray | None = None) -> np.ndarray:
    """(n_heads, d_head) singular values of G W_q^hᵀ W_k^j G, largest first; q, k in (out, in) layout."""
    rq = _r_factors(q, n_heads, gain)
    rk = _r_factors(k, n_kv, gain)
    return _singular_values(rq @ np.swapaxes(rk, 1, 2)[_kv_index(n_heads, n_kv)])


def ov_singular_values(v: np.ndarray, o: np.ndarray, n_heads: int, n_kv: int,
                       gain: np.ndarray | None = None) -> np.ndarray:
    """(n_heads, d_head) singular values of W_o^h W_v^j G, largest first; v, o in (out, in) layout."""
    rv = _r_factors(v, n_kv, gain)
    ro = _r_factors(o, n_heads, columns=True)  # o's per-head blocks are its column blocks
    return _singular_values(ro @ np.swapaxes(rv, 1, 2)[_kv_index(n_heads, n_kv)])


def effective_rank_fraction(singular_values: np.ndarray) -> float:
    """Mean over heads (rows) of exp(entropy of the sum-normalised spectrum) / its length.

    A head whose product is zero (an all-zero q, k, v or o) uses no direction at all: its fraction is 0, the limit of
    ever weaker heads, rather than 0/0."""
    s = np.asarray(singular_values, dtype=np.float64)
    total = s.sum(axis=-1, keepdims=True)
    p = np.divide(s, total, out=np.zeros_like(s), where=total > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=-1)
    rank = np.where(total[..., 0] > 0, np.exp(entropy), 0.0)
    return float(np.mean(rank / s.shape[-1]))


def qk_spectrum(q: np.ndarray, k: np.ndarray, n_heads: int, n_kv: int, gain: np.ndarray | None = None) -> float:
    return effective_rank_fraction(qk_singular_values(q, k, n_heads, n_kv, gain))


def ov_spectrum(v: np.ndarray, o: np.ndarray, n_heads: int, n_kv: int, gain: np.ndarray | None = None) -> float:
    return effective_rank_fraction(ov_singular_values(v, o, n_heads, n_kv, gain))


class LayerCollector:
    """Keeps each layer's q, k, v, o and attention-input gain until all have been read, then reduces them to the
    layer's two values. Pre-norm layers read their own attn_norm; post-norm (BERT) layers read the previous layer's
    output norm (roles.POST_NORM), and their layer 0 reads the embeddings' norm, outside the role table: unfolded.

    A pre-norm layer's tensors lie together in every format seen, so one layer is held at a time. A post-norm layer
    stored before its predecessor (safetensors sorts names: layers 10 and 11 before 2) waits for that layer's norm;
    that holds a few layers of an encoder, never more than the model's attention weights."""

    def __init__(self, info: ModelInfo, table_key: str, matches: dict[str, roles.Match]):
        self.n_heads = info.num_heads
        self.hidden = info.hidden_size
        self.post_norm = table_key in roles.POST_NORM
        self.in_out = table_key in roles.IN_OUT_LAYOUT
        self.plus_one = info.table != "gguf" and info.architecture in roles.NORM_PLUS_ONE
        targets = {(m.layer, m.target) for m in matches.values()}
        self.enabled = bool(self.n_heads) and not any(t in MLA_ROLES for _, t in targets)
        self.gain_role = "mlp_norm" if self.post_norm else "attn_norm"
        self.has_gain = {layer for layer, t in targets if t == self.gain_role}
        self.pending: dict[int, dict[str, np.ndarray]] = {}
        self.gains: dict[int, np.ndarray] = {}  # keyed by the layer whose attention the gain feeds
        self.values: dict[str, dict[int, float]] = {name: {} for name in SIGNALS}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spectra")
        self._running: tuple[int, Future] | None = None

    def wants(self, role: str) -> bool:
        """Whether a tensor of this role is needed whole (a piece or the gain of a layer's attention)."""
        return self.enabled and (role in PIECES or role == self.gain_role)

    def add(self, part: roles.Part) -> None:
        if not self.enabled:
            return
        if part.role == self.gain_role:
            gain = np.asarray(part.tensor, dtype=np.float64).reshape(-1)
            layer = part.layer + 1 if self.post_norm else part.layer
            self.gains[layer] = gain + 1.0 if self.plus_one else gain
            self._try(layer)
        elif part.role in PIECES and part.expert is None:
            w = np.asarray(part.tensor)
            self.pending.setdefault(part.layer, {})[part.role] = w.T if self.in_out else w
            self._try(part.layer)

    def _gain_source(self, layer: int) -> int:
        return layer - 1 if self.post_norm else layer

    def _try(self, layer: int) -> None:
        pieces = self.pending.get(layer)
        if pieces is None or len(pieces) < len(PIECES):
            return
        if self._gain_source(layer) in self.has_gain and layer not in self.gains:
            return  # its gain is still to come (post-norm files need not store layers in order)
        del self.pending[layer]
        gain = self.gains.pop(layer, None)
        self._collect()
        self._running = layer, self._worker.submit(self._reduce, pieces, gain)

    def _reduce(self, pieces: dict[str, np.ndarray], gain: np.ndarray | None) -> tuple[float, float] | None:
        q, k, v, o = (pieces[r] for r in PIECES)
        n_kv = self._kv_heads(q, k, v, o, gain)
        if n_kv is None:
            return None
        try:
            return qk_spectrum(q, k, self.n_heads, n_kv, gain), ov_spectrum(v, o, self.n_heads, n_kv, gain)
        except NonFinite:
            return None

    def _collect(self) -> None:
        """Wait for the layer being reduced and keep its values (re-raising what went wrong there)."""
        if self._running is None:
            return
        layer, future = self._running
        self._running = None
        values = future.result()
        if values is not None:
            self.values["qk_spectrum"][layer], self.values["ov_spectrum"][layer] = values

    def _kv_heads(self, q, k, v, o, gain) -> int | None:
        """The kv head count, read off k's rows (configs of fused-qkv models may carry one that does not apply), if
        their shapes split into the configured heads and the gain is finite; else None: an unusual layout gets no
        value (nor, through `NonFinite`, a layer with NaN weights fingerprinted with --allow-nonfinite)."""
        if any(w.ndim != 2 for w in (q, k, v, o)):
            return None
        d = q.shape[1]
        dh = q.shape[0] // self.n_heads
        n_kv = k.shape[0] // dh if dh else 0
        shapes = (n_kv > 0 and self.n_heads % n_kv == 0 and q.shape == (self.n_heads * dh, d)
                  and k.shape == (n_kv * dh, d) and v.shape[1] == d and v.shape[0] % n_kv == 0
                  and o.shape == (d, self.n_heads * (v.shape[0] // n_kv))
                  and (gain is None or gain.shape == (d,)) and (self.hidden is None or d == self.hidden))
        finite = shapes and (gain is None or np.isfinite(gain).all())
        return n_kv if finite else None

    def finish(self) -> None:
        """After the last tensor: a layer still waiting (its gain never came) is reduced unfolded, and every
        reduction is collected."""
        for layer in sorted(self.pending):
            self.has_gain.discard(self._gain_source(layer))
            self._try(layer)
        self._collect()

    def close(self) -> None:
        self._worker.shutdown()

    def signals(self, num_layers: int) -> dict:
        """The finished curves (after `finish`)."""
        out = {}
        for name, per_layer in self.values.items():
            if per_layer:
                values = [None] * num_layers
                for layer, x in per_layer.items():
                    values[layer] = x if np.isfinite(x) else None
                out[name] = {"kind": "attention_spectrum", "values": values}
        return out
