"""``harness launch``: torchrun's own elastic agent, called in-process through torch's public launcher API
(``torch.distributed.launcher.api.LaunchConfig`` + ``elastic_launch``), with the config and the checkpoint
storage checked before any worker starts, and an exit code that is the contract (harness/exitcodes.py).

What torchrun leaves to its caller, and this module adds:

* A permanent error (exit 2 or 3) is not retried, whatever ``--max-restarts`` says. The agent restarts any
  failed worker group; it cannot tell "fix the config" from "a peer died". So a worker that hits a permanent
  error does not exit: it records the error in this launch's folder (``HARNESS_LAUNCH_DIR``) and waits. The
  launcher sees the record and stops the agent through the agent's own shutdown path (the same
  ``SignalException`` torch's signal handler raises), then prints the error once and exits with its code.
* Signals keep their meaning. torchrun exits 1 when it is signalled; here the first SIGTERM/SIGUSR1/SIGUSR2/SIGINT
  is handed to the agent, which forwards it to the workers (they commit a checkpoint and exit 128+N), and the
  launcher exits 128+N. A second signal during that shutdown is ignored: torch would otherwise abandon the
  workers' save half way. A signal during the checks before the agent (torch still importing, a slow
  object store) ends the launch at once with 128+N; once the exit code is decided signals are ignored.
* One line per problem: torch's log records below ERROR and its failure table only with HARNESS_DEBUG=1.
* Workers that import nothing at start: forks of a forkserver that imports torch and torch._dynamo beside
  the launcher (harness/workerstart.py), unless ``--start-method subprocess``.

The worker side of the protocol (harness/launch_folder.py) is called by ``harness train`` (harness/cli.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

from harness import exitcodes, faults, gcpause, launch_folder, rendezvous, torchcompat, workerstart
from harness.errors import ConfigError
from harness.exitcodes import Outcome
from harness.launch_args import LaunchArgs, nodes, nproc, parse_args
from harness.launch_folder import FINISHED_PREFIX, LAUNCH_DIR_ENV, POLL_S, STOPPING_FILE

CPP_LOG_ENV = "TORCH_CPP_LOG_LEVEL"
HANDLED = exitcodes.STOP_SIGNALS
# torch's handler stays on these (its default set, less the ones the launcher handles itself).
TORCH_SIGNALS = (signal.SIGHUP, signal.SIGQUIT)
AGENT_LOGGER = "torch.distributed.elastic.agent.server.api"  # its restart decisions (INFO) are read here
# A signal after every worker finished training: how long the agent may go on collecting their results (they
# are leaving with 0) before it is stopped as for any signal.
FINISHED_WAIT_S = 15.0


# -- launcher side -------------------------------------------------------------------------------------

@dataclass
class Stopper:
    """Signal handling and permanent-error watching for one launch, in three phases:

    * ``checking`` (config, storage): a signal is only recorded; the main thread, waiting for the checks on
      a helper thread (see :func:`_prepare`), sees it and exits 128+N at once. A handler must not raise
      here: the exception lands wherever the main thread is, e.g. inside ``import torch`` (a half-imported
      torch: SystemError, even SIGSEGV) or inside storage code that reports any exception as unusable
      storage (exit 3, never retried: a preemption during startup would end the job for good).
    * ``agent``: the first signal raises torch's ``SignalException``, as torch's own handler does; the agent
      forwards it to the workers, waits for their checkpoint and re-raises.
    * ``done`` (:meth:`close`): the exit code is decided, signals are ignored."""

    folder: str
    signum: int = 0                      # the first signal (or the self-stop), 0 while running
    record: Outcome | None = None        # what a worker recorded: a permanent error, or a stop on a signal
    phase: str = "checking"              # checking -> agent -> done
    self_stop: bool = False              # signum is the launcher's own SIGTERM, sent to stop for a worker's record
    workers: int = 0                     # worker processes this launcher starts (per restart), once known
    _raise: Any = None                   # torch's SignalException, imported by arm() (never in the handler)
    _forced: bool = False                # the finished workers did not leave in FINISHED_WAIT_S: stop the agent
    _stop: threading.Event = field(default_factory=threading.Event)

    def install(self) -> None:
        for sig in HANDLED:
            signal.signal(sig, self._handle)

    def arm(self) -> None:
        """Enter the agent phase (torch's launcher modules are imported by now)."""
        from torch.distributed.elastic.multiprocessing import SignalException
        self._raise, self.phase = SignalException, "agent"

    def _handle(self, signum: int, frame: Any) -> None:
        if self.phase == "done":  # close() ignores signals; one may still be on its way to this handler
            return
        if self._forced:
            self._forced = False
            raise self._raise(f"harness launch got {exitcodes.signal_name(self.signum)}", sigval=signal.SIGTERM)
        if not self.signum and self.phase == "agent" and self.all_finished():
            # Every worker finished training and is handing the agent its result: let it collect them (0 in a
            # moment). Raising would make it stop them instead: a SIGTERM they ignore by now, then SIGKILL after
            # its shutdown timeout, the job's end ~50 s late for nothing.
            self.signum = signum
            timer = threading.Timer(FINISHED_WAIT_S, self._force_stop)
            timer.daemon = True
            timer.start()
            return
        if self.signum:
            if not self.record and self.phase == "agent" and not self.all_finished():
                print(f"harness launch: got {exitcodes.signal_name(signum)} while stopping on "
                      f"{exitcodes.signal_name(self.signum)}; waiting for the workers' checkpoint", file=sys.stderr)
            return
        self.signum = signum
        if self.phase == "agent":
            # Exactly what torch's own handler raises: the agent forwards the signal to its workers, waits for
            # them (shutdown timeout), and re-raises. A Ctrl-C reaches them as SIGTERM (same meaning to a
            # worker: commit, exit): a worker still starting has Python's SIGINT handler, which would print a
            # KeyboardInterrupt traceback from its interpreter's start; SIGTERM ends it quietly there.
            forward = signal.SIGTERM if signum == signal.SIGINT else signal.Signals(signum)
            raise self._raise(f"harness launch got {exitcodes.signal_name(signum)}", sigval=forward)

    def _force_stop(self) -> None:
        if self.phase == "agent":
            self._forced = True
            os.kill(os.getpid(), self.signum)  # the handler raises in the main thread, where the agent runs

    def stopping(self) -> bool:
        """Signalled, or a worker recorded an outcome that ends the job."""
        return bool(self.signum) or self.record is not None

    def watch(self) -> None:
        threading.Thread(target=self._watch, name="harness-launch-watch", daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            if self.record is None:
                self.record = self._read_error()
                if self.record is not None and not self.signum:
                    self.self_stop = True
                    os.kill(os.getpid(), signal.SIGTERM)  # the agent's shutdown path, in the main thread
            if self.record is not None and self.signum:
                # The agent is stopping: workers waiting in report_outcome may leave now.
                open(os.path.join(self.folder, STOPPING_FILE), "a").close()

    def all_finished(self) -> bool:
        """Every worker of this launcher said its training ran to the end (:func:`report_finished`)."""
        try:
            done = sum(n.startswith(FINISHED_PREFIX) for n in os.listdir(self.folder))
        except OSError:
            return False
        return 0 < self.workers <= done

    def _read_error(self) -> Outcome | None:
        try:
            names = sorted(n for n in os.listdir(self.folder) if n.startswith("error-") and n.endswith(".json"))
        except OSError:
            return None
        for name in names:
            try:
                with open(os.path.join(self.folder, name)) as f:
                    rec = json.load(f)
                return Outcome(int(rec["code"]), str(rec["line"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return None

    def close(self) -> None:
        """The agent has returned and the exit code is decided: from here on the handled signals are ignored.
        Why not keep a handler: CPython's teardown resets Python-level handlers to the default action, so a
        second SIGTERM/SIGUSR1 (a scheduler repeating itself, SLURM signalling every process of the step)
        arriving in the 0.4 s of teardown would kill the launcher by that signal (-15, -10) instead of the
        documented exit code. SIG_IGN holds to the end; SIGKILL still ends a teardown that hangs."""
        self._stop.set()
        self.phase = "done"
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                signal.signal(sig, signal.SIG_IGN)


class _TorchLogFilter(logging.Filter):
    """torch's elastic agent in one-line mode: its errors (a worker that failed, with its exit code) and its
    restart decisions; the rest (closing signals, rendezvous details) only with HARNESS_DEBUG=1."""

    def filter(self, record: logging.LogRecord) -> bool:
        if exitcodes.debug() or not record.name.startswith("torch."):
            return True
        # The agent logs a failed forked worker with the traceback of torch's wait for it: the line says it.
        record.exc_info, record.exc_text = None, None
        return record.levelno >= logging.ERROR or "will restart worker group" in str(record.msg)


class _RestartNote(logging.Filter):
    """On torch's agent logger: its decision to restart the workers (a node joined, a worker failed) is logged
    right before it stops them; the note lets them tell its SIGTERM from a stop of the job (launch_folder)."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def filter(self, record: logging.LogRecord) -> bool:
        if "will restart worker group" in str(record.msg):
            launch_folder.mark_agent_restart(self.folder)
        return True


def agent_log_level() -> int:
    """The agent's restart decision is an INFO record: it must reach the filters whatever torch's LOGLEVEL says
    (the workers learn of a restart from it: _RestartNote); a lower level (DEBUG) is kept."""
    level = logging.getLevelName(os.environ.get("LOGLEVEL", "INFO").upper())
    return min(level, logging.INFO) if isinstance(level, int) else logging.INFO


def _setup_logging() -> None:
    """torch logs through handlers of its own ("torch", "torch.distributed"; they do not propagate): filter
    those, whatever their format."""
    import torch.distributed.launcher.api  # noqa: F401 - sets torch's logging up

    for name in ("torch", "torch.distributed"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_TorchLogFilter())
    logging.getLogger(AGENT_LOGGER).setLevel(agent_log_level())
    gcpause.freeze_and_resume()  # torch's launcher is imported (paused by cli.entry: harness/gcpause.py)


def _check(args: LaunchArgs) -> Any:
    """Config and storage, before any worker: ConfigError (2) or StorageError (3) raise from here."""
    from harness import config, prefetch
    from harness.progress import prepare_output_dir
    from harness.storage import Storage

    try:
        faults.check_env()  # the test seam's variable (harness/faults.py)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    lo, hi = nodes(args.nnodes)
    workers = nproc(args.nproc_per_node)
    if args.standalone and (hi > 1 or args.rdzv_endpoint):
        raise ConfigError("--standalone runs one node: it cannot go with --nnodes > 1 or --rdzv-endpoint")
    cfg = config.load(args.config, args.overrides)
    if hi == 1:  # one machine: rank 0's (see harness.prefetch); before torch is imported here
        prefetch.start(cfg.checkpoint.dir)
    _check_workload(cfg, lo * workers, workers)
    storage = Storage(cfg.checkpoint.dir, cfg.checkpoint.storage_options)
    where = cfg.output_dir_setting
    prepare_output_dir(cfg.output_dir, False, where)  # metrics.jsonl's: made once the storage is known good
    storage.check_access(write=True)
    storage.remember_access(write=True)  # the workers need not check again (see Storage.access_remembered)
    from harness.checkpoint.foreign import refuse_before_workers
    refuse_before_workers(storage, cfg.checkpoint.init_from)  # another tool's checkpoints and none of ours: 2
    prepare_output_dir(cfg.output_dir, True, where)  # (no runs/remote/s3/<missing bucket>, no empty checkpoint folder)
    return cfg


def _check_workload(cfg: Any, world: int, per_node: int = 1) -> None:
    """The built-in model/data options as the workers will build them, deferred (the model on the meta device,
    no weights drawn, the datasets' tables not drawn), and a batch the data can fill at ``world`` ranks (the
    fewest the job starts with): a bad option is a ConfigError here, before any worker, in milliseconds.
    Anything else the meta device cannot do is left to the workers; so is a user's ``train.entry`` (its code
    may download or allocate; its workers raise the same ConfigError)."""
    if cfg.train.entry:
        return
    from harness import recipe
    try:
        w = recipe.workload(cfg, deferred=True)
        recipe.loader(cfg, w.dataset, world, 0)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - not a config problem: the workers build it for real
        return
    _warn_host_memory(cfg, recipe.training_state_bytes(cfg, w.model, world), per_node)


def _warn_host_memory(cfg: Any, per_rank: int, ranks: int) -> None:
    """A CPU run whose ranks on this node need more memory for weights, gradients and optimizer state alone
    than the host has available: said before any worker starts (otherwise each rank fails at its first large
    allocation, "out of host memory", and the agent restarts them into the same failure)."""
    import torch
    from harness.hostinfo import available_memory
    on_cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
    avail = available_memory()
    if on_cpu and avail is not None and per_rank * ranks > avail:
        print(f"harness launch: warning: {ranks} rank(s) on this node need at least {per_rank * ranks / 1e9:.1f} GB "
              f"for the model's weights, gradients and {cfg.optim.name} state on the CPU ({per_rank / 1e9:.1f} GB "
              f"each, before activations); {avail / 1e9:.1f} GB is available: expect 'out of host memory'",
              file=sys.stderr)


def _launch_config(args: LaunchArgs, cfg: Any, stopper: Stopper, preload_status: str) -> Any:
    """torch's LaunchConfig; with ``preload_status``, workers forked by the forkserver (harness/workerstart.py),
    which the agent waits for right before it starts them."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig

    lo, hi = nodes(args.nnodes)
    standalone, logs = hi == 1 and not args.rdzv_endpoint, os.path.join(stopper.folder, "logs")
    # The workers must outlive their checkpoint: the agent SIGKILLs them this long after forwarding a signal.
    shutdown = int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", 0)) or int(cfg.checkpoint.grace_period_s) + 30
    return LaunchConfig(**torchcompat.launch_config_fields(LaunchConfig, cfg.checkpoint.grace_period_s, dict(
        min_nodes=lo, max_nodes=hi, nproc_per_node=nproc(args.nproc_per_node),
        run_id=args.rdzv_id or (str(uuid.uuid4()) if standalone else "harness"),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0" if standalone else args.rdzv_endpoint,
        rdzv_configs=dict(args.rdzv_conf), max_restarts=args.max_restarts, monitor_interval=args.monitor_interval,
        logs_specs=(workerstart.logs_specs(logs, preload_status, stopper.stopping) if preload_status
                    else DefaultLogsSpecs(log_dir=logs)),
        signals_to_handle=_torch_signals(), shutdown_timeout=shutdown,
        start_method="forkserver" if preload_status else "spawn")))


@contextlib.contextmanager
def _quiet_cpp_warnings() -> Iterator[None]:
    """torch imported with its C++ log level at ERROR, in this process only: the agent's store client logs
    each broken connection to a lost rendezvous host as a warning with 30 lines of C++ frames, and this
    launcher says what happened in one line (torch reads TORCH_CPP_LOG_LEVEL once, as it loads). The workers
    inherit the user's environment as it was. HARNESS_DEBUG=1 or a level set by the user: left alone."""
    if exitcodes.debug() or CPP_LOG_ENV in os.environ:
        yield
        return
    os.environ[CPP_LOG_ENV] = "ERROR"
    try:
        yield
    finally:
        os.environ.pop(CPP_LOG_ENV, None)


def _torch_signals() -> str:
    """The signals torch's agent handler takes (it stops the workers without a checkpoint, exit 1), less any
    this process was started ignoring: ``nohup harness launch ...`` must survive the terminal's SIGHUP (torch
    would install its handler over the inherited SIG_IGN; the workers inherit the SIG_IGN)."""
    return ",".join(s.name for s in TORCH_SIGNALS if signal.getsignal(s) != signal.SIG_IGN)


def _worker_env(folder: str, nproc: int) -> None:
    """Environment the workers inherit (the agent copies os.environ into each)."""
    os.environ[LAUNCH_DIR_ENV] = folder
    # torch 2.13's c10d rendezvous shares one TCP store across worker-group restarts without separating each
    # attempt's keys: a restarted worker can read its peer's address from the previous attempt and hang
    # (cf. pytorch/pytorch#135712). A store per attempt avoids it.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if nproc > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default: N workers must not each take every core


def _failed(exc: Any, max_restarts: int) -> int:
    """The agent gave up (restarts spent). Workers that all committed on the same signal keep 128+N."""
    codes = sorted({f.exitcode for f in exc.failures.values()})
    if len(codes) == 1 and exitcodes.stopped(codes[0]):
        print(f"harness launch: workers stopped on {exitcodes.signal_name(codes[0] - 128)} after committing; "
              f"exit {codes[0]}", file=sys.stderr)
        return codes[0]
    rank, first = min(exc.failures.items(), key=lambda kv: kv[1].timestamp)
    why = (f"killed by {exitcodes.signal_name(-first.exitcode)}" if first.exitcode < 0
           else f"exit code {first.exitcode}")
    print(f"harness launch: workers failed after {max_restarts} restart(s) (first: rank {rank}, {why}); "
          f"exit {exitcodes.EXIT_ERROR}", file=sys.stderr)
    return exitcodes.EXIT_ERROR


def _agent(args: LaunchArgs, cfg: Any, stopper: Stopper, preload_status: str = "") -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    logging.getLogger(AGENT_LOGGER).addFilter(_RestartNote(stopper.folder))
    launch_cfg = _launch_config(args, cfg, stopper, preload_status)
    stopper.workers = launch_cfg.nproc_per_node
    _worker_env(stopper.folder, launch_cfg.nproc_per_node)
    argv = ["train", "--config", args.config]
    for s in args.overrides:
        argv += ["--set", s]
    if preload_status:  # forked workers get the environment as the agent's subprocesses would inherit it
        def launch() -> Any:
            return elastic_launch(launch_cfg, workerstart.run_worker)(dict(os.environ), argv)
    else:
        def launch() -> Any:
            return elastic_launch(launch_cfg, sys.executable)("-u", "-m", "harness", *argv)
    try:  # started again while the rendezvous host is lost (harness/rendezvous.py)
        rendezvous.run_agent(launch, args.rdzv_endpoint, args.rejoin_s, stopper.stopping)
    except ChildFailedError as exc:
        stopper.close()
        return _outcome(stopper) if stopper.record else _failed(exc, args.max_restarts)
    stopper.close()
    return _outcome(stopper) if stopper.record or stopper.signum else exitcodes.EXIT_OK


def _outcome(stopper: Stopper) -> int:
    """After the agent stopped: a permanent error wins (a save that failed during a signal stop included). A
    worker's record of a stop on a signal speaks for the job when the signal reached it through another node
    (this launcher was not signalled itself); otherwise this launcher's own signal gives the code."""
    record, own_signal = stopper.record, stopper.signum and not stopper.self_stop
    if record is not None and not (own_signal and record.code >= exitcodes.EXIT_SIGNAL_BASE):
        print(record.line, file=sys.stderr)
        return record.code
    name = exitcodes.signal_name(stopper.signum)
    if record is None and own_signal and stopper.all_finished():  # the signal came as the job was ending
        print(f"harness launch: got {name} after every worker had finished training; exit {exitcodes.EXIT_OK}",
              file=sys.stderr)
        return exitcodes.EXIT_OK
    if stopper.signum not in HANDLED:  # SIGHUP/SIGQUIT, torch's: workers are stopped without a checkpoint
        print(f"harness launch: stopped by {name}, workers ended without a checkpoint; exit {exitcodes.EXIT_ERROR}",
              file=sys.stderr)
        return exitcodes.EXIT_ERROR
    code = exitcodes.signal_code(stopper.signum)
    # No worker said it committed: they were killed, ran out of memory or crashed in the save, or were starting.
    how = ("; exit" if record else ", but no worker confirmed a checkpoint for this stop; exit")
    print(f"harness launch: stopped by {name}{how} {code} (retryable: a restart resumes)", file=sys.stderr)
    return code


def _prepare(args: LaunchArgs, stopper: Stopper) -> Any:
    """The checks before any worker (config, workload, storage) and torch's launcher imports, on a helper
    thread, the main thread waiting for them or for a signal (see :class:`Stopper`). Returns the config, or
    the exit code when the checks failed or a signal came first (the helper is then left behind: it is a
    daemon, and the process leaves without waiting for it)."""
    from harness.errors import StorageError

    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["cfg"] = _check(args)
            _setup_logging()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            box["exc"] = exc

    helper = threading.Thread(target=run, name="harness-launch-check", daemon=True)
    helper.start()
    while helper.is_alive() and not stopper.signum:
        helper.join(POLL_S)
    if stopper.signum:
        code = exitcodes.signal_code(stopper.signum)
        print(f"harness launch: stopped by {exitcodes.signal_name(stopper.signum)} before any worker started; "
              f"exit {code} (retryable: a restart resumes)", file=sys.stderr)
        return code
    exc = box.get("exc")
    if isinstance(exc, (ConfigError, StorageError)):
        outcome = exitcodes.classify(exc)
        exitcodes.print_line(outcome, exc)
        return outcome.code
    if exc is not None:
        raise exc
    return box["cfg"]


def run_launch(ns: argparse.Namespace) -> int:
    try:
        args = parse_args(ns)
    except ConfigError as exc:
        exitcodes.print_line(exitcodes.classify(exc), exc)
        return exitcodes.EXIT_CONFIG
    folder = tempfile.mkdtemp(prefix="harness-launch-")
    stopper = Stopper(folder)
    stopper.install()  # from here on, a signal means "stop, exit 128+N"
    try:
        preload_status = workerstart.start_forkserver(folder) if args.start_method == workerstart.FORKSERVER else ""
        with _quiet_cpp_warnings():
            cfg = _prepare(args, stopper)
        if isinstance(cfg, int):
            return cfg
        from torch.distributed.elastic.multiprocessing import SignalException
        try:
            stopper.arm()
            if stopper.signum:  # came between the checks and arm(): the agent never started
                return _outcome(stopper)
            stopper.watch()
            return _agent(args, cfg, stopper, preload_status)
        except SignalException as exc:  # ours (first signal, or the stop for a permanent error), or torch's
            stopper.close()
            stopper.signum = stopper.signum or int(exc.sigval)
            return _outcome(stopper)
        except Exception as exc:  # noqa: BLE001 - rendezvous timeouts and the like: one line, retryable
            stopper.close()
            if stopper.stopping():
                return _outcome(stopper)
            if exitcodes.debug():
                raise
            why = rendezvous.describe(exc, args.rdzv_endpoint, args.rejoin_s)
            print(f"harness launch: {why}; exit {exitcodes.EXIT_ERROR}", file=sys.stderr)
            return exitcodes.EXIT_ERROR
    finally:
        stopper.close()
        shutil.rmtree(folder, ignore_errors=True)
