"""The typed results (forensics/results.py): the published JSON Schema is theirs, and they describe results.json
exactly (reading a results file and writing it back gives the same bytes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forensics.results import CaseResults, json_schema
from forensics.stats.compare import to_json

ROOT = Path(__file__).resolve().parents[1]


def test_published_schema_is_generated_from_the_types():
    published = json.loads((ROOT / "docs" / "results.schema.json").read_text())
    assert published == json_schema(), "regenerate: python -m forensics.results > docs/results.schema.json"


def test_results_round_trip_byte_for_byte(tmp_path):
    from tests.test_report import synthetic_case

    raw = synthetic_case(tmp_path)["results"]
    typed = CaseResults.from_json(raw)
    assert to_json(typed.as_json()).encode() == raw
    base = typed.candidates["base-7b"]
    assert base.verdict.verdict == "DERIVED" and base.signals["qkvo"].is_aggregate
    assert base.signals["attn_norm"].status == "flat" and not base.signals["attn_norm"].compared


def test_unknown_field_is_refused():
    with pytest.raises(ValueError, match="Extra inputs"):
        CaseResults.model_validate({"schema": "llm-forensics.stats/2", "surprise": 1})
