"""Time to resume: a 2-rank job is killed with SIGKILL and relaunched the README way; how long from the relaunch
to the first training step after the restore, and where the time goes.

    python benchmarks/resume_time.py                               # quickstart state, local + S3 (moto)
    python benchmarks/resume_time.py --size-gb 1 --storage local,s3  # a >= 1 GB state (MLP + AdamW moments)
    python benchmarks/resume_time.py --launcher torchrun           # torchrun ... -m harness train instead
    python benchmarks/resume_time.py --start-methods forkserver,subprocess  # harness launch's two ways, A/B

Phases (rank 0; the total is the slowest rank's), measured with wall-clock timestamps written by a probe that
is loaded only into the relaunched job's processes (benchmarks/_resume_probe/sitecustomize.py, gated by
HARNESS_RESUME_TRACE; harness itself is unchanged): launcher (relaunch -> worker process exists), interpreter,
imports (+ config), setup (workload, model, optimizer: what is not listed apart), rendezvous + process groups,
lease + storage check, discovery (listing + commit records + manifest), read + verify, apply
(load_state_dict), restore other (broadcast of replicated tensors, decoding, RNG), first step. With
``harness launch``'s default start method the workers are forks of its forkserver (harness/workerstart.py):
``launcher`` then runs to the fork, which waits for the forkserver's imports of torch and torch._dynamo made
beside the launcher's own; ``interpreter`` is 0, ``imports`` is the config (harness's train path is preloaded too),
``setup`` no longer holds torch._dynamo's import.

Baselines measured in the same run: ``python -c "import torch"``; two processes doing ``import torch`` +
``init_process_group`` (gloo) + a barrier, bare and under torchrun; ``import harness`` (after torch), and
whether it pulled in s3fs/aiobotocore/botocore/boto3 (it must not). The baseline of the target is the torchrun
one timed like the harness job, from the launch to every rank being in the process group (torchrun_pg_ready_s,
with its phases); the same ranks then build DDP + AdamW, what any DDP script does before its first step
(torchrun_ddp_ready_s: it imports torch._dynamo, about a second on a small machine). For every size
> 0: that model's first step in a plain DDP + AdamW loop whose optimizer state is loaded
(plain_first_step: the first step after any restore is slower than later ones, harness or not: DDP's first
iteration, fresh gradient memory). With S3: what any s3fs user pays before the first byte (import s3fs, then
a new client and one small GET).
adds = total - torchrun_pg_ready_s; target: adds <= read_verify + 0.5 s. Results: a table, and JSON + PNG under
benchmarks/results/ (resume_time_<stamp>.* and resume_time_latest.*).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _first_step import model_sets, run_steps  # noqa: E402
from _results import pyplot, save_figure, write_results  # noqa: E402

PROBE = REPO / "benchmarks" / "_resume_probe"
CONFIG = REPO / "configs" / "quickstart.toml"
S3_MODULES = ("s3fs", "aiobotocore", "botocore", "boto3")
PHASES = ["launcher", "interpreter", "imports", "setup", "rendezvous_pg", "lease_storage", "discovery",
          "read_verify", "apply", "restore_other", "first_step"]
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
          "AWS_EC2_METADATA_DISABLED": "true"}


# -- processes -------------------------------------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it (workers run in sessions of their own), by pid."""
    kids, todo, tree = _children(), [proc.pid], []
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(kids.get(pid, []))
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.time() + 30
    while any(_alive(p) for p in tree) and time.time() < deadline:
        time.sleep(0.05)


def train_cmd(launcher: str, nproc: int, overrides: list[str], start_method: str = "forkserver") -> list[str]:
    sets = [a for o in overrides for a in ("--set", o)]
    if launcher == "launch":
        return [sys.executable, "-m", "harness", "launch", "--nproc-per-node", str(nproc), "--start-method",
                start_method, "--config", str(CONFIG), *sets]
    torchrun = shutil.which("torchrun")
    head = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    return [*head, "--standalone", "--nproc-per-node", str(nproc), "-m", "harness", "train", "--config",
            str(CONFIG), *sets]


