"""Smoke test of benchmarks/checkpoint_io.py: it runs end to end at a tiny size on CPU and reports every row.

No timing assertions: only that each method produced positive bytes and seconds, or says why it was skipped.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch_features import DCP_BEST, needs_dcp_best, needs_fsdp
from uninstalled_env import uninstalled_env
from harness.storage.direct_write import open_direct

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "checkpoint_io.py"

ROWS = [
    "disk_write_fsync", "disk_write_fsync_par", "disk_read_cold", "disk_read_warm", "host_copy",
    "d2h_pinned", "d2h_pageable", "h2d_pinned",
    "harness_save_sync_first", "harness_save_sync", "harness_save_async_first", "harness_save_async",
    "harness_restore_cold", "harness_restore_warm", "torch_save", "torch_load_cold", "torch_load_warm",
    "dcp_save", "dcp_async_save_first", "dcp_async_save", "dcp_async_best_first", "dcp_async_best",
    "dcp_load_cold", "dcp_load_warm",
    "safetensors_save", "safetensors_load_cold", "safetensors_load_warm",
]


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _must_run() -> set[str]:
    """Rows that have no legitimate reason to be skipped on a CPU machine with this environment."""
    rows = {"disk_write_fsync", "disk_write_fsync_par", "disk_read_cold", "disk_read_warm", "host_copy",
            "harness_save_sync_first", "harness_save_sync", "harness_save_async_first", "harness_save_async",
            "harness_restore_cold",
            "harness_restore_warm",
            "torch_save", "torch_load_cold", "torch_load_warm"}
    if torch.distributed.is_available():
        rows |= {"dcp_save", "dcp_load_cold", "dcp_load_warm", "dcp_async_save_first", "dcp_async_save"}
    if DCP_BEST:
        rows |= {"dcp_async_best_first", "dcp_async_best"}
    if _has("safetensors"):
        rows |= {"safetensors_save", "safetensors_load_cold", "safetensors_load_warm"}
    return rows


def test_checkpoint_io_benchmark_tiny_cpu(tmp_path):
    out = tmp_path / "out"
    work = tmp_path / "work"
    env = uninstalled_env()  # as documented: run from a checkout, installed or not
    proc = subprocess.run(
        # --restore-repeat 1, not the default 5: the interleaved restore section still runs every method once;
        # each round costs ~13 gc.collect() calls of ~0.14 s with torch loaded (no timing is asserted here).
        [sys.executable, str(SCRIPT), "--size-gb", "0.005", "--device", "cpu", "--state", "synthetic",
         "--restore-repeat", "1", "--out", str(out), "--dir", str(work)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # a hang guard, not a timing check
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    latest = out / "checkpoint_io_cpu_latest.json"
    assert latest.is_file()
    stamped = [p for p in out.glob("checkpoint_io_cpu_*.json") if p != latest]
    assert len(stamped) == 1
    result = json.loads(latest.read_text())
    assert result == json.loads(stamped[0].read_text())

    env_ = result["env"]
    assert env_["torch"] == torch.__version__
    assert env_["device"] == "cpu" and env_["device_name"]
    assert env_["cpu_count"] >= 1 and env_["date"]
    assert env_["state_bytes"] > 0
    assert result["cold"]["mode"] in ("fadvise", "drop_caches", "both")
    assert isinstance(result["cold"]["drop_caches_permitted"], bool)

    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ROWS
    direct = result["direct_restore"]  # the interleaved restore section ran (a failure there is only logged)
    assert "error" not in direct and direct["repeat"] == 1 and direct["manager_cold_s"] > 0, direct
    must = _must_run()
    for name in ROWS:
        r = rows[name]
        if "skipped" in r:
            assert name not in must, f"{name} was skipped: {r['skipped']}"
            assert isinstance(r["skipped"], str) and r["skipped"].strip(), name
            continue
        assert r["bytes"] > 0 and r["seconds"] > 0 and r["GBps"] > 0, r
        assert all(s > 0 for s in r["seconds_all"]), r
    for name in ("d2h_pinned", "d2h_pageable", "h2d_pinned"):  # cpu run: no copy between host and device
        assert "cpu" in rows[name]["skipped"]
    for name in ("harness_save_async_first", "harness_save_async", "dcp_async_save_first", "dcp_async_save",
                 "dcp_async_best_first", "dcp_async_best"):
        r = rows[name]
        if "skipped" not in r:
            assert 0 < r["blocking_s"] <= r["seconds"], r
    # First and steady state for both, compared in plain words (harness wins/loses).
    comparison = result["comparison"]
    if DCP_BEST:
        assert any(line.startswith("first save") and "best stager" in line for line in comparison), comparison
        assert any(line.startswith("steady state") and "best stager" in line for line in comparison), comparison
    assert all(("harness wins" in line) or ("harness loses" in line) or ("tie" in line) for line in comparison)
    for name in ("harness_save_sync", "harness_save_async_first", "harness_save_async", "torch_save"):
        assert rows[name]["durable"] is True
        assert rows[name]["bytes_on_disk"] >= rows[name]["bytes"] * 0.95
    assert rows["torch_save"]["x_torch"] == 1.0

    png = out / "checkpoint_io_cpu_latest.png"
    if _has("matplotlib"):
        assert png.is_file() and png.stat().st_size > 0
        assert len([p for p in out.glob("checkpoint_io_cpu_*.png") if p != png]) == 1
    else:
        assert result["png_skipped"]

    # Only the small report files land in --out; no checkpoint data is left behind anywhere.
    assert {p.suffix for p in out.iterdir()} <= {".json", ".png"}
    assert not any(p.is_file() for p in work.rglob("*"))
    assert "harness_save_sync" in proc.stdout  # the table was printed


TRAIN_SCRIPT = REPO / "benchmarks" / "train_overhead.py"


def test_train_overhead_benchmark_tiny_cpu(tmp_path):
    """benchmarks/train_overhead.py at a tiny gpt_small on CPU: five modes through the real trainer, one restart.
    Checks the report's rows and consistency, never timings."""
    out = tmp_path / "out"
    work = tmp_path / "work"
    env = uninstalled_env()  # as documented: run from a checkout, installed or not
    steps, every = 5, 2
    proc = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), "--device", "cpu", "--d-model", "32", "--n-layers", "1",
         "--n-heads", "2", "--seq-len", "16", "--vocab-size", "128", "--batch-size", "2", "--steps", str(steps),
         "--every", str(every), "--warmup", "1", "--recovery-modes", "async", "--out", str(out), "--dir", str(work)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # a hang guard, not a timing check
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    latest = out / "train_overhead_cpu_latest.json"
    assert latest.is_file()
    stamped = [p for p in out.glob("train_overhead_cpu_*.json") if p != latest]
    assert len(stamped) == 1
    result = json.loads(latest.read_text())
    assert result == json.loads(stamped[0].read_text())
    assert result["benchmark"] == "train_overhead"
    assert result["env"]["device"] == "cpu" and result["env"]["torch"] == torch.__version__
    assert result["env"]["model"]["d_model"] == 32 and result["env"]["batch_size"] == 2

    rows = {r["mode"]: r for r in result["rows"]}
    assert list(rows) == ["none", "sync", "async", "dcp", "dcp_best"][:5 if DCP_BEST else 4]
    assert result["skipped_modes"] == ({} if DCP_BEST else {"dcp_best": result["skipped_modes"]["dcp_best"]})
    for mode, r in rows.items():
        assert r["steps"] == steps and len(r["step_times_s"]) == steps and len(r["compute_times_s"]) == steps
        assert all(t > 0 for t in r["step_times_s"]), r
        assert r["median_step_s"] > 0 and r["mean_step_s"] > 0 and r["loop_wall_s"] > 0
        assert r["checkpoint_bytes"] > 0 and r["state_bytes"] > 0  # the final checkpoint exists in every mode
        assert isinstance(r["overhead_pct"], float)
        assert r["async"] is (mode == "async")
    assert rows["none"]["overhead_pct"] == 0.0
    assert rows["none"]["checkpoints"] == 0 and rows["none"]["blocked_s_mean"] is None
    for mode in ("sync", "async", "dcp", "dcp_best")[:4 if DCP_BEST else 3]:
        r = rows[mode]
        assert r["checkpoint_steps"] == [2, 4] and r["checkpoints"] == 2  # the final save (step 5) is not counted
        assert len(r["blocked_s_all"]) == 2 and all(b >= 0 for b in r["blocked_s_all"])
        median = statistics.median(r["step_times_s"][1:])  # past the one warm-up step
        for c in r["per_checkpoint"]:  # stall = time in save() + time at the next wait point
            assert c["stall_s"] == c["save_s"] + c["wait_s"] and c["staged_s"] is not None and c["staged_s"] >= 0
            # the whole interval after the checkpoint: steps k .. k+every-1 less every median steps
            window = r["step_times_s"][c["step"] - 1:c["step"] - 1 + every]
            assert c["window_cost_s"] == pytest.approx(sum(window) - every * median, abs=1e-4)
        assert r["final_save_s"] is not None
    assert rows["async"]["copy_s"] > 0
    assert {t["target"].split(" (")[0] for t in result["targets"]} >= {
        "visible stall <= 0.1x the snapshot's copy time", *(["visible stall lower than DCP at its best",
                                                             "staging done >= 5x sooner than DCP at its best"]
                                                            if DCP_BEST else [])}
    assert "PASS" in proc.stdout or "FAIL" in proc.stdout  # the targets were printed
    rec = rows["async"]["recovery"]
    assert rec["resumed_step"] == steps and rec["first_step"] == steps + 1
    assert rec["restore_s"] >= 0 and 0 < rec["time_to_resume_s"] <= rec["time_to_first_step_s"]
    assert "recovery" not in rows["none"] and "recovery" not in rows["sync"]

    png = out / "train_overhead_cpu_latest.png"
    if _has("matplotlib"):
        assert png.is_file() and png.stat().st_size > 0
    else:
        assert result["png_skipped"]
    assert {p.suffix for p in out.iterdir()} <= {".json", ".png"}
    assert not any(p.is_file() for p in work.rglob("*"))  # checkpoints and metrics removed
    assert "overhead %" in proc.stdout  # the table was printed


