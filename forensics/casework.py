"""`forensics case run`: fingerprints → activations → statistics → signed dossier, for one case file.

Everything is written into a staging folder beside the final one and moved into place only when the signed dossier
exists, so `out/CASE/` never holds a partial or unsigned result. Fingerprints and activation passes are cached under
`out/.cache/` (see `FingerprintCache`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from forensics import __version__
from forensics.case import Case, load_case
from forensics.errors import ForensicsError
from forensics.progress import byte_progress, err, step_progress


class FingerprintCache:
    """Reuses a model's fingerprint while none of its files changed.

    The key is each file's size, mtime, ctime and inode: any write to a file changes its ctime, which user space
    cannot set back, so a changed input is always recomputed. The cached fingerprint carries the SHA-256 computed
    when the bytes were read; `forensics verify --inputs` re-hashes them against the dossier at any time.
    Activation passes are keyed by those hashes, the corpus, the settings and the device.
    """

    def __init__(self, root: Path):
        self.root = root

    def _stat_key(self, path: Path, device: str) -> str:
        files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file())
        sig = []
        for f in files:
            st = f.stat()
            sig.append([f.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
        return _digest([str(path.resolve()), sig, __version__, device])

    def _get(self, kind: str, key: str) -> dict | None:
        f = self.root / kind / f"{key}.json"
        try:
            return json.loads(f.read_text())
        except (OSError, ValueError):
            return None

    def _put(self, kind: str, key: str, value: dict) -> None:
        folder = self.root / kind
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(value, sort_keys=True))
        os.replace(tmp, folder / f"{key}.json")

    def weights(self, path: Path, device: str, label: str) -> dict:
        from forensics.fingerprint import fingerprint_model

        key = self._stat_key(path, device)
        cached = self._get("fingerprints", key)
        if cached is not None:
            err.print(f"[dim]fingerprint of {label}: cached (no file changed)[/]")
            return cached
        with byte_progress() as bar:
            task = bar.add_task(label, total=None)
            fp = fingerprint_model(path, device=device,
                                   progress=lambda done, total: bar.update(task, completed=done, total=total))
        self._put("fingerprints", key, fp)
        return fp

    def activations(self, path: Path, fp: dict, corpus, settings: dict, device: str) -> dict:
        from forensics.signals.activations import activation_signals

        key = _digest([sorted((f["path"], f["sha256"]) for f in fp["model"]["files"]), corpus.sha256, settings,
                       device, __version__])
        cached = self._get("activations", key)
        if cached is not None:
            err.print(f"[dim]activations of {path.name}: cached[/]")
            return cached
        signals = activation_signals(path, corpus, device=device, **settings)
        self._put("activations", key, signals)
        return signals


    def neurons(self, suspect: Path, candidate: Path, fps: tuple[dict, dict], settings) -> dict:
        from dataclasses import asdict

        from forensics.stats.neurons import neuron_test

        key = _digest([[sorted((f["path"], f["sha256"]) for f in fp["model"]["files"]) for fp in fps],
                       asdict(settings), __version__])
        cached = self._get("neurons", key)
        if cached is not None:
            err.print(f"[dim]neuron matching against {candidate.name}: cached[/]")
            same_inputs(cached, fps)
            return cached
        widths = [(fp.get("model") or {}).get("hidden_size") for fp in fps]
        with step_progress() as bar:
            tasks = []  # the bar appears once matching starts (not for a pair the test does not apply to)

            def advance(done: int) -> None:
                if not tasks:
                    tasks.append(bar.add_task(f"neuron matching vs {candidate.name}", total=settings.permutations))
                bar.update(tasks[0], completed=done)

            result = neuron_test(suspect, candidate, settings, *widths, progress=advance)
        self._put("neurons", key, result)
        same_inputs(result, fps)
        return result


def same_inputs(result: dict, fps: tuple[dict, dict]) -> None:
    """Neuron matching read the models again: every file it read must hash as it did in the fingerprint pass."""
    for side, fp in zip(("suspect", "candidate"), fps):
        recorded = {f["path"]: f["sha256"] for f in fp["model"]["files"]}
        for f in (result.get("inputs") or {}).get(side, []):
            if recorded.get(f["path"], f["sha256"]) != f["sha256"]:
                root = Path(fp["model"]["path"])
                raise ForensicsError(root / f["path"] if root.is_dir() else root,
                                     f"changed during the analysis: SHA-256 {f['sha256']} when neuron matching read "
                                     f"it, {recorded[f['path']]} in the fingerprint pass")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _statistics_settings(case: Case):
    from forensics.stats.calibration import load_table
    from forensics.stats.compare import Settings

    s = case.statistics
    return Settings(alpha=s.alpha, n_permutations=s.permutations, n_bootstrap=s.bootstrap,
                    multitest="bh" if s.multitest == "fdr_bh" else s.multitest, seed=s.seed,
                    calibration=load_table())


def _panel(case: Case) -> list[dict]:
    from forensics.stats.panel import load_panel

    panel = case.statistics.panel
    if panel == "none":
        return []
    return load_panel(None if panel == "default" else panel)


def _keep_signals(fp: dict, wanted: tuple[str, ...]) -> dict:
    return {**fp, "signals": {k: v for k, v in fp["signals"].items() if k in wanted}}


def run_case(case_path: str | Path, out_root: str | Path = "out", device: str = "auto",
             argv: list[str] | None = None) -> Path:
    """Run the case end to end; returns `out_root/CASE_ID`, which holds the signed dossier."""
    from forensics.corpus import load_corpus
    from forensics.evidence.manifest import build_manifest, fingerprint_inputs
    from forensics.report.dossier import build_dossier
    from forensics.report.signing import SigningConfig
    from forensics.stats.compare import compare_case, to_json

    case_path = Path(case_path)
    case, raw_yaml = load_case(case_path)
    for m in case.models():
        if not m.path.exists():
            raise ForensicsError(m.path, f"model {m.name!r} of the case: no such file or directory")
    out_root = Path(out_root)
    cache = FingerprintCache(out_root / ".cache")

    fingerprints = {m.name: cache.weights(m.path, device, m.name) for m in case.models()}

    corpus_record, windows = None, {}
    if case.activations.enabled and any(s in case.wanted_signals() for s in ("act_norm", "act_norm_std")):
        a = case.activations
        corpus = load_corpus(a.corpus, text_field=a.text_field)
        corpus_record = corpus.describe()
        settings = {"batch_size": a.batch_size, "seq_len": a.seq_len, "num_batches": a.num_batches,
                    "seed": case.statistics.seed}
        for m in case.models():
            signals = cache.activations(m.path, fingerprints[m.name], corpus, settings,
                                        a.device if a.device != "auto" else device)
            fingerprints[m.name] = {**fingerprints[m.name],
                                    "signals": {**fingerprints[m.name]["signals"], **signals}}
            windows[m.name] = signals["act_norm"].get("windows") or {"unavailable": signals["act_norm"].get("reason")}

    neurons = None
    if case.neurons.enabled:
        settings = case.neurons.settings(case.statistics.seed)
        suspect = case.suspect
        neurons = {m.name: cache.neurons(suspect.path, m.path, (fingerprints[suspect.name], fingerprints[m.name]),
                                         settings) for m in case.candidates}

    wanted = case.wanted_signals()
    fps = {name: _keep_signals(fp, wanted) for name, fp in fingerprints.items()}
    results = compare_case(fps[case.suspect.name], {m.name: fps[m.name] for m in case.candidates},
                           {m.name: fps[m.name] for m in case.controls}, _panel(case), _statistics_settings(case),
                           neurons)
    raw_results = to_json(results).encode()

    staging = out_root / f".{case.id}.partial-{os.getpid()}"
    final = out_root / case.id
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "fingerprints").mkdir(parents=True)
        (staging / "results.json").write_bytes(raw_results)
        for name, fp in fps.items():
            (staging / "fingerprints" / f"{_safe(name)}.json").write_text(json.dumps(fp, indent=1, sort_keys=True))
        inputs = fingerprint_inputs(fps)
        if corpus_record:
            inputs += [{**f, "kind": "corpus"} for f in corpus_record["files"] if Path(f["path"]).is_absolute()]
        manifest = build_manifest(case_id=case.id, argv=argv or sys.argv, case_yaml_bytes=raw_yaml,
                                  case_yaml_path=case_path, results=raw_results, inputs=inputs,
                                  corpus=corpus_record, token_windows=windows or None, inputs_base=Path.cwd())
        build_dossier(raw_results, manifest, raw_yaml, staging, SigningConfig(**case.signing.model_dump()),
                      case=case.model_dump(mode="json"))
        old = out_root / f".{case.id}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
