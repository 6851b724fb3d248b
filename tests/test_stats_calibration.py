"""The small calibration run (the CI design of `make calibrate`): real tiny models, trained, fingerprinted and
compared end to end. The full design runs in `make calibrate` only."""

from __future__ import annotations

import json

import pytest
from scipy import stats

from forensics.lab.calibrate import SMALL, UNTRAINED, main, markdown, run


@pytest.fixture(scope="module")
def table():
    return run(SMALL, workers=2)


def test_small_calibration_holds_its_false_positive_rate(table):
    pairs = SMALL.bases * (SMALL.bases - 1) // 2
    for test in ("rule", "permutation"):
        for alpha in ("0.01", "0.05"):
            entry = table[test][alpha]
            assert entry["n"] == pairs
            # Tolerant: fails only if the false positives are far more than alpha allows.
            assert stats.binomtest(entry["hits"], entry["n"], float(alpha), alternative="greater").pvalue > 0.001


def test_small_calibration_neuron_route_applies_to_derived_pairs_only(table):
    """No unrelated pair, same width or not, has the near-exact alignment neuron matching needs; every child has,
    the rotated, width-pruned and vocab-replaced ones included, and each is at the route's floor."""
    for group in ("unrelated", "unrelated_widths"):
        assert table["routes"][group]["neurons"]["applies"]["hits"] == 0
    assert table["rule_widths"]["0.05"]["hits"] == 0 and table["rule_widths"]["0.05"]["n"] == SMALL.bases
    for transform in ("rotated", "width-pruned", "vocab-replaced", "noised", "pruned"):
        neurons = table["routes"][transform]["neurons"]
        assert neurons["applies"]["rate"] == 1.0 and neurons["0.05"]["rate"] == 1.0, transform
    assert set(table["alignment"]["rotated"]) == {"tokens, orthogonal"}
    assert set(table["alignment"]["vocab-replaced"]) == {"weights, signed permutation"}


def test_small_calibration_finds_the_untrained_children(table):
    for transform in UNTRAINED:
        entry = table["tpr"][transform]["0.05"]
        assert entry["n"] == SMALL.bases
        assert entry["hits"] >= SMALL.bases - 1, transform
    assert table["auroc"]["combined_p"] > 0.9


def test_small_calibration_report(table):
    text = markdown(table)
    for heading in ("False-positive rate", "True-positive rate per transform", "AUROC", "p-values under the null"):
        assert heading in text
    assert sum(table["histogram"]["primary_permutation"]) == table["permutation"]["0.05"]["n"]


def test_small_calibration_report_renders_again_from_its_table(table, tmp_path):
    """--render rewrites the report from the JSON file alone, byte for byte as the run wrote it, with the pooled
    row over every unrelated pair."""
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    assert main(["--render", str(path), "--markdown", str(tmp_path / "report.md")]) == 0
    text = (tmp_path / "report.md").read_text()
    assert text == markdown(table)
    pooled = table["rule"]["0.01"]["n"] + table["rule_widths"]["0.01"]["n"]
    hits = table["rule"]["0.01"]["hits"] + table["rule_widths"]["0.01"]["hits"]
    assert f"| verdict rule (DERIVED), every unrelated pair | {hits / pooled:.3f} ({hits}/{pooled}; " in text
