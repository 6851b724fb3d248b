"""Statistics of a case: similarity, permutation test, bootstrap interval, empirical null, verdict.

Pure functions of fingerprints and settings: nothing here opens a file or prints (tests/test_architecture.py).
See docs/statistics.md.
"""

from forensics.stats.compare import Settings, compare_case, to_json

__all__ = ["Settings", "compare_case", "to_json"]
