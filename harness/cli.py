"""The ``harness`` command: ``launch``, ``train`` and ``ckpt ...``; ``--version``.

Errors end in one line and the documented exit code (harness/exitcodes.py); HARNESS_DEBUG=1 adds tracebacks.
A closed pipe (``harness ckpt inspect DIR | head -1``) ends the command quietly with 141 (128+SIGPIPE), as
``git log | head`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import traceback
from typing import Any, NoReturn

from harness import exitcodes, faults, gcpause
from harness.errors import HarnessError

log = logging.getLogger("harness")

EXIT_BROKEN_PIPE = 141   # 128 + SIGPIPE: what a shell reports for `git log | head`'s git


def version() -> str:
    try:
        from harness._version import __version__
        return __version__
    except ImportError:  # an older checkout without the module: the installed distribution's metadata
        from importlib import metadata
        try:
            return metadata.version("harness")
        except metadata.PackageNotFoundError:
            return "unknown"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``command`` = train or launch, one without the ``ckpt`` commands' options (they
    import the checkpoint and export layers: time a starting job does not need to spend)."""
    parser = argparse.ArgumentParser(prog="harness", description="Fault-tolerant distributed training for PyTorch",
                                     epilog=exitcodes.TABLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"harness {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    from harness.launch_args import add_launch_parser
    add_launch_parser(sub)
    p = sub.add_parser("train", help="run training in this process (under torchrun for several processes)",
                       epilog=exitcodes.TABLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML config file (defaults are used for anything it leaves out)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable")
    if command in ("train", "launch"):
        sub.add_parser("ckpt", help="inspect and manage checkpoint folders")
        return parser
    from harness.ckpt_parser import add_ckpt_parser
    add_ckpt_parser(sub)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option), if any."""
    return next((str(a) for a in argv if not str(a).startswith("-")), None)


def _report(outcome: exitcodes.Outcome, exc: BaseException) -> None:
    """One line per problem. Under ``harness launch`` a permanent error goes to the launcher, which prints it
    once and stops the job; under bare torchrun the ranks agree on it (the checkpoint layer broadcasts its
    errors, every rank reads the same config), so rank 0 alone prints it. Retryable errors are per rank:
    every rank that hits one says so."""
    if exitcodes.debug():
        traceback.print_exception(exc, file=sys.stderr)
    if outcome.permanent:
        from harness.launch_folder import report_outcome
        if report_outcome(outcome):
            return
        if os.environ.get("RANK", "0") != "0" and not exitcodes.debug():
            return
    exitcodes.print_line(outcome)


def _report_stop(code: int) -> None:
    """Under ``harness launch``: tell the launcher that this worker stopped with a committed checkpoint on a
    signal (every rank stops together: the signal reached any rank of the job, on any node), so that its agent
    ends the job with that code instead of restarting the workers (``--max-restarts``). Without it, the node
    whose launcher was not signalled restarted its workers into a rendezvous the stopped node never joins."""
    from harness.launch_folder import report_outcome
    name = exitcodes.signal_name(code - exitcodes.EXIT_SIGNAL_BASE)
    report_outcome(exitcodes.Outcome(code, f"harness launch: workers stopped on {name} after committing a "
                                             f"checkpoint; exit {code} (retryable: a restart resumes)"))


def run_train(args: argparse.Namespace) -> int:
    from harness import config, launch_folder, prefetch, srun, stopping
    try:
        srun.adopt()  # an srun task of several: torchrun's variables from SLURM's, before anything reads RANK
        cfg = config.load(args.config, args.overrides)
        # Before torch is imported: the disk reads the checkpoint to resume while the interpreter starts up.
        prefetch.start(cfg.checkpoint.dir)
        from harness import trainer
        importlib.import_module("torch._dynamo")  # the optimizer's constructor imports it: here, before the freeze
        gcpause.freeze_and_resume()  # paused by entry() (harness/gcpause.py); a no-op in a forked worker
        code = trainer.train(cfg, exit_after=True)
        if exitcodes.stopped(code) and not stopping.stopped_for_restart():  # a restart does not end the job
            _report_stop(code)
        elif code == exitcodes.EXIT_OK:
            launch_folder.report_finished()
            faults.point("train.finished", rank=int(os.environ.get("RANK", "0")))
        return code
    except Exception as exc:
        outcome = exitcodes.classify(exc)
        if outcome is None:
            raise  # not one of ours: a bug, with its traceback (exit 1)
        _report(outcome, exc)
        return outcome.code


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "train":
        return run_train(args)
    if args.command == "launch":
        from harness.launch import run_launch
        return run_launch(args)
    from harness.ckpt_cli import run_ckpt
    gcpause.freeze_and_resume()  # torch is imported (paused by entry(): 1.55 -> 1.0 s for `ckpt list`)
    try:
        return run_ckpt(args)
    except HarnessError as exc:
        if exitcodes.debug():
            raise
        print(f"harness: error: {exc}", file=sys.stderr)
        return 1


class _PipeGuard:
    """stdout for one command: a reader that went away (``| head``) ends the command quietly, wherever the
    write happens. SystemExit passes through the subcommands' error handlers (they catch OSError, which a
    BrokenPipeError is, to report storage problems)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            _closed_pipe()

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            _closed_pipe()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _closed_pipe() -> NoReturn:
    # The Python docs' recipe: point stdout at devnull so the interpreter's final flush cannot raise again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.__stdout__.fileno())
    raise SystemExit(EXIT_BROKEN_PIPE)


