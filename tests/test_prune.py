"""No leaked saves (harness/checkpoint/prune.py): uncommitted step folders and unfinished S3 uploads that
killed saves leave behind are removed by the next start of the job (rank 0, holding the run lease) and by
`harness ckpt prune`; committed checkpoints, damaged ones included, are never touched.

The end-to-end tests SIGKILL a real `python -m harness train` in the middle of a save five times in a row
(fault seam: HARNESS_FAULT), on a local folder and on S3 (moto), and check after each kill that at most the
save in flight is uncommitted and the folder stays bounded."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ckpt_helpers import simple_run
from harness import CheckpointManager, faults, lease
from harness.checkpoint.discovery import list_checkpoints
from harness.checkpoint.format import COMMIT_FILE
from harness.checkpoint.prune import PruneReport, clean_leftovers, prune
from harness.ckpt_cli import add_ckpt_parser, run_ckpt
from harness.storage import Storage

REPO = Path(__file__).resolve().parents[1]


# -- unit: prune on local folders and memory:// -------------------------------------------------------

def _fail_at(point: str, step: int):
    def hook(name, info):
        if name == point and info.get("step") == step:
            raise faults.FaultInjected(f"killed at {name}")
    return hook


def _tree(storage: Storage, rel: str) -> dict[str, bytes]:
    return {f"{rel}/{n}": storage.read_bytes(f"{rel}/{n}") for n in storage.listdir(rel)}


def _populate(url: str) -> Storage:
    """Committed 10 (healthy), 20 (unreadable commit record), 30 (a truncated data file: committed, damaged);
    then two saves that died: 40 before its commit record, 50 after its first data file; plus files that
    are not checkpoints."""
    model, opt, sched = simple_run()
    mgr = CheckpointManager(url, keep_last=0, max_file_bytes=200)
    for step in (10, 20, 30):
        mgr.save(step, models=model, optimizers=opt, schedulers=sched, loss=1.0 / step)
    st = mgr.storage
    st.commit_bytes(f"step-000000020/{COMMIT_FILE}", b"\x00 not a commit record")
    data = sorted(n for n in st.listdir("step-000000030") if n.startswith("data-"))[0]
    st.write_bytes(f"step-000000030/{data}", st.read_bytes(f"step-000000030/{data}")[:10])
    for step, point in ((40, "save.before_commit"), (50, "save.data_file")):
        faults.install(_fail_at(point, step))
        with pytest.raises(Exception):
            mgr.save(step, models=model, optimizers=opt, schedulers=sched, loss=0.1)
    faults.install(None)
    mgr.close()
    st.write_bytes("notes.txt", b"not a checkpoint")
    st.makedirs("exports")
    st.write_bytes("exports/model.pt", b"not a checkpoint either")
    return st


def test_prune_removes_only_uncommitted_folders(ckpt_url):
    st = _populate(ckpt_url)
    infos = {i.name: i for i in list_checkpoints(st, committed_only=False)}
    assert [n for n, i in infos.items() if not i.committed] == ["step-000000040", "step-000000050"]
    assert infos["step-000000020"].problem is not None            # damaged, still "committed"
    kept = {n: _tree(st, n) for n in ("step-000000010", "step-000000020", "step-000000030", "exports")}

    dry = prune(st, dry_run=True)
    assert [f.name for f in dry.folders] == ["step-000000040", "step-000000050"]
    assert dry.folders[0].bytes and dry.folders[0].bytes > 200   # data files and manifest of step 40
    assert "would remove 2 uncommitted checkpoint folders" in dry.line() and "\n" not in dry.line()
    assert len(list_checkpoints(st, committed_only=False)) == 5   # a dry run removes nothing

    report = prune(st)
    line = report.line()
    assert [f.name for f in report.folders] == ["step-000000040", "step-000000050"] and not report.failed
    assert "removed 2 uncommitted checkpoint folders" in line and "step-000000040 (" in line, line
    assert report.uploads == 0
    left = list_checkpoints(st, committed_only=False)
    assert [(i.name, i.committed) for i in left] == [("step-000000010", True), ("step-000000020", True),
                                                     ("step-000000030", True)]
    assert {n: _tree(st, n) for n in kept} == kept               # byte for byte, damaged ones included
    assert st.read_bytes("notes.txt") == b"not a checkpoint"
    again = prune(st)
    assert not again.folders and again.line().startswith("no leftovers of killed saves in ")


def test_clean_leftovers_logs_one_line_and_nothing_when_clean(ckpt_url, caplog):
    st = _populate(ckpt_url)
    with caplog.at_level(logging.INFO, logger="harness"):
        clean_leftovers(st)
    lines = [r.getMessage() for r in caplog.records if "killed saves" in r.getMessage()]
    assert len(lines) == 1 and "step-000000040" in lines[0] and "step-000000050" in lines[0], lines
    assert " B)" in lines[0] or "KB)" in lines[0]                 # sizes are named
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="harness"):
        clean_leftovers(st)
    assert not [r for r in caplog.records if "killed saves" in r.getMessage()]


def test_a_prune_that_could_remove_nothing_does_not_say_there_was_nothing():
    """A read-only folder: the leftover stays and the line says so (it began 'no leftovers of killed saves')."""
    why = "step-000000040: OSError: [Errno 30] Read-only file system: 'data-r00000-000.bin'"
    assert PruneReport("/ck", failed=[why]).line() == f"/ck: could not remove 1: {why}"
    assert PruneReport("/ck").line() == "no leftovers of killed saves in /ck"


# -- `harness ckpt prune` ------------------------------------------------------------------------------

def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="harness")
    add_ckpt_parser(parser.add_subparsers(dest="command", required=True))
    return run_ckpt(parser.parse_args([str(a) for a in argv]))


def _plant_lease(st: Storage, pid: int) -> None:
    st.commit_bytes(lease.LEASE_FILE, json.dumps({
        "run_id": "other-job", "host": socket.gethostname(), "pid": pid, "token": "t",
        "started": time.time(), "heartbeat": time.time()}).encode())


def test_cli_prune_refuses_while_a_live_job_holds_the_folder(tmp_path, capsys):
    url = str(tmp_path / "ck")
    st = _populate(url)
    _plant_lease(st, os.getpid())                                 # this very process: alive
    for extra in ([], ["--dry-run"]):
        assert cli("ckpt", "prune", url, *extra) == 3
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "in use by a live job" in err and str(os.getpid()) in err, err
    assert (tmp_path / "ck" / "step-000000040").is_dir()

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _plant_lease(st, gone.pid)                                    # its process is gone: a stale lease
    assert cli("ckpt", "prune", url, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "would remove 2" in out and (tmp_path / "ck" / "step-000000040").is_dir()
    assert cli("ckpt", "prune", url) == 0
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0 and "removed 2 uncommitted checkpoint folders" in out, out
    assert [p.name for p in sorted((tmp_path / "ck").glob("step-*"))] == [
        "step-000000010", "step-000000020", "step-000000030"]


# -- end to end: SIGKILL mid-save five times in a row ----------------------------------------------------

KEEP_LAST = 2
SETS = ["train.max_steps=20", "checkpoint.every_steps=5", f"checkpoint.keep_last={KEEP_LAST}",
        "checkpoint.keep_best=0", "train.log_every=5", "data.num_samples=640", "checkpoint.async=false"]
S3_SETS = ["checkpoint.storage_options={harness_part_size_mb=0.03125, harness_max_concurrency=4}"]
IN_FLIGHT = "step-000000015"   # every kill lands in the save of step 15: the first one after resuming at 10


def _train(url: str, out: Path, fault: str | None, sets: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HARNESS_FAULT", "WORLD_SIZE", "RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **({"HARNESS_FAULT": fault} if fault else {}))
    cmd = [sys.executable, "-m", "harness", "train", "--config", str(REPO / "configs" / "quickstart.toml")]
    for s in [f"checkpoint.dir={url}", f"run.output_dir={out}", *SETS, *sets]:
        cmd += ["--set", s]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def _kill_five_times(url: str, out: Path, faults_in_order: list[str], sets: list[str] = (),
                     uploads=lambda: []) -> None:
    st = Storage(url)
    one_checkpoint, aborted_next = None, False
    for i, fault in enumerate(faults_in_order):
        run = _train(url, out, fault, list(sets))
        assert run.returncode == -9, f"kill {i + 1} ({fault}): exit {run.returncode}\n{run.stderr[-3000:]}"
        cleanup = [line for line in run.stderr.splitlines() if "cleanup after killed saves" in line]
        if i == 0:
            assert not cleanup, cleanup
        else:  # the previous kill's leftovers went, in one line naming them
            assert len(cleanup) == 1 and (IN_FLIGHT in cleanup[0] or "aborted" in cleanup[0]), run.stderr[-3000:]
        infos = list_checkpoints(st, committed_only=False)
        assert [i.step for i in infos if i.committed] == [5, 10], [i.name for i in infos]
        uncommitted = [i.name for i in infos if not i.committed]
        assert uncommitted in ([], [IN_FLIGHT]), f"after kill {i + 1}: {uncommitted}"
        assert all(u["Key"].split("/")[-2] == IN_FLIGHT for u in uploads()), uploads()
        if "before_commit" in fault:  # every upload of this save completed: any left would be an older one
            assert uploads() == [], uploads()
        if fault.startswith("s3.part"):
            assert uploads(), "the kill mid-upload left no unfinished upload to clean up"
            aborted_next = True
        elif i > 0 and aborted_next:
            assert "aborted 1 unfinished multipart upload" in cleanup[0], cleanup
            aborted_next = False
        one_checkpoint = one_checkpoint or st.du("step-000000005")
        assert st.du("") <= (KEEP_LAST + 2) * one_checkpoint, f"after kill {i + 1}: {st.du('')} bytes"
    done = _train(url, out, None, list(sets))
    assert done.returncode == 0, done.stderr[-3000:]
    infos = list_checkpoints(st, committed_only=False)
    assert [(i.step, i.committed) for i in infos] == [(15, True), (20, True)], [i.name for i in infos]
    assert uploads() == []


def _local_campaign(tmp: Path) -> None:
    _kill_five_times(str(tmp / "ck"), tmp, [
        "save.before_commit:sigkill:step=15",
        "save.data_file:sigkill:step=15",
        "save.after_manifest:sigkill:step=15",
        "save.before_manifest:sigkill:step=15",
        "save.before_commit:sigkill:step=15",
    ])


def _s3_campaign(tmp: Path, s3_server) -> None:
    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/runs/kill"
    uploads = lambda: s3_server.uploads(bucket)  # noqa: E731 - unfinished multipart uploads, via boto3
    _kill_five_times(url, tmp, [
        "save.before_commit:sigkill:step=15",
        "s3.part:sigkill:part=2",            # mid-upload: an unfinished multipart upload stays behind
        "save.before_commit:sigkill:step=15",  # ... and the start of this run aborted it (checked below)
        "save.data_file:sigkill:step=15",
        "save.after_manifest:sigkill:step=15",
    ], S3_SETS, uploads)


@pytest.fixture(scope="module")
def kill_campaigns(request, s3_server, tmp_path_factory):
    """The selected campaigns, local and S3, started at once (one thread each; each test takes its own's
    outcome, its assertion error included). Each is a chain of six one-process runs that spend most of their
    time starting up, on one core: side by side on two cores they take about the time of the longer one."""
    selected = {item.name.rsplit("_", 1)[1] for item in request.session.items
                if item.name.startswith("test_killed_mid_save_five_times_")}
    campaigns = {"local": (_local_campaign,), "s3": (_s3_campaign, s3_server)}
    pool = ThreadPoolExecutor(2)
    yield {name: pool.submit(fn, tmp_path_factory.mktemp(f"kill-{name}"), *args)
           for name, (fn, *args) in campaigns.items() if name in selected}
    pool.shutdown(wait=True)


def test_killed_mid_save_five_times_local(kill_campaigns):
    kill_campaigns["local"].result()


def test_killed_mid_save_five_times_s3(kill_campaigns):
    kill_campaigns["s3"].result()


def test_cli_prune_aborts_uploads_under_an_s3_prefix_that_has_no_object_yet(s3_server, s3_url, capsys):
    """A first save killed mid-upload (a loop of your own, no lease) leaves only unfinished multipart uploads:
    the prefix has no object, and prune refused it ("does not exist", exit 1) with the parts still billed."""
    bucket, prefix = s3_url[len("s3://"):].split("/", 1)
    client = s3_server.client()
    up = client.create_multipart_upload(Bucket=bucket, Key=f"{prefix}/step-000000001/data-r00000-000.bin")
    client.upload_part(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"], PartNumber=1, Body=b"z" * 1000)
    assert cli("ckpt", "prune", s3_url) == 0
    assert "aborted 1 unfinished multipart upload" in capsys.readouterr().out
    assert s3_server.uploads(bucket) == []
    assert cli("ckpt", "list", s3_url) == 1  # listing a folder that does not exist is still an error
