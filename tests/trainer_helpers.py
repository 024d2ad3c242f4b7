"""Helpers for the end-to-end trainer tests (tests/test_train_*.py): real ``python -m harness train``
processes, alone or under torchrun (``python -m torch.distributed.run``), 2 gloo ranks on CPU.

Every process is started in a session of its own with its output in a log file, every wait has a
timeout, and whatever a test started is killed (whole process trees, torchrun's workers included:
torchrun puts each worker in a session of its own, so killing the agent's group alone leaves them
running) when the test ends.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ckpt_helpers import assert_bitwise
from harness.checkpoint.discovery import list_checkpoints
from harness.checkpoint.load import read_state
from harness.storage import Storage

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "quickstart.toml")

# Small and quick, but not trivial: 3200 samples / 2 ranks / batch 32 = 50 steps per epoch, so of the
# checkpoints at 25, 50, 75, 100 (and the final one at 120) two are mid-epoch and two fall exactly on
# an epoch's last batch, and the run crosses two epoch boundaries. log_every=1 puts every step in
# metrics.jsonl, which tells the tests the step reached when they send a signal.
MAX_STEPS = 120
EVERY = 25
STEPS_PER_EPOCH = 50
BASE_SETS = [
    f"train.max_steps={MAX_STEPS}",
    f"checkpoint.every_steps={EVERY}",
    "data.num_samples=3200",
    "train.log_every=1",
    "dist.timeout_s=60",
    "checkpoint.timeout_s=60",
]
SLOW = "train.step_sleep_s=0.02"   # ~3 s of training: room to kill or signal a run in the middle

RUN_TIMEOUT = 120  # seconds: no single harness/torchrun invocation of these tests may take longer


# -- commands -----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether something on this machine listens on TCP ``port`` (from /proc: no connection is made)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = [line.split() for line in f.readlines()[1:]]
        except OSError:
            continue
        if any(r[3] == "0A" and int(r[1].rsplit(":", 1)[1], 16) == port for r in rows):
            return True
    return False


def harness_args(tmp: Path, *sets: str, config: str | None = CONFIG) -> list[str]:
    """``harness train`` arguments writing checkpoints to tmp/ck and metrics to tmp/metrics.jsonl."""
    args = ["train"]
    if config is not None:
        args += ["--config", config]
    for s in [f"checkpoint.dir={tmp / 'ck'}", f"run.output_dir={tmp}", *BASE_SETS, *sets]:
        args += ["--set", s]
    return args


def python_c(code: str, cwd: Path | str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (``python -c``, the tests' environment) in ``cwd``; it must exit 0."""
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=base_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def launch_cmd(tmp: Path, *sets: str, nproc: int = 2, nnodes: int | str = 1, endpoint: str | None = None,
               rdzv_id: str | None = None, max_restarts: int = 0) -> list[str]:
    """``harness launch`` on the test config (one node of ``nnodes`` when ``endpoint`` is given)."""
    cmd = [sys.executable, "-m", "harness", "launch", "--nproc-per-node", str(nproc), "--nnodes", str(nnodes),
           "--max-restarts", str(max_restarts)]
    if endpoint:
        cmd += ["--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id or f"launch-test-{endpoint}"]
    return cmd + harness_args(tmp, *sets)[1:]  # harness_args starts with "train"


def standalone_cmd(tmp: Path, *sets: str, config: str | None = CONFIG) -> list[str]:
    return [sys.executable, "-m", "harness", *harness_args(tmp, *sets, config=config)]


def torchrun_cmd(tmp: Path, *sets: str, nproc: int = 2, nnodes: int = 1, port: int | None = None,
                 rdzv_id: str | None = None, max_restarts: int = 0, node_rank: int | None = None) -> list[str]:
    port = port or free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "--rdzv-id", rdzv_id or f"harness-test-{port}", "--max-restarts", str(max_restarts),
           "--monitor-interval", "0.1"]
    if node_rank is not None:
        cmd += ["--node-rank", str(node_rank)]
    return cmd + ["-m", "harness", *harness_args(tmp, *sets)]


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HARNESS_FAULT" and not k.startswith("TORCHELASTIC")}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"):
        env.pop(k, None)
    # torch 2.13's c10d rendezvous shares one agent-hosted TCPStore across worker-group restarts, with no
    # per-attempt key prefix (pytorch/pytorch#135712 again): a restarted worker can read its peer's gloo
    # address from the previous attempt and fail or hang in init_process_group. Opting out of the
    # sharing gives every attempt a fresh store (probe here: 3 of 4 runs failed or hung without it).
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO),
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **extra)
    return env


