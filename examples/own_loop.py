"""Checkpointing your own training loop with harness.CheckpointManager (no built-in trainer).

Stop it at any moment and run it again: it resumes from the newest valid checkpoint, bit for bit."""
import random
import sys

import numpy as np
import torch

import harness


def main(max_steps: int = 300, ckpt_dir: str = "runs/own_loop/checkpoints") -> None:
    random.seed(0)  # seed every RNG a loop may use; a resumed run gets the saved states back
    np.random.seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100, gamma=0.5)
    data = torch.Generator().manual_seed(1)  # the data stream; its state is our position in the data
    mgr = harness.CheckpointManager(ckpt_dir, keep_last=2, keep_best=1, best_metric="loss", async_save=True)

    # Resume from the newest valid checkpoint (damaged ones are skipped); None on a first run.
    res = mgr.restore(models=model, optimizers=opt, schedulers=sched)
    step = 0
    if res is not None:
        step = res.step
        data.set_state(res.position)  # the data continues where the checkpoint left it: exact resume
        print(f"resumed from {res.name} at step {step}")

    while step < max_steps:
        x = torch.randn(32, 16, generator=data)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        mgr.before_mutation()  # an overlapped save's copy ran beside forward/backward: done before the step
        opt.step()
        sched.step()
        step += 1
        if step % 50 == 0 or step == max_steps:  # atomic, checksummed, RNG included; written in the background
            mgr.save(step, models=model, optimizers=opt, schedulers=sched, loss=loss.item(),
                     position=data.get_state(), overlap=True)  # returns at once: the copy overlaps the next step
    mgr.close()  # waits for a save in flight
    print(f"done at step {step}, newest checkpoint {mgr.latest()}")


if __name__ == "__main__":  # python examples/own_loop.py [MAX_STEPS] [CHECKPOINT_DIR]
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300, *sys.argv[2:3])