def pick_launcher(wanted: str) -> str:
    if wanted != "auto":
        return wanted
    ok = subprocess.run([sys.executable, "-m", "harness", "launch", "--help"], capture_output=True, cwd=REPO,
                        timeout=120).returncode == 0
    return "launch" if ok else "torchrun"


# -- storage ---------------------------------------------------------------------------------------------

class Moto:
    """moto's S3 server on 127.0.0.1 in this process, and a bucket."""

    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
        self.client().create_bucket(Bucket="resume")

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def stop(self) -> None:
        self.server.stop()


def committed(url: str, moto: Moto | None) -> list[str]:
    """Names of checkpoints with a commit record (what the killed run left behind)."""
    if moto is None:
        return sorted(p.parent.name for p in Path(url).glob("step-*/COMMIT"))
    prefix = url.split("/", 3)[3] + "/"
    keys = moto.client().list_objects_v2(Bucket="resume", Prefix=prefix).get("Contents", [])
    return sorted(k["Key"].split("/")[-2] for k in keys if k["Key"].endswith("/COMMIT"))


# -- one scenario ----------------------------------------------------------------------------------------

def model_overrides(size_gb: float) -> tuple[list[str], int]:
    """Config overrides for a state of about ``size_gb`` (0: the quickstart model) and checkpoint interval."""
    if size_gb <= 0:
        return [], 10
    return model_sets(size_gb), 1


