#!/usr/bin/env bash
# Launch `harness train` under torchrun, on one node (standalone) or many (c10d rendezvous).
#
#   launch/torchrun.sh [--set section.key=value ...]              # one node, all local GPUs
#   NNODES=2 RDZV_ENDPOINT=node0:29500 RDZV_ID=job42 launch/torchrun.sh   # on every node
#
# Environment (defaults in brackets; see docs/launch.md):
#   CONFIG          config file                        [configs/quickstart.toml]
#   NNODES          nodes, "N" or elastic "MIN:MAX"     [$PET_NNODES or 1]
#   NPROC_PER_NODE  workers per node                    [$PET_NPROC_PER_NODE, else GPU count, else 2]
#   NODE_RANK       passed as --node-rank if set (c10d ignores it: ranks come from the rendezvous)
#   RDZV_ENDPOINT   host:port of the c10d rendezvous    [$PET_RDZV_ENDPOINT or 127.0.0.1:29500]
#   RDZV_ID         job id shared by all nodes          [$PET_RDZV_ID or harness]
#   MAX_RESTARTS    worker-group restarts by torchrun   [$PET_MAX_RESTARTS or 3]
#   FORWARD_SIGNALS 1: forward SIGTERM/SIGINT/SIGUSR1 to torchrun; 0: torchrun gets them itself
#                   [0 inside a Slurm step (Slurm signals every process of the step), else 1]
#   TORCHRUN        torchrun executable                 [torchrun]
#   HARNESS_LAUNCH_DRY_RUN=1  print the command and exit 0 without running it
# The PET_* fallbacks are what the Kubeflow training operator sets in PyTorchJob pods.
#
# Exit code: 0 when training finished; 128+N when signal N stopped it (a checkpoint was
# committed: retryable, restart = resume); 1..127 otherwise (permanent, e.g. config error).
# This script does not `exec` torchrun on purpose: torchrun itself exits 1 whenever it is
# stopped by a signal (it re-raises SignalException), which would turn every preemption into a
# "permanent" failure. So torchrun runs as a child, we pass the signal on exactly once (a second
# signal makes torchrun abandon its graceful shutdown and exit while workers are still saving),
# and we exit with 128+N ourselves.
set -euo pipefail

CONFIG="${CONFIG:-configs/quickstart.toml}"
NNODES="${NNODES:-${PET_NNODES:-1}}"
MAX_RESTARTS="${MAX_RESTARTS:-${PET_MAX_RESTARTS:-3}}"
RDZV_ID="${RDZV_ID:-${PET_RDZV_ID:-harness}}"
TORCHRUN="${TORCHRUN:-torchrun}"
# torchrun >= 2.x shares one TCP store across worker restarts without separating each attempt's keys, so a
# restarted worker can pick up its peer's address from the previous attempt and hang while connecting
# (seen with --max-restarts on torch 2.13, cf. pytorch/pytorch#135712). A store per attempt avoids it.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"

# An explicitly given endpoint means "rendezvous", even with NNODES=1 (e.g. elastic 1 node).
rdzv_explicit=0
if [[ -n "${RDZV_ENDPOINT:-}" || -n "${PET_RDZV_ENDPOINT:-}" ]]; then
    rdzv_explicit=1
fi
RDZV_ENDPOINT="${RDZV_ENDPOINT:-${PET_RDZV_ENDPOINT:-127.0.0.1:29500}}"

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE="${PET_NPROC_PER_NODE:-}"
fi
if [[ -z "$NPROC_PER_NODE" ]]; then
    # `nvidia-smi -L` prints one "GPU i: ..." line per visible GPU; no nvidia-smi -> 0.
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
    if [[ "${gpus:-0}" =~ ^[0-9]+$ ]] && (( gpus > 0 )); then
        NPROC_PER_NODE="$gpus"
    else
        NPROC_PER_NODE=2
    fi
fi

if [[ ! "$NNODES" =~ ^[0-9]+(:[0-9]+)?$ ]]; then
    echo "torchrun.sh: NNODES must be N or MIN:MAX, got '$NNODES'" >&2
    exit 2
fi
if [[ ! "$MAX_RESTARTS" =~ ^[0-9]+$ ]]; then
    echo "torchrun.sh: MAX_RESTARTS must be a non-negative integer, got '$MAX_RESTARTS'" >&2
    exit 2
