"""What the host gives this process (torch-free: the launcher and the checkpoint layer both ask)."""

from __future__ import annotations

import os
from typing import Any


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one (a container or ``taskset`` may
    allow fewer than the machine has), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def pid_alive(pid: Any) -> bool:
    """Whether process ``pid`` exists on this host (a zombie counts as dead)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def available_memory() -> int | None:
    """Bytes of memory this process's cgroup and host can still give (Linux: MemAvailable, less where a cgroup v2
    limit leaves less), or None where that is not known."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            avail = min(avail, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return avail
