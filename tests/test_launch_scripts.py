"""launch/: shell syntax, the PyTorchJob manifest, the `harness launch` command torchrun.sh builds, and the
exit-code / requeue logic of torchrun.sh and slurm.sbatch, run against stub harness, srun, scontrol and
nvidia-smi (fast; the real launcher is tested in test_launch_agent.py)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_SH = ROOT / "launch" / "torchrun.sh"
SBATCH = ROOT / "launch" / "slurm.sbatch"
K8S = ROOT / "launch" / "k8s-pytorchjob.yaml"

# Stub `harness`: records its argv and the signals it gets and -- like `harness launch` -- exits 128+N when
# signal N stops it (after a short linger, so that a duplicate signal is seen and recorded as a second line).
STUB_HARNESS = r"""#!/usr/bin/env bash
printf '%s\n' "$*" > "$STUB_DIR/harness.args"
echo $$ >> "$STUB_DIR/harness.pids"
s=""
stop() { echo "$1" >> "$STUB_DIR/harness.signals"; kill $s 2>/dev/null; sleep 0.3; exit $2; }
trap 'stop TERM 143' TERM; trap 'stop USR1 138' USR1; trap 'stop INT 130' INT
touch "$STUB_DIR/harness.started"
case "${STUB_MODE:-run}" in done) exit 0 ;; fail) exit 1 ;; config) exit 2 ;; storage) exit 3 ;; esac
while :; do sleep 5 & s=$!; wait $s; done
"""

# Stub srun: runs the task once with SLURM_STEP_ID set and -- like Slurm with proctrack/cgroup --
# delivers a signal sent to srun to every process of the step (the task and all its descendants).
STUB_SRUN = r"""#!/usr/bin/env bash
echo $$ > "$STUB_DIR/srun.pid"
while [[ "${1:-}" == --* ]]; do shift; done
SLURM_STEP_ID=0 "$@" &
c=$!
tree() { local p; echo "$1"; for p in $(ps -o pid= --ppid "$1"); do tree "$p"; done; }
relay() { kill -s "$1" $(tree $c) 2>/dev/null || true; }
trap 'relay USR1' USR1
trap 'relay TERM' TERM
while :; do
    rc=0; wait $c || rc=$?
    if (( rc > 128 )) && kill -0 $c 2>/dev/null; then continue; fi
    break
done
exit $rc
"""

STUB_SCONTROL = r"""#!/usr/bin/env bash
echo "$*" >> "$STUB_DIR/scontrol.log"
if [[ "$1 $2" == "show hostnames" ]]; then printf 'node1\nnode2\n'; fi
"""

STUB_NVIDIA_SMI = r"""#!/usr/bin/env bash
for ((i = 0; i < ${STUB_GPUS:-0}; i++)); do echo "GPU $i: NVIDIA H100 (UUID: GPU-$i)"; done
(( ${STUB_GPUS:-0} > 0 ))
"""


@pytest.fixture
def stubs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("harness", STUB_HARNESS), ("srun", STUB_SRUN),
                       ("scontrol", STUB_SCONTROL), ("nvidia-smi", STUB_NVIDIA_SMI)]:
        p = bin_dir / name
        p.write_text(text)
        p.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PET_", "SLURM_", "RDZV_", "STUB_", "HARNESS"))
           and k not in ("NNODES", "NPROC_PER_NODE", "MAX_RESTARTS", "CONFIG", "MAX_REQUEUES")}
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
    env["STUB_DIR"] = str(tmp_path)
    yield tmp_path, env
    # A failing test may leave a stub behind (e.g. in its own process group).
    pids = tmp_path / "harness.pids"
    for pid in pids.read_text().split() if pids.exists() else []:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def dry_run(env, *args, **extra):
    env = {**env, "HARNESS_LAUNCH_DRY_RUN": "1", **extra}
    out = subprocess.run(["bash", str(TORCHRUN_SH), *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    return shlex.split(lines[0])


def has(tokens, *seq):
    n = len(seq)
    return any(tokens[i:i + n] == list(seq) for i in range(len(tokens) - n + 1))


def wait_for(path: Path, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def signals_seen(tmp):
    f = tmp / "harness.signals"
    return f.read_text().split() if f.exists() else []


# --- static checks -------------------------------------------------------------------------------

@pytest.mark.parametrize("script", [TORCHRUN_SH, SBATCH])
def test_shell_syntax(script):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_torchrun_sh_is_executable():
    assert os.access(TORCHRUN_SH, os.X_OK)


def test_sbatch_directives():
    directives = [l.split(None, 1)[1] for l in SBATCH.read_text().splitlines()
                  if l.startswith("#SBATCH ")]
    assert "--requeue" in directives
    assert any(d.startswith("--signal=B:USR1@") for d in directives)
    assert "--ntasks-per-node=1" in directives


def test_k8s_manifest():
    yaml = pytest.importorskip("yaml")
    docs = [d for d in yaml.safe_load_all(K8S.read_text()) if d is not None]
    assert len(docs) == 1
    job = docs[0]
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    elastic = job["spec"]["elasticPolicy"]
    assert elastic["rdzvBackend"] == "c10d"
    assert 1 <= elastic["minReplicas"] <= elastic["maxReplicas"]
    assert elastic["maxRestarts"] >= 1
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert worker["restartPolicy"] == "ExitCode"
    assert elastic["minReplicas"] <= worker["replicas"] <= elastic["maxReplicas"]
    pod = worker["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > 25 + 30   # grace period + the agent's shutdown margin
    assert pod["shareProcessNamespace"] is True  # PID 1 is the pause process, which reaps orphans
    (c,) = pod["containers"]
    assert c["name"] == "pytorch"
    assert c["command"] == ["harness", "launch"]
    assert has(c["args"], "--config", "configs/s3.toml")
    # run id = the job's name (per job, stable across pod restarts): the lease tells two jobs apart
    assert has(c["args"], "--rdzv-id", "$(HARNESS_JOB_NAME)")
    (name,) = [e for e in c["env"] if e["name"] == "HARNESS_JOB_NAME"]
    assert name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['training.kubeflow.org/job-name']"
    assert c["envFrom"][0]["secretRef"]["name"]
    assert any(p["name"] == "pytorchjob-port" for p in c["ports"])


def test_launch_parser_reads_kubeflow_pet_variables(monkeypatch):
    """`harness launch` takes torchrun's PET_* variables as defaults (what the operator sets in each pod)."""
    from harness.cli import build_parser
    for k, v in {"PET_NNODES": "2:2", "PET_RDZV_ENDPOINT": "harness-worker-0:29400", "PET_MAX_RESTARTS": "7",
                 "PET_NPROC_PER_NODE": "auto"}.items():
        monkeypatch.setenv(k, v)
    args = build_parser().parse_args(["launch", "--config", "configs/s3.toml"])
    assert (args.nnodes, args.rdzv_endpoint, args.max_restarts, args.nproc_per_node) == \
        ("2:2", "harness-worker-0:29400", "7", "auto")


