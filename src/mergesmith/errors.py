"""One error hierarchy: every user-facing failure is a MergesmithError with a readable message."""

from __future__ import annotations


class MergesmithError(Exception):
    """Base of every error mergesmith reports to a user (the CLI prints it and exits 2)."""


class ConfigError(MergesmithError):
    """A merge configuration is invalid; carries every problem found, not just the first."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            text = f"Invalid merge configuration{where}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            text = f"Invalid merge configuration{where} ({len(self.problems)} problems):\n{lines}"
        super().__init__(text)


class ModelError(MergesmithError):
    """An input model cannot be found, read or understood."""


class PlanError(MergesmithError):
    """The inputs do not fit together for the requested merge (names, shapes, layer counts)."""


class OutputError(MergesmithError):
    """The output directory cannot be written as asked."""


class MethodError(MergesmithError):
    """A merge method was registered or called incorrectly."""
