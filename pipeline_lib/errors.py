"""The errors every stage raises for bad input, each naming the file and column (no stage imports upward for them)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Problem:
    file: str
    column: str
    issue: str
    count: int = 0
    example: object = None

    def __str__(self) -> str:
        ex = "" if self.example is None else f" (e.g. {self.example!r})"
        cnt = f" [{self.count} rows]" if self.count else ""
        return f"{self.file}: column '{self.column}': {self.issue}{cnt}{ex}"


class DataValidationError(ValueError):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n  - ".join(str(p) for p in problems)
        super().__init__(f"raw data failed validation ({len(problems)} problem(s)):\n  - {lines}")


class OutputPathError(OSError):
    """A folder the run writes (runs_dir, the model repository) cannot be written: raised at run start,
    before any work, naming the config key, the path and why."""
