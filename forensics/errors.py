"""The one error type the tool reports to a user: which file, what is wrong with it."""

from __future__ import annotations

from pathlib import Path


class ForensicsError(Exception):
    """A problem with an input that the analyst must fix; the CLI prints it and exits non-zero."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self):
        # Rebuilt from its two fields, so it crosses process boundaries (a Ray task's error reaches the driver whole).
        return type(self), (self.path, self.problem)
