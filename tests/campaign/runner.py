"""Fault campaign: many randomized trials that try to make harness lose, hide or corrupt a checkpoint.

Every trial draws its own seed from the campaign seed and prints one line ``kind seed outcome [detail]``;
a failing trial is replayed alone with ``--replay KIND:SEED``. Two families:

* in-process (fast, most of the count): a CheckpointManager save sequence on local disk or memory:// (or,
  with ``--s3-trials``, S3: moto's server behind tests/s3_proxy.py failing 0-10 % of requests) with
  a fault at a random ``save.*`` / ``retention.delete`` point (a crash: an exception no ``except Exception``
  catches, standing for the process dying there; or a handled error: FaultInjected / ENOSPC through the
  seam), or random damage (byte flip, truncation, deletion) of a random file of a random committed
  checkpoint. Then a fresh manager restores, and the trial checks: the restored state is bitwise the
  expected checkpoint's (the newest intact one), no committed checkpoint went missing except by retention,
  an interrupted save left nothing visible, and every damaged checkpoint is reported (RestoreResult.skipped
  or verify_checkpoint raising CheckpointError).
* process (slow): a 2-rank torchrun job killed with SIGKILL (whole tree, or one rank), SIGTERM'd, or hit by
  HARNESS_FAULT at a random point and step, then started again with the same command; its final checkpoint
  must equal an uninterrupted reference run's bit for bit.

Outcomes: ``ok``; ``FAIL``; ``KNOWN`` for a trial that hit a documented harness bug (none open now; see RELIABILITY.md),
counted apart from failures. Exit status 1 if any trial failed.

    python -m tests.campaign.runner --trials 600 --s3-trials 40 --process-trials 30 --seed 20261125 --json out.json
    python -m tests.campaign.runner --replay damage:flip:12345
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import torch  # noqa: E402
from fsspec.implementations.memory import MemoryFileSystem  # noqa: E402

from harness import faults  # noqa: E402
from harness.checkpoint import CheckpointManager  # noqa: E402
from harness.checkpoint.discovery import list_checkpoints, verify_checkpoint  # noqa: E402
from harness.errors import CheckpointError  # noqa: E402
from harness.storage import Storage  # noqa: E402

SAVE_POINTS = ["save.data_file", "save.before_manifest", "save.after_manifest", "save.before_commit",
               "save.after_commit", "retention.delete"]
DAMAGES = ["flip", "truncate", "delete"]
PROCESS_KINDS = ["kill9-tree", "kill9-rank", "sigterm", "fault", "node-loss"]
PROCESS_FAULT_POINTS = ["train.step", "save.data_file", "save.before_manifest", "save.after_manifest",
                        "save.before_commit", "save.after_commit", "retention.delete"]


class Crash(BaseException):
    """The process 'dies' here: not an Exception, so no handler in harness can swallow it."""


class TrialFailure(AssertionError):
    pass


class KnownIssue(Exception):
    """A trial hit a documented, reported harness bug (see RELIABILITY.md); counted apart from failures."""


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise TrialFailure(msg)


@dataclass
class Result:
    kind: str
    seed: int
    outcome: str           # ok | FAIL
    detail: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        return f"{self.kind:<34} seed={self.seed:<11d} {self.outcome:<4} {self.seconds:6.2f}s {self.detail}"


# -- in-process trials ---------------------------------------------------------------------------------

def _objects(seed: int):
    from ckpt_helpers import fresh
    return fresh(seed)


def _state(model, opt, sched) -> dict:
    from ckpt_helpers import snapshot
    return snapshot({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})


_OPTS: dict[str, dict] = {}      # storage_options per checkpoint URL (S3 trials go through the fault proxy)
_S3: dict = {}                   # the moto server and fault proxy, started on the first S3 trial


def _s3_url(rng: random.Random) -> str:
    """A fresh bucket behind the fault proxy, failing a random fraction (0..10 %) of requests."""
    if not _S3:
        from s3_proxy import FaultProxy
        from s3_server import S3Server
        _S3["server"] = S3Server().start()
        _S3["proxy"] = FaultProxy(_S3["server"].endpoint, stall_s=1.5).start()
    rate = rng.choice([0.0, 0.02, 0.05, 0.1])
    _S3["proxy"].configure(rate=rate, seed=rng.randrange(1 << 31))
    url = f"s3://{_S3['server'].new_bucket('campaign')}/run"
    _OPTS[url] = {"endpoint_url": _S3["proxy"].url, "config_kwargs": {"read_timeout": 1.0, "connect_timeout": 1.0},
                  "harness_part_size_mb": 1 / 64, "harness_max_concurrency": 3, "harness_retry_budget_s": 60}
    return url


def stop_s3() -> None:
    if _S3:
        _S3.pop("proxy").stop()
        _S3.pop("server").stop()


def _storage(url: str) -> Storage:
    return Storage(url, _OPTS.get(url))


def _mgr(url: str, **kw) -> CheckpointManager:
    return CheckpointManager(url, storage_options=_OPTS.get(url), **kw)


def _location(rng: random.Random, tmp: Path, s3: bool = False) -> tuple[str, str]:
    if s3:
        return "s3", _s3_url(rng)
    if rng.random() < 0.5:
        return "local", str(tmp / f"ck-{uuid.uuid4().hex[:8]}")
    return "memory", f"memory://campaign-{uuid.uuid4().hex}/run"


def _cleanup(where: str, url: str) -> None:
    if where == "local":
        shutil.rmtree(url, ignore_errors=True)
    elif where == "memory":
        _clear_memory()
    if where == "s3" and _S3:
        _S3["proxy"].configure(rate=0.0)


def _clear_memory() -> None:
    MemoryFileSystem.store.clear()
    MemoryFileSystem.pseudo_dirs[:] = [""]


def _committed(url: str) -> list[int]:
    return [i.step for i in list_checkpoints(_storage(url)) if i.problem is None]


def _restore_and_compare(url: str, expected_step: int | None, states: dict[int, dict], seed: int):
    from ckpt_helpers import assert_bitwise
    model, opt, sched = _objects(seed + 7)
    mgr = _mgr(url, keep_last=0)
    try:
        result = mgr.restore(models=model, optimizers=opt, schedulers=sched)
    finally:
        mgr.close()
    if expected_step is None:
        check(result is None, f"restore found {result and result.name}, expected no checkpoint")
        return None
    check(result is not None, f"restore found nothing, expected step {expected_step}")
    check(result.step == expected_step, f"restored step {result.step}, expected {expected_step}")
    try:
        assert_bitwise(states[expected_step], _state(model, opt, sched))
    except AssertionError as exc:
        raise TrialFailure(f"restored state differs from step {expected_step}: {exc}") from None
    return result


def trial_save_fault(seed: int, tmp: Path, point: str | None = None, action: str | None = None,
                     s3: bool = False) -> str:
    """A save sequence with one fault at a random occurrence of a random point, then a restart."""
    from ckpt_helpers import train_step
    rng = random.Random(seed)
    where, url = _location(rng, tmp, s3)
    point = point or rng.choice(SAVE_POINTS)
    action = action or rng.choice(["crash", "crash", "raise", "enospc"])
    keep_last = rng.choice([0, 1, 2, 3])
    n_saves = rng.randint(2, 6)
    fire_at = rng.randint(1, n_saves * (3 if point == "save.data_file" else 1))
    calls = Counter()
    fired: dict = {}

    def hook(name: str, info: dict) -> None:
        if name != point or fired:
            return
        calls[name] += 1
        if calls[name] == fire_at:
            fired.update(info, at_save=current[0])
            if action == "crash":
                raise Crash(f"crash at {name}")
            if action == "enospc":
                raise OSError(errno.ENOSPC, f"No space left on device (injected at {name})")
            raise faults.FaultInjected(f"fault injected at {name}")

    torch.manual_seed(seed)
    model, opt, sched = _objects(seed)
    mgr = _mgr(url, keep_last=keep_last, max_file_bytes=rng.choice([256, 1 << 20]))
    states: dict[int, dict] = {}
    saved: list[int] = []        # steps whose save() returned normally
    failed: list[int] = []       # steps whose save() raised a handled error
    current = [0]
    crashed_at = None
    faults.install(hook)
    try:
        for step in range(1, n_saves + 1):
            train_step(model, opt, sched, seed=seed + step)
            states[step] = _state(model, opt, sched)
            current[0] = step
            try:
                mgr.save(step, models=model, optimizers=opt, schedulers=sched)
                saved.append(step)
            except Crash:
                crashed_at = step
                break
            except CheckpointError as exc:
                check(bool(fired) and fired["at_save"] == step, f"save {step} failed without a fault: {exc}")
                failed.append(step)
    finally:
        faults.install(None)
        if crashed_at is None:
            mgr.close()
        elif mgr._pool is not None:
            mgr._pool.shutdown(wait=False)
    committed = _committed(url)
    # Atomic commit: a save that did not return is visible only if it crashed after the commit record.
    for step in failed + ([crashed_at] if crashed_at else []):
        after_commit = fired.get("at_save") == step and point in ("save.after_commit", "retention.delete")
        if step in committed:
            check(after_commit, f"step {step} is committed although its save failed at {point}")
    if action != "crash":
        check(not any(s in committed for s in failed if point.startswith("save.") and point != "save.after_commit"),
              f"failed saves {failed} visible: {committed}")
    # Nothing lost but by retention: the newest keep_last successful saves are all still committed.
    # (Fixed bug B2: an error after the commit record is in place must not fail the save.)
    b2 = [s for s in failed if s in committed and point == "save.after_commit"]
    check(not b2, f"save() failed for committed step(s) {b2} ({action} at {point}): bug B2 is back")
    good = sorted(saved)
    must = good if keep_last == 0 else good[-keep_last:]
    check(all(s in committed for s in must), f"committed {committed} lost some of {must} (keep_last={keep_last})")
    check(all(s in saved or s == crashed_at for s in committed), f"unexpected committed steps {committed}")
    expected = max(committed) if committed else None
    _restore_and_compare(url, expected, states, seed)
    # The next run goes on saving past whatever the crash left behind.
    if crashed_at is not None:
        model2, opt2, sched2 = _objects(seed + 11)
        mgr2 = _mgr(url, keep_last=keep_last)
        try:
            mgr2.save(n_saves + 1, models=model2, optimizers=opt2, schedulers=sched2)
        finally:
            mgr2.close()
        states[n_saves + 1] = _state(model2, opt2, sched2)
        check(_committed(url)[-1] == n_saves + 1, "save after the crash not committed")
        _restore_and_compare(url, n_saves + 1, states, seed)
    _cleanup(where, url)
    return (f"{where} keep_last={keep_last} saves={n_saves} fire#{fire_at} "
            f"{'fired@' + str(fired.get('at_save')) if fired else 'not-reached'} committed={committed}")


def _damage(storage: Storage, rel: str, how: str, rng: random.Random) -> str:
    data = storage.read_bytes(rel)
    if how == "delete":
        storage.remove(rel)
        return f"deleted {rel}"
    if how == "truncate":
        cut = rng.randrange(0, max(1, len(data)))
        storage.write_bytes(rel, data[:cut])
        return f"truncated {rel} {len(data)}->{cut}"
    pos = rng.randrange(len(data))
    mask = rng.randrange(1, 256)
    buf = bytearray(data)
    buf[pos] ^= mask
    storage.write_bytes(rel, bytes(buf))
    return f"flipped {rel}@{pos}^{mask:#04x}"


def trial_damage(seed: int, tmp: Path, how: str | None = None, s3: bool = False) -> str:
    """Committed checkpoints, one file of one of them damaged; restore takes the newest intact one and
    reports the damaged one; verify refuses it; later saves never delete it."""
    from ckpt_helpers import train_step
    rng = random.Random(seed)
    where, url = _location(rng, tmp, s3)
    how = how or rng.choice(DAMAGES)
    n_saves = rng.randint(2, 5)
    torch.manual_seed(seed)
    model, opt, sched = _objects(seed)
    mgr = _mgr(url, keep_last=0, max_file_bytes=rng.choice([256, 1 << 20]))
    states: dict[int, dict] = {}
    for step in range(1, n_saves + 1):
        train_step(model, opt, sched, seed=seed + step)
        states[step] = _state(model, opt, sched)
        mgr.save(step, models=model, optimizers=opt, schedulers=sched)
    mgr.close()
    storage = _storage(url)
    infos = list_checkpoints(storage)
    victim = rng.choice(infos)
    files = sorted(n for n in storage.listdir(victim.name))
    rel = f"{victim.name}/{rng.choice(files)}"
    what = _damage(storage, rel, how, rng)
    storage.refresh()
    # verify must refuse the damaged checkpoint (a deleted COMMIT: it is no longer committed at all)
    try:
        verify_checkpoint(storage, victim.name)
        verified = True
    except CheckpointError:
        verified = False
    covered = _covers_data(storage, victim.name, rel, what)
    newest = victim.step == n_saves
    expected = n_saves - 1 if newest and not verified else n_saves
    expected = expected or None
    result = _restore_and_compare(url, expected, states, seed)
    if newest and not verified:
        check(result is None or any(n == victim.name for n, _ in result.skipped),
              f"{what}: restore did not report the damaged newest checkpoint: {result and result.skipped}")
    if verified and covered:  # (fixed bug B1: damage to the commit record's summary went unnoticed)
        raise TrialFailure(f"{what}: verify_checkpoint accepted the damaged checkpoint")
    # Retention never deletes a damaged checkpoint, nor the newest.
    mgr = _mgr(url, keep_last=1)
    try:
        mgr.restore(models=_objects(1)[0], optimizers=_objects(1)[1], schedulers=_objects(1)[2])
    except CheckpointError:
        pass
    model2, opt2, sched2 = _objects(seed + 3)
    for step in (n_saves + 1, n_saves + 2):
        mgr.save(step, models=model2, optimizers=opt2, schedulers=sched2)
    mgr.close()
    storage.refresh()
    left = set(storage.listdir())
    if newest and not verified:
        check(victim.name in left, f"{what}: retention deleted the damaged checkpoint {victim.name}")
    check(_committed(url)[-1] == n_saves + 2, "newest checkpoint missing after retention")
    _cleanup(where, url)
    return f"{where} saves={n_saves} victim={victim.name} {what}" + ("" if covered else " (padding: no data)")


def _covers_data(storage: Storage, name: str, rel: str, what: str) -> bool:
    """False when a flip hit bytes of a data file that no tensor covers (alignment padding): harmless."""
    if not what.startswith("flipped") or "/data-" not in rel:
        return True
    import json as _json
    pos = int(what.rsplit("@", 1)[1].split("^")[0])
    fname = rel.split("/", 1)[1]
    manifest = _json.loads(storage.read_bytes(f"{name}/manifest.json"))
    return any(e["file"] == fname and e["offset"] <= pos < e["offset"] + e["length"] for e in manifest["tensors"])


# -- process trials ------------------------------------------------------------------------------------

def trial_node_loss(rng: random.Random, runner, run_dir: Path) -> str:
    """Two `harness launch` nodes; one (the rendezvous host or not) is SIGKILLed whole at a random moment after
    the first commit and the same command started again: both must end 0 (checked against the reference by
    the caller). The survivor restarts its workers (or, host lost, its agent: harness/rendezvous.py)."""
    import trainer_helpers as th
    port = th.free_port()
    cmd = th.launch_cmd(run_dir, th.SLOW, nproc=1, nnodes=2, endpoint=f"127.0.0.1:{port}", max_restarts=3)
    nodes = [runner.start("node0", cmd)]
    th.wait_until("the rendezvous store", lambda: th.listening(port), nodes, timeout=60)
    nodes.append(runner.start("node1", cmd))
    th.wait_until("first commit", lambda: th.committed_steps(run_dir / "ck"), nodes, timeout=180)
    delay, which = rng.uniform(0.0, 1.5), rng.choice([0, 1])  # well before the end (~2.5 s of steps left)
    time.sleep(delay)
    if any(n.poll() is not None for n in nodes):
        rcs = [n.wait(120) for n in nodes]
        check(rcs == [0, 0], f"node-loss: a node ended before the kill: {rcs}:\n{nodes[0].tail(20)}")
        return f"node-loss after {delay:.2f}s: run already ended"
    th.wait_gone(th.kill_tree(nodes[which]))
    time.sleep(rng.uniform(0.0, 2.0))  # the replacement comes a little later, like a recreated pod
    survivor, replacement = nodes[1 - which], runner.start("replacement", cmd)
    rcs = [survivor.wait(240), replacement.wait(240)]
    check(rcs == [0, 0], f"node-loss of node{which} after {delay:.2f}s: exit {rcs}:\n{survivor.tail(30)}")
    return f"node-loss of node{which} ({'host' if which == 0 else 'other'}) after {delay:.2f}s"


def trial_process(seed: int, tmp: Path, ref, kind: str | None = None) -> str:
    import trainer_helpers as th
    rng = random.Random(seed)
    kind = kind or rng.choice(PROCESS_KINDS)
    run_dir = tmp / f"proc-{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    runner = th.Runner(run_dir)
    try:
        if kind == "node-loss":
            detail = trial_node_loss(rng, runner, run_dir)
            try:
                th.assert_same_final(run_dir, ref)
            except AssertionError as exc:
                raise TrialFailure(f"{detail}: final state differs from the reference: {exc}") from None
            return detail
        if kind == "fault":
            point = rng.choice(PROCESS_FAULT_POINTS)
            if point == "train.step":
                step = rng.randint(1, th.MAX_STEPS - 1)
            else:
                step = rng.choice([s for s in range(th.EVERY, th.MAX_STEPS, th.EVERY)])
            rank = rng.choice([0, 1]) if point in ("train.step", "save.data_file") else 0
            action = rng.choice(["sigkill", "sigkill", "exit", "raise"])
            spec = f"{point}:{action}:rank={rank}" + ("" if point == "retention.delete" else f":step={step}")
            first = runner.run("first", th.torchrun_cmd(run_dir), env=th.base_env(HARNESS_FAULT=spec))
            detail = f"HARNESS_FAULT={spec} rc={first.rc}"
        else:
            first = runner.start("first", th.torchrun_cmd(run_dir, th.SLOW))
            th.wait_until("first commit", lambda: th.committed_steps(run_dir / "ck"), [first], timeout=180)
            delay = rng.uniform(0.0, 3.0)
            time.sleep(delay)
            if first.poll() is not None:
                detail = f"{kind} after {delay:.2f}s: run already ended rc={first.rc}"
            elif kind == "kill9-tree":
                pids = th.kill_tree(first, signal.SIGKILL)
                first.wait(60)
                th.wait_gone(pids)
                detail = f"kill -9 tree after {delay:.2f}s"
            elif kind == "kill9-rank":
                rank = rng.choice([0, 1])
                try:
                    victim = first.worker_of_rank(rank)
                except AssertionError:  # the workers have finished; only the agent is still on its way out
                    victim = None
                if victim is None:
                    first.wait(120)
                    detail = f"{kind} after {delay:.2f}s: workers already ended rc={first.rc}"
                else:
                    os.kill(victim, signal.SIGKILL)
                    first.wait(120)
                    detail = f"kill -9 rank {rank} after {delay:.2f}s rc={first.rc}"
            else:
                os.kill(first.pid, signal.SIGTERM)
                first.wait(120)
                detail = f"SIGTERM agent after {delay:.2f}s rc={first.rc}"
            pids = [first.pid, *th.descendants(first.pid)]
            th.kill_tree(first)
            th.wait_gone(pids, timeout=30)
        before = th.committed_steps(run_dir / "ck")
        second = runner.run("rerun", th.torchrun_cmd(run_dir), timeout=240)
        check(second.rc == 0, f"{detail}: rerun exit {second.rc}:\n{second.tail(30)}")
        resumed = th.resumed_from(second.log())
        if before:
            check(before[-1] == th.MAX_STEPS or resumed == [before[-1]] * 2,
                  f"{detail}: resumed from {resumed}, newest commit was {before[-1]}")
        try:
            th.assert_same_final(run_dir, ref)
        except AssertionError as exc:
            raise TrialFailure(f"{detail}: final state differs from the reference: {exc}") from None
        return f"{detail} committed-before={before} resumed={resumed}"
    finally:
        runner.close()
        shutil.rmtree(run_dir, ignore_errors=True)


# -- campaign ------------------------------------------------------------------------------------------

def _kind_of(rng: random.Random) -> tuple[str, dict]:
    r = rng.random()
    if r < 0.6:
        point = rng.choice(SAVE_POINTS)
        action = rng.choice(["crash", "crash", "raise", "enospc"])
        return f"save-fault:{point}:{action}", {"point": point, "action": action}
    how = rng.choice(DAMAGES)
    return f"damage:{how}", {"how": how}


def run_one(kind: str, seed: int, tmp: Path, ref=None) -> Result:
    t0 = time.monotonic()
    try:
        s3 = kind.startswith("s3:")
        parts = kind.removeprefix("s3:").split(":")
        if parts[0] == "save-fault":
            detail = trial_save_fault(seed, tmp, point=parts[1], action=parts[2], s3=s3)
        elif parts[0] == "damage":
            detail = trial_damage(seed, tmp, how=parts[1], s3=s3)
        elif parts[0] == "process":
            detail = trial_process(seed, tmp, ref, kind=parts[1])
        else:
            raise ValueError(f"unknown trial kind {kind!r}")
        outcome = "ok"
    except KnownIssue as exc:
        outcome, detail = "KNOWN", str(exc)
    except TrialFailure as exc:
        outcome, detail = "FAIL", str(exc).replace("\n", " | ")[:2000]
    except Exception as exc:  # noqa: BLE001 - an unexpected exception is a failure of the trial too
        outcome = "FAIL"
        detail = f"{type(exc).__name__}: {exc} | " + traceback.format_exc().replace("\n", " | ")[-1500:]
    finally:
        faults.install(None)
    return Result(kind, seed, outcome, detail, time.monotonic() - t0)


def summarize(results: list[Result]) -> dict:
    table: dict[str, dict] = defaultdict(lambda: {"trials": 0, "failures": 0, "seconds": 0.0})
    for r in results:
        row = table[r.kind]
        row["trials"] += 1
        row["failures"] += r.outcome == "FAIL"
        row["known_bug"] = row.get("known_bug", 0) + (r.outcome == "KNOWN")
        row["seconds"] = round(row["seconds"] + r.seconds, 2)
    return {k: table[k] for k in sorted(table)}


def print_table(summary: dict, out=sys.stdout) -> None:
    print(f"\n{'fault kind':<44} {'trials':>6} {'failures':>8} {'known bug':>9}", file=out)
    for kind, row in summary.items():
        print(f"{kind:<44} {row['trials']:>6} {row['failures']:>8} {row['known_bug']:>9}", file=out)
    total = sum(r["trials"] for r in summary.values())
    fails = sum(r["failures"] for r in summary.values())
    known = sum(r["known_bug"] for r in summary.values())
    print(f"{'TOTAL':<44} {total:>6} {fails:>8} {known:>9}", file=out)


def campaign(trials: int, seed: int, process_trials: int = 0, tmp: Path | None = None,
             json_path: str | None = None, out=sys.stdout, s3_trials: int = 0) -> dict:
    """Run ``trials`` in-process trials and ``process_trials`` torchrun trials; returns the JSON summary."""
    master = random.Random(seed)
    own_tmp = tmp is None
    tmp = Path(tempfile.mkdtemp(prefix="harness-campaign-")) if own_tmp else tmp
    results: list[Result] = []
    t0 = time.monotonic()
    print(f"campaign seed={seed} trials={trials} s3_trials={s3_trials} process_trials={process_trials} "
          f"(replay one: python -m tests.campaign.runner --replay KIND:SEED)", file=out, flush=True)
    try:
        for _ in range(trials):
            kind, _ = _kind_of(master)
            r = run_one(kind, master.randrange(1 << 31), tmp)
            results.append(r)
            print(r.line(), file=out, flush=True)
        for _ in range(s3_trials):
            kind, _ = _kind_of(master)
            r = run_one(f"s3:{kind}", master.randrange(1 << 31), tmp)
            results.append(r)
            print(r.line(), file=out, flush=True)
        if process_trials:
            import trainer_helpers as th
            ref = th.Reference(tmp / "reference")
            for i in range(process_trials):
                kind = f"process:{PROCESS_KINDS[i % len(PROCESS_KINDS)]}"
                r = run_one(kind, master.randrange(1 << 31), tmp, ref)
                results.append(r)
                print(r.line(), file=out, flush=True)
    finally:
        stop_s3()
        if own_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    summary = summarize(results)
    print_table(summary, out)
    doc = {"seed": seed, "trials": len(results), "failures": sum(r.outcome == "FAIL" for r in results),
           "known_bug": sum(r.outcome == "KNOWN" for r in results),
           "seconds": round(time.monotonic() - t0, 1), "torch": torch.__version__,
           "command": f"python -m tests.campaign.runner --trials {trials} --s3-trials {s3_trials} "
                      f"--process-trials {process_trials} --seed {seed}",
           "by_kind": summary,
           "failed": [r.__dict__ for r in results if r.outcome == "FAIL"],
           "known": [r.__dict__ for r in results if r.outcome == "KNOWN"]}
    if json_path:
        Path(json_path).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"summary written to {json_path}", file=out)
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=200, help="in-process trials")
    p.add_argument("--process-trials", type=int, default=0, help="torchrun kill/restart trials")
    p.add_argument("--s3-trials", type=int, default=0, help="in-process trials on S3 (moto + fault proxy)")
    p.add_argument("--seed", type=int, default=None, help="campaign seed (random and printed if not given)")
    p.add_argument("--json", dest="json_path", help="write the summary as JSON here")
    p.add_argument("--replay", help="run one trial: KIND:SEED as printed, e.g. damage:flip:12345")
    args = p.parse_args(argv)
    import logging
    logging.getLogger("harness").setLevel(logging.CRITICAL)
    if args.replay:
        kind, seed = args.replay.rsplit(":", 1)
        ref = None
        with tempfile.TemporaryDirectory(prefix="harness-replay-") as d:
            if kind.startswith("process:"):
                import trainer_helpers as th
                ref = th.Reference(Path(d) / "reference")
            try:
                r = run_one(kind, int(seed), Path(d), ref)
            finally:
                stop_s3()
        print(r.line())
        return 1 if r.outcome == "FAIL" else 0
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    doc = campaign(args.trials, seed, args.process_trials, json_path=args.json_path, s3_trials=args.s3_trials)
    return 0 if doc["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