def entry() -> NoReturn:
    """The process entry point (the ``harness`` script, ``python -m harness``). ``train`` and ``launch`` leave
    through :func:`harness.exiting.leave` (no interpreter teardown: in a worker it can abort a finished job,
    SIGABRT, when a gloo thread still holds a tensor; in both it takes ~0.4-0.7 s with torch loaded, time a
    scheduler waits for the exit code). Other commands exit as usual."""
    argv = sys.argv[1:]
    gcpause.pause()  # every command's start-up imports torch: resumed once it has (harness/gcpause.py)
    if _command(argv) not in ("train", "launch"):
        _defer_signals()
    code = run(argv)
    if _command(argv) in ("train", "launch"):
        from harness.exiting import leave  # no torch: the launcher may leave while torch is still importing
        leave(code)
    sys.exit(code)


# The other commands (ckpt ...) while they import torch: signals noted, acted on once the imports are done.
_noted: list[int] | None = None


def _note(signum: int, frame: Any) -> None:
    if _noted is not None:
        _noted.append(signum)


def _defer_signals() -> None:
    """Until :func:`_end_cleanly_on_signals`: SIGTERM, SIGHUP and SIGINT are noted, not acted on. Raised in the
    middle of torch's or numpy's import, the exit was swallowed (the command went on, exit 0, after saying it
    stopped), became an ImportError traceback, or aborted the process (SIGABRT)."""
    global _noted
    _noted = []
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:  # not one the process was started ignoring (nohup)
            signal.signal(sig, _note)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _note)


def _stop(signum: int, frame: Any) -> NoReturn:
    print(f"harness: stopped by {exitcodes.signal_name(signum)}", file=sys.stderr)
    raise SystemExit(exitcodes.signal_code(signum))


def _end_cleanly_on_signals() -> None:
    """The other commands (ckpt ...), their imports done: SIGTERM and SIGHUP (a timeout, a closed terminal) end
    the command as Ctrl-C does, through its cleanup (an export's temp file is removed: a signal's default action
    left a hidden temp file as large as the export), with one line and 128+N; a signal noted while importing
    ends it now, before it does anything."""
    global _noted
    if _noted is None:
        return
    noted, _noted = _noted, None
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        if signal.getsignal(sig) is _note:
            signal.signal(sig, _stop if sig != signal.SIGINT else signal.default_int_handler)
    if noted:
        _stop(noted[0], None)


def run(argv: list[str]) -> int:
    """A command's exit code, with ``train``'s and ``launch``'s signal handling around it (also what a worker
    forked by the launcher runs: harness/workerstart.py)."""
    long_running = _command(argv) in ("train", "launch")
    if long_running and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        # Until the command's own handler is in, Ctrl-C ends the process quietly, as SIGTERM does: not with a
        # KeyboardInterrupt traceback from whatever import was running. (Python's own handler only: a SIGINT
        # the process was started ignoring, a background job of a script, stays ignored.)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    code = main(argv)
    if long_running:
        # The exit code is decided: a signal from here on (a scheduler repeating SIGTERM) must not replace it
        # by death by that signal while atexit hooks run and files are flushed. (The trainer and the launcher
        # ignore them already once their run is over; this covers the paths that never installed a handler.)
        for sig in exitcodes.STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command(argv)).parse_args(argv)
    if getattr(args, "ckpt_command", None) == "export":
        from harness.ckpt_parser import finish_export
        finish_export(args)
    for url in (u for u in vars(args).values() if isinstance(u, str) and "://" in u):
        # the URL's filesystem (s3fs and its C extensions), imported before signals act again (_defer_signals)
        with contextlib.suppress(ImportError, ValueError):
            importlib.import_module("fsspec").get_filesystem_class(url.split("://", 1)[0])
    _end_cleanly_on_signals()
    stdout = sys.stdout
    sys.stdout = _PipeGuard(stdout)
    try:
        code = _dispatch(args)
        sys.stdout.flush()  # inside the guard: a reader that went away shows up here at the latest
        return code
    except BrokenPipeError:  # raised by a direct write to the stream underneath
        _closed_pipe()
    finally:
        sys.stdout = stdout
