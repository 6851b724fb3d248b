"""Statistics of a case: similarity, permutation test, bootstrap interval, empirical null, verdict.

See docs/statistics.md.
"""

from forensics.stats.calibration import load_table
from forensics.stats.compare import Settings, compare_case, to_json
from forensics.stats.panel import load_panel

__all__ = ["Settings", "compare_case", "load_panel", "load_table", "to_json"]
