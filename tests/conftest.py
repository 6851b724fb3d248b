"""Fixtures more than one test module uses."""

from __future__ import annotations

import pytest

from forensics.corpus import load_corpus
from tests.test_case_run import family
from tests.test_corpus import byte_bpe


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny lineage of tests/test_case_run.py: a parent, its noised child and three unrelated models."""
    root = tmp_path_factory.mktemp("case-models")
    tok = byte_bpe(load_corpus(show_progress=False).texts[:30])
    parent = family(root / "parent", tok, seed=1)
    family(root / "child", tok, seed=2, parent=parent, noise=0.02)
    for i, seed in enumerate((11, 12, 13)):
        family(root / f"unrelated{i}", tok, seed=seed)
    return root
