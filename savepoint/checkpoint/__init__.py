"""Checkpointing: the manager (when and what), state adapters, and the folder with its commit protocol."""

from savepoint.checkpoint.manager import CheckpointManager
from savepoint.checkpoint.storage import CheckpointFolder

__all__ = ["CheckpointFolder", "CheckpointManager"]
