"""The one orchestration of the stages: evidence for a set of models (fingerprints, activations, neuron tests), the
statistics over it, and a case run into a signed dossier. The case, the bench, the panel build and the calibration
all call these functions; none merges signals or reads a model by other means.

    sources → roles → signals → stats → evidence → report          (docs/architecture.md)

What is expensive is cached in a `Store`: fingerprints under a key of the files' identity (size, mtime, ctime,
inode: any write changes ctime, which user space cannot set back), activation passes and neuron tests under the
SHA-256 of the files they read, the settings and the tool version. Every entry carries an HMAC under a key of this
installation, so an entry edited by hand is discarded and recomputed, and the run says so.

A case's outputs are written into a staging folder beside the final one and moved into place only when the signed
dossier exists, so `out/CASE/` never holds a partial or unsigned result.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import importlib.util
import json
import secrets
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from forensics import __version__, settings
from forensics.errors import ForensicsError
from forensics.evidence.atomic import atomic_write_bytes, check_output, exclusive_write_bytes, staged_directory
from forensics.progress import byte_progress, err, step_progress
from forensics.results import CaseResults

STORE_KEY_NAME = "cache-hmac.key"


def digest(obj) -> str:
    """A content key: SHA-256 of the canonical JSON of `obj`."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class Store:
    """A cache of JSON values under (kind, key), authenticated with an HMAC under this installation's key."""

    def __init__(self, root: Path, key_dir: Path | None = None):
        self.root = Path(root)
        self._key_path = (key_dir or settings.key_dir()) / STORE_KEY_NAME
        self._secret: bytes | None = None

    def _key(self) -> bytes:
        if self._secret is None:
            if not self._key_path.exists():
                self._key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                exclusive_write_bytes(self._key_path, secrets.token_bytes(32).hex().encode(), mode=0o600)
            try:
                self._secret = bytes.fromhex(self._key_path.read_text().strip())
            except (OSError, ValueError) as e:
                raise ForensicsError(self._key_path, f"cannot read the cache key: {e}") from e
        return self._secret

    def _mac(self, kind: str, key: str, body: bytes) -> str:
        return hmac.new(self._key(), f"{kind}/{key}\n".encode() + body, hashlib.sha256).hexdigest()

    def get(self, kind: str, key: str) -> dict | None:
        path = self.root / kind / f"{key}.json"
        try:
            raw = path.read_bytes()
        except OSError:
            return None
        mac, _, body = raw.partition(b"\n")
        if not hmac.compare_digest(mac.decode(errors="replace"), self._mac(kind, key, body)):
            err.print(f"[yellow]cache entry {path} failed its authentication check (edited or written by another "
                      f"installation): discarded, recomputing[/]", highlight=False, soft_wrap=True)
            path.unlink(missing_ok=True)
            return None
        return json.loads(body)

    def put(self, kind: str, key: str, value: dict) -> None:
        body = json.dumps(value, sort_keys=True).encode()
        atomic_write_bytes(self.root / kind / f"{key}.json", self._mac(kind, key, body).encode() + b"\n" + body)


# -- evidence of one model ------------------------------------------------------------------------------------------

def file_key(fp: dict) -> list:
    """The files a fingerprint read, by content: what activation and neuron caches are keyed by."""
    return sorted((f["path"], f["sha256"]) for f in fp["model"]["files"])


def identity(path: Path) -> list:
    """The model's files by identity (path below the model, size, mtime, ctime, inode), every regular file of its
    directory tree. Any write changes ctime, which user space cannot set back: the same identity before and after a
    pass means no byte changed while it ran."""
    path = Path(path)
    files = [(path.name, path)] if path.is_file() else sorted(
        (str(f.relative_to(path)), f) for f in path.rglob("*") if f.is_file())
    return [[name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino] for name, f in files for st in [f.stat()]]


def _stat_key(path: Path, device: str, ident: list | None = None) -> str:
    return digest([str(path.resolve()), identity(path) if ident is None else ident, __version__, device,
                   code_digest(FINGERPRINT_CODE)])


def unchanged(path: Path, fp: dict, what: str) -> None:
    """Every file the fingerprint lists must have the identity it had before the fingerprint pass (and the look-ups
    before it) read it."""
    then = (fp.get("run") or {}).get("identity")
    if then is None:
        raise ValueError("internal: a fingerprint without its files' identity (made outside pipeline.fingerprint)")
    then, now = {f[0]: f for f in then}, {f[0]: f for f in identity(Path(path))}
    for f in fp["model"]["files"]:
        if then.get(f["path"]) != now.get(f["path"]):
            raise ForensicsError(Path(path) / f["path"] if Path(path).is_dir() else Path(path),
                                 f"changed during the analysis: its size, modification or status-change time is "
                                 f"not what it was before the fingerprint pass hashed it (checked around {what})")


