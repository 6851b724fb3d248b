"""Case files (`cases/NAME.yaml`): what to compare, how, and how to sign — validated before anything runs.

Relative paths in a case file are relative to the case file itself. Secrets never live in the YAML: a signing
passphrase comes from an environment variable or a file named here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from forensics import roles
from forensics.errors import ForensicsError
from forensics.signals.attention import SIGNALS as ATTENTION_SIGNALS
from forensics.stats.neurons import NeuronSettings

WEIGHT_SIGNALS = roles.COMPARED
ACTIVATION_SIGNALS = ("act_norm", "act_norm_std")
SIGNALS = WEIGHT_SIGNALS + ATTENTION_SIGNALS + ACTIVATION_SIGNALS


# Upper bounds of every count, far above any useful setting and below one that would exhaust memory or run for days:
# a typo (an extra zero or three) is refused by its field and line instead of starting such a run.
MAX_PERMUTATIONS = 10 ** 6  # p floor 1e-6
MAX_BOOTSTRAP = 10 ** 5
MAX_NEURON_PERMUTATIONS = 10 ** 4  # each redoes every unit's assignment problems
MAX_NEURONS = 1024
MAX_DIMS = 65536  # wider than any model's residual stream (the sketches keep at most its width)
MAX_TOKENS = 10 ** 6  # more than any vocabulary holds
MAX_BATCH_SIZE = 1024
MAX_SEQ_LEN = 131072
MAX_NUM_BATCHES = 10 ** 5


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(Strict):
    name: str = Field(min_length=1, description="display name used throughout the dossier")
    path: Path | None = Field(None, description="model directory or single .gguf / .onnx file")
    registry: Path | None = Field(None, description="instead of a path, for a candidate: a registry holding the "
                                                    "model, whose stored fingerprint and neuron record are used")
    reference: str | None = Field(None, description="the model's name in that registry")
    claimed_origin: str | None = Field(None, description="what its publisher says it is derived from, if anything")
    notes: str | None = None

    @model_validator(mode="after")
    def one_source(self):
        if (self.path is None) == (self.registry is None):
            raise ValueError("give the model's path, or a registry and the reference's name in it")
        if (self.registry is None) != (self.reference is None):
            raise ValueError("registry and reference go together")
        return self


class Party(Strict):
    role: str
    name: str


class Activations(Strict):
    enabled: bool = True
    corpus: Path | None = Field(None, description="a local .txt/.jsonl/.jsonl.zst/.parquet; default: embedded corpus")
    text_field: str = "text"
    # Unset sizes take the device's defaults: the original's 8 x 1024 x 1000 on a GPU, 4 x 256 x 8 on a CPU.
    batch_size: int | None = Field(None, ge=1, le=MAX_BATCH_SIZE)
    seq_len: int | None = Field(None, ge=8, le=MAX_SEQ_LEN)
    num_batches: int | None = Field(None, ge=1, le=MAX_NUM_BATCHES)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    stream: Literal["auto", "always", "never"] = Field(
        "auto", description="read one block at a time from the checkpoint (safetensors), for models larger than "
                            "memory; auto: when the model would take more than half the memory available")


class Statistics(Strict):
    permutations: int = Field(9999, ge=99, le=MAX_PERMUTATIONS)
    bootstrap: int = Field(2000, ge=100, le=MAX_BOOTSTRAP)
    alpha: float = Field(0.01, gt=0, lt=0.5)
    seed: int = 20251126
    multitest: Literal["holm", "fdr_bh"] = "holm"
    panel: Literal["default", "none"] | Path = "default"


class Neurons(Strict):
    """Neuron matching (forensics/stats/neurons.py): run for every candidate of the suspect's hidden width."""

    enabled: bool = True
    permutations: int = Field(NeuronSettings.permutations, ge=19, le=MAX_NEURON_PERMUTATIONS,
                              description="T of the exact test; its p cannot go below 1/(T+1)")
    neurons: int = Field(NeuronSettings.neurons, ge=2, le=MAX_NEURONS,
                         description="suspect neurons drawn per layer, split evenly over its FFN units (dense FFN, "
                                     "experts, shared expert), at least min(4, neurons) from each")
    dims: int = Field(NeuronSettings.dims, ge=8, le=MAX_DIMS,
                      description="residual dimensions kept in the neuron sketches")
    tokens: int = Field(NeuronSettings.tokens, ge=16, le=MAX_TOKENS,
                        description="shared tokens used to align the residual streams, at most")

    def settings(self, seed: int, alpha: float) -> NeuronSettings:
        return NeuronSettings(permutations=self.permutations, neurons=self.neurons, dims=self.dims,
                              tokens=self.tokens, seed=seed, alpha=alpha)