# --- the command torchrun.sh builds --------------------------------------------------------------

def test_default_is_one_node_harness_launch(stubs):
    _, env = stubs
    cmd = dry_run(env)
    assert cmd[:2] == ["harness", "launch"]
    assert "--rdzv-endpoint" not in cmd      # one node, no endpoint: harness launch runs standalone
    assert has(cmd, "--nnodes", "1") and has(cmd, "--nproc-per-node", "2")
    assert has(cmd, "--max-restarts", "3")
    assert cmd[-2:] == ["--config", "configs/quickstart.toml"]


def test_two_nodes_use_c10d_rendezvous(stubs):
    _, env = stubs
    cmd = dry_run(env, "--set", "train.max_steps=100", NNODES="2", RDZV_ID="job42",
                  MAX_RESTARTS="5", CONFIG="configs/s3.toml")
    assert has(cmd, "--nnodes", "2")
    assert has(cmd, "--rdzv-endpoint", "127.0.0.1:29500")
    assert has(cmd, "--rdzv-id", "job42")
    assert has(cmd, "--max-restarts", "5")
    assert cmd[-4:] == ["--config", "configs/s3.toml", "--set", "train.max_steps=100"]


def test_explicit_endpoint_selects_rendezvous_even_on_one_node(stubs):
    _, env = stubs
    cmd = dry_run(env, RDZV_ENDPOINT="head:1234")
    assert has(cmd, "--rdzv-endpoint", "head:1234") and has(cmd, "--rdzv-id", "harness")


def test_kubeflow_pet_variables_are_fallbacks(stubs):
    _, env = stubs
    cmd = dry_run(env, PET_NNODES="2:2", PET_RDZV_ENDPOINT="harness-worker-0:29400",
                  PET_MAX_RESTARTS="7", PET_NPROC_PER_NODE="4")
    assert has(cmd, "--nnodes", "2:2") and has(cmd, "--nproc-per-node", "4")
    assert has(cmd, "--rdzv-endpoint", "harness-worker-0:29400")
    assert has(cmd, "--max-restarts", "7")
    # explicit variables win over PET_*
    cmd = dry_run(env, PET_NNODES="2:2", NNODES="3", NPROC_PER_NODE="1", PET_NPROC_PER_NODE="4")
    assert has(cmd, "--nnodes", "3") and has(cmd, "--nproc-per-node", "1")


def test_nproc_defaults_to_gpu_count(stubs):
    _, env = stubs
    assert has(dry_run(env, STUB_GPUS="4"), "--nproc-per-node", "4")