def fingerprint(path: Path, device: str, label: str, store: Store | None = None, show_progress: bool = True,
                collectors: Callable | None = None, since: list | None = None) -> dict:
    """The model's weight fingerprint (forensics.fingerprint), with a byte progress bar; cached while no file of the
    model changed. With `collectors` (see fingerprint_model), the pass is run whatever the cache holds, since they
    need the tensors. `since`: the files' identity when the analysis of this model began (before its look-ups), else
    now; the pass's files must still have it when the pass ends."""
    from forensics.fingerprint import fingerprint_model

    path = Path(path)
    before = identity(path) if since is None else since
    key = _stat_key(path, device, before) if store else None
    if store and collectors is None and (cached := store.get("fingerprints", key)) is not None:
        err.print(f"[dim]fingerprint of {label}: cached (no file changed)[/]")
        return cached
    with byte_progress(show_progress) as bar:
        task = bar.add_task(label, total=None)
        fp = fingerprint_model(path, device=device, collectors=collectors,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
    fp["run"]["identity"] = before
    unchanged(path, fp, "the fingerprint pass")
    if store:
        store.put("fingerprints", key, fp)
    return fp


def activations(path: Path, fp: dict, corpus, plan: dict, device: str, store: Store | None = None,
                show_progress: bool = True, ran: Callable[[dict], None] | None = None) -> dict:
    """The activation signals of the model whose fingerprint is `fp`. The forward pass reads the weights through
    transformers, not hashed again: the files must keep the identity they had when the fingerprint pass hashed them,
    before and after it (`unchanged`), so the activations describe the same bytes as the weights."""
    from forensics.signals.activations import activation_signals, streams

    # `auto` resolved here, so the cache holds what was run (a streamed pass batches windows differently).
    plan = {**plan, "stream": "always" if streams(path, plan.get("stream", "auto"), device) else "never"}
    key = digest([file_key(fp), corpus.sha256, plan, device, __version__, code_digest(ACTIVATION_CODE)])
    if store and (cached := store.get("activations", key)) is not None:
        err.print(f"[dim]activations of {Path(path).name}: cached[/]")
        return cached
    unchanged(path, fp, "the activation pass")
    signals = activation_signals(path, corpus, device=device, show_progress=show_progress, **plan)
    unchanged(path, fp, "the activation pass")
    if ran:
        ran(signals)  # told only when the pass ran (its reads are transformers': counted as the files it loads)
    if store:
        store.put("activations", key, signals)
    return signals


def same_bytes(fp: dict, files: list[dict], what: str) -> None:
    """Every file a later pass read must hash as it did in the fingerprint pass."""
    recorded = {f["path"]: f["sha256"] for f in fp["model"]["files"]}
    for f in files:
        if recorded.get(f["path"], f["sha256"]) != f["sha256"]:
            root = Path(fp["model"]["path"])
            raise ForensicsError(root / f["path"] if root.is_dir() else root,
                                 f"changed during the analysis: SHA-256 {f['sha256']} when {what} read it, "
                                 f"{recorded[f['path']]} in the fingerprint pass")


def with_signals(fp: dict, signals: dict) -> dict:
    """The fingerprint with more signals (activations) beside its own."""
    return {**fp, "signals": {**fp["signals"], **signals}}


def keep_signals(fp: dict, wanted: tuple[str, ...]) -> dict:
    return {**fp, "signals": {k: v for k, v in fp["signals"].items() if k in wanted}}


# -- neuron matching --------------------------------------------------------------------------------------------------

@dataclass
class PairPlan:
    """A neuron pair's first steps (forensics/stats/neurons.py has the procedure), taken from look-ups before either
    model's pass: the widths, the shared tokens and the alignment their embedding rows give, and the seeded sample
    of the suspect's coordinates the sketches keep. `result` is set once the test is decided not to apply; `fit` is
    None until an alignment is accepted (the weights' profiles are tried after the passes, from what they read)."""

    suspect: Path
    candidate: Path
    suspect_width: int
    tokens: dict = field(default_factory=dict)
    tried: list = field(default_factory=list)
    fit: object | None = None  # stats.residual.Fit
    dims: np.ndarray | None = None
    result: dict | None = None
    looked_up: dict = field(default_factory=dict)  # file -> bytes the candidate's look-ups read

    def suspect_projection(self) -> np.ndarray:
        return np.eye(self.suspect_width)[:, self.dims]

    def candidate_projection(self) -> np.ndarray:
        return self.fit.matrix[:, self.dims]

    @property
    def weights_route(self) -> bool:
        from forensics.stats.residual import WEIGHTS_PERMUTATION

        return self.fit is not None and self.fit.how == WEIGHTS_PERMUTATION


def plan_pairs(suspect: Path, candidates: dict[str, Path], s) -> tuple[dict[str, PairPlan], dict[str, int]]:
    """Look-ups of the suspect and each candidate (headers, vocabularies, the shared tokens' embedding rows, the
    suspect's read once for every pair) and each pair's alignment through the shared tokens: the plans, and the
    bytes the suspect's look-up read per file (each candidate's are in its plan)."""
    from forensics.signals.neurons import hidden_size, read_embedding_rows
    from forensics.sources.vocabulary import shared_tokens, vocabulary
    from forensics.stats.neurons import unavailable
    from forensics.seeds import rng_for

    suspect = Path(suspect)
    width = hidden_size(suspect)
    dims = np.sort(rng_for(s.seed, "dims").choice(width, min(s.dims, width), replace=False))
    va, sa = vocabulary(suspect)
    plans, shared = {}, {}
    for name, candidate in candidates.items():
        plans[name] = plan = PairPlan(suspect, Path(candidate), width, dims=dims)
        other = hidden_size(plan.candidate)
        if not width or not other:
            plan.result = unavailable(f"the {'suspect' if not width else 'candidate'}'s hidden size is unknown (no "
                                      f"hidden_size in its config or metadata): its residual stream cannot be "
                                      f"sampled")
            continue
        if width > other:
            plan.result = unavailable(_wider(width, other))
            continue
        vb, sb = vocabulary(plan.candidate)
        pairs = np.asarray(shared_tokens(va, vb, sa, sb))
        if len(pairs):
            plan.tokens = {"shared_tokens": len(pairs)}
            if len(pairs) > s.tokens:
                pairs = pairs[np.sort(rng_for(s.seed, "tokens").choice(len(pairs), s.tokens, replace=False))]
            plan.tokens["tokens_used"] = int(len(pairs))
            shared[name] = pairs
    rows, looked = _suspect_rows(suspect, {name: pairs[:, 0] for name, pairs in shared.items()})
    for name, pairs in shared.items():
        plan = plans[name]
        ec, plan.looked_up = read_embedding_rows(plan.candidate, pairs[:, 1])
        plan.fit, plan.result = _by_tokens(rows[name], ec, s, plan.tried)
    return plans, looked


def _suspect_rows(suspect: Path, wanted: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The suspect's embedding rows each pair needs (name -> token ids), from one look-up of all of them, and the
    bytes it read per file."""
    from forensics.signals.neurons import read_embedding_rows

    ids = np.unique(np.concatenate(list(wanted.values()))) if wanted else np.zeros(0, np.int64)
    if not len(ids):
        return {name: None for name in wanted}, {}
    rows, looked = read_embedding_rows(suspect, ids)
    return {name: rows[np.searchsorted(ids, want)] for name, want in wanted.items()}, looked


def weights_alignment(plan: PairPlan, profiles: tuple, s) -> None:
    """The alignment through the attention weights' profiles, for a pair the shared tokens did not align: sets the
    plan's fit, or its result when none is accepted."""
    plan.fit, plan.result = _by_weights(*profiles, s, plan.tried, plan.tokens)


def neuron_test(suspect: Path, candidate: Path, neuron_settings=None,
                progress: Callable[[int], None] | None = None) -> dict:
    """Neuron matching of one pair, each step in a read of its own (a case takes the sketches from the fingerprint
    passes instead, `gather`): the residual streams are aligned (forensics/stats/residual.py: through shared tokens,
    else through the attention weights), one pass per model reads its FFN sketches on the aligned directions (a
    seeded sample of the suspect's coordinates), the statistics match them."""
    from forensics.signals.neurons import read_gains, read_profile, read_sketch
    from forensics.stats.neurons import NeuronSettings

    s = neuron_settings or NeuronSettings()
    plan = plan_pairs(suspect, {"candidate": candidate}, s)[0]["candidate"]
    if plan.result is None and plan.fit is None:
        weights_alignment(plan, (read_profile(plan.suspect), read_profile(plan.candidate)), s)
    if plan.result is not None:
        return plan.result
    sus = read_sketch(plan.suspect, plan.suspect_projection(), readers=True)
    cand = read_sketch(plan.candidate, plan.candidate_projection(), readers=plan.weights_route,
                       gains=None if plan.fit.signed_permutation else read_gains(plan.candidate)[0])
    return _matched(sus, cand, plan.fit, plan.tried, s, progress, plan.tokens, len(plan.dims))


def neuron_test_record(suspect: Path, record, neuron_settings, progress: Callable[[int], None] | None = None) -> dict:
    """Neuron matching of the suspect against a registry's record of a reference (signals.neurons.Record): the same
    alignment as `neuron_test`, but the sketch is on the reference's stored coordinates, and the suspect is read on
    the directions the alignment maps them to. The reference's weights are not read."""
    return record_tests(suspect, {"reference": record}, neuron_settings, lambda name: progress)["reference"]


def record_tests(suspect: Path, records: dict, neuron_settings,
                 progress: Callable[[str], Callable[[int], None] | None] = lambda name: None,
                 count: Callable[[str, dict], None] = lambda kind, per_file: None) -> dict[str, dict]:
    """`neuron_test_record` of the suspect against every record of `records` (name -> Record), the suspect read once
    for all: its look-ups (vocabulary, the embedding rows every record's tokens need, the profile and gains when one
    needs them) first, then one pass collecting the sketch each record's alignment asks for."""
    from forensics.signals.neurons import hidden_size, read_gains, read_profile, read_sketches, selection
    from forensics.sources.vocabulary import spellings, vocabulary
    from forensics.stats import residual
    from forensics.stats.neurons import unavailable

    s = neuron_settings
    suspect = Path(suspect)
    width = hidden_size(suspect)
    vocab, spelling = vocabulary(suspect)
    index = spellings(vocab, spelling) if vocab else {}
    results, shared = {}, {}
    for name, record in records.items():
        if record.sketch.hidden_size < width:
            results[name] = unavailable(_wider(width, record.sketch.hidden_size))
            continue
        shared[name] = np.array([(index[t], i) for i, t in enumerate(record.texts) if t in index],
                                dtype=np.int64).reshape(-1, 2)
    rows, looked = _suspect_rows(suspect, {name: pairs[:, 0] for name, pairs in shared.items()})
    count("look-up", looked)

    def suspect_gains() -> dict:
        found, looked = read_gains(suspect)
        count("look-up", looked)
        return found

    profile, gains = functools.cache(lambda: read_profile(suspect)), functools.cache(suspect_gains)
    planned = {}
    for name, pairs in shared.items():
        record = records[name]
        tokens, tried, fit, refused = {}, [], None, None
        if len(pairs):
            tokens = {"shared_tokens": len(pairs), "tokens_used": len(pairs)}
            fit, refused = _by_tokens(rows[name], record.rows[pairs[:, 1]], s, tried)
        if fit is None and refused is None:
            fit, refused = _by_weights(profile(), record.profile, s, tried, tokens)
        if refused:
            results[name] = refused
            continue
        onto = fit.matrix[record.dims, :]  # (kept reference coordinates, suspect width): each one's suspect direction
        cand = record.sketch
        if fit.signed_permutation:
            # A narrower suspect holds only some of the kept coordinates: the sketch keeps those.
            mapped = np.flatnonzero(np.abs(onto).sum(axis=1) > 0)
            if len(mapped) < 8:
                results[name] = unavailable(f"only {len(mapped)} of the reference's {len(record.dims)} sketched "
                                            f"coordinates are in the suspect's residual stream; neuron matching "
                                            f"needs 8")
                continue
            onto, cand = onto[mapped], cand.columns(mapped) if len(mapped) < len(record.dims) else cand
        projection = onto.T
        spec = (projection, gains() if selection(projection) is None else None,
                fit.how == residual.WEIGHTS_PERMUTATION)
        planned[name] = (fit, tried, tokens, cand, spec)
    if planned:
        sketches = read_sketches(suspect, [spec for *_, spec in planned.values()])
        count("again", {f["path"]: f["size"] for f in sketches[0].files})
        for (name, (fit, tried, tokens, cand, spec)), sus in zip(planned.items(), sketches):
            results[name] = _matched(sus, cand, fit, tried, s, progress(name), tokens, spec[0].shape[1],
                                     sign_suspect=True)
    return {name: results[name] for name in records}


def _by_tokens(es: np.ndarray, ec: np.ndarray, s, tried: list[dict]) -> tuple:
    """(accepted fit or None, None), or (None, the unavailable result) when the embeddings cannot be aligned so."""
    from forensics.stats import residual
    from forensics.stats.neurons import unavailable
    from forensics.seeds import rng_for

    if es.shape[1] > ec.shape[1]:
        return None, unavailable(f"the suspect's embedding is wider than the candidate's ({es.shape[1]} vs "
                                 f"{ec.shape[1]})")
    fits = residual.by_tokens(es, ec, rng_for(s.seed, "chance", "tokens"))
    tried += [f.as_dict() for f in fits]
    return residual.choose_token_fit(fits), None


def _by_weights(ps, pc, s, tried: list[dict], tokens: dict) -> tuple:
    """(accepted fit, None) from the two models' profiles, or (None, the unavailable result saying why no map of
    either kind was accepted)."""
    from forensics.stats import residual
    from forensics.stats.neurons import unavailable
    from forensics.seeds import rng_for

    keys = sorted(set(ps.features) & set(pc.features))
    ms, mc = ps.matrix(keys) if keys else None, pc.matrix(keys) if keys else None
    if keys and ms.shape[0] > mc.shape[0]:
        return None, unavailable(_wider(ms.shape[0], mc.shape[0]))
    if ps.num_layers == pc.num_layers and len(keys) >= 8:
        weights = residual.by_profiles(ms, mc, np.array([layer for _, layer in keys]),
                                       rng_for(s.seed, "chance", "weights"))
        tried.append(weights.as_dict())
        if weights.accepted:
            return weights, None
    return None, {**unavailable(_no_alignment(tried, tokens.get("shared_tokens", 0))),
                  "alignment": {"how": None, **tokens, "tried": tried}}


def _matched(sus, cand, fit, tried: list[dict], s, progress, tokens: dict, dims: int, sign_suspect: bool = False) -> dict:
    """Steps 3-5 on two sketches in one basis, the weights alignment's coordinate signs set first (on whichever side
    was read through the map), and the alignment described."""
    from forensics.stats import residual
    from forensics.stats.neurons import match_test, unavailable

    weights_route = fit.how == residual.WEIGHTS_PERMUTATION
    if weights_route:
        keys = sorted(set(sus.readers) & set(cand.readers))
        if not keys:
            return unavailable("the weights alignment found no q, k or v matrices in both models to set the "
                               "coordinates' signs from")
        signs = residual.gram_signs([sus.readers[k] for k in keys], [cand.readers[k] for k in keys])
        for parts in (sus if sign_suspect else cand).units.values():
            for which in parts:
                parts[which] = parts[which] * signs.astype(np.float32)
    result = match_test(sus, cand, s, progress, both_signs=weights_route)
    result["alignment"] = {"how": fit.how, **tokens, "quality": fit.quality, "z": min(fit.z, 1e9),
                           "suspect_width": int(fit.matrix.shape[1]), "candidate_width": int(fit.matrix.shape[0]),
                           "dims": int(dims), "tried": tried}
    result["inputs"] = {"suspect": sus.files, "candidate": cand.files}
    return result


def _wider(suspect: int, candidate: int) -> str:
    return (f"the suspect's residual stream is wider than the candidate's ({suspect} vs {candidate}); a narrower "
            f"suspect is matched into a subset of the candidate's coordinates, not the other way round (swap the two "
            f"to test that direction)")


# The modules whose code a cached value depends on: an entry is reused only by the code that made it (the version
# alone does not change with every commit, and a fingerprint of older code differs in its last bits).
READING = ("forensics.sources", "forensics.sources.base", "forensics.sources.dtypes", "forensics.sources.safetensors",
           "forensics.sources.hf", "forensics.sources.gguf", "forensics.sources.onnx", "forensics.sources.e5s1",
           "forensics.roles")
FINGERPRINT_CODE = READING + ("forensics.fingerprint", "forensics.signals.weights", "forensics.signals.attention")
ACTIVATION_CODE = READING + ("forensics.signals.activations", "forensics.corpus")
NEURON_CODE = FINGERPRINT_CODE + ("forensics.signals.neurons", "forensics.stats.neurons", "forensics.stats.residual",
                                  "forensics.sources.vocabulary", __name__)


@functools.cache
def code_digest(modules: tuple[str, ...]) -> str:
    """SHA-256 of the named modules' source files (found, not imported: a cache key must not cost onnx's import)."""
    h = hashlib.sha256()
    for name in modules:
        h.update(name.encode() + b"\0" + Path(importlib.util.find_spec(name).origin).read_bytes())
    return h.hexdigest()


def neuron_code() -> str:
    """The digest of the code that computes a neuron test (reading, sketching, aligning, matching)."""
    return code_digest(NEURON_CODE)


def _no_alignment(tried: list[dict], shared: int) -> str:
    from forensics.stats.residual import MIN_QUALITY, WEIGHTS_PERMUTATION

    if not shared:
        tokens = "the two vocabularies share no token (or a model ships no tokenizer)"
    else:
        best = max((t for t in tried if t["how"] != WEIGHTS_PERMUTATION), key=lambda t: t["excess"])
        tokens = (f"through the {shared} shared tokens the best map ({best['how']}, quality {best['quality']:.2f} "
                  f"against {best['chance_mean']:.2f} by chance) goes {best['excess']:.2f} of the way from chance to "
                  f"a perfect map; acceptance needs {MIN_QUALITY}")
    weights = next((t for t in tried if t["how"] == WEIGHTS_PERMUTATION), None)
    if weights is None:
        profile = "the attention weights' per-coordinate profiles cannot be compared (different depths, or too few " \
                  "attention matrices)"
    else:
        profile = f"the attention weights' per-coordinate profiles go {weights['excess']:.2f} of the way " \
                  f"(quality {weights['quality']:.2f} against {weights['chance_mean']:.2f})"
    return (f"no near-exact alignment of the two residual streams: {tokens}; {profile}. Neuron matching does not "
            f"apply; a failed alignment is not absence of evidence")


def neurons(suspect: Path, candidate: Path, fps: tuple[dict, dict], neuron_settings,
            store: Store | None = None) -> dict:
    """`neuron_test` with a progress bar, cached by both models' file hashes; the bytes it read are checked against
    the fingerprint pass."""
    result = _with_progress(store, _neuron_key(fps, neuron_settings), Path(candidate).name,
                            neuron_settings.permutations,
                            lambda advance: neuron_test(suspect, candidate, neuron_settings, progress=advance))
    same_inputs(result, fps)
    return result


def _neuron_key(fps: tuple[dict, dict], neuron_settings) -> str:
    return digest([[file_key(fp) for fp in fps], asdict(neuron_settings), __version__, neuron_code()])


def _with_progress(store: Store | None, key: str, label: str, total: int, run: Callable) -> dict:
    """A neuron test from the cache, or run with a progress bar and cached."""
    if store and (cached := store.get("neurons", key)) is not None:
        err.print(f"[dim]neuron matching against {label}: cached[/]")
        return cached
    with step_progress() as bar:
        result = run(_matching_bars(bar, total)(label))
    if store:
        store.put("neurons", key, result)
    return result


def _matching_bars(bar, total: int) -> Callable[[str], Callable[[int], None]]:
    """label -> the progress callback of its neuron matching; a bar appears once matching starts (not for a pair the
    test does not apply to)."""
    tasks: dict[str, object] = {}

    def of(label: str) -> Callable[[int], None]:
        def advance(done: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(f"neuron matching vs {label}", total=total)
            bar.update(tasks[label], completed=done)
        return advance
    return of


def same_inputs(result: dict, fps: tuple[dict, dict]) -> None:
    """Neuron matching read both models again: what it read must be the fingerprinted evidence."""
    for side, fp in zip(("suspect", "candidate"), fps):
        same_bytes(fp, (result.get("inputs") or {}).get(side, []), "neuron matching")


# -- a set of models ------------------------------------------------------------------------------------------------

@dataclass
class ActivationPlan:
    corpus: object  # forensics.corpus.Corpus
    settings: dict  # batch_size, seq_len, num_batches, seed
    device: str


@dataclass
class Evidence:
    """Everything read from a set of models: fingerprints (activation signals merged in), neuron tests, and the
    bytes read of every file, by kind of read."""

    fingerprints: dict[str, dict]
    windows: dict[str, dict] = field(default_factory=dict)  # per model: the token windows its activations used
    neurons: dict[str, dict] = field(default_factory=dict)  # per candidate: its neuron test against the suspect
    reads: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # model -> file -> kind -> bytes




def add_reads(reads: dict, name: str, kind: str, per_file: dict[str, int]) -> None:
    """Count bytes read of model `name`'s files (file -> bytes) as `kind` (evidence.manifest.READ_KINDS)."""
    from forensics.evidence.manifest import READ_KINDS

    for f, n in per_file.items():
        reads.setdefault(name, {}).setdefault(f, dict.fromkeys(READ_KINDS, 0))[kind] += n


def gather(models: dict[str, Path], device: str, store: Store | None = None, plan: ActivationPlan | None = None,
           neuron_pairs: list[tuple[str, str]] = (), neuron_settings=None, show_progress: bool = True) -> Evidence:
    """Fingerprints of `models` (name -> path), their activation signals when `plan` says how, and the neuron test
    of each (suspect, candidate) pair named, each model read once: the pairs are aligned from look-ups first, and the
    fingerprint pass of each model collects its neuron sketches and profile beside its weight signals. Only a pair
    aligned through the weights' profiles (known after the passes) reads its candidate again, for the sketch."""
    from forensics.signals.neurons import Layout, ProfileCollector, SketchCollector, read_gains, read_sketch

    reads: dict[str, dict[str, dict[str, int]]] = {name: {} for name in models}
    count = functools.partial(add_reads, reads)

    since = {name: identity(Path(path)) for name, path in models.items()}  # before any look-up
    cached = {name: store.get("fingerprints", _stat_key(Path(path), device, since[name])) if store else None
              for name, path in models.items()}
    tests, todo = {}, {}
    for sus, cand in neuron_pairs:
        hit = None
        if store and cached[sus] and cached[cand]:
            hit = store.get("neurons", _neuron_key((cached[sus], cached[cand]), neuron_settings))
        if hit is not None:
            err.print(f"[dim]neuron matching against {cand}: cached[/]")
            tests[cand] = hit
        else:
            todo.setdefault(sus, {})[cand] = models[cand]
    plans = {}
    for sus, candidates in todo.items():
        made_plans, looked = plan_pairs(models[sus], candidates, neuron_settings)
        count(sus, "look-up", looked)
        for cand, p in made_plans.items():
            plans[(sus, cand)] = p
            count(cand, "look-up", p.looked_up)

    # What each model's pass collects for the pairs still to test: name -> {"sketch"/"profile": make(layout)}.
    wanted: dict[str, dict[str, Callable]] = {}
    for (sus, cand), p in plans.items():
        if p.result is not None:
            continue
        wanted.setdefault(sus, {}).setdefault("sketch", lambda layout, p=p: SketchCollector(
            layout, p.suspect_projection(), readers=True))  # the same for every pair: one seeded sample
        if p.fit is None:
            for name in (sus, cand):
                wanted.setdefault(name, {})["profile"] = ProfileCollector
        else:
            gains = None
            if not p.fit.signed_permutation:
                gains, looked = read_gains(p.candidate)
                count(cand, "look-up", looked)
            wanted.setdefault(cand, {})["sketch"] = lambda layout, p=p, g=gains: SketchCollector(
                layout, p.candidate_projection(), gains=g)
    made: dict[str, dict[str, object]] = {}

    def collectors(name: str, path: Path):
        def make(info):
            layout = Layout(Path(path), info)
            made[name] = {what: build(layout) for what, build in wanted[name].items()}
            return list(made[name].values())
        return make if name in wanted else None

    fps = {}
    for name, path in models.items():
        if cached[name] is not None and name not in wanted:
            fps[name] = cached[name]
            continue
        fps[name] = fingerprint(path, device, name, store, show_progress, collectors(name, path), since[name])
        count(name, "pass", fps[name]["run"].get("bytes_read_per_file", {}))

    for (sus, cand), p in plans.items():
        def run(advance, sus=sus, cand=cand, p=p):
            if p.result is None and p.fit is None:
                weights_alignment(p, (made[sus]["profile"].profile(), made[cand]["profile"].profile()),
                                  neuron_settings)
            if p.result is not None:
                return p.result
            sus_files, cand_files = fps[sus]["model"]["files"], fps[cand]["model"]["files"]
            sketch = made[sus]["sketch"].sketch(sus_files)
            if "sketch" in made.get(cand, {}):
                other = made[cand]["sketch"].sketch(cand_files)
            else:
                other = read_sketch(p.candidate, p.candidate_projection(), readers=True,
                                    gains=None if p.fit.signed_permutation else made[cand]["profile"].gains)
                count(cand, "again", {f["path"]: f["size"] for f in other.files})
            return _matched(sketch, other, p.fit, p.tried, neuron_settings, advance, p.tokens, len(p.dims))

        tests[cand] = _with_progress(store, _neuron_key((fps[sus], fps[cand]), neuron_settings), cand,
                                     neuron_settings.permutations, run)
        same_inputs(tests[cand], (fps[sus], fps[cand]))

    windows = {}
    if plan is not None:
        for name, path in models.items():
            def ran(signals: dict, name: str = name) -> None:
                if not signals["act_norm"].get("unavailable"):  # a model transformers could not run read no weights
                    count(name, "activations", {f["path"]: f["size"] for f in fps[name]["model"]["files"]})

            acts = activations(path, fps[name], plan.corpus, plan.settings, plan.device, store, show_progress, ran)
            fps[name] = with_signals(fps[name], acts)
            windows[name] = acts["act_norm"].get("windows") or {"unavailable": acts["act_norm"].get("unavailable")}
    return Evidence(fps, windows, tests, reads)


def compare(suspect: dict, candidates: dict[str, dict], controls: dict[str, dict], panel: list[dict], stats_settings,
            neuron_tests: dict[str, dict] | None = None, null_pairs: list | None = None) -> tuple[CaseResults, bytes]:
    """The statistics over gathered evidence: typed results and the exact bytes of results.json."""
    from forensics.stats.compare import compare_case, to_json

    raw = to_json(compare_case(suspect, candidates, controls, panel, stats_settings, neuron_tests,
                               null_pairs)).encode()
    return CaseResults.from_json(raw), raw


# -- a case ---------------------------------------------------------------------------------------------------------

def statistics_settings(case, calibration: dict | None):
    from forensics.stats.compare import Settings

    s = case.statistics
    return Settings(alpha=s.alpha, n_permutations=s.permutations, n_bootstrap=s.bootstrap,
                    multitest="bh" if s.multitest == "fdr_bh" else s.multitest, seed=s.seed,
                    calibration=calibration)


def missing_models(case) -> list[tuple[object, str]]:
    """(model, problem) for what the case names and is not there: a model's path, a registry, a reference's name."""
    from forensics.evidence.registry import Registry

    out = [(m, "no such file or directory") for m in case.models() if m.path is not None and not m.path.exists()]
    for m in case.candidates:
        if m.registry is None:
            continue
        if not m.registry.is_file():
            out.append((m, f"no registry at {m.registry}"))
            continue
        with Registry(m.registry) as reg:
            if m.reference not in reg.names():
                out.append((m, f"the registry {m.registry} holds no reference named {m.reference!r}"))
    return out


def describe_registry(path: Path, reg=None) -> dict:
    """What a manifest records of a registry read: its path, size, SHA-256 of its contents and its size in
    references (opening it checks its schema); `reg`, when open already, is the state described."""
    from forensics.evidence.registry import Registry

    if reg is None:
        with Registry(path) as reg:
            return describe_registry(path, reg)
    return {"path": str(path), "sha256_of_contents": reg.digest(), "bytes": Path(path).stat().st_size,
            "references": len(reg.names())}


def case_panel(case) -> list[dict]:
    from forensics.reference import load_panel

    panel = case.statistics.panel
    if panel == "none":
        return []
    if isinstance(panel, Path) and panel.is_file():
        from forensics.evidence.registry import Registry

        # A registry: the references every two of which it declares unrelated.
        with Registry(panel) as reg:
            return [e.fp() for e in reg.null_members()]
    return load_panel(None if panel == "default" else panel)


def run_case(case_path: str | Path, out_root: str | Path = "out", device: str = "auto",
             argv: list[str] | None = None) -> Path:
    """Run the case end to end; returns `out_root/CASE_ID`, which holds the signed dossier."""
    from forensics.case import load_case
    from forensics.corpus import load_corpus
    from forensics.evidence.registry import Registry
    from forensics.reference import load_calibration_table
    from forensics.report.signing import SigningConfig, load_signer

    case_path = Path(case_path)
    case, raw_yaml = load_case(case_path)
    on_disk = [m for m in case.models() if m.path is not None]
    from_registry = [m for m in case.candidates if m.registry is not None]
    for m, problem in missing_models(case):
        raise ForensicsError(m.path or m.registry, f"model {m.name!r} of the case: {problem}")
    panel = case.statistics.panel
    registries = sorted({m.registry for m in from_registry} | ({panel} if isinstance(panel, Path) and
                                                                panel.is_file() else set()))
    described = [describe_registry(r) for r in registries]  # each opened and checked before anything is read
    out_root = Path(out_root)
    # Before any model is read: an output that would land in the evidence, an unwritable --out, or a key that cannot
    # sign stops the case now, not after the analysis.
    check_output(out_root / case.id / "dossier.pdf", [m.path for m in on_disk] + registries)
    signing = SigningConfig(**case.signing.model_dump())
    load_signer(signing)
    store = Store(out_root / ".cache")
    wanted = case.wanted_signals()

    plan = corpus_record = None
    if case.activations.enabled and any(s in wanted for s in ("act_norm", "act_norm_std")):
        a = case.activations
        corpus = load_corpus(a.corpus, text_field=a.text_field)
        corpus_record = corpus.describe()
        plan = ActivationPlan(corpus, {"batch_size": a.batch_size, "seq_len": a.seq_len,
                                       "num_batches": a.num_batches, "seed": case.statistics.seed,
                                       "stream": a.stream},
                              a.device if a.device != "auto" else device)
    neuron_settings = case.neurons.settings(case.statistics.seed, case.statistics.alpha)
    pairs = [(case.suspect.name, m.name) for m in case.candidates if m.path is not None] if case.neurons.enabled else []
    evidence = gather({m.name: m.path for m in on_disk}, device, store, plan, pairs, neuron_settings)
    suspect_fp = evidence.fingerprints[case.suspect.name]
    for path in sorted({m.registry for m in from_registry}):
        with Registry(path) as reg:
            entries = {m.name: reg.get(m.reference) for m in from_registry if m.registry == path}
            for name, entry in entries.items():
                evidence.fingerprints[name] = entry.fp()
            if case.neurons.enabled:
                tested = registry_neurons(case.suspect.path, suspect_fp, reg, list(entries.values()),
                                          neuron_settings, store, lambda kind, per_file: add_reads(
                                              evidence.reads, case.suspect.name, kind, per_file))
                evidence.neurons.update({name: tested[entry.name] for name, entry in entries.items()})

    fps = {name: keep_signals(fp, wanted) for name, fp in evidence.fingerprints.items()}
    _, raw_results = compare(fps[case.suspect.name], {m.name: fps[m.name] for m in case.candidates},
                             {m.name: fps[m.name] for m in case.controls}, case_panel(case),
                             statistics_settings(case, load_calibration_table()),
                             evidence.neurons if case.neurons.enabled else None)

    inputs = [{"path": str(r), "kind": "registry"} for r in registries]
    if corpus_record:
        inputs += [{**f, "kind": "corpus"} for f in corpus_record["files"] if Path(f["path"]).is_absolute()]
    disk_fps = {m.name: fps[m.name] for m in on_disk}  # a registry's references are inputs through the registry file
    return publish(out_root / case.id, case.id, raw_results, fps, raw_yaml, case_path, case.model_dump(mode="json"),
                   signing, argv, inputs, corpus=corpus_record, windows=evidence.windows or None,
                   registries=described or None, weights=disk_fps, reads=evidence.reads)


def publish(out_dir: Path, case_id: str, raw_results: bytes, fps: dict[str, dict], raw_yaml: bytes,
            yaml_path: Path, case: dict, signing, argv: list[str] | None, inputs: list, corpus: dict | None = None,
            windows: dict | None = None, registries: list[dict] | None = None, extra: dict[str, bytes] | None = None,
            weights: dict[str, dict] | None = None, reads: dict | None = None) -> Path:
    """results.json, the fingerprints, the manifest and the signed dossier, staged and moved into `out_dir` whole.
    `inputs`: input records beside the weights of `weights` (the models read from disk; default: all of `fps`);
    `reads`: the bytes read of each weight file (Evidence.reads); `extra`: more files to write (name -> bytes)."""
    from forensics.evidence.manifest import build_manifest, fingerprint_inputs
    from forensics.report.dossier import build_dossier

    with staged_directory(out_dir) as staging:
        (staging / "fingerprints").mkdir()
        (staging / "results.json").write_bytes(raw_results)
        for name, data in (extra or {}).items():
            (staging / name).write_bytes(data)
        for name, fp in fps.items():
            (staging / "fingerprints" / f"{_safe(name)}.json").write_text(json.dumps(fp, indent=1, sort_keys=True))
        manifest = build_manifest(case_id=case_id, argv=argv or sys.argv, case_yaml_bytes=raw_yaml,
                                  case_yaml_path=yaml_path, results=raw_results,
                                  inputs=fingerprint_inputs(fps if weights is None else weights, reads) + inputs,
                                  corpus=corpus, token_windows=windows, inputs_base=Path.cwd(), registries=registries)
        build_dossier(raw_results, manifest, raw_yaml, staging, signing, case=case)
    return out_dir


def _safe(name: str) -> str:
    return "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "_" for c in name)


# -- the registry -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reference:
    """A model to put in a registry: where it is, what to call it, what the analyst declares about it."""

    path: Path
    name: str
    declared: object  # evidence.registry.Declared


# What a registry's neuron records sample: the case's defaults of neuron matching (stats/neurons.NeuronSettings).
RECORD_DIMS, RECORD_TOKENS, RECORD_SEED = 64, 8192, 0


def reference_entry(ref: Reference, device: str = "cpu", show_progress: bool = False):
    """The registry entry of one model: its fingerprint (every file read and hashed), canonical, and its neuron
    record (none for a model neuron matching cannot read, e.g. one without FFN matrices or token embedding), the
    record's sketch and profile collected by the fingerprint pass, its token rows by a look-up before it."""
    from forensics.evidence.registry import Entry, canonical
    from forensics.signals.neurons import Layout, ProfileCollector, Record, SketchCollector, record_lookups

    made: dict = {}
    try:
        texts, rows, chosen = record_lookups(ref.path, RECORD_DIMS, RECORD_TOKENS, RECORD_SEED)
    except ForensicsError as e:
        lookups, problem = None, e.problem
    else:
        lookups, problem = (texts, rows, chosen), None

    def collectors(info):
        layout = Layout(Path(ref.path), info)
        made["profile"] = ProfileCollector(layout)
        made["sketch"] = SketchCollector(layout, np.eye(layout.d)[:, lookups[2]], readers=True)
        return [made["profile"], made["sketch"]]

    try:
        fp = fingerprint(ref.path, device, ref.name, show_progress=show_progress,
                         collectors=collectors if lookups else None)
    except ForensicsError as e:
        if not lookups:
            raise
        # A tensor the record's collectors cannot read (or the model itself: then this raises again): the entry is
        # made without a record, as one for a model neuron matching cannot read.
        fp = fingerprint(ref.path, device, ref.name, show_progress=show_progress)
        lookups, problem = None, e.problem
    record = None
    if lookups:
        try:
            sketch = made["sketch"].sketch(fp["model"]["files"])
        except ForensicsError as e:
            problem = e.problem
        else:
            record = Record(texts, rows, made["profile"].profile(), chosen, sketch,
                            {"dims": RECORD_DIMS, "tokens": RECORD_TOKENS, "seed": RECORD_SEED})
    if record is None:
        err.print(f"[yellow]{ref.name}: no neuron record ({problem})[/]", highlight=False, soft_wrap=True)
    return Entry(ref.name, canonical(fp), ref.declared, record.to_bytes() if record else None)


def _ray_entry(ref: Reference):
    """One Ray task: a worker process fingerprints one model; BLAS stays on one thread, since tasks share the cores."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return reference_entry(ref)


def build_entries(refs: list[Reference], engine: str = "local", address: str | None = None,
                  workers: int | None = None, memory_gb: float = 4.0, retries: int = 3) -> list:
    """Registry entries of `refs`, in their order: in this process (`local`), or as Ray tasks, one per model, each
    with `memory_gb` reserved and retried up to `retries` times if its worker dies. The driver alone writes."""
    if engine == "local":
        with step_progress() as bar:
            task = bar.add_task("fingerprinting references", total=len(refs))
            out = []
            for ref in refs:
                out.append(reference_entry(ref))
                bar.advance(task)
        return out
    if engine != "ray":
        raise ForensicsError(None, f"engine must be 'local' or 'ray', not {engine!r}")
    import os

    # Keep the GPUs Ray's tasks see as they are (Ray's coming default; said now, so Ray does not warn about it).
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, num_cpus=None if address else (workers or None), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    try:
        remote = ray.remote(max_retries=retries, num_cpus=1, memory=int(memory_gb * 2**30))(_ray_entry)
        pending = {remote.remote(ref): i for i, ref in enumerate(refs)}
        out: list = [None] * len(refs)
        with step_progress() as bar:
            task = bar.add_task(f"fingerprinting references on Ray ({len(refs)} tasks)", total=len(refs))
            waiting = list(pending)
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                try:
                    out[pending[done[0]]] = ray.get(done[0])
                except ray.exceptions.RayTaskError as e:
                    if isinstance(e.cause, ForensicsError):
                        raise ForensicsError(e.cause.path, e.cause.problem) from None
                    raise ForensicsError(refs[pending[done[0]]].path, f"fingerprinting failed on Ray: "
                                                                      f"{e.cause!r}") from None
                except ray.exceptions.RayError as e:
                    raise ForensicsError(refs[pending[done[0]]].path, f"the Ray task failed after {retries} retries: "
                                                                      f"{e}") from None
                bar.advance(task)
        return out
    finally:
        if started_here:
            ray.shutdown()


SCAN_FULL = 20  # references a scan puts through the full verdict rule, the best-screened first
SCAN_NULL = 500  # declared-unrelated pairs of the registry in a scan's null, at most (a seeded sample beyond)


def registry_neurons(suspect: Path, suspect_fp: dict, reg, entries: list, neuron_settings, store: Store | None,
                     count: Callable[[str, dict], None] = lambda kind, per_file: None) -> dict[str, dict]:
    """`record_tests` of the suspect against registry entries' records (the suspect read once for all of them), with
    a progress bar each, cached per entry by the suspect's file hashes and the record's SHA-256; what it read of the
    suspect is checked against its fingerprint."""
    from forensics.signals.neurons import Record
    from forensics.stats.neurons import unavailable

    results, keys, records = {}, {}, {}
    for entry in entries:
        if entry.record_sha256 is None:
            results[entry.name] = unavailable("the registry holds no neuron record of this reference")
            continue
        keys[entry.name] = digest([file_key(suspect_fp), entry.record_sha256, asdict(neuron_settings), __version__,
                                   neuron_code()])
        if store and (cached := store.get("neurons", keys[entry.name])) is not None:
            err.print(f"[dim]neuron matching against {entry.name}: cached[/]")
            results[entry.name] = cached
        else:
            records[entry.name] = Record.from_bytes(reg.neuron_record(entry.name), entry.name)
    if records:
        with step_progress() as bar:
            fresh = record_tests(suspect, records, neuron_settings, _matching_bars(bar, neuron_settings.permutations),
                                 count)
        for name, result in fresh.items():
            if store:
                store.put("neurons", keys[name], result)
            results[name] = result
    for result in results.values():
        same_bytes(suspect_fp, (result.get("inputs") or {}).get("suspect", []), "neuron matching")
    return {e.name: results[e.name] for e in entries}


def scan_permutations(references: int, alpha: float, method: str, at_least: int) -> int:
    """T of a scan's neuron tests: the least T >= `at_least`, T + 1 a multiple of 100, whose floor 1/(T+1) can be
    significant after the adjustment over every reference scanned (Holm: references / (T+1) < alpha), at most the
    case's limit (a larger registry leaves the route unable to reach alpha, and says so)."""
    from forensics.case import MAX_NEURON_PERMUTATIONS
    from forensics.stats.multitest import best_adjusted

    t = max(at_least, 99)
    while (best_adjusted(1 / (t + 1), references, method) >= alpha or (t + 1) % 100) and t < MAX_NEURON_PERMUTATIONS:
        t += 1
    return min(t, MAX_NEURON_PERMUTATIONS)


def scan(suspect: Path, registry_path: Path, stats_settings, device: str = "auto", store: Store | None = None,
         neuron_permutations: int | None = None, full: int = SCAN_FULL,
         null_limit: int = SCAN_NULL) -> tuple[CaseResults, bytes, list[dict], dict, dict]:
    """The suspect against every reference of a registry, in two passes (docs/registry.md):

    1. a screen of all references at once (stats/screen.py), against the registry's declared-unrelated pairs;
    2. the full verdict rule on the `full` best-screened ones: one comparison with each of them a candidate,
       neuron matching against their stored records (their weights are not read), the same unrelated pairs as the
       null, and every screened-out reference counted at p = 1 in the adjustments, so the family is every reference.

    Returns the typed results of pass 2, their bytes, every reference ranked (pass 2's by the evidence, then the
    rest by the screen), what was scanned (the registry's hash and size) and the suspect's fingerprint."""
    from dataclasses import replace

    from forensics.evidence.registry import Registry
    from forensics.stats.neurons import NeuronSettings
    from forensics.stats.screen import screen

    suspect = Path(suspect)
    fp = fingerprint(suspect, device, suspect.name, store)
    with Registry(registry_path) as reg:
        # One read transaction: every entry, record and the contents hash come from one state of the registry (a
        # writer waits until the scan is done).
        reg.db.execute("BEGIN")
        entries = reg.entries()
        if not entries:
            raise ForensicsError(registry_path, "the registry holds no reference to scan against")
        names = [e.name for e in entries]
        fps = {e.name: e.fp() for e in entries}
        pairs = reg.unrelated_sample(null_limit, stats_settings.seed)
        screened = screen(fp, [fps[n] for n in names], [(fps[a], fps[b]) for a, b in pairs])
        order = screened.order(names)
        chosen = [names[i] for i in order[:max(full, 1)]]
        permutations = neuron_permutations or scan_permutations(len(entries), stats_settings.alpha,
                                                                stats_settings.multitest, NeuronSettings.permutations)
        s = NeuronSettings(permutations=permutations, seed=stats_settings.seed, alpha=stats_settings.alpha)
        scanned = {**describe_registry(registry_path, reg), "fully_compared": len(chosen),
                   "null_pairs": len(pairs), "neuron_permutations": permutations}
        by_name = {e.name: e for e in entries}
        tests = registry_neurons(suspect, fp, reg, [by_name[name] for name in chosen], s, store)
    settings = replace(stats_settings, untested=len(entries) - len(chosen))
    null = [(a, fps[a], b, fps[b]) for a, b in pairs]
    results, raw = compare(fp, {n: fps[n] for n in chosen}, {}, [], settings, tests, null)
    screen_of = {n: {"statistic": float(screened.statistic[i]) if np.isfinite(screened.statistic[i]) else None,
                     "r": float(screened.r[i]) if np.isfinite(screened.r[i]) else None,
                     "pvalue": float(screened.pvalue[i])} for i, n in enumerate(names)}
    ranking = [{**row, "screen": screen_of[row["reference"]]} for row in rank(results)]
    ranking += [{"rank": len(ranking) + k + 1, "reference": names[i], "verdict": "NOT COMPARED",
                 "decided_by": None, "pvalue_adjusted": None, "smallest_route_pvalue": None, "error_rate": None,
                 "screen": screen_of[names[i]]} for k, i in enumerate(order[len(chosen):])]
    return results, raw, ranking, scanned, fp


def run_scan(suspect: Path, registry_path: Path, out_dir: Path | None, stats_settings, analyst: str,
             signing=None, device: str = "auto", store: Store | None = None, neuron_permutations: int | None = None,
             top: int | None = None, full: int = SCAN_FULL, argv: list[str] | None = None) -> dict:
    """`scan`, and with `out_dir` its signed dossier: the scan written as the case it amounts to (scan.yaml: the
    suspect, the fully compared references as candidates taken from the registry, the registry as the panel), the
    ranking (scan.json), results.json, and a manifest that records the registry's file, size and SHA-256 of its
    contents. Every setting is checked before anything is read. Returns the ranking document."""
    import yaml

    from forensics.evidence.registry import Registry
    from forensics.report.signing import SigningConfig, load_signer
    from forensics.stats.neurons import NeuronSettings

    suspect, registry_path = Path(suspect), Path(registry_path)
    signing = signing or {}
    with Registry(registry_path) as reg:
        names = reg.names()
    if not names:
        raise ForensicsError(registry_path, "the registry holds no reference to scan against")
    permutations = neuron_permutations or scan_permutations(len(names), stats_settings.alpha,
                                                            stats_settings.multitest, NeuronSettings.permutations)
    case = scan_case(suspect, registry_path, names[:1], stats_settings, analyst, signing, permutations)
    if out_dir is not None:
        check_output(Path(out_dir) / "dossier.pdf", [suspect, registry_path])
        load_signer(SigningConfig(**signing))
    results, raw, ranking, scanned, fp = scan(suspect, registry_path, stats_settings, device, store, permutations,
                                              full)
    doc = {"schema": "llm-forensics.scan/1", "suspect": str(suspect), "registry": scanned,
           "alpha": stats_settings.alpha, "multitest": results.multitest.model_dump(mode="json"),
           "null_pairs": results.null.n_pairs, "ranking": ranking[:top] if top else ranking}
    if out_dir is None:
        return doc
    case = scan_case(suspect, registry_path, sorted(results.candidates), stats_settings, analyst, signing,
                     permutations)
    raw_yaml = (f"# Written by `forensics scan` ({scanned['references']} references screened, these "
                f"{scanned['fully_compared']} compared in full). Run as a case, its null is the registry's set of "
                f"mutually unrelated references rather than the scan's sample of unrelated pairs, and the "
                f"screened-out references are not counted in its adjustment.\n").encode() + yaml.safe_dump(
        case.model_dump(mode="json", exclude_defaults=True), sort_keys=False, allow_unicode=True).encode()
    described = [{k: scanned[k] for k in ("path", "sha256_of_contents", "bytes", "references")}]
    publish(Path(out_dir), case.id, raw, {case.suspect.name: fp}, raw_yaml, Path(out_dir) / "scan.yaml",
            case.model_dump(mode="json"), SigningConfig(**signing), argv,
            [{"path": str(registry_path), "kind": "registry"}], registries=described,
            extra={"scan.yaml": raw_yaml, "scan.json": (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()})
    return doc


def scan_case(suspect: Path, registry_path: Path, references: list[str], stats_settings, analyst: str,
              signing: dict, permutations: int):
    """The case a scan amounts to, validated as a case file is (a bad setting stops the scan before it reads)."""
    from pydantic import ValidationError

    from forensics.case import Case

    try:
        return Case(
            id=f"scan-{_safe(suspect.name)}", title=f"Scan of {suspect.name} against the registry "
            f"{registry_path.name}", analyst=analyst,
            suspect={"name": f"suspect: {suspect.name}", "path": suspect.resolve()},  # a reference may share its name
            candidates=[{"name": n, "registry": registry_path.resolve(), "reference": n} for n in references],
            statistics={"permutations": stats_settings.n_permutations, "bootstrap": stats_settings.n_bootstrap,
                        "alpha": stats_settings.alpha, "seed": stats_settings.seed,
                        "multitest": "fdr_bh" if stats_settings.multitest == "bh" else "holm",
                        "panel": registry_path.resolve()},
            neurons={"permutations": permutations}, activations={"enabled": False}, signing=signing)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ForensicsError(None, f"invalid scan settings: {problems}") from None


def rank(results: CaseResults) -> list[dict]:
    """Candidates ordered by the verdict (DERIVED first), then by the deciding or smallest route p, then by name."""
    order = {"DERIVED": 0, "INCONCLUSIVE": 1, "NO EVIDENCE": 2}
    rows = []
    for name, c in results.candidates.items():
        v = c.verdict
        ps = [r.pvalue for r in v.routes.values() if r.pvalue is not None]
        rows.append({"reference": name, "verdict": v.verdict, "decided_by": v.route,
                     "pvalue_adjusted": v.pvalue_adjusted, "smallest_route_pvalue": min(ps) if ps else None,
                     "error_rate": v.error_rate})
    rows.sort(key=lambda r: (order.get(r["verdict"], 3), 1.0 if r["pvalue_adjusted"] is None else r["pvalue_adjusted"],
                             1.0 if r["smallest_route_pvalue"] is None else r["smallest_route_pvalue"], r["reference"]))
    return [{"rank": i + 1, **r} for i, r in enumerate(rows)]
