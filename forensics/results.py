"""The typed records that flow between the stages: fingerprints, signal tests, neuron tests, verdicts, the case.

The statistics stage builds results.json as plain JSON (so its bytes are canonical and reproducible); every stage
after it — the pipeline, the report, the bench, the command line — reads it through `CaseResults`, never as a raw
dict with guessed keys. The models forbid unknown fields, so a results file that drifts from this description fails
loudly where it is read. `python -m forensics.results` prints the JSON Schema published as
docs/results.schema.json (a test keeps the two equal).
"""

from __future__ import annotations

import json
import sys
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

VERDICTS = ("DERIVED", "INCONCLUSIVE", "NO EVIDENCE")


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# -- fingerprints ---------------------------------------------------------------------------------------------------

class FileRecord(Record):
    path: str
    size: int
    sha256: str


class ModelRecord(Record):
    path: str
    format: str
    architecture: str
    num_layers: int
    hidden_size: int | None = None
    files: list[FileRecord]


class Signal(BaseModel):
    """One per-layer curve of a fingerprint. Activation signals carry how they were measured (corpus, settings,
    positions, device) beside the values; those fields are described in docs/activations.md."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str
    values: list[float | None] | None = None
    role: str | None = None
    experts: list[list[float | None] | None] | None = None


class Fingerprint(Record):
    fp_schema: str = Field(alias="schema")
    tool: dict[str, str]
    model: ModelRecord
    signals: dict[str, Signal]
    nonfinite: list[dict] = []
    run: dict[str, str | int | float] = {}

    def weight_files(self) -> dict[str, str]:
        return {f.path: f.sha256 for f in self.model.files}


# -- statistics of one signal -------------------------------------------------------------------------------------

class Variation(Record):
    cv: float | None
    threshold: float
    flat: bool


class SideVariation(Record):
    suspect: Variation
    candidate: Variation


class SideLayers(Record):
    suspect: int
    candidate: int


class AlternativeAlignment(Record):
    statistic: float | None
    mapping: list[list[int | float]]  # layer pairs; fractional where interpolation aligned them


class CurveAlignment(Record):
    method: str
    n_aligned: int
    mapping: list[list[int | float]]  # layer pairs; fractional where interpolation aligned them
    alternatives: dict[str, AlternativeAlignment] | None = None


class Rate(Record):
    """A measured error rate: `hits` of `n` pairs, with its 95 % Clopper–Pearson interval."""

    alpha: float
    rate: float | None = None
    hits: int | None = None
    n: int | None = None
    ci95: list[float | None] | None = None
    design: str | None = None


class Permutation(Record):
    statistic: float | None
    pvalue: float
    n_resamples: int
    floor: float
    exact: bool
    block_length: int
    trend_degree: int
    permuted: str
    alternative: str
    null: str
    measured_false_positive_rate: Rate | None = None


class Interval(Record):
    low: float | None
    high: float | None
    level: float
    standard_error: float | None
    n_resamples: int
    block_length: int
    method: str


class EmpiricalNull(Record):
    statistic: float | None
    pvalue: float
    percentile: float | None
    n_null: int
    floor: float
    null_median: float | None
    null_max: float | None
    values: list[float | None]


class Scale(Record):
    ratio_median: float | None
    log_ratio_iqr: float | None


class SignalTest(Record):
    """One signal (or aggregate) of the suspect against one candidate. A signal that was not compared (flat, too
    short) has only its status, the reason and the curves' variation; an aggregate names the roles it averages."""

    status: Literal["compared", "flat", "too_short"]
    signals: list[str] | None = None
    reason: str | None = None
    variation: SideVariation | None = None
    n_layers: SideLayers | None = None
    statistic: float | None = None
    spearman: float | None = None
    alignment: CurveAlignment | None = None
    permutation: Permutation | None = None
    confidence_interval: Interval | None = None
    empirical_null: EmpiricalNull | None = None
    scale: Scale | None = None
    pvalue_adjusted: float | None = None
    roles: list[str] | None = None
    left_out: list[str] | None = None
    role_statistics: dict[str, float | None] | None = None
    definition: str | None = None

    @property
    def compared(self) -> bool:
        return self.status == "compared"

    @property
    def is_aggregate(self) -> bool:
        return self.roles is not None

    def names(self, label: str) -> tuple[str, str]:
        """The signal in the suspect's and in the candidate's fingerprint (they differ for dense against MoE)."""
        return (self.signals[0], self.signals[-1]) if self.signals else (label, label)