def test_harness_command_can_be_chosen(stubs):
    _, env = stubs
    cmd = dry_run(env, HARNESS="python3 -m harness")
    assert cmd[:4] == ["python3", "-m", "harness", "launch"]


def test_bad_nnodes_is_a_config_error(stubs):
    _, env = stubs
    out = subprocess.run(["bash", str(TORCHRUN_SH)], env={**env, "NNODES": "two"}, cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "NNODES" in out.stderr


# --- torchrun.sh at run time: it execs harness launch, whose exit code is the contract ---------------

@pytest.fixture
def start():
    procs = []

    def _start(cmd, env, **extra):
        p = subprocess.Popen(cmd, env={**env, **extra}, cwd=ROOT, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(p)
        return p

    yield _start
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        p.stdout.close()


@pytest.mark.parametrize("mode,rc", [("done", 0), ("fail", 1), ("config", 2), ("storage", 3)])
def test_torchrun_sh_passes_the_exit_code_through(stubs, mode, rc, start):
    _, env = stubs
    p = start(["bash", str(TORCHRUN_SH)], env, STUB_MODE=mode)
    assert p.wait(timeout=30) == rc, p.stdout.read()


@pytest.mark.parametrize("sig,rc", [(signal.SIGTERM, 143), (signal.SIGUSR1, 138), (signal.SIGINT, 130)])
def test_torchrun_sh_signal_reaches_the_launcher_directly(stubs, sig, rc, start):
    tmp, env = stubs
    p = start(["bash", str(TORCHRUN_SH)], env)
    wait_for(tmp / "harness.started")
    os.kill(p.pid, sig)   # exec: the script's pid is the launcher's
    assert p.wait(timeout=30) == rc, p.stdout.read()
    assert signals_seen(tmp) == [sig.name[3:]]


# --- slurm.sbatch: requeue on retryable exits ----------------------------------------------------

def sbatch_env(env, **extra):
    return {**env, "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]",
            "SLURM_JOB_NUM_NODES": "2", "SLURM_SUBMIT_DIR": str(ROOT), **extra}


def requeued(tmp):
    log = tmp / "scontrol.log"
    return log.exists() and "requeue 4242" in log.read_text().splitlines()


def test_sbatch_usr1_checkpoints_and_requeues(stubs, start):
    tmp, env = stubs
    p = start(["bash", str(SBATCH), "--set", "train.max_steps=100"], sbatch_env(env))
    wait_for(tmp / "harness.started")
    os.kill(p.pid, signal.SIGUSR1)           # --signal=B:USR1: only the batch shell gets it
    out = p.communicate(timeout=30)[0]
    assert p.returncode == 138, out
    assert requeued(tmp), out
    assert signals_seen(tmp) == ["USR1"]     # exactly once: srun relays it, nobody else does
    args = shlex.split((tmp / "harness.args").read_text())
    assert args[0] == "launch" and has(args, "--nnodes", "2")
    assert has(args, "--rdzv-endpoint", "node1:29500") and has(args, "--rdzv-id", "4242")
    assert args[-2:] == ["--set", "train.max_steps=100"]


@pytest.mark.parametrize("mode,rc", [("done", 0), ("config", 2), ("storage", 3)])
def test_sbatch_does_not_requeue_success_or_permanent_failure(stubs, mode, rc, start):
    tmp, env = stubs
    p = start(["bash", str(SBATCH)], sbatch_env(env), STUB_MODE=mode)
    out = p.communicate(timeout=30)[0]
    assert p.returncode == rc, out
    assert not requeued(tmp), out


@pytest.mark.parametrize("restarts,again", [("0", True), ("2", False)])
def test_sbatch_requeues_exit_1_a_bounded_number_of_times(stubs, restarts, again, start):
    tmp, env = stubs
    p = start(["bash", str(SBATCH)], sbatch_env(env, SLURM_RESTART_COUNT=restarts), STUB_MODE="fail")
    out = p.communicate(timeout=30)[0]
    assert p.returncode == 1, out
    assert requeued(tmp) == again, out


def test_sbatch_does_not_requeue_after_scancel(stubs, start):
    tmp, env = stubs
    p = start(["bash", str(SBATCH)], sbatch_env(env))
    wait_for(tmp / "harness.started")
    wait_for(tmp / "srun.pid")
    # scancel: Slurm sends SIGTERM to the batch shell and to the step.
    os.kill(p.pid, signal.SIGTERM)
    os.kill(int((tmp / "srun.pid").read_text()), signal.SIGTERM)
    out = p.communicate(timeout=30)[0]
    assert p.returncode == 143, out
    assert not requeued(tmp), out
    assert signals_seen(tmp) == ["TERM"]
