"""What engines and the checkpoint bookkeeping share about reading and writing training state."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the path and the reason."""