# -- processes ----------------------------------------------------------------------------------------

def _ppids() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        out[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (from /proc), children first."""
    ppids = _ppids()
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in ppids.items() if pp in frontier and p not in found]
        found += kids
        frontier = kids
    return found


def proc_env(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = f.read().split(b"\0")
    return dict(i.decode(errors="replace").split("=", 1) for i in items if b"=" in i)


WORKER_NAME = "harness-r"


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _mp_helper(pid: int) -> bool:
    """multiprocessing's forkserver or resource tracker (started by ``harness launch``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"from multiprocessing." in f.read()
    except OSError:
        return False


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Proc:
    """A started command: its Popen, log file and start time."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    started: float = field(default_factory=time.monotonic)
    rc: int | None = None
    elapsed: float | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def poll(self) -> int | None:
        if self.rc is None:
            rc = self.popen.poll()
            if rc is not None:
                self.rc, self.elapsed = rc, time.monotonic() - self.started
        return self.rc

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        """The exit code; a run that outlives ``timeout`` is killed (whole tree) and the test fails."""
        try:
            self.popen.wait(timeout=max(0.0, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            kill_tree(self)
            raise AssertionError(f"{self.name} still running after {timeout:.0f} s (killed); log tail:\n"
                                 f"{self.tail()}") from None
        self.poll()
        assert self.rc is not None
        print(f"{self.name}: exit {self.rc} after {self.elapsed:.1f} s")
        return self.rc

    def workers(self) -> list[int]:
        """Live worker processes: torchrun's children (fresh interpreters), or the workers ``harness launch``
        forks from its forkserver (named harness-r<RANK>, see harness/workerstart.py); not the forkserver or
        multiprocessing's resource tracker."""
        ppids = _ppids()
        return sorted(p for p in descendants(self.pid) if alive(p) and (
            comm(p).startswith(WORKER_NAME) or (ppids.get(p) == self.pid and not _mp_helper(p))))

    def worker_of_rank(self, rank: int) -> int:
        for pid in self.workers():
            try:
                if comm(pid) == f"{WORKER_NAME}{rank}" or proc_env(pid).get("RANK") == str(rank):
                    return pid
            except OSError:
                continue
        raise AssertionError(f"{self.name}: no live worker with RANK={rank}; log tail:\n{self.tail()}")


class Runner:
    """Starts processes for one test and kills whatever is left of them at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Proc:
        log_path = self.tmp / f"{name}.log"
        with open(log_path, "wb") as out:
            popen = subprocess.Popen(cmd, cwd=REPO, env=env or base_env(), stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def run(self, name: str, cmd: list[str], env: dict[str, str] | None = None,
            timeout: float = RUN_TIMEOUT) -> Proc:
        proc = self.start(name, cmd, env)
        proc.wait(timeout)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None or descendants(proc.pid):
                kill_tree(proc)
            try:
                proc.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def kill_tree(proc: Proc, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to a process, its process group and every descendant's process group at once: what a
    node failure does. Returns the pids signalled."""
    pids = [proc.pid, *descendants(proc.pid)]
    own = os.getpgrp()
    for pid in pids:
        try:
            pgid = os.getpgid(pid)
        except ProcessLookupError:
            continue
        try:
            if pgid != own:
                os.killpg(pgid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return pids


def wait_gone(pids: list[int], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return
        time.sleep(0.05)
    raise AssertionError(f"processes still alive {timeout:.0f} s after being killed: "
                         f"{[p for p in pids if alive(p)]}")


def wait_until(what: str, predicate: Callable[[], Any], procs: list[Proc], timeout: float = 60) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail early if a process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{p.name} exited with {p.rc} while waiting for {what}; log tail:\n{p.tail()}")
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; log tails:\n"
                         + "\n".join(f"--- {p.name}\n{p.tail(20)}" for p in procs))


# -- checkpoints and metrics -----------------------------------------------------------------------------

def committed_steps(ckdir: Path) -> list[int]:
    """Steps of the committed checkpoints in ckdir, oldest first ([] when there is none yet)."""
    if not ckdir.exists():
        return []
    try:
        return [i.step for i in list_checkpoints(Storage(str(ckdir)))]
    except (OSError, FileNotFoundError):
        return []


def all_checkpoint_folders(ckdir: Path) -> list[str]:
    return sorted(p.name for p in ckdir.iterdir() if p.name.startswith("step-")) if ckdir.exists() else []


def metrics(tmp: Path) -> list[dict]:
    path = tmp / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return out


def last_logged_step(tmp: Path) -> int:
    """The highest training step rank 0 has logged to metrics.jsonl (log_every=1: every step)."""
    return max((r["step"] for r in metrics(tmp) if "event" not in r), default=0)


def events(tmp: Path, kind: str) -> list[dict]:
    return [r for r in metrics(tmp) if r.get("event") == kind]


@dataclass
class FinalState:
    name: str
    raw: dict          # the manifest
    state: dict        # replicated state: models, optimizers, schedulers, scaler, extra
    ranks: list        # per-rank state: rng, position, rank_state


def final_state(ckdir: Path) -> FinalState:
    """The newest committed checkpoint of a finished run, read with full checksum verification."""
    storage = Storage(str(ckdir))
    infos = list_checkpoints(storage)
    assert infos, f"no committed checkpoint in {ckdir}"
    name = infos[-1].name
    manifest, state, ranks = read_state(storage, name, ranks=None)
    return FinalState(name, manifest.raw, state, ranks)


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Bitwise equality of two decoded states (dict keys in the same order): tensors byte for byte, so
    -0.0 != 0.0 and a nan equals the same nan. One comparison for every test: ckpt_helpers.assert_bitwise."""
    assert_bitwise(a, b, path, ordered_keys=True)


SUMMARY_KEYS = ("step", "epoch", "loss", "metrics", "world_size", "model_classes")


def assert_same_final(run_dir: Path, ref: "Reference | FinalState") -> FinalState:
    """The final checkpoint of the run in run_dir equals the reference's bit for bit: every tensor of model,
    optimizer, scheduler, every rank's RNG and data position, and step/epoch/loss/metrics."""
    reference = ref.get() if isinstance(ref, Reference) else ref
    got = final_state(run_dir / "ck")
    assert got.raw["step"] == MAX_STEPS, f"final checkpoint {got.name} is not at step {MAX_STEPS}"
    for key in SUMMARY_KEYS:
        assert_same(got.raw.get(key), reference.raw.get(key), f"manifest.{key}")
    assert_same(got.state, reference.state, "state")
    assert_same(got.ranks, reference.ranks, "ranks")
    # Same bytes, same checksums: the per-tensor checksums must agree too.
    sums = lambda fs: sorted((t["key"], t["checksum"]) for t in fs.raw["tensors"])  # noqa: E731
    assert sums(got) == sums(reference)
    return got


def resumed_from(log: str) -> list[int]:
    """Steps this run resumed from, as the trainer logged them ('resumed from step-... at step N')."""
    return [int(m) for m in re.findall(r"resumed from step-\d+(?:-a\d+)? at step (\d+)", log)]


def worker_exit_codes(log: str) -> dict[int, int]:
    """rank -> exit code from torchrun's failure summary ('rank : 1 (local_rank: 1)' / 'exitcode : 143')."""
    out = {}
    for m in re.finditer(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", log):
        out[int(m.group(1))] = int(m.group(2))
    return out


# -- the uninterrupted reference ------------------------------------------------------------------------

class Reference:
    """The final state of one uninterrupted 2-rank torchrun run, shared by every test of a session. The run
    starts in the background when first asked for, so it overlaps the first test's own runs."""

    _shared: "Reference | None" = None

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.runner = Runner(tmp)
        self.proc = self.runner.start("reference", torchrun_cmd(tmp))
        atexit.register(self.runner.close)  # a session that never waited for it must not leave it running
        self._state: FinalState | None = None

    @classmethod
    def shared(cls, tmp_root: Path) -> "Reference":
        if cls._shared is None or cls._shared.tmp.parent != tmp_root:
            cls._shared = cls(tmp_root / "reference")
        return cls._shared

    def get(self) -> FinalState:
        if self._state is None:
            try:
                rc = self.proc.wait()
            finally:
                self.runner.close()
            assert rc == 0, f"reference run failed with {rc}:\n{self.proc.tail()}"
            assert committed_steps(self.tmp / "ck")[-1] == MAX_STEPS
            assert not events(self.tmp, "resume"), "the reference run resumed from something"
            self._state = final_state(self.tmp / "ck")
        return self._state


def reference(tmp_root: Path) -> Reference:
    """The session's reference run (started now if it is not running yet); ``.get()`` waits for it."""
    return Reference.shared(tmp_root)