class Signing(Strict):
    pkcs12: Path | None = None
    key: Path | None = None
    certificate: Path | None = None
    passphrase_env: str | None = Field(None, description="name of the environment variable holding the passphrase "
                                                         "(or a PKCS#11 token's PIN)")
    passphrase_file: Path | None = None
    pkcs11_module: Path | None = Field(None, description="PKCS#11 library of the token or HSM holding the key")
    pkcs11_token: str | None = Field(None, description="the token's label")
    pkcs11_key: str | None = Field(None, description="label of the key and its certificate on the token")
    tsa_url: str | None = Field(None, pattern=r"^https?://", description="RFC 3161 timestamp authority")

    @model_validator(mode="after")
    def one_kind_of_key(self):
        if sum(map(bool, (self.pkcs12, self.key or self.certificate, self.pkcs11_module))) > 1:
            raise ValueError("give one kind of key: pkcs12, key + certificate, or pkcs11_module")
        if self.pkcs11_module and not (self.pkcs11_token and self.pkcs11_key):
            raise ValueError("pkcs11_module needs pkcs11_token and pkcs11_key")
        if bool(self.key) != bool(self.certificate):
            raise ValueError("key and certificate go together")
        if self.passphrase_env and self.passphrase_file:
            raise ValueError("give passphrase_env or passphrase_file, not both")
        return self


