"""The project's own error types: every refusal on the load path is one of these."""


class HarnessError(Exception):
    """Base class of every error harness raises on purpose."""


class ConfigError(HarnessError):
    """A configuration file or override is wrong; permanent, exit code 2."""


class CheckpointError(HarnessError):
    """A checkpoint could not be saved, found or loaded."""


class CheckpointFormatError(CheckpointError):
    """A manifest or commit record is malformed or hostile; nothing from it was used."""


class CheckpointCorruptError(CheckpointError):
    """Stored bytes disagree with the manifest (size or checksum)."""


class NoCheckpointError(CheckpointError):
    """No committed, valid checkpoint exists where one was required."""


class StorageError(CheckpointError):
    """The storage backend failed or is unreachable (permissions, missing bucket, full disk)."""
