"""Your own DDP training loop under torchrun, with harness.CheckpointManager and harness.StopSignals.

    torchrun --standalone --nproc-per-node 2 examples/own_loop_ddp.py [MAX_STEPS] [CHECKPOINT_DIR]

SIGTERM or SIGUSR1 (a scheduler's preemption notice; to torchrun, which passes it on, or to every process, as
SLURM does): every rank stops at the same step, commits a checkpoint and exits 128+N (torchrun itself exits 1).
Run the same command again: it resumes from that step and ends bit for bit where an uninterrupted run ends."""
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import harness


def main(max_steps: int = 2000, ckpt_dir: str = "runs/own_loop_ddp/checkpoints") -> int:
    dist.init_process_group("gloo")  # "nccl" on GPUs; before the manager (it is collective)
    rank = dist.get_rank()
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(),
                                                        torch.nn.Linear(64, 1)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=500, gamma=0.5)
    data = torch.Generator().manual_seed(1 + rank)  # each rank's own data stream; its state is its position
    mgr = harness.CheckpointManager(ckpt_dir, keep_last=2)
    mgr.hold_folder()  # one job per folder: one that another live job holds raises, naming it
    stop = harness.StopSignals()  # from here SIGTERM/SIGUSR1/SIGUSR2/SIGINT stop the loop at an agreed step

    res = mgr.restore(models=model, optimizers=opt, schedulers=sched)  # every rank; None on a first run
    step = saved = res.step if res is not None else 0
    if res is not None:
        data.set_state(res.position)  # this rank's own position, saved by this rank
        print(f"rank {rank}: resumed from {res.name} at step {step}", flush=True)

    while step < max_steps:
        x = torch.randn(32, 16, generator=data)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        stopping = stop.requested()  # every rank, every step: the same answer at the same step
        if stopping or step % 500 == 0 or step == max_steps:
            mgr.save(step, models=model, optimizers=opt, schedulers=sched, loss=loss.item(),
                     position=data.get_state())
            saved = step
        if stopping:
            print(f"rank {rank}: signal {stopping}: checkpoint of step {saved} committed", flush=True)
            break
    mgr.close()  # waits for a save in flight
    stop.close()
    dist.destroy_process_group()
    return stop.exit_code  # 0, or 128+N: a scheduler requeues the job and it resumes


if __name__ == "__main__":
    harness.dist.leave(main(*[int(a) for a in sys.argv[1:2]], *sys.argv[2:3]))
