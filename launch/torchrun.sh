#!/usr/bin/env bash
# Run `harness launch` (torchrun's elastic agent, in-process) with its options taken from the environment:
# what Slurm (launch/slurm.sbatch) and the Kubeflow operator (PET_* variables) hand a node.
#
#   launch/torchrun.sh [--set section.key=value ...]              # one node, all local GPUs
#   NNODES=2 RDZV_ENDPOINT=node0:29500 RDZV_ID=job42 launch/torchrun.sh   # on every node
#
# Environment (defaults in brackets; see docs/launch.md):
#   CONFIG          config file                        [configs/quickstart.toml]
#   NNODES          nodes, "N" or elastic "MIN:MAX"     [$PET_NNODES or 1]
#   NPROC_PER_NODE  workers per node                    [$PET_NPROC_PER_NODE, else GPU count, else 2]
#   RDZV_ENDPOINT   host:port of the c10d rendezvous    [$PET_RDZV_ENDPOINT or 127.0.0.1:29500]
#   RDZV_ID         job id shared by all nodes          [$PET_RDZV_ID or harness]
#   MAX_RESTARTS    worker-group restarts by the agent  [$PET_MAX_RESTARTS or 3]
#   HARNESS         the harness command                 [harness if on PATH, else python3 -m harness]
#   HARNESS_LAUNCH_DRY_RUN=1  print the command and exit 0 without running it
#
# The script `exec`s `harness launch`, so its exit code is the contract (docs/launch.md): 0 finished;
# 128+N stopped by signal N after committing a checkpoint (retry: it resumes); 2 config error and 3
# storage/checkpoints unusable (do not retry); 1 anything else after the agent's restarts (retry a bounded
# number of times). Signals go straight to the launcher, which hands the first one to the agent.
set -euo pipefail

CONFIG="${CONFIG:-configs/quickstart.toml}"
NNODES="${NNODES:-${PET_NNODES:-1}}"
MAX_RESTARTS="${MAX_RESTARTS:-${PET_MAX_RESTARTS:-3}}"
RDZV_ID="${RDZV_ID:-${PET_RDZV_ID:-harness}}"

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

if [[ -n "${HARNESS:-}" ]]; then
    read -r -a cmd <<< "$HARNESS"
elif command -v harness >/dev/null 2>&1; then
    cmd=(harness)
else
    cmd=("${PYTHON:-python3}" -m harness)
fi
cmd+=(launch --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --max-restarts "$MAX_RESTARTS")
if [[ "$NNODES" != 1 || "$rdzv_explicit" == 1 ]]; then
    cmd+=(--rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID")
fi
cmd+=(--config "$CONFIG" "$@")

# Print the command, shell-quoted only where needed (printf %q alone also escapes commas).
for arg in "${cmd[@]}"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then printf '%s ' "$arg"; else printf '%q ' "$arg"; fi
done
printf '\n'
if [[ "${HARNESS_LAUNCH_DRY_RUN:-0}" == 1 ]]; then
    exit 0
fi
exec "${cmd[@]}"