# -- neuron matching ------------------------------------------------------------------------------------------------

class Unit(Record):
    layer: int
    kind: str
    expert: int | None = None
    label: str | None = None


class NeuronUnit(Record):
    unit: Unit
    label: str
    statistic: float
    pvalue: float
    matches: Unit
    same_index_fraction: float
    neurons: int | None = None  # drawn from this unit (stats.neurons.unit_neurons); absent before neurons/2


class NeuronLayer(Record):
    layer: int
    statistic: float
    pvalue: float
    units: list[NeuronUnit]


class NeuronSettingsRecord(Record):
    permutations: int
    neurons: int
    dims: int
    tokens: int
    seed: int
    alpha: float | None = None


class AlignmentFit(Record):
    """One residual map tried (stats/residual.py) and how it compares with its chance level."""

    how: str
    quality: float
    chance_mean: float
    chance_sd: float
    chance_max: float
    chance_draws: int
    z: float
    excess: float
    min_quality: float
    accepted: bool


class ResidualAlignment(Record):
    """The map neuron matching used (`how`; None when no map beat chance) and every map tried, in order."""

    how: str | None
    shared_tokens: int | None = None
    tokens_used: int | None = None
    quality: float | None = None
    z: float | None = None
    suspect_width: int | None = None
    candidate_width: int | None = None
    dims: int | None = None
    tried: list[AlignmentFit]


class Fisher(Record):
    statistic: float
    pvalue: float
    df: int


class NullSummaryStats(Record):
    mean: float
    max: float


class NeuronScreen(Record):
    """The screen that orders neuron matching's search: bfloat16 products, native or float32 ones rounded alike."""

    dtype: str
    native: bool
    margin: float


class NeuronInputs(Record):
    suspect: list[FileRecord]
    candidate: list[FileRecord]


class NeuronTest(Record):
    """The exact neuron-matching test of one pair, and (in a case's results) its conclusion."""

    neurons_schema: str = Field(alias="schema")
    status: Literal["compared", "unavailable"]
    reason: str | None = None
    settings: NeuronSettingsRecord | None = None
    parts: list[str] | None = None
    stream_sign: int | None = None
    statistic: float | None = None
    statistic_definition: str | None = None
    pvalue: float | None = None
    n_permutations: int | None = None
    draws: int | None = None
    stopped: bool | None = None
    hits: int | None = None
    screen: NeuronScreen | None = None
    floor: float | None = None
    null: NullSummaryStats | None = None
    fisher: Fisher | None = None
    layers: list[NeuronLayer] | None = None
    alignment: ResidualAlignment | None = None
    inputs: NeuronInputs | None = None
    conclusion: str | None = None
    pvalue_adjusted: float | None = None


# -- per candidate ----------------------------------------------------------------------------------------------------

class RouteResult(Record):
    """One route's part in a verdict (stats/decision.py). The std-curve route also carries its own rule's outcome
    (`conclusion`, the rule of 0.2), neuron matching its own conclusion; neither is a second verdict."""

    role: Literal["decided", "supports", "does not support", "cannot reach alpha", "not applicable"]
    pvalue: float | None
    floor: float | None
    what: str
    components: list[list[list[float]]]  # the route's tests as groups of [p, floor] (stats/decision.py)
    conclusion: str | None = None
    reason: str | None = None
    reasons: list[str] | None = None
    rule: str | None = None
    measured_false_positive_rate: Rate | None = None
    primary_signal: str | None = None
    statistic: float | None = None
    pvalue_permutation: float | None = None
    permutation_floor: float | None = None
    pvalue_empirical: float | None = None
    pvalue_combined: float | None = None
    pvalue_adjusted: float | None = None
    n_null: int | None = None
    min_null_pairs: int | None = None