def run_scenario(storage: str, size_gb: float, launcher: str, nproc: int, work: Path, moto: Moto | None,
                 timeout_s: float, checkpoints: int = 1, start_method: str = "forkserver") -> dict:
    name = f"{storage}-{'quickstart' if size_gb <= 0 else f'{size_gb:g}gb'}"
    if launcher == "launch" and start_method != "forkserver":
        name += f"-{start_method}"
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    url = str(folder / "ckpt") if storage == "local" else f"s3://resume/{name}-{int(time.time())}"
    extra, every = model_overrides(size_gb)
    overrides = [f"checkpoint.dir={url}", f"checkpoint.every_steps={every}", f"checkpoint.keep_last={checkpoints}",
                 "checkpoint.keep_best=0", "checkpoint.async=false", "train.max_steps=1000000",
                 f"run.output_dir={folder / 'out'}", *extra]
    env = {**os.environ, **(moto.env if moto else {}),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = train_cmd(launcher, nproc, overrides, start_method)
    run_until(cmd, folder, env, "run1.log", lambda: len(committed(url, moto)) >= checkpoints, timeout_s,
              f"{name}: the first run made no checkpoint")
    saved = committed(url, moto)
    nbytes = state_bytes(url, saved[-1], moto)  # now: the relaunched job's retention may delete it later
    trace = folder / "trace"
    trace.mkdir()
    env2 = {**env, "HARNESS_RESUME_TRACE": str(trace),
            "PYTHONPATH": os.pathsep.join([str(PROBE), env["PYTHONPATH"]])}
    t_launch = time.time()
    records = run_until(cmd, folder, env2, "run2.log", lambda: first_steps(trace, nproc), timeout_s,
                        f"{name}: the relaunched job took no training step")
    result = {"scenario": name, "storage": storage, "launcher": launcher,
              "start_method": start_method if launcher == "launch" else None,
              "workers_forked": all(r.get("forked", False) for r in records
                                    if r["label"] == "process" and r["rank"] is not None),
              "checkpoint": saved[-1],
              "checkpoints_present": len(saved),
              "state_bytes": nbytes, **phases(records, t_launch, nproc)}
    if storage == "local":
        shutil.rmtree(folder / "ckpt", ignore_errors=True)
    return result


def restart_scenario(nproc: int, work: Path, timeout_s: float, start_method: str) -> dict:
    """An in-job restart: `harness launch --max-restarts 1`, rank 1 SIGKILLed at step 25 (the fault seam, once),
    the agent restarts the worker group, which resumes from the checkpoint at step 20. Timed from the kill (the
    seam's marker file is written just before it) to the restarted group's first step; phases as above, the
    kill standing for the relaunch."""
    name = f"restart-quickstart-{start_method}"
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "trace").mkdir(parents=True)
    fired = folder / "fired"
    overrides = [f"checkpoint.dir={folder / 'ckpt'}", "checkpoint.every_steps=10", "checkpoint.async=false",
                 "train.max_steps=1000000", f"run.output_dir={folder / 'out'}"]
    cmd = train_cmd("launch", nproc, overrides, start_method)
    cmd[4:4] = ["--max-restarts", "1"]
    env = {**os.environ, "HARNESS_RESUME_TRACE": str(folder / "trace"),
           "HARNESS_FAULT": f"train.step:sigkill:step=25:rank=1:once={fired}",
           "PYTHONPATH": os.pathsep.join([str(PROBE), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}

    def restarted() -> list[dict]:  # both worker groups have stepped
        records = read_trace(folder / "trace")
        stepped = {r["pid"] for r in records if r["label"] == "step" and r["rank"] is not None}
        return records if fired.exists() and len(stepped) >= 2 * nproc else []

    records = run_until(cmd, folder, env, "run.log", restarted, timeout_s, f"{name}: no restarted step")
    t_kill = fired.stat().st_mtime
    first_pids = {r["pid"] for r in records if r["label"] == "process" and r["rank"] is not None
                  and r["t1"] < t_kill}
    after = [r for r in records if r["pid"] not in first_pids]
    return {"scenario": name, "storage": "local", "launcher": "launch", "start_method": start_method,
            "workers_forked": all(r.get("forked", False) for r in after if r["label"] == "process" and r["rank"]),
            "checkpoint": "step-000000020", "checkpoints_present": None,
            "state_bytes": state_bytes(str(folder / "ckpt"), "step-000000020", None),
            **phases(after, t_kill, nproc)}


def state_bytes(url: str, name: str, moto: Moto | None) -> int:
    if moto is None:
        return sum(p.stat().st_size for p in (Path(url) / name).glob("data-*"))
    prefix = f"{url.split('/', 3)[3]}/{name}/data-"
    return sum(k["Size"] for k in moto.client().list_objects_v2(Bucket="resume", Prefix=prefix).get("Contents", []))


def read_trace(trace: Path) -> list[dict]:
    out = []
    for p in trace.glob("trace-*.jsonl"):
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line cut by the SIGKILL
    return out


def first_steps(trace: Path, nproc: int) -> list[dict]:
    """The trace once every rank has taken a step, else []."""
    records = read_trace(trace)
    return records if len({r["rank"] for r in records if r["label"] == "step" and r["rank"] is not None}) >= nproc else []


def run_until(cmd: list[str], folder: Path, env: dict, log_name: str, done: Callable[[], Any], timeout_s: float,
              failure: str) -> Any:
    """Start a job (a session of its own, output in ``folder/log_name``), poll ``done()`` until it gives
    something truthy, and return that; the job, with everything under it, is killed either way."""
    log = folder / log_name
    job = subprocess.Popen(cmd, cwd=folder, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                           start_new_session=True)
    deadline = time.time() + timeout_s
    try:
        while not (value := done()):
            if job.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{failure}; see {log}:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        return value
    finally:
        kill_tree(job)


def _rank_phases(rs: list[dict], t_launch: float) -> dict:
    def all_(label: str) -> list[dict]:
        return [r for r in rs if r["label"] == label]

    def total(label: str, lo: float = 0.0, hi: float = float("inf")) -> float:
        return sum(r["t1"] - r["t0"] for r in all_(label) if r["t0"] >= lo and r["t1"] <= hi)

    proc, train, resume = all_("process")[0], min(all_("train"), key=lambda r: r["t0"], default=None), all_("resume")
    step = min(all_("step"), key=lambda r: r["t0"])
    if train is None or not resume:
        raise RuntimeError("the probe saw no harness.trainer.train / Trainer.resume call: was it renamed?")
    resume = resume[0]
    t_train = train["t0"]
    p = {"launcher": (proc["t0"] or proc["t1"]) - t_launch, "interpreter": proc["t1"] - (proc["t0"] or proc["t1"]),
         "imports": t_train - proc["t1"], "rendezvous_pg": total("pg"),
         "lease_storage": total("lease") + total("storage_check", t_train)}
    p["setup"] = resume["t0"] - t_train - p["rendezvous_pg"] - p["lease_storage"]
    inside = (resume["t0"], resume["t1"])
    p["discovery"], p["read_verify"], p["apply"] = (total(k, *inside) for k in ("discovery", "read", "apply"))
    p["restore_other"] = resume["t1"] - resume["t0"] - p["discovery"] - p["read_verify"] - p["apply"]
    p["first_step"] = step["t1"] - resume["t1"]
    reads = [r["t0"] for r in all_("read") if inside[0] <= r["t0"] <= inside[1]]
    found = min(reads, default=inside[1])  # storage calls before the first tensor read: discovery's
    ops = {k[3:]: sum(1 for r in all_(k) if inside[0] <= r["t0"] < found)
           for k in ("op_list", "op_head", "op_read", "op_open")}
    return {"phases": {k: round(p[k], 4) for k in PHASES}, "to_first_step": round(step["t1"] - t_launch, 4),
            "to_first_step_start": round(step["t0"] - t_launch, 4),
            "discovery_storage_calls": ops,
            "restore_s": round(resume["t1"] - resume["t0"], 4), "s3_modules_loaded": step.get("s3_modules"),
            "vm_hwm_mb": step.get("vm_hwm_kb", 0) / 1024}


def phases(records: list[dict], t_launch: float, nproc: int) -> dict:
    by_rank: dict[str, list[dict]] = {}
    agent = [r for r in records if r["rank"] is None]
    for r in records:
        if r["rank"] is not None:
            by_rank.setdefault(r["rank"], []).append(r)
    ranks = {k: _rank_phases(v, t_launch) for k, v in sorted(by_rank.items())}
    r0 = ranks.get("0") or next(iter(ranks.values()))
    return {"phases": r0["phases"], "total_s": max(r["to_first_step"] for r in ranks.values()),
            # ready to train: the first step begins on every rank (the total also holds that one step)
            "ready_s": max(r["to_first_step_start"] for r in ranks.values()),
            "restore_s": r0["restore_s"], "discovery_storage_calls": r0["discovery_storage_calls"],
            "per_rank": ranks,
            "launcher_storage_check_s": round(sum(r["t1"] - r["t0"] for r in agent
                                                  if r["label"] == "storage_check"), 4),
            "s3_modules_loaded": r0["s3_modules_loaded"]}


# -- baselines -------------------------------------------------------------------------------------------

PG_SCRIPT = ("import torch, torch.distributed as d; d.init_process_group('gloo'); d.barrier(); "
             "d.destroy_process_group()")
# The baseline under torchrun, timed like the harness job (wall-clock timestamps, each rank's process start from
# /proc): when each rank has imported torch, joined the process group (init_process_group + a barrier: the
# baseline of the target), and built what any DDP training script builds before its first step
# (DistributedDataParallel + AdamW, whose construction imports torch._dynamo: a cost of torch, not harness).
TORCHRUN_SCRIPT = """
import json, os, sys, time
with open("/proc/self/stat") as f:
    ticks = int(f.read().rsplit(")", 1)[1].split()[19])
with open("/proc/uptime") as f:
    boot = time.time() - float(f.read().split()[0])  # /proc/stat's btime is whole seconds: up to 1 s off
out = {"process": boot + ticks / os.sysconf("SC_CLK_TCK"), "interpreter": time.time()}
import torch, torch.distributed as d
out["torch"] = time.time()
d.init_process_group("gloo")
d.barrier()
out["pg"] = time.time()
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(32, 8))
opt = torch.optim.AdamW(model.parameters())
out["ddp_optimizer"] = time.time()
with open(os.path.join(sys.argv[1], f"baseline-{os.environ['RANK']}.json"), "w") as f:
    json.dump(out, f)
d.destroy_process_group()
"""
# The first training step of the same model in a plain DDP + AdamW loop whose optimizer state is loaded as a
# restore leaves it (every moment allocated): what the first step after a restore costs without harness. The
# model comes from harness's recipe (the same layers as the job's); nothing else of harness runs.
IMPORT_SCRIPT = ("import json, sys, time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter(); "
                 "import harness; t2 = time.perf_counter(); m = " + repr(S3_MODULES) + "; "
                 "a = [x for x in m if x in sys.modules]; import harness.cli, harness.trainer; "
                 "t3 = time.perf_counter(); print(json.dumps({'torch_s': t1 - t0, 'harness_s': t2 - t1, "
                 "'train_path_s': t3 - t2, 's3_after_import_harness': a, "
                 "'s3_after_train_path': [x for x in m if x in sys.modules]}))")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(cmds: list[list[str]], env: dict, cwd: Path) -> float:
    t0 = time.time()
    procs = [subprocess.Popen(c, env=e, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for c, e in zip(cmds, env if isinstance(env, list) else [env] * len(cmds))]
    for p in procs:
        out, err = p.communicate(timeout=300)
        if p.returncode:
            raise RuntimeError(f"baseline {p.args} failed: {err.decode()[-2000:]}")
    return time.time() - t0


def baselines(nproc: int, work: Path, quick: bool = False, repeat: int = 1) -> dict:
    """Startup costs without harness; ``quick`` skips the two multi-process ones (for the smoke test). The
    multi-process ones run ``repeat`` times, each figure the median (as the scenarios' totals are): a single
    launch of torchrun varies by +-0.3 s on a shared machine."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out: dict = {"python_import_torch_s": None, "torch_pg_bare_s": None, "torchrun_exit_s": None,
                 "torchrun_pg_ready_s": None, "torchrun_ddp_ready_s": None, "torchrun_phases": None}
    if not quick:
        out["python_import_torch_s"] = _timed([[sys.executable, "-c", "import torch"]], env, work)
        out.update(_medians([_pg_baselines(nproc, work, env) for _ in range(max(1, repeat))]))
        out["pg_baseline_runs"] = max(1, repeat)
    imp = subprocess.run([sys.executable, "-c", IMPORT_SCRIPT], env=env, cwd=work, capture_output=True, text=True,
                         timeout=300)
    if imp.returncode:
        raise RuntimeError(f"import baseline failed: {imp.stderr[-2000:]}")
    out.update(json.loads(imp.stdout))
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


S3_CLIENT_SCRIPT = """
import json, sys, time
import torch
t0 = time.perf_counter()
import s3fs
t1 = time.perf_counter()
s3fs.S3FileSystem().cat_file(sys.argv[1])
print(json.dumps({"s3fs_import_s": t1 - t0, "s3_client_first_get_s": time.perf_counter() - t1}))
"""


def s3_client_baseline(moto: Moto, work: Path, repeat: int) -> dict:
    """What any s3fs user's process pays before its first byte from S3, after torch (as a worker): import s3fs,
    then one small GET on a new client (the client's creation is most of it). Medians of ``repeat`` runs."""
    moto.client().put_object(Bucket="resume", Key="baseline/probe", Body=b"x")
    env = {**os.environ, **moto.env}
    runs = []
    for _ in range(max(1, repeat)):
        out = subprocess.run([sys.executable, "-c", S3_CLIENT_SCRIPT, "resume/baseline/probe"], env=env, cwd=work,
                             capture_output=True, text=True, timeout=300)
        if out.returncode:
            raise RuntimeError(f"S3 client baseline failed: {out.stderr[-2000:]}")
        runs.append(json.loads(out.stdout))
    return _medians(runs)


def first_step_baseline(size_gb: float, nproc: int, work: Path, repeat: int) -> dict:
    """The plain loop of benchmarks/_first_step.py under torchrun for the ``size_gb`` model, ``repeat`` times:
    medians of its first step and of a later one."""
    runs = []
    for _ in range(max(1, repeat)):
        steps = run_steps("plain", model_overrides(size_gb)[0], work, nproc)
        runs.append({"first_step_s": steps[0]["total"], "later_step_s": sorted(s["total"] for s in steps[1:])[1]})
    return {**_medians(runs), "first_step_runs_s": [round(r["first_step_s"], 4) for r in runs]}


def _medians(runs: list[dict]) -> dict:
    """Key by key (nested dicts too), the median over ``runs``."""
    out: dict = {}
    for k, v in runs[0].items():
        if isinstance(v, dict):
            out[k] = _medians([r[k] for r in runs])
        else:
            out[k] = round(statistics.median(r[k] for r in runs), 4)
    return out


def _pg_baselines(nproc: int, work: Path, env: dict) -> dict:
    out = {}
    port = _free_port()
    envs = [{**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r), "WORLD_SIZE": str(nproc)}
            for r in range(nproc)]
    out["torch_pg_bare_s"] = _timed([[sys.executable, "-c", PG_SCRIPT]] * nproc, envs, work)
    script = work / "pg_baseline.py"
    script.write_text(TORCHRUN_SCRIPT)
    stamps = work / "baseline-stamps"
    shutil.rmtree(stamps, ignore_errors=True)
    stamps.mkdir()
    torchrun = shutil.which("torchrun")
    head = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    t_launch = time.time()
    out["torchrun_exit_s"] = _timed([[*head, "--standalone", "--nproc-per-node", str(nproc), str(script),
                                      str(stamps)]], env, work)
    ranks = [json.loads(p.read_text()) for p in sorted(stamps.glob("baseline-*.json"))]
    if len(ranks) != nproc:
        raise RuntimeError(f"torchrun baseline: {len(ranks)} of {nproc} ranks reported")
    # Each phase as the slowest rank ends it (the job waits for that rank), from the relaunch.
    ends = {k: max(r[k] for r in ranks) - t_launch for k in ("process", "interpreter", "torch", "pg", "ddp_optimizer")}
    out["torchrun_pg_ready_s"], out["torchrun_ddp_ready_s"] = ends["pg"], ends["ddp_optimizer"]
    out["torchrun_phases"] = {"launcher": ends["process"], "interpreter": ends["interpreter"] - ends["process"],
                              "import_torch": ends["torch"] - ends["interpreter"], "pg": ends["pg"] - ends["torch"],
                              "ddp_optimizer": ends["ddp_optimizer"] - ends["pg"]}
    out["torchrun_phases"] = {k: round(v, 4) for k, v in out["torchrun_phases"].items()}
    return out


# -- report ----------------------------------------------------------------------------------------------

def verdict(scenario: dict, b: dict) -> dict:
    """What harness adds to the baseline (torchrun + import torch + init_process_group, every rank ready) and
    to a plain DDP script's start (that + DDP + AdamW), against the target: adds <= read_verify + 0.5 s."""
    base, floor = b.get("torchrun_pg_ready_s"), b.get("torchrun_ddp_ready_s")
    target = round(scenario["phases"]["read_verify"] + 0.5, 4)
    adds = None if base is None else round(scenario["total_s"] - base, 4)
    return {"harness_adds_s": adds, "harness_adds_beyond_ddp_s": None if floor is None else
            round(scenario["total_s"] - floor, 4), "target_s": target,
            "target_met": None if adds is None else adds <= target}


def _against_torchrun(s: dict, t: dict) -> str:
    """Where the time harness adds goes: its phases less the torchrun baseline's counterparts."""
    p = s["phases"]
    restore = sum(p[k] for k in ("lease_storage", "discovery", "read_verify", "apply", "restore_other"))
    parts = [("launcher", p["launcher"] - t["launcher"]),
             ("interpreter+imports", p["interpreter"] + p["imports"] - t["interpreter"] - t["import_torch"]),
             ("rendezvous_pg", p["rendezvous_pg"] - t["pg"]),
             ("setup beyond DDP+AdamW", p["setup"] - t["ddp_optimizer"]),
             ("DDP+AdamW (torch._dynamo import, in setup)", t["ddp_optimizer"]),
             ("restore", restore), ("first_step", p["first_step"])]
    return f"  {s['scenario']}: " + ", ".join(f"{k} {v:+.2f}" for k, v in parts)


def table(result: dict) -> str:
    b = result["baselines"]
    quick = b["torchrun_pg_ready_s"] is None
    pg = ("not measured (--quick-baselines)" if quick else
          f"{b['torch_pg_bare_s']:.2f} s (torchrun, + DDP + AdamW, launch to exit {b['torchrun_exit_s']:.2f} s)")
    torch_s = f"in-process {b['torch_s']:.2f}" if quick else f"{b['python_import_torch_s']:.2f}"
    lines = [f"baselines: python -c 'import torch' {torch_s} s | {result['nproc']} procs import "
             f"torch + init_process_group(gloo) {pg} | import harness after torch {b['harness_s']:.3f} s "
             f"(+ cli/trainer {b['train_path_s']:.3f} s), s3 modules after it: "
             f"{', '.join(b['s3_after_import_harness']) or 'none'}"]
    if "s3fs_import_s" in b:
        lines.append(f"baseline: an S3 client's start after torch (any s3fs user's): import s3fs "
                     f"{b['s3fs_import_s']:.2f} s + client and first GET {b['s3_client_first_get_s']:.2f} s")
    if not quick:
        t = b["torchrun_phases"]
        lines.append(f"baseline: torchrun + import torch + init_process_group, every rank ready "
                     f"{b['torchrun_pg_ready_s']:.2f} s (launcher {t['launcher']:.2f}, interpreter "
                     f"{t['interpreter']:.2f}, import torch {t['import_torch']:.2f}, process group {t['pg']:.2f}); "
                     f"+ DDP + AdamW as any DDP script builds them {b['torchrun_ddp_ready_s']:.2f} s")
    head = ["scenario", "MB", *PHASES, "total", "baseline", "adds", "target", "met", "adds-ddp"]
    rows = [head]
    for s in result["scenarios"]:
        if "error" in s:
            rows.append([s["scenario"], "-", *["-"] * len(PHASES), "failed", s["error"][:60], *["-"] * 4])
            continue
        adds, beyond = s.get("harness_adds_s"), s.get("harness_adds_beyond_ddp_s")
        met = {None: "-", True: "yes", False: "NO"}[s.get("target_met")]
        rows.append([s["scenario"], f"{s['state_bytes'] / 1e6:.1f}", *(f"{s['phases'][k]:.3f}" for k in PHASES),
                     f"{s['total_s']:.2f}", "-" if quick else f"{b['torchrun_pg_ready_s']:.2f}",
                     "-" if adds is None else f"{adds:.2f}", f"<= {s['target_s']:.2f}", met,
                     "-" if beyond is None else f"{beyond:.2f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append("adds = total - baseline (both from the relaunch to: every rank's first training step / every rank "
                 "in the process group); target = read_verify + 0.5 s; adds-ddp = total - (baseline + DDP + AdamW)")
    for size, f in b.get("plain_first_step", {}).items():
        lines.append(f"plain DDP + AdamW on the {size} GB model, optimizer state loaded (torchrun): first step "
                     f"{f['first_step_s']:.2f} s (runs: {', '.join(f'{v:.2f}' for v in f['first_step_runs_s'])}), a "
                     f"later one {f['later_step_s']:.2f} s (compare `first_step`)")
    if not quick:
        lines.append("harness less torchrun, by phase (s):")
        lines += [_against_torchrun(s, b["torchrun_phases"]) for s in result["scenarios"] if "error" not in s]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> str | None:
    plt, skip = pyplot()
    if plt is None:
        return skip
    scen = [s for s in result["scenarios"] if "error" not in s]
    if not scen:
        return "no scenario completed"
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.6 * len(scen)))
    left = [0.0] * len(scen)
    colors = plt.get_cmap("tab20").colors
    for i, k in enumerate(PHASES):
        vals = [max(0.0, s["phases"][k]) for s in scen]
        ax.barh([s["scenario"] for s in scen], vals, left=left, color=colors[i % len(colors)], label=k)
        left = [a + b for a, b in zip(left, vals)]
    base = result["baselines"].get("torchrun_pg_ready_s")
    if base is not None:
        ax.axvline(base, color="black", linestyle="--", label="torchrun + import torch + init_process_group")
        ax.axvline(base + 0.5, color="gray", linestyle=":", label="target without read time (baseline + 0.5 s)")
        ax.axvline(result["baselines"]["torchrun_ddp_ready_s"], color="black", linestyle="-.",
                   label="baseline + DDP + AdamW (any DDP script)")
    ax.set_xlabel("seconds from relaunch to the first training step")
    ax.set_title(f"time to resume after SIGKILL ({result['nproc']} ranks, {result['launcher']})")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside: never over the axis
    return save_figure(plt, fig, path, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, nargs="+", default=[0.0],
                    help="state sizes; 0 = the quickstart model (default). e.g. --size-gb 0 1")
    ap.add_argument("--storage", default="local,s3", help="comma-separated: local, s3 (moto on 127.0.0.1)")
    ap.add_argument("--launcher", choices=["auto", "launch", "torchrun"], default="auto",
                    help="auto: `harness launch` when it exists, else torchrun -m harness train")
    ap.add_argument("--start-methods", default="forkserver",
                    help="harness launch --start-method, comma-separated: forkserver (default), subprocess")
    ap.add_argument("--restart", action="store_true",
                    help="also an in-job restart (--max-restarts 1, a worker SIGKILLed) per start method")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="runs per scenario; the median total is kept")
    ap.add_argument("--timeout", type=float, default=600.0, help="per run, to the first checkpoint / first step")
    ap.add_argument("--checkpoints", type=int, default=1,
                    help="committed checkpoints the killed run leaves (discovery cost vs their number)")
    ap.add_argument("--quick-baselines", action="store_true",
                    help="skip the multi-process torch + init_process_group baselines (smoke test)")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    storages = [s.strip() for s in args.storage.split(",") if s.strip()]
    if set(storages) - {"local", "s3"}:
        ap.error("--storage takes local and/or s3")
    methods = [m.strip() for m in args.start_methods.split(",") if m.strip()]
    if not methods or set(methods) - {"forkserver", "subprocess"}:
        ap.error("--start-methods takes forkserver and/or subprocess")
    work = args.dir or Path(tempfile.mkdtemp(prefix="resume-time-"))
    work.mkdir(parents=True, exist_ok=True)
    launcher = pick_launcher(args.launcher)
    result = {"env": env_info(), "launcher": launcher, "nproc": args.nproc,
              "baselines": baselines(args.nproc, work, args.quick_baselines, args.repeat),
              "scenarios": []}
    moto = Moto() if "s3" in storages else None
    try:
        if moto is not None:
            result["baselines"].update(s3_client_baseline(moto, work, args.repeat))
        for size, storage, method in ((z, s, m) for z in args.size_gb for s in storages for m in methods):
            runs = []
            for _ in range(args.repeat):
                try:
                    runs.append(run_scenario(storage, size, launcher, args.nproc, work,
                                             moto if storage == "s3" else None, args.timeout,
                                             args.checkpoints, method))
                except RuntimeError as exc:
                    runs.append({"scenario": f"{storage}-{size:g}-{method}", "error": str(exc)})
                    print(f"{storage} {size:g} GB {method}: {exc}", file=sys.stderr)
            ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["total_s"])
            best = ok[len(ok) // 2] if ok else runs[-1]
            if ok:
                best.update(verdict(best, result["baselines"]))
                best["runs_total_s"] = [r["total_s"] for r in ok]
            result["scenarios"].append(best)
        for size in (z for z in args.size_gb if z > 0):
            result["baselines"].setdefault("plain_first_step", {})[f"{size:g}"] = \
                first_step_baseline(size, args.nproc, work, args.repeat)
        for method in methods if args.restart else []:
            runs = [restart_scenario(args.nproc, work, args.timeout, method) for _ in range(args.repeat)]
            runs.sort(key=lambda r: r["total_s"])
            best = runs[len(runs) // 2]
            best.update(verdict(best, result["baselines"]), runs_total_s=[r["total_s"] for r in runs])
            result["scenarios"].append(best)
    finally:
        if moto is not None:
            moto.stop()
    print(table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    write_results(args.out, "resume_time", stamp, result, lambda p: plot(result, p))
    print(f"results: {args.out / 'resume_time_latest.json'}")
    failed = [s for s in result["scenarios"] if "error" in s]
    return 1 if failed else 0


def env_info() -> dict:
    import platform

    import torch
    return {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "host": platform.node(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


if __name__ == "__main__":
    sys.exit(main())
