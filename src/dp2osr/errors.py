"""Typed errors of the stages; the CLI maps each to an exit code.

Bad input (an option, a file, a folder) is a ``ValueError`` or ``FileNotFoundError`` naming it: exit code 2,
raised before any work starts. The errors below come after work was done, which is kept.
"""

from __future__ import annotations


class StageError(RuntimeError):
    """A stage could not finish; what it wrote so far is kept (rerun to resume)."""

    exit_code = 1


class PartialFailure(StageError):
    """Some inputs failed (each reported by name); every other output was written."""

    exit_code = 1


class TrainingDiverged(StageError):
    """A non-finite loss or gradient; no checkpoint was written from that state."""

    exit_code = 3
