"""Errors of the evaluation programs (bad input exits with code 2, with a message saying what is valid)."""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class EvalInputError(ValueError):
    """Bad input: a path that is not a complete export, an unknown protocol or key, unusable data.

    The message names the file, key or value and what would be valid. ``evals.run`` exits with 2.
    """


class ExportVanishedError(EvalInputError):
    """The export was purged or rewritten while it was being read (the read is discarded)."""
