"""Configuration problems that name file, document, object and field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong (or doubtful) with an input.

    ``file`` is the path as given; ``document`` the 1-based index of the YAML document
    in a multi-document file (None for the agent file); ``obj`` names the object,
    e.g. ``Device default/meter-1``; ``field`` is a dotted path with list indices,
    e.g. ``spec.properties[2].visitors.configData.offset``.
    """

    file: str
    document: int | None
    obj: str | None
    field: str
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        where = self.file
        if self.document is not None:
            where += f" document {self.document}"
        if self.obj:
            where += f" ({self.obj})"
        field = f" {self.field}:" if self.field else ""
        return f"{self.severity}: {where}:{field} {self.message}"


class ConfigError(Exception):
    """Raised when an input is invalid; carries every problem found, not just the first.

    Nothing of an input that raised this is applied.
    """

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
