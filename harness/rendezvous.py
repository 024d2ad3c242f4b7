"""The c10d rendezvous of ``harness launch``: its settings (``--rdzv-conf``), and a lost host ridden out.

**Settings.** ``--rdzv-conf KEY=VALUE,...`` (default ``PET_RDZV_CONF``, which the Kubeflow operator fills from
``elasticPolicy.rdzvConf``) goes to the agent as torchrun's does: ``join_timeout`` (600 s: how long a node waits
for the others, e.g. a replacement node still being provisioned), ``last_call_timeout``, ``close_timeout``,
``read_timeout`` (60 s: the store client's connect and read timeout), ``keep_alive_interval``, ... A value that
is not a number where torch expects one is a config error (exit 2) before any worker, not an agent crash.

**A lost host.** torchrun's c10d rendezvous keeps its store in the launcher of one node, the host of
``--rdzv-endpoint``. When that node is lost (a machine down, a pod evicted), the agent of every other node fails
with ``RendezvousConnectionError`` and torchrun exits 1 at once. Under Kubeflow's ``restartPolicy: ExitCode``
(it retries only 130, 137, 138 and 143) that ends the whole job, while the operator is already bringing the lost
pod back. The same happens when a node starts long before the host (an image pull on a fresh machine): torch's
store client gives up after ``read_timeout``.

So, with an endpoint, this launcher starts its agent again after such a failure, for up to
``HARNESS_RDZV_REJOIN_S`` seconds (default 600, torch's own rendezvous join timeout) after the first one. The
new agent reaches the store of the node that took the host's place (or hosts the store itself, when the
endpoint names this machine), its workers rejoin, and the job resumes from its last checkpoint. Each new agent
has the full ``--max-restarts``: it takes a lost host to get one. When the window ends, the failure is
reported as before (exit 1). A later loss, after an agent that ran longer than the window (so it had
reached its store), has a window of its own.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

from harness.config import suggest
from harness.errors import ConfigError

REJOIN_ENV = "HARNESS_RDZV_REJOIN_S"
REJOIN_S = 600.0
# Between agents: 2 s, doubling to 30 s. A refused or unresolvable endpoint (the host's pod deleted, its DNS
# name gone) can fail at once; the pause keeps that to a line every 30 s, not every 2.
PAUSE_S, MAX_PAUSE_S = 2.0, 30.0
# An agent that ran longer than the window, and at least this long, before failing had reached its store: its
# failure is a new loss, with a window of its own. (torch's store client alone can take 2.5 minutes to give up:
# two 60 s connection attempts and a pause.)
REACHED_S = 300.0


# torch's c10d rendezvous settings (its c10d backend, dynamic handler and launcher read no others): the whole
# numbers (seconds or counts), then the rest. An unknown key is refused: torch would ignore a typo silently.
NUMERIC_CONF = ("join_timeout", "last_call_timeout", "close_timeout", "heartbeat_timeout", "read_timeout",
                "keep_alive_interval", "keep_alive_max_attempt", "timeout")
KNOWN_CONF = (*NUMERIC_CONF, "is_host", "store_type")


def parse_conf(text: str) -> dict[str, str]:
    """``KEY=VALUE,...`` as torchrun's ``--rdzv-conf`` takes it; ConfigError for a malformed one."""
    conf: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = (x.strip() for x in item.partition("="))
        if not sep or not key or not value:
            raise ConfigError(f"--rdzv-conf {text!r}: expected KEY=VALUE[,KEY=VALUE...], got {item!r}")
        if key not in KNOWN_CONF:
            raise ConfigError(f"--rdzv-conf: unknown key {key!r}" + suggest(key, list(KNOWN_CONF)))
        if key in NUMERIC_CONF and not (value.isdigit() and int(value) > 0):  # torch reads them with int()
            raise ConfigError(f"--rdzv-conf {key}={value!r}: expected a whole number > 0")
        conf[key] = value
    return conf


def window() -> float:
    """Seconds to keep starting the agent again after the first lost rendezvous (``HARNESS_RDZV_REJOIN_S``)."""
    raw = os.environ.get(REJOIN_ENV, "").strip()
    if not raw:
        return REJOIN_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise ConfigError(f"{REJOIN_ENV}={raw!r}: expected a number of seconds >= 0")
    return value


def run_agent(launch: Callable[[], None], endpoint: str, seconds: float,
              stopping: Callable[[], bool] = lambda: False) -> None:
    """``launch()`` (one elastic agent, to its end), started again while it fails to reach the rendezvous
    at ``endpoint``, until ``seconds`` after the first such failure. No endpoint (one standalone node, whose
    launcher hosts the store itself): once. A signal (torch's ``SignalException``) ends the wait at once, and
    a launcher that is ``stopping`` (signalled, or a worker recorded its outcome: every node is stopping, so
    the host is gone for good) is not started again."""
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

    deadline, pause = None, PAUSE_S
    while True:
        started = time.monotonic()
        try:
            launch()
            return
        except RendezvousConnectionError as exc:
            now = time.monotonic()
            if deadline is None or now - started > max(seconds, REACHED_S):  # a new loss (days later, say)
                deadline, pause = now + seconds, PAUSE_S
            if not endpoint or now >= deadline or stopping():
                raise
            pause = min(pause, deadline - now)
            print(f"harness launch: cannot reach the rendezvous at {endpoint} ({_cause(exc)}); starting the "
                  f"agent again in {pause:.0f} s (for {deadline - now:.0f} s more)", file=sys.stderr, flush=True)
            time.sleep(pause)
            pause = min(2 * pause, MAX_PAUSE_S)
            if stopping():
                raise


def describe(exc: Exception, endpoint: str, seconds: float) -> str:
    """What went wrong outside the workers, in words a user of several nodes can act on."""
    kind, where = type(exc).__name__, endpoint or "this node"
    if kind == "RendezvousConnectionError" and endpoint:
        waited = (f"no node hosted it within {seconds:.0f} s (its host is lost or never started)" if seconds
                  else f"{REJOIN_ENV}=0: not waiting for a host")
        return f"cannot reach the rendezvous at {where}, and {waited} ({_cause(exc)})"
    if kind == "RendezvousTimeoutError":
        return (f"not enough nodes joined the rendezvous at {where} in time (--rdzv-conf join_timeout=SECONDS, "
                f"default 600; {kind}: {exc})")
    return f"{kind}: {exc}"


def _cause(exc: BaseException) -> str:
    """The store's own words (the exception torch chains under its generic message)."""
    inner = exc.__cause__ or exc.__context__
    text = str(inner or exc).strip().splitlines()
    return (text[0] if text else type(inner or exc).__name__)[:200]
