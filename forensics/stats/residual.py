"""Which suspect residual coordinate is which candidate coordinate: the map neuron matching compares neurons through.

A derived model may hold its parent's residual stream as it was, with its coordinates reordered or sign-flipped,
turned by an output-preserving orthogonal rotation (SliceGPT, QuaRot), restricted to a subset (width pruning), or
behind a new vocabulary whose embeddings were re-initialised. Three maps, tried in a fixed order (docs/statistics.md,
"Neuron matching", step 1); each is a (candidate width, suspect width) matrix M with x_suspect ≈ x_candidate · M:

1. `tokens, signed permutation`: embedding columns correlated over the tokens both vocabularies spell the same way,
   matched one to one on |r| (`linear_sum_assignment`; rectangular when the suspect is narrower).
2. `tokens, orthogonal`: the orthogonal Procrustes map of the same embedding rows (columns orthonormal, so also a
   subspace when the suspect is narrower), for a stream that was rotated rather than reordered. Used when it explains
   clearly more than the signed permutation (`ROTATION_MARGIN`), since the signed permutation is exact for every
   coordinate-wise edit and cheaper to apply. So it is not fitted at all when an accepted signed permutation leaves
   it no room (quality above 1 - `ROTATION_MARGIN`, and no quality exceeds 1): the choice is the same, and its ten
   d x d SVDs (with the chance draws) cost a 7B pair 2.5 minutes.
3. `weights, signed permutation`: when no token map holds (no shared spelling, or shared spellings whose embeddings
   were re-initialised), each coordinate's profile over the layers (log column norm of q, k, v with the input norm's
   gain folded in, log row norm of o: all invariant to neuron and head reordering and to gain folding), matched one to
   one on the profiles' correlation; signs from the readers' Gram matrices (`gram_signs`). The FFN matrices neuron
   matching compares are kept out of the profiles, so the map is not fitted to the statistic it serves.

Every map's quality (mean correlation of matched coordinates) is set against its own chance level: the same fit after
the correspondence it relies on is destroyed (token rows shuffled; each profile feature shuffled across coordinates),
`CHANCE_DRAWS` times. A map is accepted only if its quality exceeds every chance draw, lies `MIN_Z` chance standard
deviations above their mean, and covers `MIN_QUALITY` of the way from chance to a perfect map (`Fit.excess`: a
near-exact map, as derivation leaves it, not the loose one unrelated models share): an alignment that fails makes
neuron matching not applicable instead of finding nothing.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse.linalg import ArpackNoConvergence, svds
from threadpoolctl import threadpool_limits

from forensics import settings

CHANCE_DRAWS = 9
MIN_Z = 6.0
# Unrelated models trained on similar text share a loose map of their streams, far above chance yet far from the
# near-exact map of a derived pair (docs/statistics.md has the measured qualities). A loose map may line up features
# two models both learned, which the neuron null (random reorderings after the map) does not account for, so only a
# near-exact map is used.
MIN_QUALITY = 0.8
SHARED_COMPONENTS = 4  # principal components of each embedding removed before the token maps (see below)
ROTATION_MARGIN = 0.1  # orthogonal quality must exceed the signed permutation's by this much to be preferred

TOKENS_PERMUTATION = "tokens, signed permutation"
TOKENS_ORTHOGONAL = "tokens, orthogonal"
WEIGHTS_PERMUTATION = "weights, signed permutation"


@dataclass(frozen=True)
class Fit:
    """One map and how it compares with chance."""

    how: str
    matrix: np.ndarray  # (candidate width, suspect width)
    quality: float  # mean over suspect coordinates of the matched correlation
    chance_mean: float
    chance_sd: float
    chance_max: float

    @property
    def z(self) -> float:
        return (self.quality - self.chance_mean) / self.chance_sd if self.chance_sd > 0 else float("inf")

    @property
    def excess(self) -> float:
        """How far the quality goes from chance towards a perfect map, (q - chance) / (1 - chance): a fit overfits
        when the coordinates are many for its rows, and its chance draws overfit alike, so the threshold reads this."""
        return (self.quality - self.chance_mean) / (1.0 - self.chance_mean) if self.chance_mean < 1 else 0.0

    @property
    def accepted(self) -> bool:
        return self.excess >= MIN_QUALITY and self.quality > self.chance_max and self.z >= MIN_Z

    @property
    def signed_permutation(self) -> bool:
        return self.how != TOKENS_ORTHOGONAL

    def as_dict(self) -> dict:
        return {"how": self.how, "quality": self.quality, "chance_mean": self.chance_mean,
                "chance_sd": self.chance_sd, "chance_max": self.chance_max, "chance_draws": CHANCE_DRAWS,
                "z": min(self.z, 1e9), "excess": self.excess, "min_quality": MIN_QUALITY, "accepted": self.accepted}


def _standard(x: np.ndarray) -> np.ndarray:
    """Columns centred and scaled to unit length (x.T @ y is then Pearson's r per pair of columns)."""
    x = x - x.mean(axis=0)
    n = np.linalg.norm(x, axis=0)
    return x / np.where(n > 0, n, 1.0)


def _signed_match(corr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each row's one-to-one match on |corr|: M (columns x rows of corr) with ±1 at the matches, and the matches
    (rows, columns, signs of their r)."""
    rows, cols = linear_sum_assignment(np.abs(corr), maximize=True)
    signs = np.where(corr[rows, cols] < 0, -1.0, 1.0)
    m = np.zeros((corr.shape[1], corr.shape[0]))
    m[cols, rows] = signs
    return m, rows, cols, signs


def _permutation_fit(fit: tuple[np.ndarray, np.ndarray], judge: tuple[np.ndarray, np.ndarray]) -> tuple:
    """Signed permutation fitted on `fit` (standardised columns of both sides), its quality read on `judge` (the
    suspect's side standardised already, as `_quality` takes it).

    The quality is `_quality(judge[0], judge[1] @ M)` without the dense (tokens x d) by (d x d) product: a column of
    the product is one signed column of judge[1] (or zero), and standardising commutes with picking columns and
    with their signs, so each matched pair's correlation is that of the two columns, signed."""
    m, rows, cols, signs = _signed_match(fit[0].T @ fit[1])
    per = np.zeros(m.shape[1])
    # np.take: several times faster than indexing, for columns
    per[rows] = np.sum(np.take(judge[0], rows, axis=1) * np.take(_standard(judge[1]), cols, axis=1), axis=0) * signs
    return m, float(per.mean())


def _orthogonal_fit(fit: tuple[np.ndarray, np.ndarray], judge: tuple[np.ndarray, np.ndarray]) -> tuple:
    """Procrustes: the M with orthonormal columns maximising tr(Mᵀ ecᵀ es) on `fit`, its quality read on `judge`."""
    u, _, vt = np.linalg.svd(fit[1].T @ fit[0], full_matrices=False)
    m = u @ vt
    return m, _quality(judge[0], judge[1] @ m)


def _quality(target: np.ndarray, mapped: np.ndarray) -> float:
    """Mean over the suspect's coordinates of the correlation of each with what the map puts there; `target`
    standardised already (`_standard`: it is the same for the fit and every chance draw)."""
    return float(np.sum(target * _standard(mapped), axis=0).mean())


# The working memory of the chance draws fitted at once: a draw of 8192 tokens at a 7B width holds about 1.5 GB.
CHANCE_MEMORY = 4 << 30


def _chance(fit_quality, rng: np.random.Generator, shuffle, draw_bytes: int = 0) -> tuple[float, float, float]:
    """The fit's quality on CHANCE_DRAWS shuffles, drawn in order and fitted one per core (as many at once as
    CHANCE_MEMORY holds at `draw_bytes` a draw), each on one BLAS thread (scipy's assignment releases the GIL; BLAS
    threads of several fits at once only wait on each other)."""
    orders = [shuffle(rng) for _ in range(CHANCE_DRAWS)]
    workers = max(1, min(CHANCE_DRAWS, settings.cores(), CHANCE_MEMORY // max(draw_bytes, 1)))
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=workers) as pool:
        draws = np.array(list(pool.map(fit_quality, orders)))
    return float(draws.mean()), float(draws.std(ddof=1)), float(draws.max())


def without_shared_components(e: np.ndarray, k: int = SHARED_COMPONENTS) -> np.ndarray:
    """Rows centred, the top k principal components removed.

    Independently trained models share the dominant directions of their embeddings (tokens the text never uses all
    drift the same way; frequency dominates the next few), and matching coordinates on those lines up structure the
    two models share without being related. The components come from each model's own rows, so the map of a derived
    model, an orthogonal M, carries them onto each other, so its quality read without them is unchanged.
    """
    e = e - e.mean(axis=0)
    k = min(k, min(e.shape) - 1)
    if k < 1:
        return e
    v = _top_right_singular_vectors(e, k)
    return e - (e @ v) @ v.T


# Up to this width a full SVD is cheap; beyond it, Lanczos iterations (ARPACK, run to machine precision) find the k
# leading directions for a fraction of the cost: a 7B model's 8192 x 3584 embedding rows took 24 s by full SVD.
FULL_SVD_WIDTH = 1024


def _top_right_singular_vectors(e: np.ndarray, k: int) -> np.ndarray:
    """(d, k): an orthonormal basis of e's k leading right singular directions."""
    if min(e.shape) > FULL_SVD_WIDTH:
        start = np.random.default_rng(0).standard_normal(min(e.shape))  # ARPACK's start: fixed, so results repeat
        try:
            return svds(e, k=k, tol=0, v0=start, solver="arpack", return_singular_vectors="vh")[2].T
        except ArpackNoConvergence:
            pass  # nearly equal k-th and next singular values: the full SVD decides
    return np.linalg.svd(e, full_matrices=False)[2][:k].T


def by_tokens(es: np.ndarray, ec: np.ndarray, rng: np.random.Generator) -> list[Fit]:
    """Both token maps from embedding rows of the same tokens, es (tokens, d_s), ec (tokens, d_c), d_s <= d_c.

    Each map is fitted on the whole centred embeddings (so a rotation is recovered in every direction) and judged on
    the embeddings without their shared components (`without_shared_components`), where only lineage lines up."""
    es, ec = es.astype(np.float64), ec.astype(np.float64)
    cs, cc = es - es.mean(axis=0), ec - ec.mean(axis=0)
    js, jc = _standard(without_shared_components(es)), without_shared_components(ec)
    zs, zc = _standard(cs), _standard(cc)
    n = len(es)
    fits = []
    for how, fitter, fs, fc in ((TOKENS_PERMUTATION, _permutation_fit, zs, zc),
                                (TOKENS_ORTHOGONAL, _orthogonal_fit, cs, cc)):
        if fits and fits[0].accepted and fits[0].quality + ROTATION_MARGIN >= 1.0:
            break  # the rotation could not be chosen (`choose_token_fit`): a quality never exceeds 1
        m, q = fitter((fs, fc), (js, jc))

        def shuffled(order, fitter=fitter, fs=fs, fc=fc):
            return fitter((fs, fc[order]), (js, jc[order]))[1]

        # A draw holds about seven (tokens, width) float64 arrays: the shuffled rows, their standardised copies.
        fits.append(Fit(how, m, q, *_chance(shuffled, rng, lambda g: g.permutation(n), 7 * 8 * n * ec.shape[1])))
    return fits


def choose_token_fit(fits: list[Fit]) -> Fit | None:
    """The signed permutation unless the orthogonal map is accepted and explains clearly more; None if neither holds.
    `fits` holds the signed permutation alone when the rotation was not fitted (`by_tokens`)."""
    perm, orth = fits if len(fits) == 2 else (fits[0], None)
    if orth is None:
        return perm if perm.accepted else None
    if orth.accepted and (not perm.accepted or orth.quality > perm.quality + ROTATION_MARGIN):
        return orth
    return perm if perm.accepted else None


def by_profiles(ps: np.ndarray, pc: np.ndarray, layers: np.ndarray, rng: np.random.Generator) -> Fit:
    """Signed-permutation map (signs still +1: `gram_signs` sets them) from coordinate profiles (d, features), the
    features' layers in `layers`.

    Chance: the candidate's layers reordered at random (one order for every coordinate, each layer's features kept
    together), which breaks the correspondence but keeps what every layer of a model shares, such as coordinates
    that are large throughout: unrelated models line those up too."""
    def standard_rows(p):
        p = p - p.mean(axis=0)
        p = p / np.where(p.std(axis=0) > 0, p.std(axis=0), 1.0)  # every feature counts alike
        return _standard(p.T)  # per coordinate: centred, unit length over the features

    def assign(zc: np.ndarray) -> tuple[np.ndarray, float]:
        corr = zs.T @ zc  # a profile anti-correlated with another is no match: maximise r itself, not |r|
        rows, cols = linear_sum_assignment(corr, maximize=True)
        m = np.zeros((corr.shape[1], corr.shape[0]))
        m[cols, rows] = 1.0
        return m, float(corr[rows, cols].mean())

    zs = standard_rows(ps)
    m, q = assign(standard_rows(pc))

    groups = [np.flatnonzero(layers == layer) for layer in np.unique(layers)]

    def shuffled(g):
        # Layer i's features take the values of layer order[i] (layers with fewer features keep their own).
        order = g.permutation(len(groups))
        out = pc.copy()
        for dst, src in zip(groups, (groups[k] for k in order)):
            if len(dst) == len(src):
                out[:, dst] = pc[:, src]
        return standard_rows(out)

    return Fit(WEIGHTS_PERMUTATION, m, q, *_chance(lambda z: assign(z)[1], rng, shuffled))


def gram_signs(readers_s: list[np.ndarray], readers_c: list[np.ndarray]) -> np.ndarray:
    """Signs s of the matched coordinates from reader matrices restricted to them (rows, k), suspect and candidate.

    If the suspect's coordinate i is s_i times the candidate's, every Gram entry obeys Gs_ij = s_i s_j Gc_ij, so
    A = Σ Gs ∘ Gc = (s sᵀ) ∘ Σ Gc∘Gc: s sᵀ times a non-negative matrix, whose leading eigenvector has the signs of s.
    The whole stream's sign (s and -s) cannot be told from the weights: the matching statistic tries both.
    """
    a = sum((s.T.astype(np.float64) @ s) * (c.T.astype(np.float64) @ c) for s, c in zip(readers_s, readers_c))
    a = a / np.abs(a).max() if np.abs(a).max() > 0 else a
    _, vectors = np.linalg.eigh(a)
    lead = vectors[:, -1]
    signs = np.where(lead < 0, -1.0, 1.0)
    return signs * (1.0 if signs[0] > 0 else -1.0)
