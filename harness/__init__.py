"""harness: a fault-tolerant distributed training harness for PyTorch."""

from harness._version import __version__  # noqa: F401

# The public API, imported on first use (PEP 562): `import harness` alone (the CLI, `harness launch` checking a
# config, a worker starting) loads neither torch nor the checkpoint layer until something asks for them.
_EXPORTS = {
    "CheckpointManager": "harness.checkpoint.manager", "RestoreResult": "harness.checkpoint.manager",
    "Stateful": "harness.state", "StopSignals": "harness.stopping",
    **{name: "harness.errors" for name in ("HarnessError", "ConfigError", "CheckpointError", "CheckpointFormatError",
                                           "CheckpointCorruptError", "NoCheckpointError", "StorageError",
                                           "StateMismatchError")},
    "load_for_inference": "harness.interop.inference", "warm_start": "harness.interop.inference",
}

__all__ = ["CheckpointManager", "RestoreResult", "Stateful", "StopSignals", "HarnessError", "ConfigError",
           "CheckpointError", "CheckpointFormatError", "CheckpointCorruptError", "NoCheckpointError", "StorageError",
           "StateMismatchError", "load_for_inference", "warm_start"]


def __getattr__(name: str):
    import importlib

    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # once: later lookups do not come here
        return value
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:  # a submodule (`harness.recipe` after a bare `import harness`, as when the API above was eager)
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
