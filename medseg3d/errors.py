"""The project's own exceptions. The CLI turns every `MedsegError` into one readable message and exit 2."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One problem found in the user's data: which case, which file, what is wrong, how to fix it."""

    case: str | None
    file: str | None
    what: str
    fix: str

    def format(self) -> str:
        where = []
        if self.case:
            where.append(f"case {self.case}")
        if self.file:
            where.append(f"file {self.file}")
        prefix = f"[{', '.join(where)}] " if where else ""
        return f"{prefix}{self.what}. Fix: {self.fix}"


class MedsegError(Exception):
    """Base class of every error medseg3d reports to the user."""


class DatasetError(MedsegError):
    """The dataset on disk is malformed; carries every problem found, not just the first."""

    def __init__(self, message: str, problems: list[Problem] | None = None) -> None:
        self.problems = list(problems or [])
        super().__init__(message)

    def __str__(self) -> str:
        head = super().__str__()
        if not self.problems:
            return head
        lines = [f"{head} ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):"]
        lines += [f"  - {p.format()}" for p in self.problems]
        return "\n".join(lines)


class PlanError(MedsegError):
    """plans.json is missing, of an unknown schema, or does not match the data or checkpoint."""


class CheckpointError(MedsegError):
    """A checkpoint is missing, truncated, corrupt, or was trained with another plan."""


class InputError(MedsegError):
    """An input given on the command line (file, folder, option value) cannot be used."""


class OutputExistsError(MedsegError):
    """An output already exists and the user did not ask to overwrite it."""


class ConfigError(MedsegError):
    """An option or configuration name is invalid (names the valid choices)."""
