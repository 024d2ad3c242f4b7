"""Retention: keep the newest N, plus the best K by a metric (min or max, ties to the newer), never the
newest, never a damaged one; a failing delete is logged and saving goes on."""

from __future__ import annotations

import logging

import pytest

from ckpt_helpers import Net, ckpt_names, simple_run
from harness import CheckpointManager, faults
from harness.checkpoint.discovery import CheckpointInfo
from harness.checkpoint.retention import RetentionPolicy, select_deletions


def _steps(url):
    return [int(n.split("-")[1]) for n in ckpt_names(url)]


def _save_all(url, losses=None, metrics=None, **kw):
    model, _, _ = simple_run(steps=1)
    mgr = CheckpointManager(url, **kw)
    n = len(losses or metrics)
    for i in range(n):
        mgr.save((i + 1) * 10, models=model, loss=None if losses is None else losses[i],
                 metrics=None if metrics is None else {"acc": metrics[i]})
    mgr.close()
    return mgr


@pytest.mark.parametrize("keep_last,kept", [(1, [50]), (2, [40, 50]), (3, [30, 40, 50]), (0, [10, 20, 30, 40, 50]),
                                            (9, [10, 20, 30, 40, 50])])
def test_keep_last(ckpt_url, keep_last, kept):
    _save_all(ckpt_url, losses=[5, 4, 3, 2, 1], keep_last=keep_last)
    assert _steps(ckpt_url) == kept


def test_keep_best_min_loss_apart_from_rolling(ckpt_url):
    _save_all(ckpt_url, losses=[3.0, 0.5, 2.0, 0.7, 4.0, 5.0], keep_last=2, keep_best=2)
    assert _steps(ckpt_url) == [20, 40, 50, 60]


def test_keep_best_max_metric(ckpt_url):
    _save_all(ckpt_url, metrics=[0.9, 0.1, 0.95, 0.2, 0.3], keep_last=1, keep_best=1, best_metric="acc",
              best_mode="max")
    assert _steps(ckpt_url) == [30, 50]


def test_a_best_metric_the_saves_do_not_report_is_warned_once(ckpt_url, caplog):
    """keep_best by 'accuracy' when the saves report 'acc' (a typo) keeps nothing by it: one warning, naming
    the metrics there are; the reported name warns nothing."""
    with caplog.at_level(logging.WARNING, logger="harness"):
        _save_all(ckpt_url, metrics=[0.9, 0.1, 0.95], keep_last=1, keep_best=1, best_metric="accuracy",
                  best_mode="max")
    assert caplog.text.count("best_metric 'accuracy' is not among the saved metrics (acc): keep_best=1") == 1
    assert _steps(ckpt_url) == [30]  # nothing kept as best: only the newest
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="harness"):
        _save_all(ckpt_url, metrics=[0.9, 0.1, 0.5], keep_last=1, keep_best=1, best_metric="acc", best_mode="max")
    assert "best_metric" not in caplog.text


def test_keep_best_ties_go_to_the_newer(ckpt_url):
    _save_all(ckpt_url, losses=[1.0, 1.0, 1.0, 9.0, 9.0], keep_last=1, keep_best=1)
    assert _steps(ckpt_url) == [30, 50]


def test_unscored_checkpoints_are_not_best(ckpt_url):
    import math
    _save_all(ckpt_url, losses=[math.nan, 2.0, None, 3.0], keep_last=1, keep_best=1)
    assert _steps(ckpt_url) == [20, 40]


def test_newest_is_never_deleted_even_when_worst(ckpt_url):
    _save_all(ckpt_url, losses=[1.0, 2.0, 3.0, 99.0], keep_last=1, keep_best=2)
    assert _steps(ckpt_url) == [10, 20, 40]


def _info(step, loss, problem=None):
    return CheckpointInfo(name=f"step-{step:09d}", step=step, attempt=0, committed=True,
                          commit={"loss": loss}, problem=problem)


def test_a_diverged_run_keeps_its_last_checkpoint_with_a_finite_loss(ckpt_url, caplog):
    """keep_last=2 and the loss went nan at step 40: the saves of nan weights pushed the last good checkpoint out,
    leaving nothing to resume from but nan. The newest checkpoint with a finite loss now stays, with a warning."""
    nan = float("nan")
    _save_all(ckpt_url, losses=[3.0, 2.0, 1.0, nan, nan, float("inf"), nan], keep_last=2)
    assert _steps(ckpt_url) == [30, 60, 70]
    assert "keeping step-000000030, the newest with a finite one" in caplog.text


