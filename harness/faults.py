"""The one fault-injection seam.

Code under test calls :func:`point` at each step where a crash matters (after each data file, before and
after the manifest, before and after the commit record, during retention, at each training step). In
production nothing is installed and a call costs one dict lookup.

Two ways to arm it, both used only by tests and fault campaigns:

* in-process: ``faults.install(fn)`` where ``fn(name, info)`` may raise or kill the process;
* across processes (torchrun workers): the environment variable ``HARNESS_FAULT`` holding
  ``NAME:ACTION[:key=value...]``, e.g. ``save.before_commit:sigkill:step=30:rank=1``. The fault fires at
  the first call of point NAME whose info matches every key=value given. ACTION is one of
  ``raise`` (FaultInjected), ``sigkill`` / ``sigterm`` (signal to this process), ``exit`` (os._exit(70)),
  ``enospc`` (OSError ENOSPC) or ``sleep=SECONDS``. The special key ``once=PATH`` makes the fault fire
  only if PATH does not exist, and creates it when firing: a restarted process (torchrun
  ``--max-restarts``) then runs through the same point unharmed.

Points in use: ``save.data_file``, ``save.before_manifest``, ``save.after_manifest``,
``save.before_commit``, ``save.after_commit``, ``retention.delete``, ``train.step``, ``train.finished``
(``harness train`` after a run that reached its end, final checkpoint committed; info ``rank``), ``s3.part``
(each multipart part handed to the uploader; info ``file`` and ``part``, e.g. ``s3.part:sigkill:part=3``),
``discovery.read_commit`` (before a commit record is read; info ``name``: a store failing there),
``restore.read`` (each rank, before it reads its part of the checkpoint rank 0 chose; info ``name``),
``launch.preload`` (in the forkserver of ``harness launch``, before it imports torch: a preload that fails),
``local.atomic_written`` (a local file written whole by :func:`harness.storage.local.atomic_file`, before
its fsync and rename; info ``file``: the name it gets), and ``restore.apply`` (as each saved state dict is loaded into its object; info ``what`` and ``name``,
e.g. ``what=optimizer``: a hook raising torch.OutOfMemoryError there is an OOM inside load_state_dict).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from typing import Any, Callable

FaultHook = Callable[[str, dict], None]

_hook: FaultHook | None = None
_env_spec: tuple[str, str, dict[str, str]] | None = None
_env_fired = False


class FaultInjected(RuntimeError):
    """Raised by the ``raise`` action: stands for a crash at this point."""


def install(hook: FaultHook | None) -> None:
    """Install (or with None remove) an in-process fault hook."""
    global _hook
    _hook = hook


def forget_env() -> None:
    """Read HARNESS_FAULT again at the next point, as a fresh process would: for a worker forked from the
    launcher's forkserver (harness/workerstart.py), which read it already (``launch.preload``) in the
    environment it started with, not the worker's."""
    global _env_spec, _env_fired
    _env_spec, _env_fired = None, False


ACTIONS = ("raise", "sigkill", "sigterm", "exit", "enospc")


def check_env() -> None:
    """Raise ValueError for a malformed HARNESS_FAULT (``harness launch`` calls it before any worker starts:
    a typo in a test's fault is a config error there, not a failure at some later point)."""
    _parse_env()


def _parse_env() -> tuple[str, str, dict[str, str]] | None:
    spec = os.environ.get("HARNESS_FAULT", "")
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) < 2 or not parts[0] or any("=" not in p for p in parts[2:]):
        raise ValueError(f"HARNESS_FAULT must be NAME:ACTION[:key=value...], got {spec!r}")
    action = parts[1]
    if action not in ACTIONS and not _is_sleep(action):
        raise ValueError(f"HARNESS_FAULT {spec!r}: unknown action {action!r} (one of {', '.join(ACTIONS)}, "
                         f"sleep=SECONDS)")
    return parts[0], action, dict(p.split("=", 1) for p in parts[2:])


def _is_sleep(action: str) -> bool:
    try:
        return action.startswith("sleep=") and float(action.split("=", 1)[1]) >= 0
    except ValueError:
        return False


def _act(action: str, name: str) -> None:
    if action == "raise":
        raise FaultInjected(f"fault injected at {name}")
    if action == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if action == "exit":
        os._exit(70)
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {name})")
    if action.startswith("sleep="):
        time.sleep(float(action.split("=", 1)[1]))
        return
    raise ValueError(f"unknown fault action {action!r}")


def point(name: str, /, **info: Any) -> None:
    """Mark a point where a fault may be injected. ``info`` narrows env-var faults (step, rank, file)."""
    global _env_spec, _env_fired
    if _hook is not None:
        _hook(name, info)
    if _env_fired:
        return
    if _env_spec is None:
        _env_spec = _parse_env() or ("", "", {})
    want, action, match = _env_spec
    if want != name:
        return
    if "rank" not in info:
        info = {**info, "rank": os.environ.get("RANK", "0")}
    once = match.get("once")
    if all(str(info.get(k)) == v for k, v in match.items() if k != "once"):
        _env_fired = True
        if once is not None:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        _act(action, name)