@pytest.mark.parametrize("loop", ["launch", "matmul"])
def test_writer_contention_benchmark_tiny_cpu(tmp_path, loop):
    """benchmarks/writer_contention.py at a tiny state: both modes measured each round, interleaved; the
    report's figures consistent with its samples, never timings."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "writer_contention.py"), "--device", "cpu", "--size-gb", "0.01",
         "--rounds", "2", "--idle-s", "0.1", "--loop", loop, "--matmul-n", "64", "--out", str(out),
         "--dir", str(tmp_path / "work")],
        cwd=REPO, env=uninstalled_env(), capture_output=True, text=True, timeout=300)  # a hang guard
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    name = "writer_contention_cpu" + ("" if loop == "launch" else "_matmul")
    result = json.loads((out / f"{name}_latest.json").read_text())
    assert result["benchmark"] == "writer_contention" and result["loop"] == loop and result["state_bytes"] > 0
    rows = {r["mode"]: r for r in result["rows"]}
    assert list(rows) == ["from_source", "gil_free", "gil_held"]
    assert rows["gil_free"]["from_source"] == rows["gil_held"]["from_source"] == 0  # every byte copied
    (tmp_path / "probe").mkdir()
    if open_direct(str(tmp_path / "probe" / "f"))[1]:  # O_DIRECT here: the snapshot's bytes go uncopied
        assert rows["from_source"]["from_source"] > 0.95
    for r in rows.values():
        assert len(r["samples"]) == 2
        for s in r["samples"]:
            assert s["idle_ops_per_s"] > 0 and s["busy_ops_per_s"] > 0 and s["write_s"] > 0
            assert s["rate_fraction"] == pytest.approx(s["busy_ops_per_s"] / s["idle_ops_per_s"])
            assert s["write_alone_s"] > 0 and 0 <= s["writer_cpu_s"] < 60
        assert r["rate_fraction"] == pytest.approx(statistics.median(s["rate_fraction"] for s in r["samples"]))
    assert "gil_held" in proc.stdout  # the table was printed
    assert not list((tmp_path / "work").iterdir())  # the checkpoint folder went with the run


def test_resume_time_benchmark_smoke(tmp_path):
    """benchmarks/resume_time.py end to end on the quickstart state, local storage only: a 2-rank job is
    SIGKILLed after its first checkpoint and relaunched; every phase is reported and the relaunch restored."""
    out = tmp_path / "out"
    env = uninstalled_env()  # as documented: run from a checkout, installed or not
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "resume_time.py"), "--storage", "local", "--size-gb", "0",
         "--launcher", "launch", "--quick-baselines", "--out", str(out), "--dir", str(tmp_path / "work")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # a hang guard, not a timing check
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    result = json.loads((out / "resume_time_latest.json").read_text())
    assert result["baselines"]["s3_after_import_harness"] == []  # import harness pulls in no S3 client
    (scenario,) = result["scenarios"]
    assert scenario["scenario"] == "local-quickstart" and scenario["checkpoint"].startswith("step-")
    assert set(scenario["phases"]) == {"launcher", "interpreter", "imports", "setup", "rendezvous_pg",
                                       "lease_storage", "discovery", "read_verify", "apply", "restore_other",
                                       "first_step"}
    assert scenario["phases"]["read_verify"] > 0 and scenario["restore_s"] > 0
    assert scenario["total_s"] >= sum(v for v in scenario["phases"].values() if v > 0) * 0.99
    assert scenario["s3_modules_loaded"] == []  # a local run never imports the S3 stack
    assert len(scenario["per_rank"]) == 2


def test_resume_time_plain_first_step_baseline_tiny(tmp_path):
    """The baseline beside the >= 1 GB rows: the same model's first step in a plain DDP + AdamW loop whose
    optimizer state is loaded (2 real ranks under torchrun), at a tiny size. No timing assertions."""
    code = ("import json, sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); import resume_time as rt; "
            f"print(json.dumps(rt.first_step_baseline(0.001, 2, Path({str(tmp_path)!r}), 1)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=uninstalled_env(), capture_output=True,
                          text=True, timeout=300)  # a hang guard, not a timing check
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(got) == {"first_step_s", "later_step_s", "first_step_runs_s"}, got
    assert got["first_step_s"] > 0 and got["later_step_s"] > 0 and got["first_step_runs_s"] == [got["first_step_s"]]


def test_first_step_ab_tiny(tmp_path):
    """benchmarks/first_step_ab.py end to end at a tiny size: a checkpoint made by harness launch, then
    harness's trainer resumed from it and the plain loop, each under torchrun; every part of the step timed.
    No timing assertions."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "first_step_ab.py"), "--size-gb", "0.001",
                           "--repeat", "1", "--out", str(out)], cwd=REPO, env=uninstalled_env(),
                          capture_output=True, text=True, timeout=300)  # a hang guard, not a timing check
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "first_step_ab_latest.json").read_text())
    for mode in ("harness", "plain"):
        (steps,) = result["runs"][mode]
        assert len(steps) == 4 and all(set(s) == {"forward", "backward", "optimizer", "total"} for s in steps)
        assert all(s["total"] >= s["forward"] + s["backward"] + s["optimizer"] > 0 for s in steps), steps
        assert result[mode]["first_step_totals"] == [round(steps[0]["total"], 3)]


