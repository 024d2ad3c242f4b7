#!/usr/bin/env bash
# One torchrun worker of gpu_check's "two ranks on one GPU" part (benchmarks/gpu_check.py): both ranks train on
# cuda:0, and NCCL, which refuses two ranks on one device of one host, is given a distinct host id per rank
# (NCCL_HOSTID), so it connects them over sockets as if they were two machines. Arguments go to `harness train`.
set -euo pipefail
export NCCL_HOSTID="gpucheck-rank${RANK:-0}"
export LOCAL_RANK=0                       # the trainer's device is cuda:LOCAL_RANK: both ranks on the one GPU
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-lo}" GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
export NCCL_IB_DISABLE=1
exec "${PYTHON:-python}" -m harness train "$@"
