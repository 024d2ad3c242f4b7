"""Timing probe for benchmarks/resume_time.py: loaded by every Python process of a relaunched job (this folder
is put first on PYTHONPATH) and active only when HARNESS_RESUME_TRACE names a folder.

It changes no behaviour: it wraps a few functions by name as their modules finish importing (so the names
the harness binds with ``from ... import`` are the wrappers too) and appends one JSON line per call, with
wall-clock start and end, to ``$HARNESS_RESUME_TRACE/trace-<pid>.jsonl``. Written line by line and flushed:
the job is SIGKILLed once every rank has taken its first step. Nothing here is imported by harness itself.
"""

from __future__ import annotations

import functools
import importlib.abc
import json
import os
import sys
import threading
import time

_DIR = os.environ.get("HARNESS_RESUME_TRACE")
# module -> [(attribute path, label)]; a missing attribute is skipped (the code under it may have moved)
_PATCHES = {
    "torch.distributed.distributed_c10d": [("init_process_group", "pg"), ("new_group", "pg")],
    "torch.nn.modules.module": [("Module.load_state_dict", "apply")],
    "torch.optim.optimizer": [("Optimizer.load_state_dict", "apply")],
    "torch.optim.lr_scheduler": [("LRScheduler.load_state_dict", "apply")],
    "harness.trainer": [("train", "train"), ("Trainer.resume", "resume"), ("Trainer.train_step", "step")],
    "harness.lease": [("acquire", "lease")],
    "harness.storage.facade": [("Storage.check_access", "storage_check"), ("Storage.listdir", "op_list"),
                               ("Storage.list_tree", "op_list"), ("Storage.read_bytes", "op_read"),
                               ("Storage.size", "op_head"), ("Storage.exists", "op_head"),
                               ("Storage.open_read", "op_open")],
    "harness.storage": [("Storage.check_access", "storage_check"), ("Storage.listdir", "op_list"),
                        ("Storage.list_tree", "op_list"), ("Storage.read_bytes", "op_read"),
                        ("Storage.size", "op_head"), ("Storage.exists", "op_head"),
                        ("Storage.open_read", "op_open")],
    "harness.checkpoint.discovery": [("list_checkpoints", "discovery"), ("scan", "discovery"),
                                     ("read_commit", "discovery"), ("open_checkpoint", "discovery")],
    "harness.checkpoint.blobs": [("read_tensors", "read"), ("read_rows", "read")],
    "harness.checkpoint.direct_read": [("read_into", "read"), ("verify_entries", "read")],
}
_AT_ENTRY = {"train"}  # calls that never return before the SIGKILL
S3_MODULES = ("s3fs", "aiobotocore", "botocore", "boto3")
_local = threading.local()
_lock = threading.Lock()
_file = None
_file_pid = [0]
_forked_at: list[float] = []
_steps = 0


def _emit(record: dict) -> None:
    global _file
    with _lock:
        if _file is None or _file_pid[0] != os.getpid():  # a fork (a worker of the launcher's forkserver)
            _file = open(os.path.join(_DIR, f"trace-{os.getpid()}.jsonl"), "a", buffering=1)
            _file_pid[0] = os.getpid()
            if _forked_at:  # its process record, with the rank it has by now (see _forked)
                _file.write(json.dumps({"pid": os.getpid(), "rank": os.environ.get("RANK"), "label": "process",
                                        "t0": _forked_at[0], "t1": _forked_at[0], "forked": True}) + "\n")
        _file.write(json.dumps({"pid": os.getpid(), "rank": os.environ.get("RANK"), **record}) + "\n")


def _process_start() -> float | None:
    """Wall-clock time this process was created (from /proc; 10 ms resolution)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            boot = time.time() - float(f.read().split()[0])  # /proc/stat's btime is whole seconds: up to 1 s off
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _vm_hwm_kb() -> int:
    """Peak resident memory of this process so far (restore's high-water mark lies before the first step)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, ValueError, StopIteration):
        return 0


def _wrap(fn, label: str):
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        global _steps
        depth = getattr(_local, label, 0)
        setattr(_local, label, depth + 1)  # nested calls of one label (an optimizer inside ZeRO) count once
        t0 = time.time()
        if label in _AT_ENTRY and depth == 0:
            _emit({"label": label, "t0": t0, "t1": t0})  # it runs until the job is killed: record its start
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        finally:
            t1 = time.time()
            setattr(_local, label, depth)
            if label == "step":
                _steps += 1
            if depth == 0 and (label != "step" or _steps <= 2):
                rec = {"label": label, "t0": t0, "t1": t1}
                if label == "step" and _steps == 1:
                    rec["s3_modules"] = [m for m in S3_MODULES if m in sys.modules]
                    rec["vm_hwm_kb"] = _vm_hwm_kb()
                _emit(rec)
    return timed


def _patch(name: str, module) -> None:
    for path, label in _PATCHES.get(name, ()):
        owner, attr = module, path
        if "." in path:
            cls, attr = path.split(".", 1)
            owner = getattr(module, cls, None)
        fn = getattr(owner, attr, None) if owner is not None else None
        if fn is None or getattr(fn, "_resume_probe", False):
            continue
        wrapped = _wrap(fn, label)
        wrapped._resume_probe = True
        setattr(owner, attr, wrapped)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, name: str) -> None:
        self._inner, self._name = inner, name

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        self._inner.exec_module(module)
        _patch(self._name, module)

    def __getattr__(self, item):
        return getattr(self._inner, item)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, name)
                return spec
        return None


def _forked() -> None:
    """A worker forked from the launcher's preloaded forkserver: its process starts here, its interpreter
    (and everything the forkserver imported) is up at once. Recorded with its first record, once the worker
    has its RANK."""
    global _lock
    _lock = threading.Lock()  # the fork may have copied it held
    _forked_at[:] = [time.time()]


if _DIR:
    _emit({"label": "process", "t0": _process_start(), "t1": time.time()})  # t1: interpreter is up
    os.register_at_fork(after_in_child=_forked)
    for _name, _mod in list(sys.modules.items()):
        if _name in _PATCHES:
            _patch(_name, _mod)
    sys.meta_path.insert(0, _Finder())