@needs_fsdp
def test_sharded_restore_benchmark_tiny_cpu(tmp_path):
    """benchmarks/sharded_restore.py at a tiny size: 2 real ranks (gloo), ZeRO and FSDP2 restored by harness and
    FSDP2 by DCP, at the saving world size and across 1 <-> 2 ranks; every row verified, timed cold and warm,
    its peak extra RSS reported. No timing or memory assertions."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = uninstalled_env()  # as documented: run from a checkout, installed or not
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "sharded_restore.py"), "--size-mb", "2", "--repeat", "1",
         "--out", str(out), "--dir", str(work)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # a hang guard, not a timing check
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    latest = out / "sharded_restore_cpu_latest.json"
    stamped = [p for p in out.glob("sharded_restore_cpu_*.json") if p != latest]
    assert len(stamped) == 1 and json.loads(latest.read_text()) == json.loads(stamped[0].read_text())
    result = json.loads(latest.read_text())
    assert result["benchmark"] == "sharded_restore" and result["env"]["torch"] == torch.__version__
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ["harness_zero", "harness_fsdp", "dcp_fsdp", "harness_fsdp_2to1", "dcp_fsdp_2to1",
                          "harness_fsdp_1to2", "dcp_fsdp_1to2"]
    for name, r in rows.items():
        assert r["verified"] is True, name
        assert len(r["state_bytes_per_rank"]) == r["restored_world"] and min(r["state_bytes_per_rank"]) > 0
        for temp in ("warm", "cold"):
            assert r[temp]["median_s"] > 0 and len(r[temp]["seconds_all"]) == 1, (name, r)
            assert r[temp]["peak_extra_bytes"] >= 0 and isinstance(r[temp]["within_bound"], bool)
    assert set(rows["harness_fsdp"]["dcp_over_harness"]) == {"warm", "cold"}
    if _has("matplotlib"):
        assert (out / "sharded_restore_cpu_latest.png").stat().st_size > 0
    else:
        assert result["png_skipped"]
    assert {p.suffix for p in out.iterdir()} <= {".json", ".png"}
    assert not any(work.rglob("*"))  # the checkpoints are removed
    assert "harness_fsdp_1to2" in proc.stdout  # the table was printed


@needs_dcp_best
def test_dcp_best_stager_saves_twice_reused_or_not(tmp_path):
    """benchmarks/_dcp_best.py: DCP at its best saves twice in a row whether this torch can reuse a DefaultStager
    (2.13: one stager, buffers reused) or not (2.11 closes it after each stage: a new one per save, else the
    second save fails with KeyError: <class 'type'>). Both paths run here; the probe's answer for this torch too."""
    import torch.distributed.checkpoint as dcp

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from _dcp_best import BestStager, stager_reusable
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    for reuse in (True, False):  # the probe's answer (True on 2.13, False on 2.11), then never reused
        best = BestStager(torch.device("cpu"))
        assert best.reuse == stager_reusable() and "StagingOptions" in best.note
        best.reuse = reuse and best.reuse
        stagers = []
        try:
            for i in range(2):
                t = torch.full((4,), float(i))
                stagers.append(best.next())
                folder = str(tmp_path / f"{reuse}-{i}")
                resp = dcp.async_save({"t": t}, checkpoint_id=folder, async_stager=stagers[-1], no_dist=True)
                resp.staging_completion.result()
                resp.upload_completion.result()
                back = {"t": torch.zeros(4)}
                dcp.load(back, checkpoint_id=folder, no_dist=True)
                assert torch.equal(back["t"], t)
        finally:
            best.close()
        assert (stagers[0] is stagers[1]) == best.reuse


