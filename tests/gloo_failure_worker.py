"""Two real gloo ranks (spawned by tests/test_resource_failures.py); rank 1 dies (``die``) or stalls past the
group's timeout (``slow``), and rank 0 prints, as JSON, how harness classifies the exception its next
collective raises: the error a lost or stalled peer really produces, not one written by hand."""

import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run(rank: int, mode: str, port: int) -> None:
    from harness.checkpoint.errors import is_resource_error, problem_of
    from harness.exitcodes import classify

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=2))
    t = torch.ones(4)
    dist.all_reduce(t)
    if rank == 1:
        if mode == "slow":
            time.sleep(5)
        os._exit(0)
    try:
        for _ in range(3):
            dist.all_reduce(t)
        raise AssertionError("the collectives went through without the peer")
    except RuntimeError as exc:
        outcome = classify(exc)
        print(json.dumps({"type": type(exc).__name__, "message": str(exc)[:300], "resource": is_resource_error(exc),
                          "severity": problem_of(exc, 0).severity.value,
                          "code": outcome and outcome.code, "line": outcome and outcome.line}), flush=True)
    os._exit(0)


if __name__ == "__main__":
    mp.start_processes(run, args=(sys.argv[1], int(sys.argv[2])), nprocs=2, start_method="spawn", join=True)