def test_best_of_a_run_with_no_finite_loss_says_so(tmp_path):
    """It said the checkpoints do not record 'loss' (use --metric): they do, as nan."""
    from harness.errors import NoCheckpointError
    from harness.interop.export import export_checkpoint
    _save_all(str(tmp_path / "ck"), losses=[float("nan"), float("inf")], keep_last=0)
    with pytest.raises(NoCheckpointError, match=r"has a finite 'loss' \(the values recorded are inf, nan\): none is "
                                                r"best; choose one with --step"):
        export_checkpoint(tmp_path / "ck", tmp_path / "best.pt", best=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_select_deletions_unit():
    infos = [_info(10, 1.0), _info(20, 0.1, problem="bad commit"), _info(30, 3.0), _info(40, 4.0), _info(50, 5.0)]
    policy = RetentionPolicy(keep_last=1, keep_best=1)
    # damaged ones (unreadable commit, or known-damaged by name) are neither counted nor deleted
    assert [i.step for i in select_deletions(infos, policy, protect=set())] == [30, 40]
    assert [i.step for i in select_deletions(infos, policy, protect=set(), damaged={"step-000000010"})] == [40]
    # the just-committed checkpoint counts among the newest N and is never deleted
    assert [i.step for i in select_deletions(infos, RetentionPolicy(keep_last=2), protect={"step-000000050"})] \
        == [10, 30]
    assert [i.step for i in select_deletions(infos, RetentionPolicy(keep_last=1), protect={"step-000000030"})] \
        == [10, 40]
    with pytest.raises(ValueError):
        RetentionPolicy(keep_last=-1)
    with pytest.raises(ValueError):
        RetentionPolicy(best_mode="median")


def test_failing_delete_is_logged_and_saving_goes_on(ckpt_url, caplog):
    model, _, _ = simple_run(steps=1)
    mgr = CheckpointManager(ckpt_url, keep_last=1)
    mgr.save(10, models=model)
    calls = []

    def refuse(name, info):
        if name == "retention.delete":
            calls.append(info["name"])
            raise PermissionError("delete denied")

    faults.install(refuse)
    with caplog.at_level(logging.WARNING, logger="harness"):
        mgr.save(20, models=model)
        mgr.save(30, models=model)
    assert calls and calls[0] == "step-000000010"
    assert "could not delete step-000000010" in caplog.text and "delete denied" in caplog.text
    assert _steps(ckpt_url) == [10, 20, 30]
    faults.install(None)
    mgr.save(40, models=model)
    assert _steps(ckpt_url) == [40]
    assert CheckpointManager(ckpt_url).restore(models=Net()).step == 40


def test_a_failing_listing_does_not_fail_a_committed_save(ckpt_url, caplog, monkeypatch):
    """Retention runs after the commit: if it blows up as a whole, the save still succeeded."""
    from harness.checkpoint import retention
    model, _, _ = simple_run(steps=1)
    mgr = CheckpointManager(ckpt_url, keep_last=1)

    def broken(*a, **k):
        raise OSError("listing failed")

    monkeypatch.setattr(retention, "list_checkpoints", broken)
    with caplog.at_level(logging.WARNING, logger="harness"):
        mgr.save(10, models=model)
    assert "listing failed" in caplog.text
    monkeypatch.undo()
    assert CheckpointManager(ckpt_url).restore(models=Net()).step == 10


@pytest.mark.parametrize("damage", ["unreadable", "different"])
def test_a_commit_record_damaged_after_the_job_read_it_is_kept(ckpt_url, caplog, damage):
    """The saving job ranks checkpoints by commit records it read once and kept (discovery.CommitCache). A
    record damaged since (same size: the listing cannot tell) must still not be deleted: the record is read
    again right before its checkpoint would go, and a changed one keeps it, as one found damaged at ranking."""
    from harness.storage import Storage
    model, _, _ = simple_run(steps=1)
    mgr = CheckpointManager(ckpt_url, keep_last=3)
    for step in (1, 2, 3):
        mgr.save(step, models=model, loss=1.25)
    storage = Storage(ckpt_url)
    raw = storage.read_bytes("step-000000001/COMMIT")
    bad = raw.replace(b"1.25", b"9.25") if damage == "different" else raw.replace(b"{", b"[", 1)
    assert bad != raw and len(bad) == len(raw)
    storage.write_bytes("step-000000001/COMMIT", bad)
    with caplog.at_level(logging.WARNING, logger="harness"):
        mgr.save(4, models=model, loss=1.25)
    mgr.close()
    assert _steps(ckpt_url) == [1, 2, 3, 4]
    assert any("step-000000001's commit record changed since it was read" in r.getMessage() for r in caplog.records)
    mgr = CheckpointManager(ckpt_url, keep_last=3)   # a new job reads it damaged: not counted, not deleted
    mgr.save(5, models=model, loss=1.25)
    mgr.close()
    assert _steps(ckpt_url) == [1, 3, 4, 5]