class Verdict(Record):
    """The one verdict of a candidate: the route that decided it, that route's p (raw and adjusted across the
    candidates), the reasons, the rule, and what is known of its error rate."""

    verdict: Literal["DERIVED", "INCONCLUSIVE", "NO EVIDENCE"]
    route: Literal["neurons", "attention_spectra", "std_curves"] | None
    pvalue: float | None
    pvalue_adjusted: float | None
    reasons: list[str]
    rule: str
    error_rate: str
    measured_false_positive_rate: Rate | None
    routes: dict[str, RouteResult]

    @property
    def std(self) -> RouteResult:
        return self.routes["std_curves"]


class Tamper(Record):
    raised: bool
    roles: list[str]
    checked_roles: list[str]
    invariant_evidence: list[str]
    statement: str | None = None


class Unmatched(Record):
    suspect_only: list[str]
    candidate_only: list[str]


class CandidateResult(Record):
    signals: dict[str, SignalTest]
    unmatched: Unmatched
    verdict: Verdict
    neurons: NeuronTest | None = None
    tamper: Tamper | None = None


# -- the case ---------------------------------------------------------------------------------------------------------

class ModelEntry(Record):
    kind: Literal["suspect", "candidate", "control", "panel"]
    path: str | None
    architecture: str | None
    num_layers: int | None


class Excluded(Record):
    name: str
    reason: str


class NullMembers(Record):
    members: list[str]
    excluded: list[Excluded]
    n_pairs: int


class Multitest(Record):
    method: str
    family: str
    m: int


class Curve(Record):
    layers: list[int]
    raw: list[float | None]
    z: list[float | None] | None
    variation: Variation


class StatsSettings(Record):
    alpha: float
    n_permutations: int
    n_bootstrap: int
    confidence_level: float
    multitest: str
    alignment: str
    flat_cv: float
    min_layers: int
    trend_degree: int
    seed: int
    untested: int = 0  # candidates screened out before the comparison (a scan's), at p = 1 in every adjustment


class CaseResults(Record):
    """results.json: every statistic of a case. The suspect is called "suspect" here; controls and panel models are
    prefixed "control:" and "panel:"."""

    results_schema: Literal["llm-forensics.stats/2"] = Field(alias="schema")
    settings: StatsSettings
    verdict_rule: str
    std_rule: str
    neuron_rule: str | None
    measured_false_positive_rate: Rate | None
    multitest: Multitest
    models: dict[str, ModelEntry]
    null: NullMembers
    curves: dict[str, dict[str, Curve]]
    candidates: dict[str, CandidateResult]

    @model_validator(mode="after")
    def one_suspect_and_known_candidates(self):
        suspects = [name for name, m in self.models.items() if m.kind == "suspect"]
        if len(suspects) != 1:
            raise ValueError(f"results must hold exactly one model of kind 'suspect', found {suspects}")
        unknown = [name for name in self.candidates if name not in self.models]
        if unknown:
            raise ValueError(f"results compare candidate {unknown[0]!r}, which is not among the models")
        return self

    @classmethod
    def from_json(cls, raw: bytes | str) -> CaseResults:
        return cls.model_validate(json.loads(raw))

    def as_json(self) -> dict:
        """The JSON object this was read from (fields absent there stay absent)."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


def json_schema() -> dict:
    return CaseResults.model_json_schema(by_alias=True)


if __name__ == "__main__":
    json.dump(json_schema(), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
