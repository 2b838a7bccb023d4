"""Error types: every user-facing failure is a FedTextSegError whose message names the file and the problem."""

from __future__ import annotations

from pathlib import Path


class FedTextSegError(Exception):
    """Base class of errors meant for the user (the CLI prints them without a traceback)."""


class SiteError(FedTextSegError):
    """A problem with one file of a site: ``path`` names the file, ``problem`` says what is wrong."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):  # picklable across DataLoader workers and Ray processes
        return (type(self), (self.path, self.problem))


class ConfigError(FedTextSegError):
    """A configuration that cannot work, with what to change."""


class PatchSizeError(ConfigError):
    """A training / sliding-window patch the network's downsampling cannot take."""


class BudgetExhaustedError(FedTextSegError):
    """A privacy budget that the next step would exceed."""