def test_checkpoint_io_stopped_by_sigterm_writes_what_it_measured(tmp_path):
    """gpu_check stops a benchmark at its time limit with SIGTERM: the rows measured so far must still reach the
    JSON (on the H200 a run stopped in the restore section used to lose all of them)."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--size-gb", "0.005", "--device", "cpu", "--groups", "limits,harness",
         "--restore-repeat", "200", "--out", str(out), "--dir", str(tmp_path / "work")],
        cwd=REPO, env=uninstalled_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # the group loop logs its skips last: the restore section (~2 s a round) follows
            if "skipped safetensors_save" in line:
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    res = json.loads((out / "checkpoint_io_cpu_latest.json").read_text())
    assert res["stopped"] and "signal 15" in res["stopped"]
    by = {r["method"]: r for r in res["rows"]}
    for name in ("disk_write_fsync", "harness_save_sync", "harness_restore_warm", "harness_save_async"):
        assert by[name]["seconds"] > 0, by[name]
    assert by["torch_save"]["skipped"].startswith("not selected")
    assert res["direct_restore"] is None  # stopped inside it: no half-measured medians


def test_import_dcp_benchmark_tiny_cpu(tmp_path):
    """benchmarks/import_dcp.py at a tiny state: every method measured warm and cold; no timing asserted."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "import_dcp.py"), "--size-gb", "0.005",
                           "--repeat", "1", "--out", str(out), "--dir", str(tmp_path)],
                          cwd=REPO, env=uninstalled_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    result = json.loads((out / "import_dcp_cpu_latest.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["torch_empty_planner", "torch_in_place", "harness_read",
                                                     "harness_import"]
    assert result["state_bytes"] > 0 and all(r["cold_s"] > 0 and r["warm_s"] > 0 for r in result["rows"])
    assert "harness_read" in proc.stdout


def test_import_dcp_benchmark_tiny_s3(tmp_path, s3_url):
    """benchmarks/import_dcp.py --s3-url against the tests' moto: torch's FsspecReader both ways, harness in
    spans and record by record, each measured; no timing asserted."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "import_dcp.py"), "--size-gb", "0.002",
                           "--repeat", "1", "--out", str(out), "--dir", str(tmp_path), "--s3-url", f"{s3_url}/dcp"],
                          cwd=REPO, env=uninstalled_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    result = json.loads((out / "import_dcp_s3_latest.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["torch_empty_planner", "torch_in_place", "harness_read",
                                                     "harness_read_by_record"]
    assert result["records"] > 1 and all(r["s"] > 0 for r in result["rows"]) and "harness_read" in proc.stdout


def test_many_checkpoints_benchmark_tiny(tmp_path):
    """benchmarks/many_checkpoints.py end to end on local disk at tiny folder sizes: both managers save, the
    one that remembers what it read reads one commit record per save, the forgetful one every record. No
    timing assertions."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "many_checkpoints.py"), "--counts", "3,6",
                           "--s3-counts", "", "--saves", "2", "--out", str(out)], cwd=REPO, env=uninstalled_env(),
                          capture_output=True, text=True, timeout=300)  # a hang guard, not a timing check
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "many_checkpoints_latest.json").read_text())["rows"]
    assert [(r["backend"], r["checkpoints"]) for r in rows] == [("local", 3), ("local", 6)]
    for r in rows:
        assert r["now"]["records_read_per_save"] == 1.0, r
        assert r["every record"]["records_read_per_save"] > r["checkpoints"], r