fi

# --signals-to-handle only exists in newer torch; probe the help text instead of the version.
# (Captured into a variable: `torchrun --help | grep -q` could SIGPIPE torchrun under pipefail.)
signals_supported=0
help_text="$("$TORCHRUN" --help 2>&1 || true)"
if [[ "$help_text" == *--signals-to-handle* ]]; then
    signals_supported=1
fi

cmd=("$TORCHRUN" --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE")
if [[ "$NNODES" != 1 || "$rdzv_explicit" == 1 ]]; then
    cmd+=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID")
    if [[ -n "${NODE_RANK:-}" ]]; then
        cmd+=(--node-rank "$NODE_RANK")
    fi
else
    cmd+=(--standalone)
fi
cmd+=(--max-restarts "$MAX_RESTARTS")
if [[ "$signals_supported" == 1 ]]; then
    cmd+=(--signals-to-handle SIGTERM,SIGINT,SIGUSR1)
fi
cmd+=(-m harness train --config "$CONFIG" "$@")

# Print the command, shell-quoted only where needed (printf %q alone also escapes commas).
for arg in "${cmd[@]}"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then printf '%s ' "$arg"; else printf '%q ' "$arg"; fi
done
printf '\n'
if [[ "${HARNESS_LAUNCH_DRY_RUN:-0}" == 1 ]]; then
    exit 0
fi

if [[ -z "${FORWARD_SIGNALS:-}" ]]; then
    # Inside an srun step Slurm delivers a signal to every process of the step (torchrun
    # included), so forwarding as well would hand torchrun the signal twice.
    if [[ -n "${SLURM_STEP_ID:-}" ]]; then FORWARD_SIGNALS=0; else FORWARD_SIGNALS=1; fi
fi

received=""   # name of the first signal we got (TERM, INT or USR1)
child=""
forward() {   # forward "$received" to torchrun; $1=1 forces it even when FORWARD_SIGNALS=0
    local to="$received"
    # Old torchrun cannot handle SIGUSR1 (it was started with it ignored, below): ask it to
    # stop with SIGTERM, which it turns into a graceful shutdown of the workers.
    if [[ "$received" == USR1 && "$signals_supported" == 0 ]]; then
        to=TERM
    elif [[ "$FORWARD_SIGNALS" != 1 && "$1" != 1 ]]; then
        return 0
    fi
    echo "torchrun.sh: got SIG$received, sending SIG$to to torchrun (pid $child)" >&2
    kill -s "$to" "$child" 2>/dev/null || true
}
on_signal() {
    if [[ -n "$received" ]]; then
        echo "torchrun.sh: got SIG$1 while stopping on SIG$received; not forwarding it" >&2
        return 0
    fi
    received="$1"
    if [[ -n "$child" ]]; then forward 0; fi
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal USR1' USR1

if [[ "$FORWARD_SIGNALS" == 1 ]]; then
    # Own process group: signals sent to our group (Ctrl-C in a terminal, kill -- -PGID) reach
    # torchrun only through on_signal, i.e. once.
    set -m
fi
if [[ "$signals_supported" == 1 ]]; then
    "${cmd[@]}" &
else
    # Without --signals-to-handle, SIGUSR1's default action would kill torchrun at once and
    # orphan the workers mid-save; an ignored signal stays ignored across exec. The workers
    # still get SIGUSR1 because the harness installs its own handler for it.
    (trap '' USR1; exec "${cmd[@]}") &
fi
child=$!
set +m   # (only needed for the line above; also silences job-status notices)
if [[ -n "$received" ]]; then
    forward 1   # the signal came before torchrun existed, so nobody else delivered it
fi

# `wait` returns early (status > 128) whenever a trapped signal arrives; keep waiting until
# torchrun itself has exited.
while :; do
    rc=0
    wait "$child" || rc=$?
    if (( rc > 128 )) && kill -0 "$child" 2>/dev/null; then
        continue
    fi
    break
done

if (( rc != 0 )) && [[ -n "$received" ]]; then
    rc=$(( 128 + $(kill -l "$received") ))
    echo "torchrun.sh: stopped by SIG$received; exiting $rc (retryable: restart resumes)" >&2
fi
exit "$rc"
