"""harness: a fault-tolerant distributed training harness for PyTorch."""

from harness._version import __version__  # noqa: F401

from harness.checkpoint.manager import CheckpointManager, RestoreResult  # noqa: E402
from harness.errors import (CheckpointCorruptError, CheckpointError, CheckpointFormatError,  # noqa: E402
                            ConfigError, HarnessError, NoCheckpointError, StorageError)
from harness.state import Stateful  # noqa: E402

__all__ = ["CheckpointManager", "RestoreResult", "Stateful", "HarnessError", "ConfigError", "CheckpointError",
           "CheckpointFormatError", "CheckpointCorruptError", "NoCheckpointError", "StorageError"]
from harness.interop.inference import load_for_inference, warm_start  # noqa: E402,F401  (added: export/import/inspect)
__all__ += ["load_for_inference", "warm_start"]
