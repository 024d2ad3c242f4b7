"""Checkpoint format, commit, discovery, retention and the CheckpointManager."""

from harness.checkpoint.manager import CheckpointManager, RestoreResult

__all__ = ["CheckpointManager", "RestoreResult"]