class Case(Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="case identifier, used in output paths")
    title: str
    analyst: str
    organisation: str | None = None
    parties: list[Party] = []
    suspect: ModelRef
    candidates: list[ModelRef] = Field(min_length=1)
    controls: list[ModelRef] = []
    signals: Literal["all"] | list[str] = "all"
    activations: Activations = Activations()
    statistics: Statistics = Statistics()
    neurons: Neurons = Neurons()
    signing: Signing = Signing()

    @field_validator("signals")
    @classmethod
    def known_signals(cls, v):
        if isinstance(v, list):
            unknown = [s for s in v if s not in SIGNALS]
            if unknown:
                raise ValueError(f"unknown signal(s) {unknown}; known: {', '.join(SIGNALS)}")
            if not v:
                raise ValueError("empty list: name at least one signal, or 'all'")
        return v

    @model_validator(mode="after")
    def files_where_read(self):
        if self.suspect.path is None or any(m.path is None for m in self.controls):
            raise ValueError("the suspect and the controls are read from their files (give their path); only a "
                             "candidate may come from a registry")
        return self

    @model_validator(mode="after")
    def distinct_names(self):
        names = [m.name for m in self.models()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be distinct; repeated: {dupes}")
        return self

    def models(self) -> list[ModelRef]:
        return [self.suspect, *self.candidates, *self.controls]

    def wanted_signals(self) -> tuple[str, ...]:
        return SIGNALS if self.signals == "all" else tuple(self.signals)


def _line_of(node: yaml.Node, loc: tuple) -> int | None:
    """The YAML line of the field a validation error points at (the deepest node found on its path)."""
    line = node.start_mark.line + 1
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == key), None)
            if match is None:
                match = next((k for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            match = node.value[key]
        else:
            match = None
        if match is None:
            break
        node, line = match, match.start_mark.line + 1
    return line


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key, first: yaml.Node, second: yaml.Node):
        self.key, self.first_line, self.second_line = key, first.start_mark.line + 1, second.start_mark.line + 1
        super().__init__(f"duplicate key {key!r}")


class _CaseLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping, at any depth. Plain YAML keeps the last one
    silently, so a second `suspect:` further down would replace the first without a word."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # merge keys (<<) may be overridden, by design; unhashable keys are refused by SafeLoader
            key = self.construct_object(key_node)
            if key in seen:
                raise DuplicateKeyError(key, seen[key], key_node)
            seen[key] = key_node
        return super().construct_mapping(node, deep)


def load_case(path: str | Path) -> tuple[Case, bytes]:
    """Parse and validate a case file; returns the case (paths made absolute) and its exact bytes."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ForensicsError(path, f"cannot read case file: {e.strerror}") from e
    try:
        loader = _CaseLoader(raw.decode("utf-8"))
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except DuplicateKeyError as e:
        raise ForensicsError(path, f"line {e.second_line}: duplicate key {e.key!r} (first given at line "
                                   f"{e.first_line}); a key may appear only once in a mapping") from e
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise ForensicsError(path, f"not valid YAML: {e}") from e
    if not isinstance(data, dict) or node is None:
        raise ForensicsError(path, "a case file is a YAML mapping (id, title, analyst, suspect, candidates, ...)")
    try:
        case = Case.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"]) or "(top level)"
            problems.append(f"line {_line_of(node, err['loc'])}: {field}: {err['msg']}")
        raise ForensicsError(path, "invalid case file:\n  " + "\n  ".join(problems)) from e
    case = _resolve(case, path.parent.resolve())
    _distinct_models(case, path, node)
    return case, raw


def _distinct_models(case: Case, path: Path, node: yaml.Node) -> None:
    """Refuse a model listed twice (same path once links are resolved), before any model is read: a suspect that is
    also a candidate compares the model with itself, and a control that is a candidate puts a candidate in the null
    of unrelated pairs; either would make the statistics meaningless."""
    listed = [("suspect", ("suspect",), case.suspect)]
    listed += [(f"candidate {i + 1}", ("candidates", i), m) for i, m in enumerate(case.candidates)]
    listed += [(f"control {i + 1}", ("controls", i), m) for i, m in enumerate(case.controls)]
    first: dict[Path, tuple[str, tuple, ModelRef]] = {}
    for role, loc, m in listed:
        real = m.path.resolve() if m.path is not None else Path(f"{m.registry.resolve()}#{m.reference}")
        if real in first:
            role0, loc0, m0 = first[real]
            raise ForensicsError(path, f"line {_line_of(node, loc + ('path',))}: {role} {m.name!r} is the same model "
                                       f"as {role0} {m0.name!r} (line {_line_of(node, loc0 + ('path',))}): both are "
                                       f"{real}; a case compares distinct models")
        first[real] = (role, loc, m)


def _resolve(case: Case, base: Path) -> Case:
    def fix(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else (base / p).resolve())

    def model(m: ModelRef) -> ModelRef:
        return m.model_copy(update={"path": fix(m.path), "registry": fix(m.registry)})

    update = {
        "suspect": model(case.suspect),
        "candidates": [model(m) for m in case.candidates],
        "controls": [model(m) for m in case.controls],
        "activations": case.activations.model_copy(update={"corpus": fix(case.activations.corpus)}),
        "signing": case.signing.model_copy(update={k: fix(getattr(case.signing, k)) for k in
                                                   ("pkcs12", "key", "certificate", "passphrase_file",
                                                    "pkcs11_module")}),
    }
    if isinstance(case.statistics.panel, Path):
        update["statistics"] = case.statistics.model_copy(update={"panel": fix(case.statistics.panel)})
    return case.model_copy(update=update)
