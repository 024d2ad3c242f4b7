"""The project's own error types: every refusal on the load path is one of these."""


class HarnessError(Exception):
    """Base class of every error harness raises on purpose."""


class ConfigError(HarnessError):
    """A configuration file or override is wrong; permanent, exit code 2."""


class CheckpointError(HarnessError):
    """A checkpoint could not be saved, found or loaded."""


class StateMismatchError(CheckpointError):
    """A valid checkpoint whose state does not fit the objects given to restore (another model shape, optimizer
    class, parameter groups). ``reason`` is the mismatch alone; the message adds ``hint`` (what an API caller can
    pass), which ``harness train`` replaces by its own."""

    def __init__(self, reason: str, hint: str = "") -> None:
        super().__init__(f"{reason}; {hint}" if hint else reason)
        self.reason = reason


class CheckpointFormatError(CheckpointError):
    """A manifest or commit record is malformed or hostile; nothing from it was used."""


class NewerFormatError(CheckpointFormatError):
    """A checkpoint written by a newer harness, in a format version this one does not read. Not damaged: a
    restore never walks past it to an older checkpoint, which would silently undo the training since."""


class CheckpointCorruptError(CheckpointError):
    """Stored bytes disagree with the manifest (size or checksum)."""


class NoCheckpointError(CheckpointError):
    """No committed, valid checkpoint exists where one was required."""


class StorageError(CheckpointError):
    """The storage backend failed or is unreachable (permissions, missing bucket, full disk)."""


class StorageUnavailableError(StorageError):
    """The storage kept failing with errors worth retrying (refused or reset connections, timeouts, throttling,
    5xx) for a whole retry budget. Nothing says it is unusable: a restart later may well reach it, so a run
    that ends on it exits 1 (retryable), not 3, and no checkpoint is called damaged for it."""


def cause_chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (``__cause__``, else an unsuppressed ``__context__``)."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return seen


def is_storage_unavailable(exc: BaseException) -> bool:
    """``exc``, or an exception it was raised from, is a :class:`StorageUnavailableError`."""
    return any(isinstance(link, StorageUnavailableError) for link in cause_chain(exc))


def storage_failure(why: str, unavailable: bool,
                    otherwise: type[CheckpointError] = CheckpointError) -> CheckpointError:
    """The error every rank raises for a failure one rank reported as (``why``, ``unavailable``): the storage
    out of retries keeps its retryable kind (exit 1) across ranks; anything else is ``otherwise`` (exit 3)."""
    return (StorageUnavailableError if unavailable else otherwise)(why)


GLOO_TRANSPORT = "gloo/transport/"


def is_transport_failure(exc: BaseException) -> bool:
    """A failure of gloo's transport: a lost peer ("Connection reset by peer", "Connection closed by peer") or
    a collective that timed out. torch's gloo backend raises these as a plain RuntimeError whose message names
    gloo's transport source file (NCCL and the store raise ``torch.distributed.DistError`` subclasses).
    The checkpoint layer's process group is gloo even on GPUs, so this is how a lost peer looks there too: a
    communication failure, retryable, never a bad checkpoint."""
    return isinstance(exc, RuntimeError) and GLOO_TRANSPORT in str(exc)


CUDA_ERROR_PREFIXES = ("CUDA error: ", "CUDA driver error: ")


def is_accelerator_failure(exc: BaseException) -> bool:
    """A failed CUDA call before torch 2.8, which raises ``torch.AcceleratorError`` for these and a plain
    RuntimeError ("CUDA error: an illegal memory access was encountered", "... uncorrectable ECC error",
    "CUDA error: out of memory" from a library handle) before it; ``torch>=2.4`` is supported."""
    return isinstance(exc, RuntimeError) and str(exc).lstrip().startswith(CUDA_ERROR_PREFIXES)


HOST_ALLOCATOR_FAILURE = "DefaultCPUAllocator: can't allocate memory"


def is_host_out_of_memory(exc: BaseException) -> bool:
    """Host memory refused: torch's CPU allocator raises a plain RuntimeError ("[enforce fail at alloc_cpu.cpp]
    ... DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes"), Python and numpy a
    MemoryError. Out of memory, as on a GPU: not a bug (no traceback), not the checkpoint's fault."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and HOST_ALLOCATOR_FAILURE in str(exc))
