"""What differs between the torch releases pyproject allows (``torch>=2.4``), in one place, so the rest of the
code is written against one API. Checked by feature, never by version number. torch-free at import (the
launcher imports it before torch). The suite runs on the newest torch; ``tests/test_torchcompat.py`` runs each
fallback here too."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from harness.errors import ConfigError

# torch's agent SIGKILLs the workers this long after forwarding a signal where LaunchConfig has no
# ``shutdown_timeout`` (torch 2.11 and older: ``PContext.close(death_sig, timeout=30)``).
TORCH_KILL_AFTER_S = 30


def launch_config_fields(launch_config: type, grace_period_s: float, wanted: dict[str, Any]) -> dict[str, Any]:
    """``wanted`` less the fields this torch's ``LaunchConfig`` lacks:

    * ``shutdown_timeout`` (not in 2.11): the agent kills the workers 30 s after forwarding a signal, whatever
      ``checkpoint.grace_period_s`` says; a longer grace period is warned about, in one line.
    * ``signals_to_handle`` (not in the oldest): torch's handler then takes SIGTERM and SIGINT too; the
      launcher maps the ``SignalException`` it raises to the same exit codes (harness/launch.py), but ``nohup``
      no longer shields the workers from SIGHUP."""
    have = {f.name for f in dataclasses.fields(launch_config)}
    if "shutdown_timeout" in wanted and "shutdown_timeout" not in have and grace_period_s > TORCH_KILL_AFTER_S - 5:
        import torch
        print(f"harness launch: warning: torch {torch.__version__}'s agent kills the workers {TORCH_KILL_AFTER_S} s "
              f"after forwarding a signal: checkpoint.grace_period_s = {grace_period_s:g} may not be honoured "
              "(newer torch waits grace_period_s + 30 s)", file=sys.stderr)
    return {k: v for k, v in wanted.items() if k in have}


def fsdp_unsupported() -> str | None:
    """Why this torch cannot run ``train.parallel = "fsdp"``, or None. harness needs FSDP2's public
    ``torch.distributed.fsdp.fully_shard`` (torch 2.6+) and the public DTensor API it reads and writes sharded
    state through: torch 2.5 keeps fully_shard private and refuses it without CUDA ("FSDP requires CUDA for
    streams"), torch 2.4 has no public DTensor either."""
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return f"torch {torch.__version__} was built without torch.distributed"
    import torch.distributed.fsdp as fsdp
    import torch.distributed.tensor as dtensor

    if not hasattr(fsdp, "fully_shard") or not hasattr(dtensor, "DTensor"):
        return (f'train.parallel = "fsdp" needs torch >= 2.6 (FSDP2\'s public fully_shard and DTensor, on CPU '
                f'and GPU); this is torch {torch.__version__}: use "ddp" or "zero", or a newer torch')
    return None


def fully_shard() -> Any:
    """FSDP2's ``fully_shard``, or a ConfigError (exit 2, one line) where :func:`fsdp_unsupported` says why."""
    why = fsdp_unsupported()
    if why:
        raise ConfigError(why)
    from torch.distributed.fsdp import fully_shard as fn
    return fn
