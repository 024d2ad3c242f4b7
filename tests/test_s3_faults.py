"""S3 under real object-store behaviour: injected 5xx/SlowDown/resets/stalls, a process killed mid-upload,
fail-fast on a missing bucket, rejected credentials or no permission, and no secret anywhere."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from ckpt_helpers import assert_bitwise, fresh, simple_run, train_step
from harness import CheckpointManager
from harness.checkpoint.discovery import list_checkpoints, verify_checkpoint
from harness.errors import StorageError
from harness.storage import Storage
from s3_server import ACCESS_KEY, SECRET_KEY
from s3_worker import STORAGE_OPTIONS as WORKER_OPTIONS, make_state

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
WRONG_KEY = "AKIAWRONGKEYHARNESS9"
WRONG_SECRET = "wRoNg-SeCrEt-0b1c2d3e4f-must-not-leak"


def _proxy_options(proxy, **extra) -> dict:
    return {"endpoint_url": proxy.url, "config_kwargs": {"read_timeout": 1.0, "connect_timeout": 1.0},
            "harness_part_size_mb": 1 / 64, "harness_max_concurrency": 3, "harness_retry_budget_s": 60, **extra}


# -- faults on the wire ---------------------------------------------------------------------------------

def test_saves_commit_and_restores_verify_through_faults(s3_bucket, fault_proxy):
    url = f"s3://{s3_bucket}/faulty"
    fault_proxy.stall_s = 1.5                        # beyond the client's 1 s read timeout
    fault_proxy.configure(rate=0.2, seed=int(os.environ.get("HARNESS_S3_FAULT_SEED", "20261123")))
    opts = _proxy_options(fault_proxy)
    model, opt, sched = simple_run(seed=5)
    g = torch.Generator().manual_seed(5)
    extra = {"big": torch.randn(60_000, generator=g)}   # 240 KB: 15 parts of 16 KiB per save
    mgr = CheckpointManager(url, keep_last=2, storage_options=opts, max_file_bytes=100_000)
    for step in range(1, 5):
        train_step(model, opt, sched, seed=step)
        extra["big"].add_(1.0)
        mgr.save(step, models=model, optimizers=opt, schedulers=sched, extra={"big": extra["big"]},
                 loss=1.0 / step)
    mgr.close()
    final = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), extra["big"].clone())

    storage = Storage(url, opts)
    infos = list_checkpoints(storage)
    assert [i.name for i in infos] == ["step-000000003", "step-000000004"]
    for info in infos:
        verify_checkpoint(storage, info.name)
    m2, o2, s2 = fresh()
    result = CheckpointManager(url, storage_options=opts).restore(models=m2, optimizers=o2, schedulers=s2)
    assert result.name == "step-000000004" and result.skipped == []
    assert_bitwise(m2.state_dict(), final[0])
    assert_bitwise(o2.state_dict(), final[1])
    assert_bitwise(result.extra["big"], final[2])
    counts = dict(fault_proxy.counts)
    print(f"fault proxy seed={fault_proxy.seed}: {counts}")
    assert sum(counts.get(k, 0) for k in ("500", "503", "reset", "stall", "reset_after")) >= 10, counts
    assert all(counts.get(k, 0) > 0 for k in ("500", "503", "reset")), counts


@pytest.mark.parametrize("fault", ["s3.part:sigkill:part=5", "save.data_file:sigkill"])
def test_kill_mid_upload_leaves_nothing_visible(s3_server, s3_url, fault):
    def worker(step: int, seed: int, fault: str | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        env.pop("HARNESS_FAULT", None)
        if fault:
            env["HARNESS_FAULT"] = fault
        return subprocess.run([sys.executable, str(TESTS / "s3_worker.py"), s3_url, str(step), str(seed)],
                              env=env, capture_output=True, text=True, timeout=60)

    first = worker(1, seed=1)
    assert first.returncode == 0, first.stderr
    killed = worker(2, seed=2, fault=fault)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])

    storage = Storage(s3_url)
    assert [i.name for i in list_checkpoints(storage)] == ["step-000000001"]   # step 2 is invisible
    bucket = s3_url[5:].split("/", 1)[0]
    if fault.startswith("s3.part"):  # killed with parts uploaded: an unfinished upload, no object
        assert any("step-000000002/" in u["Key"] for u in s3_server.uploads(bucket))
    else:                            # killed after a whole data object: an uncommitted folder
        assert "step-000000002" in [i.name for i in list_checkpoints(storage, committed_only=False)]

    model, extra = make_state(1)
    m2, _ = make_state(99)
    result = CheckpointManager(s3_url, storage_options=WORKER_OPTIONS).restore(models=m2)
    assert result.name == "step-000000001"
    assert_bitwise(m2.state_dict(), model.state_dict())
    assert_bitwise(result.extra["big"], extra["big"])

    if fault.startswith("s3.part"):
        again = worker(2, seed=2)    # the restarted job saves step 2 again
        assert again.returncode == 0, again.stderr
        result = CheckpointManager(s3_url, storage_options=WORKER_OPTIONS).restore(models=m2)
        assert result.step == 2
        assert_bitwise(m2.state_dict(), make_state(2)[0].state_dict())


# -- fail fast ------------------------------------------------------------------------------------------

def _one_line_naming(msg: str, bucket: str) -> None:
    assert "\n" not in msg and bucket in msg, msg
    for secret in (SECRET_KEY, WRONG_SECRET, WRONG_KEY, ACCESS_KEY):
        assert secret not in msg, msg


def test_fail_fast_missing_bucket(s3_server):
    bucket = f"harness-missing-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    with pytest.raises(StorageError) as info:
        CheckpointManager(f"s3://{bucket}/run")
    assert time.monotonic() - t0 < 10
    _one_line_naming(str(info.value), bucket)
    assert "does not exist" in str(info.value)


@pytest.mark.parametrize("verdict,words", [("invalid", "rejected the credentials (InvalidAccessKeyId)"),
                                           ("denied", "access denied")])
def test_fail_fast_bad_credentials_or_no_permission(s3_bucket, fault_proxy, verdict, words):
    """moto accepts any credentials, so the proxy plays IAM: 403 InvalidAccessKeyId or AccessDenied
    (with S3's XML error body) for requests signed with WRONG_KEY."""
    fault_proxy.deny[WRONG_KEY] = verdict
    opts = {"endpoint_url": fault_proxy.url, "key": WRONG_KEY, "secret": WRONG_SECRET}
    with pytest.raises(StorageError) as info:
        CheckpointManager(f"s3://{s3_bucket}/run", storage_options=opts)
    _one_line_naming(str(info.value), s3_bucket)
    assert words in str(info.value)


def test_fail_fast_in_trainer_before_training(s3_bucket, fault_proxy, tmp_path):
    """`harness train` with rejected credentials: exit 3 and one line on stderr, no step trained."""
    fault_proxy.deny[WRONG_KEY] = "invalid"
    opts = f'{{endpoint_url="{fault_proxy.url}", key="{WRONG_KEY}", secret="{WRONG_SECRET}"}}'
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "harness", "train", "--config", str(REPO / "configs/quickstart.toml"),
                           "--set", f"checkpoint.dir=s3://{s3_bucket}/run", "--set", f"checkpoint.storage_options={opts}",
                           "--set", f"run.output_dir={out}", "--set", "train.max_steps=5"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("harness: checkpoint error:") and "InvalidAccessKeyId" in last, proc.stderr
    _one_line_naming(last, s3_bucket)
    assert WRONG_SECRET not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    metrics = out / "metrics.jsonl"
    assert not metrics.exists() or '"step": 1' not in metrics.read_text()


# -- secrets ------------------------------------------------------------------------------------------------

def test_no_secret_in_logs_errors_or_objects(s3_server, s3_bucket, fault_proxy, caplog, capfd):
    """Credentials given explicitly in storage_options, logging at DEBUG (botocore included), faults on:
    the secret appears in no log record, no output, no exception and no stored object."""
    for name in ("harness", "botocore", "aiobotocore", "s3fs"):
        caplog.set_level(logging.DEBUG, logger=name)
    url = f"s3://{s3_bucket}/secret-check"
    fault_proxy.configure(rate=0.15, seed=7, kinds={"500": 1, "503": 1, "reset": 1})
    opts = _proxy_options(fault_proxy, key=ACCESS_KEY, secret=SECRET_KEY)
    model, opt, sched = simple_run()
    mgr = CheckpointManager(url, keep_last=1, storage_options=opts)
    for step in (1, 2):
        mgr.save(step, models=model, optimizers=opt, schedulers=sched, metadata={"note": "secret scan"})
    mgr.close()
    CheckpointManager(url, storage_options=opts).restore(models=fresh()[0])
    fault_proxy.configure(rate=0.0)
    errors = []
    fault_proxy.deny[WRONG_KEY] = "invalid"
    try:
        CheckpointManager(url, storage_options={**opts, "key": WRONG_KEY, "secret": WRONG_SECRET})
    except StorageError as exc:
        errors.append(str(exc))
    from harness.cli import main
    main(["ckpt", "list", url, "--storage-option", f"endpoint_url={fault_proxy.url}"])
    assert errors
    seen = caplog.text + "".join(errors) + "".join(capfd.readouterr())
    assert "step-000000002" in seen
    for secret in (SECRET_KEY, WRONG_SECRET):
        assert secret not in seen
        for key, body in s3_server.all_objects(s3_bucket):
            assert secret.encode() not in body, key


def test_an_outage_longer_than_the_retry_budget_is_retried_by_the_agent_then_resumes(s3_bucket, fault_proxy, runner,
                                                                                       tmp_path):
    """S3 answering 503 to every request for longer than the retry budget, mid-run: a save runs out of
    retries, the workers exit 1 ("storage unreachable", retryable: it was 3, which neither the agent, nor the
    SLURM script, nor Kubeflow's ExitCode policy retries), the agent restarts them, and once S3 answers again
    they resume from the last committed checkpoint and finish: exit 0. Real `harness launch`, 2 ranks."""
    from trainer_helpers import SLOW, launch_cmd, resumed_from, wait_until

    url = f"s3://{s3_bucket}/outage"
    opts = f'{{endpoint_url="{fault_proxy.url}", harness_retry_budget_s=2}}'
    proc = runner.start("outage", launch_cmd(tmp_path, f"checkpoint.dir='{url}'", f"checkpoint.storage_options={opts}",
                                             SLOW, max_restarts=3))
    wait_until("the first checkpoint", lambda: list_checkpoints(Storage(url)), [proc], timeout=120)
    fault_proxy.configure(rate=1.0, seed=0, kinds={"503": 1})
    try:
        wait_until("the outage ends the workers", lambda: "storage unreachable (retryable, exit 1)" in proc.log(),
                   [proc], timeout=120)
    finally:
        fault_proxy.configure(rate=0.0)
    assert proc.wait(180) == 0, proc.tail()
    log = proc.log()
    assert "will restart worker group" in log and "harness: checkpoint error" not in log, log[-3000:]
    assert resumed_from(log) and min(resumed_from(log)) >= 25, log[-3000:]  # from a checkpoint of this run
    assert [i.step for i in list_checkpoints(Storage(url))][-1] == 120


def test_a_restore_during_an_outage_is_retryable_and_marks_nothing_damaged(s3_bucket, fault_proxy):
    """Restoring while every request gets 503 for longer than the budget: StorageUnavailableError (exit 1 for
    `harness train`), not a generic checkpoint error; the checkpoint is not walked past or called damaged, and
    restores once S3 answers."""
    from harness.errors import StorageUnavailableError

    url = f"s3://{s3_bucket}/restore-outage"
    model, opt, _ = simple_run()
    CheckpointManager(url).save(7, models=model, optimizers=opt)
    mgr = CheckpointManager(url, storage_options={"endpoint_url": fault_proxy.url, "harness_retry_budget_s": 1.5})
    fault_proxy.configure(rate=1.0, seed=0, kinds={"503": 1})
    try:
        with pytest.raises(StorageUnavailableError, match="retry budget"):
            target, target_opt, _ = fresh()
            mgr.restore(models=target, optimizers=target_opt)
    finally:
        fault_proxy.configure(rate=0.0)
    target, target_opt, _ = fresh()
    res = mgr.restore(models=target, optimizers=target_opt)
    assert res.step == 7 and not res.skipped
    assert_bitwise(target.state_dict(), model.state_dict())
